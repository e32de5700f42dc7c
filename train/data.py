"""Datasets held in memory as one uint8 tensor, and the loaders over them.

Every dataset becomes the same thing: `images` (N, 3, H, W) uint8 and `labels` (N,) int64
per split, plus the class names. Decoded datasets (CIFAR-10, image folders) are cached as
.npy files and memory-mapped, so the ranks of a node share one copy in the page cache.
A batch is one tensor index, `images[indices]`; `train/augment.py` turns it into the model's
input on the training device.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from train.cli import UserError
from train.config import DataConfig

# Per-channel statistics of the CIFAR-10 training set, in [0, 1] units.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
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

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]


# ---------------------------------------------------------------------------- loading


def load(cfg: DataConfig, dist) -> Datasets:
    """The configured dataset; files are prepared once per node, then memory-mapped by every rank.

    On a GPU the training split moves to the device: a batch is then one index into GPU memory,
    with no host-to-device copy per step.
    """
    if cfg.name == "synthetic":
        datasets = synthetic(cfg.synthetic_train, cfg.synthetic_test, cfg.synthetic_classes, cfg.synthetic_seed)
    else:
        prepare = _cifar10_cache if cfg.name == "cifar10" else _imagefolder_cache
        datasets = _open_cache(dist.once_per_node(lambda: prepare(cfg)))
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
    """Write the cache folder atomically: a temporary sibling, then one rename."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", arr)
        (tmp / "meta.json").write_text(json.dumps({"classes": classes}))
        os.rename(tmp, folder)
    except OSError:
        if not folder.is_dir():  # another node sharing this folder may have won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _files_fingerprint(files: list[Path], *extra) -> str:
    return _fingerprint([(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files], *extra)


def _cache_root(cfg: DataConfig) -> Path:
    return Path(os.path.expanduser(cfg.cache_dir))


# ---------------------------------------------------------------------------- CIFAR-10


def cifar10_folder(root: str | Path, download: bool) -> Path:
    """The `cifar-10-batches-py` folder under `root`: present, extracted from the archive, or downloaded."""
    root = Path(os.path.expanduser(root))
    for folder in (root / CIFAR10_FOLDER, root):
        if all((folder / f).is_file() for f in CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES):
            return folder
    archive = root / CIFAR10_ARCHIVE
    from torchvision.datasets import utils as tv_utils  # torchvision is slow to import; only needed here

    if archive.is_file():
        try:
            tv_utils.extract_archive(str(archive), str(root))
        except Exception as e:  # tarfile and gzip raise several types for a damaged archive
            if not download:
                raise UserError(
                    f"cannot extract {archive} ({e}); delete it and put a good copy there, or set data.download=true"
                ) from None
            archive.unlink()
        else:
            return _checked_folder(root)
    if download:
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(60)  # urllib has no timeout of its own: a silent network must not hang the job
        try:
            tv_utils.download_and_extract_archive(CIFAR10_URL, str(root), filename=CIFAR10_ARCHIVE, md5=CIFAR10_MD5)
        except Exception as e:  # URLError, OSError, RuntimeError("File not found or corrupted.")
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"CIFAR-10 is not in {root}/{CIFAR10_FOLDER} and the download failed ({reason}); "
                f"put {CIFAR10_ARCHIVE} (from {CIFAR10_URL}) or its extracted {CIFAR10_FOLDER}/ folder in {root}/, "
                f"or run without it: data.name=synthetic"
            ) from None
        finally:
            socket.setdefaulttimeout(previous)
        return _checked_folder(root)
    raise UserError(
        f"CIFAR-10 is not in {root}/{CIFAR10_FOLDER}; put {CIFAR10_ARCHIVE} (from {CIFAR10_URL}) "
        f"or its extracted {CIFAR10_FOLDER}/ folder in {root}/, set data.download=true to fetch it, "
        f"or run without it: data.name=synthetic"
    )


