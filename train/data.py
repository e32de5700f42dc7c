"""Datasets held in memory as one uint8 tensor, and the loaders over them.

Every dataset becomes the same thing: `images` (N, 3, H, W) uint8 and `labels` (N,) int64
per split, plus the class names. Decoded datasets (CIFAR-10, image folders) are cached as
.npy files and memory-mapped, so the ranks of a node share one copy in the page cache.
A batch is one tensor index, `images[indices]`; `train/augment.py` turns it into the model's
input on the training device.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import pickle
import shutil
import socket
import stat
import tarfile
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from train import atomic, cli
from train.cli import UserError
from train.config import DataConfig

try:  # numpy 2; what CIFAR-10's pickles call numpy.core.multiarray._reconstruct
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct

# Per-channel statistics of the CIFAR-10 training set, in [0, 1] units.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's ImageNet weights expect these
# data.normalize -> (mean, std) in [0, 1] units; `none` is the seed's ToTensor() alone (mean 0, std 1)
NORMALISATIONS = {
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}
# torchvision's CIFAR10 class names in label order (batches.meta's label_names): what the seed's models predict.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch",)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


@dataclass
class Split:
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Datasets:
    train: Split
    test: Split
    classes: list[str]
    notes: list[str] = field(default_factory=list)  # warnings for the run's log: a damaged cache rebuilt, ...

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]

    def identity(self) -> dict:
        """What a checkpoint records of its training data: the classes, the split sizes and a digest of the labels.

        Labels, not pixels: the same dataset moved to another folder, or decoded by another Pillow, is the same data.
        """
        h = hashlib.sha256()
        for split in (self.train, self.test):
            h.update(split.labels.cpu().numpy().astype("<i8").tobytes())
        return {"classes": list(self.classes), "train": len(self.train), "test": len(self.test), "labels": h.hexdigest()[:16]}


# ---------------------------------------------------------------------------- loading


def load(cfg: DataConfig, dist) -> Datasets:
    """The configured dataset; files are prepared once per node, then memory-mapped by every rank.

    On a GPU the training split moves to the device: a batch is then one index into GPU memory,
    with no host-to-device copy per step.
    """
    notes: list[str] = []
    if cfg.name == "synthetic":
        try:
            datasets = synthetic(cfg.synthetic_train, cfg.synthetic_test, cfg.synthetic_classes, cfg.synthetic_seed)
        except MemoryError as e:  # numpy's "Unable to allocate 7.28 TiB ..."
            raise UserError(
                f"data.synthetic_train={cfg.synthetic_train} and data.synthetic_test={cfg.synthetic_test} images "
                f"do not fit in memory ({e}); ask for fewer"
            ) from None
    else:
        prepare = _cifar10_cache if cfg.name == "cifar10" else _imagefolder_cache
        first = dist.local_rank == 0  # checks (and builds) the node's cache; the other ranks then only find it
        datasets = _open_cache(dist.once_per_node(lambda: prepare(cfg, notes, check=first)))
    datasets.notes = notes
    if dist.device.type == "cuda":
        datasets.train = Split(datasets.train.images.to(dist.device), datasets.train.labels.to(dist.device))
    return datasets


def batch_per_rank(batch_size: int, n_train: int, world_size: int) -> int:
    """The per-rank share of the global batch, or a UserError when it cannot be split or is too large."""
    if batch_size % world_size:
        raise UserError(
            f"train.batch_size={batch_size} is not divisible by the {world_size} ranks; "
            f"use a multiple of {world_size} (it is the global batch, split evenly across ranks)"
        )
    per_rank = batch_size // world_size
    if steps_per_epoch(n_train, per_rank, world_size) == 0:
        raise UserError(
            f"train.batch_size={batch_size} is larger than the {n_train} training images "
            f"(per rank: {n_train // world_size}); lower train.batch_size"
        )
    return per_rank


# ---------------------------------------------------------------------------- the decoded-dataset cache
# <cache_dir>/<name>-<key>/: one .npy file per array and meta.json ({"classes", "files": {file: sha256}}).
# The key is made from the source files (path, size, mtime), so changed sources get a new folder.

CACHE_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def _cached(folder: Path, decode, notes: list[str], check: bool) -> Path:
    """`folder`, written from `decode()` (arrays, classes) when missing. When `check`, each file is compared with
    its digest first: a truncated or altered cache is rebuilt with a warning in `notes`, never trained on."""
    if folder.exists():
        problem = _cache_problem(folder) if check else None
        if problem is None:
            return folder
        notes.append(f"the dataset cache {folder} cannot be trusted ({problem}); rebuilt it from the source files")
        aside = folder.with_name(f".{folder.name}.damaged.{os.getpid()}")
        with contextlib.suppress(OSError):  # another node sharing the cache may have moved it first
            os.rename(folder, aside)
        shutil.rmtree(aside, ignore_errors=True)
    arrays, classes = decode()
    _write_cache(folder, arrays, classes)
    return folder


def _cache_problem(folder: Path) -> str | None:
    """What is wrong with a cache folder, or None when every file matches the digest written with it."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as e:
        return f"meta.json unreadable ({type(e).__name__})"
    digests = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(digests, dict):
        return "meta.json has no digests: an older version wrote it"
    for name in CACHE_ARRAYS:
        try:
            with open(folder / f"{name}.npy", "rb") as f:
                found = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as e:
            return f"{name}.npy: {e.strerror or e}"
        if found != digests.get(f"{name}.npy"):
            return f"{name}.npy does not match the digest written with it"
    return None


def _open_cache(folder: Path) -> Datasets:
    # mmap_mode="c": pages come from the page cache, shared by all ranks; copy-on-write keeps the
    # array writable for torch.from_numpy without ever writing the file.
    def array(name):
        return torch.from_numpy(np.load(folder / f"{name}.npy", mmap_mode="c"))

    meta = json.loads((folder / "meta.json").read_text())
    return Datasets(
        train=Split(array("train_images"), array("train_labels")),
        test=Split(array("test_images"), array("test_labels")),
        classes=meta["classes"],
    )


def _write_cache(folder: Path, arrays: dict[str, np.ndarray], classes: list[str]) -> None:
    """Write the cache folder atomically: a temporary sibling, then one rename; the digest of every file in meta.json."""
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        digests = {}
        for name in CACHE_ARRAYS:
            np.save(tmp / f"{name}.npy", arrays[name])
            with open(tmp / f"{name}.npy", "rb") as f:
                digests[f"{name}.npy"] = hashlib.file_digest(f, "sha256").hexdigest()
        (tmp / "meta.json").write_text(json.dumps({"classes": classes, "files": digests}))
        os.rename(tmp, folder)
    except OSError as e:
        if not folder.is_dir():  # else another node sharing this folder has won the race
            raise UserError(
                f"cannot write the dataset cache in {folder.parent} ({atomic.unusable(folder.parent, e)}); "
                f"set data.cache_dir to a writable folder with room for it"
            ) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _files_fingerprint(files: list[Path], *extra) -> str:
    def entry(f: Path):
        try:
            found = f.stat()
        except OSError as e:  # a broken link or a symlink loop
            raise UserError(f"{f} cannot be read ({e.strerror or e}); remove or replace it") from None
        return str(f.resolve()), found.st_size, found.st_mtime_ns

    return _fingerprint([entry(f) for f in files], *extra)


def _cache_root(cfg: DataConfig) -> Path:
    return Path(os.path.expanduser(cfg.cache_dir))


# ---------------------------------------------------------------------------- CIFAR-10


def cifar10_folder(
    root: str | Path, download: bool, verify: bool = True, spare: Path | None = None, notes: list[str] | None = None
) -> Path:
    """The `cifar-10-batches-py` folder: under `root` (or `spare`), extracted from the archive, or downloaded.

    The archive is extracted, and downloaded, into `root`, or into `spare` (the cache folder) when
    `root` is not writable (a line in `notes` says so). A local archive's MD5 is checked first unless
    `verify` is False (an archive the user repacked). The archive is never deleted, whatever goes wrong.
    """
    root = Path(os.path.expanduser(root))
    for folder in (root / CIFAR10_FOLDER, root, *([spare / CIFAR10_FOLDER] if spare else [])):
        if _complete(folder):
            return folder
    target = root if spare is None or _writable(root) else spare
    if target != root and notes is not None:
        notes.append(f"data.root {root} is not writable: CIFAR-10 goes to {spare / CIFAR10_FOLDER} instead")
    archive = root / CIFAR10_ARCHIVE
    if archive.is_file():
        if verify:
            _check_md5(archive)
        return _extract(archive, target)
    if download:
        return _extract(_download(target), target)
    raise UserError(
        f"CIFAR-10 is not in {root}/{CIFAR10_FOLDER}; put {CIFAR10_ARCHIVE} (from {CIFAR10_URL}) "
        f"or its extracted {CIFAR10_FOLDER}/ folder in {root}/, set data.download=true to fetch it, "
        f"or run without it: data.name=synthetic"
    )