def _checked_folder(root: Path) -> Path:
    folder = root / CIFAR10_FOLDER
    missing = [f for f in CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES if not (folder / f).is_file()]
    if missing:
        raise UserError(f"{folder} lacks {', '.join(missing)}; the archive is not CIFAR-10's python version ({CIFAR10_ARCHIVE})")
    return folder


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 pickle: (N, 3, 32, 32) uint8 images and (N,) int64 labels."""
    try:
        with open(path, "rb") as f:
            # Python-2 pickles: latin1 gives str keys and numpy arrays back. These are the
            # dataset's own files, the same trust as torchvision's CIFAR10 reader.
            entry = pickle.load(f, encoding="latin1")
        data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
    except Exception as e:
        raise UserError(
            f"CIFAR-10 file {path} cannot be read ({type(e).__name__}: {e}); replace it with the official file"
        ) from None
    if len(data) != len(labels):
        raise UserError(
            f"CIFAR-10 file {path} holds {len(data)} images but {len(labels)} labels; replace it with the official file"
        )
    return data, labels


def read_cifar10(folder: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    parts = {
        split: [_read_batch(folder / f) for f in files]
        for split, files in (("train", CIFAR10_TRAIN_FILES), ("test", CIFAR10_TEST_FILES))
    }
    arrays = {}
    for split, batches in parts.items():
        arrays[f"{split}_images"] = np.concatenate([b[0] for b in batches])
        arrays[f"{split}_labels"] = np.concatenate([b[1] for b in batches])
    meta = folder / "batches.meta"
    if meta.is_file():
        with open(meta, "rb") as f:
            classes = list(pickle.load(f, encoding="latin1")["label_names"])
    else:
        classes = list(CIFAR10_CLASSES)
    return arrays, classes


def _cifar10_cache(cfg: DataConfig) -> Path:
    folder = cifar10_folder(cfg.root, cfg.download)
    files = [folder / f for f in CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES]
    cache = _cache_root(cfg) / f"cifar10-{_files_fingerprint(files)}"
    if not (cache / "meta.json").is_file():
        arrays, classes = read_cifar10(folder)
        _write_cache(cache, arrays, classes)
    return cache


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
    """(3, size, size) uint8 from an image file of any mode and size, or a UserError naming the file."""
    try:
        with Image.open(path) as img:
            img.load()
            rgb = to_rgb(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"image {path} cannot be read ({type(e).__name__}: {e}); remove or replace the file") from None
    rgb = rgb.resize((size, size), Image.BILINEAR)  # the seed's transforms.Resize((32, 32)) on a PIL image
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).copy()


def _folder_listing(split_dir: Path, classes: list[str] | None) -> tuple[list[tuple[Path, int]], list[str]]:
    if not split_dir.is_dir():
        raise UserError(f"image folder {split_dir} not found; data.root must hold train/<class>/*.png and test/<class>/*.png")
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    classes = classes or found
    if not classes:
        raise UserError(f"image folder {split_dir} has no class folders; expected {split_dir}/<class>/<image>")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UserError(f"{split_dir} has classes not in train/: {', '.join(unknown)}; every test class needs training images")
    items = [
        (p, i)
        for i, c in enumerate(classes)
        if (split_dir / c).is_dir()
        for p in sorted((split_dir / c).iterdir())
        if p.suffix.lower() in IMAGE_EXTENSIONS
    ]
    if not items:
        raise UserError(f"image folder {split_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return items, classes


def _imagefolder_cache(cfg: DataConfig) -> Path:
    root = Path(os.path.expanduser(cfg.root))
    train_items, classes = _folder_listing(root / "train", None)
    test_items, _ = _folder_listing(root / "test", classes)
    key = _files_fingerprint([p for p, _ in train_items + test_items], cfg.image_size, classes)
    cache = _cache_root(cfg) / f"imagefolder-{key}"
    if not (cache / "meta.json").is_file():
        arrays = {}
        for split, items in (("train", train_items), ("test", test_items)):
            arrays[f"{split}_images"] = np.stack([read_image(p, cfg.image_size) for p, _ in items])
            arrays[f"{split}_labels"] = np.array([label for _, label in items], dtype=np.int64)
        _write_cache(cache, arrays, classes)
    return cache


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
    return DataLoader(_Batches(split), sampler=batches, batch_size=None, num_workers=workers)