def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES)


def _writable(folder: Path) -> bool:
    """`folder` exists (or can be made) and this process may create files in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def _check_md5(archive: Path) -> None:
    try:
        with open(archive, "rb") as f:
            found = hashlib.file_digest(f, "md5").hexdigest()
    except OSError as e:
        raise UserError(f"cannot read {archive} ({e.strerror or e}); make it readable or replace it") from None
    if found != CIFAR10_MD5:
        raise UserError(
            f"{archive} is not the official CIFAR-10 archive (MD5 {found}, expected {CIFAR10_MD5}: truncated or altered?); "
            f"replace it with a good copy from {CIFAR10_URL} (or delete it and set data.download=true), "
            f"or set data.verify=false for an archive you repacked yourself"
        )


def _download(target: Path) -> Path:
    """The official archive, fetched into `target` under a temporary name and renamed when its MD5 is right."""
    from torchvision.datasets import utils as tv_utils  # torchvision is slow to import; only needed here

    partial = f".{CIFAR10_ARCHIVE}.part"
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)  # urllib has no timeout of its own: a silent network must not hang the job
    try:
        tv_utils.download_url(CIFAR10_URL, str(target), filename=partial, md5=CIFAR10_MD5)
        os.replace(target / partial, target / CIFAR10_ARCHIVE)
    except Exception as e:  # URLError, OSError, RuntimeError("File not found or corrupted.")
        (target / partial).unlink(missing_ok=True)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"CIFAR-10 is not in {target}/{CIFAR10_FOLDER} and the download failed ({reason}); "
            f"put {CIFAR10_ARCHIVE} (from {CIFAR10_URL}) or its extracted {CIFAR10_FOLDER}/ folder there, "
            f"or run without it: data.name=synthetic"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return target / CIFAR10_ARCHIVE


def _plain_member(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """tarfile's "data" filter (nothing outside `dest`), and only files and folders with relative names:
    CIFAR-10's archive holds no links, devices or absolute names."""
    if not (member.isfile() or member.isdir()):
        raise tarfile.FilterError(f"{member.name!r} is a link or a device")
    if os.path.isabs(member.name):  # the data filter would strip the "/" and extract it inside: refuse it instead
        raise tarfile.FilterError(f"{member.name!r} has an absolute path")
    return tarfile.data_filter(member, dest)


def _extract(archive: Path, into: Path) -> Path:
    """Extract the archive into a temporary folder beside `into/cifar-10-batches-py`, moved into place when
    complete; on any failure only that temporary folder is removed, the archive is kept."""
    dest = into / CIFAR10_FOLDER
    if _complete(dest):  # extracted by another node sharing this folder, since the caller looked
        return dest
    if dest.exists():
        raise UserError(
            f"{dest} is incomplete (CIFAR-10 needs {', '.join(CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES)}); "
            f"move it away so that {archive} can be extracted there"
        )
    try:
        into.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{CIFAR10_FOLDER}.extract.", dir=into))
    except OSError as e:
        raise UserError(
            f"cannot extract {archive} into {into} ({atomic.unusable(into, e)}); make it writable or set data.cache_dir "
            f"to a writable folder"
        ) from None
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter=_plain_member)
        missing = [f for f in CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES if not (tmp / CIFAR10_FOLDER / f).is_file()]
        if missing:
            raise UserError(f"{archive} lacks {CIFAR10_FOLDER}/{missing[0]}; it is not CIFAR-10's python version ({CIFAR10_URL})")
        try:
            os.rename(tmp / CIFAR10_FOLDER, dest)
        except OSError:
            if not _complete(dest):  # else another node sharing this folder extracted it first
                raise
    except tarfile.FilterError as e:
        raise UserError(
            f"{archive} is refused: member {e}; nothing extracted from it was kept. "
            f"Replace it with the official archive from {CIFAR10_URL}"
        ) from None
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        if isinstance(e, OSError) and e.strerror:
            reason = e.strerror  # No space left on device, ...
        elif isinstance(e, tarfile.ReadError):
            reason = "not a readable .tar.gz: truncated or damaged?"
        else:
            reason = next(iter(str(e).splitlines()), "") or type(e).__name__
        raise UserError(
            f"cannot extract {archive} ({reason}); its partial output is removed and the archive is kept: "
            f"free space, or replace a damaged archive with a good copy from {CIFAR10_URL}"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


class _Refused(Exception):
    pass


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR-10's files: dicts, lists, strings and numpy arrays, and nothing that runs code.

    A pickle names the functions it calls; these are all the files need (Python 2's cPickle
    wrote numpy.core.multiarray, numpy 2 writes numpy._core; Python 3's protocol 2 spells bytes
    as _codecs.encode(str, 'latin1')). Any other name is refused before anything is called.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None


def _unpickle(path: Path):
    """A CIFAR-10 pickle, read with `_CifarUnpickler`, or a UserError naming the file."""
    try:
        with open(path, "rb") as f:
            # Python-2 pickles: latin1 gives str keys and numpy arrays back
            return _CifarUnpickler(f, encoding="latin1").load()
    except _Refused as e:
        raise UserError(
            f"CIFAR-10 file {path} calls {e}, which CIFAR-10 files never do; refusing to load it (it could run code): "
            f"replace it with the official file"
        ) from None
    except Exception as e:  # pickle raises many types for a damaged file
        raise UserError(
            f"CIFAR-10 file {path} cannot be read ({type(e).__name__}: {e}); replace it with the official file"
        ) from None


def _read_batch(path: Path, classes: list[str], named_by: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 pickle: (N, 3, 32, 32) uint8 images and (N,) int64 labels in [0, len(classes)).

    `named_by` says where the class names came from, for the error line.
    """
    entry = _unpickle(path)
    try:
        data = entry["data"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.size % 3072:
            raise ValueError(f"'data' is not uint8 rows of 3072 values: {getattr(data, 'dtype', type(data).__name__)}")
        labels = np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"], dtype=np.int64)
        data = data.reshape(-1, 3, 32, 32)
    except Exception as e:  # a dict without these entries, or not a dict at all
        raise UserError(
            f"CIFAR-10 file {path} cannot be read ({type(e).__name__}: {e}); replace it with the official file"
        ) from None
    if len(data) != len(labels):
        raise UserError(
            f"CIFAR-10 file {path} holds {len(data)} images but {len(labels)} labels; replace it with the official file"
        )
    bad = labels[(labels < 0) | (labels >= len(classes))]
    if len(bad):
        raise UserError(
            f"CIFAR-10 file {path} has label {bad[0]}, but {named_by} {len(classes)} classes (labels 0 to "
            f"{len(classes) - 1}); replace it with the official file"
        )
    return data, labels


def _read_classes(folder: Path) -> list[str]:
    meta = folder / "batches.meta"
    if not meta.is_file():
        return list(CIFAR10_CLASSES)
    entry = _unpickle(meta)
    names = entry.get("label_names") if isinstance(entry, dict) else None
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
        raise UserError(f"CIFAR-10 file {meta} has no list of class names ('label_names'); replace it with the official file")
    return names


def read_cifar10(folder: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    classes = _read_classes(folder)
    named_by = f"{folder / 'batches.meta'} names" if (folder / "batches.meta").is_file() else "CIFAR-10 has"
    arrays = {}
    for split, files in (("train", CIFAR10_TRAIN_FILES), ("test", CIFAR10_TEST_FILES)):
        batches = [_read_batch(folder / f, classes, named_by) for f in files]
        arrays[f"{split}_images"] = np.concatenate([b[0] for b in batches])
        arrays[f"{split}_labels"] = np.concatenate([b[1] for b in batches])
    return arrays, classes


def _cifar10_cache(cfg: DataConfig, notes: list[str], check: bool) -> Path:
    cache_root = _cache_root(cfg)
    folder = cifar10_folder(cfg.root, cfg.download, cfg.verify, cache_root, notes)
    files = [folder / f for f in CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES]
    return _cached(cache_root / f"cifar10-{_files_fingerprint(files)}", lambda: read_cifar10(folder), notes, check)


# ---------------------------------------------------------------------------- image folders


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: alpha dropped (as the seed's convert('RGB')), 16-bit scaled, CMYK converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: PIL's convert would clip at 255; scale the real range to 8 bits.
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        image = Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL's advice for palette transparency; the alpha is then dropped
    return image.convert("RGB")


def read_image(path: Path, size: int) -> np.ndarray:
    """(3, size, size) uint8 from an image file of any mode and size, or a UserError naming the file.

    Only regular files are opened (a FIFO or a device would block or never end), and an image larger
    than PIL's decompression-bomb limit (MAX_IMAGE_PIXELS, about 89 million pixels) is refused, not decoded.
    """
    try:
        regular = stat.S_ISREG(path.stat().st_mode)
    except OSError as e:  # missing, a symlink loop, no permission
        raise UserError(f"image {path} cannot be read ({e.strerror or e}); remove or replace the file") from None
    if not regular:
        raise UserError(f"image {path} is not a regular file (a folder, FIFO or device); give image files only")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                rgb = to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"image {path} is refused: {str(e).rstrip('.')}; shrink it or remove it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"image {path} cannot be read ({type(e).__name__}: {e}); remove or replace the file") from None
    rgb = rgb.resize((size, size), Image.BILINEAR)  # the seed's transforms.Resize((32, 32)) on a PIL image
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).copy()


def visible_entries(folder: Path) -> list[Path]:
    """The entries of `folder` a user sees, sorted: hidden ones (`.ipynb_checkpoints`, macOS's `._0.png`) left out."""
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as e:
        raise UserError(f"cannot list {folder} ({e.strerror or e})") from None


def _folder_listing(split_dir: Path, classes: list[str] | None) -> tuple[list[tuple[Path, int]], list[str]]:
    if not split_dir.is_dir():
        raise UserError(f"image folder {split_dir} not found; data.root must hold train/<class>/*.png and test/<class>/*.png")
    found = [d.name for d in visible_entries(split_dir) if d.is_dir()]
    classes = classes or found
    if not classes:
        raise UserError(f"image folder {split_dir} has no class folders; expected {split_dir}/<class>/<image>")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UserError(f"{split_dir} has classes not in train/: {', '.join(unknown)}; every test class needs training images")
    items = []
    for label, name in enumerate(classes):
        if not (split_dir / name).is_dir():
            continue  # a class without test images
        images = [p for p in visible_entries(split_dir / name) if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not images:
            raise UserError(
                f"class folder {split_dir / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add some or remove the folder"
            )
        items += [(p, label) for p in images]
    return items, classes


def _imagefolder_cache(cfg: DataConfig, notes: list[str], check: bool) -> Path:
    root = Path(os.path.expanduser(cfg.root))
    train_items, classes = _folder_listing(root / "train", None)
    test_items, _ = _folder_listing(root / "test", classes)
    key = _files_fingerprint([p for p, _ in train_items + test_items], cfg.image_size, classes)

    def decode():
        arrays = {}
        for split, items in (("train", train_items), ("test", test_items)):
            arrays[f"{split}_images"] = np.stack([read_image(p, cfg.image_size) for p, _ in items])
            arrays[f"{split}_labels"] = np.array([label for _, label in items], dtype=np.int64)
        return arrays, classes

    return _cached(_cache_root(cfg) / f"imagefolder-{key}", decode, notes, check)


# ---------------------------------------------------------------------------- synthetic


def synthetic(n_train: int, n_test: int, n_classes: int = 10, seed: int = 0, size: int = 32) -> Datasets:
    """A learnable dataset, the same for the same seed: one smooth colour pattern per class, plus noise.

    Each image is its class pattern at a random contrast, shifted by a few pixels, with
    per-pixel noise: a small CNN learns it in a few epochs, yet the first epoch is far from perfect.
    """
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(-1.0, 1.0, size=(n_classes, 3, 4, 4))
    patterns = np.kron(coarse, np.ones((1, 1, size // 4, size // 4)))  # (C, 3, size, size), blocks of 8x8

    def split(n):
        labels = rng.permutation(np.arange(n) % n_classes)
        contrast = rng.uniform(20.0, 60.0, size=(n, 1, 1, 1))
        images = 128.0 + contrast * patterns[labels] + rng.normal(0.0, 70.0, size=(n, 3, size, size))
        shifts = rng.integers(-3, 4, size=(n, 2))
        for i, (dy, dx) in enumerate(shifts):
            images[i] = np.roll(images[i], (dy, dx), axis=(1, 2))
        return Split(torch.from_numpy(np.clip(images, 0, 255).astype(np.uint8)), torch.from_numpy(labels.astype(np.int64)))

    train, test = split(n_train), split(n_test)
    return Datasets(train=train, test=test, classes=[f"class_{i}" for i in range(n_classes)])


# ---------------------------------------------------------------------------- loaders


class _Batches(Dataset):
    """A dataset whose items are whole batches: `ds[index_tensor]` is one tensor index.

    A batch is (images, labels, indices): the indices (positions in the split) key the batch's random draws.
    """

    def __init__(self, split: Split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: torch.Tensor):  # on the split's device already (_IndexBatches)
        return self.split.images[index], self.split.labels[index], index


class _IndexBatches:
    """Batches of indices as tensor slices: the sample order is turned into one tensor per epoch,
    so no Python code runs per sample in the training loop. `skip` leaves out the batches a resumed
    run has already trained on."""

    def __init__(self, order, size: int, drop_last: bool, skip: int = 0, device: torch.device | None = None):
        self.order, self.size, self.drop_last, self.skip, self.device = order, size, drop_last, skip, device

    def __len__(self) -> int:
        n = len(self.order)
        return max(0, (n // self.size if self.drop_last else -(-n // self.size)) - self.skip)

    def __iter__(self):
        # one host-to-device copy per epoch when the data lives on a GPU, none per step
        order = torch.as_tensor(list(self.order), dtype=torch.long).to(self.device)
        for i in range(self.skip, self.skip + len(self)):
            yield order[i * self.size : (i + 1) * self.size]


def train_loader(
    split: Split, batch_per_rank: int, rank: int, world_size: int, seed: int, epoch: int, skip: int = 0, workers: int = 0
) -> DataLoader:
    """This rank's batches of one epoch, less the first `skip` (a resumed epoch): shuffled by (seed, epoch),
    split across ranks, full batches only."""
    sampler = DistributedSampler(split, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return _loader(split, sampler, batch_per_rank, drop_last=True, skip=skip, workers=workers)


def steps_per_epoch(n: int, batch_per_rank: int, world_size: int) -> int:
    return (n // world_size) // batch_per_rank


def eval_loader(split: Split, batch_per_rank: int, rank: int, world_size: int, workers: int = 0) -> DataLoader:
    """This rank's contiguous share of the test set: every sample exactly once across ranks, no padding.

    The set is cut into chunks of `batch_per_rank` images from its start and each rank takes whole
    chunks, so a batch holds the same images on any number of ranks (the bitwise mode needs that).
    """
    n = len(split)
    chunks = -(-n // batch_per_rank)
    first, end = chunks * rank // world_size, chunks * (rank + 1) // world_size  # this rank's chunks
    share = range(min(n, first * batch_per_rank), min(n, end * batch_per_rank))
    return _loader(split, share, batch_per_rank, drop_last=False, skip=0, workers=workers)


def _loader(split: Split, order, size: int, drop_last: bool, skip: int, workers: int) -> DataLoader:
    if split.images.is_cuda:
        workers = 0  # the batches are GPU tensor slices already; forked workers cannot touch CUDA tensors
    batches = _IndexBatches(order, size, drop_last, skip, device=split.images.device)
    # workers ignore the stop signals SLURM sends to every process of the job: the main process saves
    return DataLoader(
        _Batches(split), sampler=batches, batch_size=None, num_workers=workers, worker_init_fn=cli.ignore_stop_signals
    )
