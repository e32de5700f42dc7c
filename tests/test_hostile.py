"""Hostile files and misuse: nothing runs, nothing is lost, one line for every mistake a user can make.

Each test starts the real entry point on files it makes and checks the exit code, the one line
(no traceback), that nothing outside the run's folders changed, and that the earlier good state
is intact. A malicious file carries a harmless marker (`touch <tmp>/pwned`), never anything worse.
Most of these runs stop before training starts, in a few seconds.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, SMOKE, env_for_tests, load, ok, one_error_line, py2_pickle, run, train, write_cifar10
from train import atomic, checkpoint, data
from train.config import DataConfig
from train.distributed import Dist, Launch

PREDICT = REPO / "infer" / "predict.py"
EVALUATE = REPO / "infer" / "evaluate.py"
SUBMIT = REPO / "launch" / "submit.py"
ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"


class Exploit:
    """Unpickling this runs `touch marker`: proof that a reader ran code from a file, and nothing worse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def cifar_args(tmp_path: Path, root: Path, *extra: str) -> list[str]:
    """The smoke run on CIFAR-format files in `root`, never downloading, its cache and run folder in tmp_path."""
    return [
        "--config",
        SMOKE,
        "data.name=cifar10",
        f"data.root={root}",
        "data.download=false",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"log.run_dir={tmp_path / 'run'}",
        "train.epochs=1",
        *extra,
    ]


def repacked_archive(tmp_path: Path) -> Path:
    """CIFAR-10 files in the official format, in a tar.gz of the official layout: not the official bytes."""
    write_cifar10(tmp_path / "src", per_batch=20, test=20)
    archive = tmp_path / ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / FOLDER, arcname=FOLDER)
    return archive


def mount(*args: str) -> None:
    """`mount ARGS`, or skip the test where this machine does not allow it (a container without CAP_SYS_ADMIN)."""
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here ({done.stderr.strip()[:100]})")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished smoke run (2 epochs): best.pt, last.pt, prev.pt and two metrics lines."""
    run_dir = tmp_path_factory.mktemp("hostile") / "finished"
    ok(train("--config", SMOKE, f"log.run_dir={run_dir}", cwd=run_dir.parent))
    return run_dir


def copy_of(finished: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of the finished run, hard links kept as links (`cp -a`), and the arguments that continue it."""
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-a", str(finished), str(run_dir)], check=True)
    return run_dir, ["--config", SMOKE, f"log.run_dir={run_dir}"]


# ---------------------------------------------------------------------------- security


@pytest.mark.parametrize("name", ["data_batch_1", "batches.meta"])
def test_pickled_code_in_a_cifar10_file_never_runs(name, tmp_path):
    write_cifar10(tmp_path / "data", per_batch=20, test=20)
    marker = tmp_path / "pwned"
    path = tmp_path / "data" / FOLDER / name
    path.write_bytes(pickle.dumps({"data": Exploit(marker), "labels": [0], "label_names": Exploit(marker)}, protocol=2))
    line = one_error_line(train(*cifar_args(tmp_path, tmp_path / "data"), cwd=tmp_path))
    assert line == (
        f"error: CIFAR-10 file {path} calls posix.system, which CIFAR-10 files never do; refusing to load it "
        f"(it could run code): replace it with the official file"
    )
    assert not marker.exists()
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def _tar_with(archive: Path, bad: tarfile.TarInfo) -> None:
    """A tar.gz with one good member first (its partial output must not survive), then `bad`."""
    with tarfile.open(archive, "w:gz") as tar:
        good = tarfile.TarInfo(f"{FOLDER}/data_batch_1")
        good.size = 5
        tar.addfile(good, io.BytesIO(b"12345"))
        tar.addfile(bad, io.BytesIO(b"x" * bad.size))


@pytest.mark.parametrize("kind", ["climbs out", "absolute", "symlink", "device"])
def test_archive_members_that_leave_data_root_are_refused(kind, tmp_path):
    root, outside = tmp_path / "data", tmp_path / "outside"
    root.mkdir()
    name = {"climbs out": "../outside", "absolute": str(outside)}.get(kind, f"{FOLDER}/test_batch")
    bad = tarfile.TarInfo(name)
    if kind == "symlink":
        bad.type, bad.linkname = tarfile.SYMTYPE, str(outside)
    elif kind == "device":
        bad.type, bad.devmajor, bad.devminor = tarfile.CHRTYPE, 1, 3  # /dev/null's numbers
    else:
        bad.size = 1
    _tar_with(root / ARCHIVE, bad)
    before = (root / ARCHIVE).read_bytes()
    line = one_error_line(train(*cifar_args(tmp_path, root, "data.verify=false"), cwd=tmp_path))
    assert line.startswith(f"error: {root / ARCHIVE} is refused: member ") and "nothing extracted from it was kept" in line
    assert not outside.exists() and not os.path.lexists(outside)
    assert os.listdir(root) == [ARCHIVE] and (root / ARCHIVE).read_bytes() == before  # no partial output, archive kept


def test_a_local_archive_is_checked_against_the_official_md5(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    shutil.move(repacked_archive(tmp_path), root / ARCHIVE)
    before = (root / ARCHIVE).read_bytes()
    line = one_error_line(train(*cifar_args(tmp_path, root), cwd=tmp_path))
    assert line.startswith(f"error: {root / ARCHIVE} is not the official CIFAR-10 archive (MD5 ")
    assert line.endswith("or set data.verify=false for an archive you repacked yourself")
    assert os.listdir(root) == [ARCHIVE] and (root / ARCHIVE).read_bytes() == before
    # the documented way for an archive the user repacked: extracted beside it, then trained on
    proc = ok(train(*cifar_args(tmp_path, root, "data.verify=false"), cwd=tmp_path))
    assert "training cnn on cifar10 (100 train / 20 test images)" in proc.stdout
    assert sorted(os.listdir(root)) == sorted([ARCHIVE, FOLDER]) and (root / ARCHIVE).read_bytes() == before


@pytest.mark.parametrize("damage", ["truncated", "truncated, download on", "disk full"])
def test_a_damaged_archive_is_kept_and_reported(damage, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    extra = ["data.verify=false"]
    if damage == "disk full":  # a member of 8 MB of zeros (a few kB compressed) on a 2 MB filesystem
        mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(root))
        big = tarfile.TarInfo(f"{FOLDER}/data_batch_1")
        big.size = 8 << 20
        with tarfile.open(root / ARCHIVE, "w:gz") as tar:
            tar.addfile(big, io.BytesIO(bytes(big.size)))
    else:
        archive = repacked_archive(tmp_path).read_bytes()
        (root / ARCHIVE).write_bytes(archive[: len(archive) // 2])
        if damage == "truncated, download on":  # the old reader deleted the archive here, to download another
            extra = ["data.download=true"]
    before = (root / ARCHIVE).read_bytes()
    try:
        line = one_error_line(train(*cifar_args(tmp_path, root, *extra), cwd=tmp_path))
        assert os.listdir(root) == [ARCHIVE] and (root / ARCHIVE).read_bytes() == before
    finally:
        if damage == "disk full":
            subprocess.run(["umount", str(root)], check=False)
    if damage == "truncated, download on":
        assert "is not the official CIFAR-10 archive (MD5 " in line and "delete it and set data.download=true" in line
    else:
        reason = "No space left on device" if damage == "disk full" else ""
        assert line.startswith(f"error: cannot extract {root / ARCHIVE} ({reason}")
        assert "its partial output is removed and the archive is kept" in line


def test_read_only_folders(tmp_path):
    """data.root read-only with only the archive: extracted into the cache instead. A read-only run folder or
    cache folder: one line each. A full TensorBoard folder: one warning, and the run trains on."""
    ro = tmp_path / "ro"
    ro.mkdir()
    shutil.move(repacked_archive(tmp_path), ro / ARCHIVE)
    mount("--bind", str(ro), str(ro))
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        run_dir = tmp_path / "run"
        proc = ok(train(*cifar_args(tmp_path, ro, "data.verify=false", "train.epochs=2"), cwd=tmp_path))
        assert f"warning: data.root {ro} is not writable: CIFAR-10 goes to {tmp_path / 'cache' / FOLDER} instead" in proc.stdout
        assert "done: test_acc" in proc.stdout and checkpoint.load(run_dir / "checkpoints" / "last.pt")["progress"]["epoch"] == 2
        line = one_error_line(train(*cifar_args(tmp_path, ro, f"log.run_dir={ro / 'run'}"), cwd=tmp_path))
        assert line == f"error: log.run_dir {ro / 'run'} cannot be used (Read-only file system); choose a folder you can write in"
        extracted = cifar_args(tmp_path, tmp_path / "cache", f"data.cache_dir={ro / 'cache'}")  # the folder extracted above
        line = one_error_line(train(*extracted, cwd=tmp_path))
        assert line.startswith(f"error: cannot write the dataset cache in {ro / 'cache'} (Read-only file system); ")
        assert os.listdir(ro) == [ARCHIVE]
    finally:
        subprocess.run(["umount", str(ro)], check=False)


# ---------------------------------------------------------------------------- nothing lost


def test_one_trainer_per_run_folder(tmp_path):
    """A second trainer stops in one line naming the first; killed with -9, the first leaves no stale lock.
    `~` in log.run_dir is the home folder, as in data.root."""
    env = env_for_tests(HOME=str(tmp_path), SLURM_JOB_ID="4242")
    args = ["--config", SMOKE, "log.run_dir=~/run", "data.synthetic_train=256", "train.batch_size=32"]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(
        [sys.executable, REPO / "train" / "main.py", *args, "train.epochs=1000"], cwd=tmp_path, env=env, stdout=log, stderr=log
    )
    try:
        last = tmp_path / "run" / "checkpoints" / "last.pt"
        deadline = time.monotonic() + 120
        while not last.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert last.exists(), (tmp_path / "first.log").read_text()
        line = one_error_line(train(*args, "train.epochs=1", cwd=tmp_path, env=env_for_tests(HOME=str(tmp_path))))
        assert line.startswith(
            f"error: log.run_dir {tmp_path / 'run'} is in use by another trainer "
            f"(host {socket.gethostname()}, pid {first.pid}, SLURM job 4242, since "
        )
        assert line.endswith("); wait for it to end or stop it, or choose another log.run_dir")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        log.close()
    proc = ok(train(*args, "train.epochs=1", "train.threads=100000", cwd=tmp_path, env=env_for_tests(HOME=str(tmp_path))))
    assert "warning: train.threads=100000 is more than 4x the" in proc.stdout
    assert "nothing to do" in proc.stdout


def test_a_rerun_in_the_same_process_owns_the_folder_again(tmp_path, capsys, monkeypatch):
    """The launcher's debug executor trains in-process: leaving a run releases the folder. TensorBoard failing
    to write (its writer raising ENOSPC, as on a full disk) warns once per run and training goes on; an absurd
    log.every_steps is an epoch's worth."""
    from torch.utils.tensorboard import SummaryWriter

    from train import main

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", full_disk)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = ["--config", str(SMOKE), f"log.run_dir={run_dir}", "data.synthetic_train=256", "log.every_steps=1000000000000000000"]
    assert main.main([*args, "train.epochs=1"]) == 0
    assert main.main([*args, "train.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert out.count("warning: TensorBoard stopped: cannot write in ") == 2
    assert f"resumed from {run_dir / 'checkpoints' / 'last.pt'}" in out and out.count("done: test_acc") == 2
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["progress"]["epoch"] == 2


@pytest.mark.parametrize(
    "sweep, expected",
    [
        (["optim.lr=0.01,0.01"], "error: --sweep 'optim.lr=0.01,0.01' repeats 0.01; give each value once"),
        (["data.root=a/b,a_b"], "error: two sweep points would train in one run folder, "),
    ],
)
def test_a_sweep_whose_points_share_a_run_folder_is_refused(sweep, expected, tmp_path):
    cmd = [sys.executable, SUBMIT, "--config", SMOKE, "--cluster", "local", "--dry-run", f"log.run_dir={tmp_path / 'sweep'}"]
    line = one_error_line(run([*cmd, *(f"--sweep={s}" for s in sweep)], cwd=tmp_path))
    assert line.startswith(expected)
    assert not (tmp_path / "sweep").exists()


def test_best_pt_is_a_file_of_its_own(finished, tmp_path):
    run_dir, args = copy_of(finished, tmp_path)
    ckpts = run_dir / "checkpoints"
    assert all((ckpts / name).stat().st_nlink == 1 for name in ("last.pt", "prev.pt", "best.pt"))
    last = (ckpts / "last.pt").read_bytes()
    with open(ckpts / "best.pt", "r+b") as f:  # `cp prev.pt best.pt` writes into best.pt's own inode
        f.write((ckpts / "prev.pt").read_bytes())
        f.truncate()
    proc = ok(train(*args, cwd=tmp_path))
    assert "already finished 2 epochs" in proc.stdout
    assert (ckpts / "last.pt").read_bytes() == last


def test_starting_over_moves_the_earlier_run_aside(finished, tmp_path):
    run_dir, args = copy_of(finished, tmp_path)
    ckpts = run_dir / "checkpoints"
    best, metrics = (ckpts / "best.pt").read_bytes(), (run_dir / "metrics.jsonl").read_text()
    (ckpts / "last.pt").unlink()
    (ckpts / "prev.pt").unlink()
    proc = ok(train(*args, "train.epochs=1", cwd=tmp_path))
    (earlier,) = run_dir.glob("earlier-*")
    assert (
        f"warning: {run_dir} holds an earlier run (best.pt, metrics.jsonl, config.yaml, runtime.yaml, attempts.jsonl, "
        f"1 TensorBoard event file) "
        f"but no last.pt or prev.pt to resume from; moved it to {earlier} and starting over"
    ) in proc.stdout
    assert (earlier / "best.pt").read_bytes() == best and (earlier / "metrics.jsonl").read_text() == metrics
    assert len(list(earlier.glob("events.out.tfevents.*"))) == 1 and not list(run_dir.glob("earlier-*/earlier-*"))
    assert (earlier / "attempts.jsonl").is_file() and "goodput: 1 attempt (1 completed)" in proc.stdout  # a new run's count
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1]


def test_a_damaged_metrics_line_is_dropped_with_a_warning(finished, tmp_path):
    run_dir, args = copy_of(finished, tmp_path)
    metrics = (run_dir / "metrics.jsonl").read_text()
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_lo')  # a kill in the middle of appending a line
    proc = ok(train(*args, cwd=tmp_path))
    assert f"warning: {run_dir / 'metrics.jsonl'} line 3 is damaged (cut short by a kill or a full disk?); dropped" in proc.stdout
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    assert not list(run_dir.glob(".metrics.jsonl.*"))


def _image_folder(root: Path, classes: list[str], per_class: int = 8) -> None:
    for split in ("train", "test"):
        for i, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for k in range(per_class):
                Image.new("RGB", (8, 8), (40 * i, 200 - 20 * k, 90)).save(root / split / name / f"{k}.png")


def test_a_resume_on_other_data_is_refused(tmp_path):
    """The checkpoint records its classes, sizes and labels; a format-1 file without them resumes with a warning.
    Hidden entries (.ipynb_checkpoints, macOS's ._0.png) in the image folder are skipped."""
    _image_folder(tmp_path / "pets", ["cat", "dog"])
    (tmp_path / "pets" / "train" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "pets" / "train" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    _image_folder(tmp_path / "vehicles", ["car", "ship"])
    run_dir = tmp_path / "run"
    args = ["--config", SMOKE, "data.name=imagefolder", f"data.cache_dir={tmp_path / 'cache'}", f"log.run_dir={run_dir}"]
    args += ["train.batch_size=8", "train.epochs=1"]
    ok(train(*args, f"data.root={tmp_path / 'pets'}", cwd=tmp_path))
    ckpts = run_dir / "checkpoints"
    assert load(ckpts / "last.pt")["data"]["classes"] == ["cat", "dog"]
    before = {p.name: p.read_bytes() for p in ckpts.iterdir()}
    line = one_error_line(train(*args, f"data.root={tmp_path / 'vehicles'}", "train.epochs=2", cwd=tmp_path))
    assert line.startswith(
        f"error: cannot resume from {ckpts}: checkpoint was trained on other data (classes cat, dog, ...; here car, ship, ...)"
    )
    assert {p.name: p.read_bytes() for p in ckpts.iterdir()} == before
    # format 1, as an earlier version wrote it: no data entry, the position in the epoch named `batch`
    payload = {k: v for k, v in load(ckpts / "last.pt").items() if k not in ("digest", "data")}
    payload["progress"]["batch"] = payload["progress"].pop("step_in_epoch")
    payload["format"] = 1
    payload["digest"] = atomic.digest(payload)
    torch.save(payload, ckpts / "last.pt")
    proc = ok(train(*args, f"data.root={tmp_path / 'pets'}", "train.epochs=2", cwd=tmp_path))
    assert f"warning: {ckpts / 'last.pt'} does not record the data it was trained on" in proc.stdout
    assert checkpoint.load(ckpts / "last.pt")["progress"]["epoch"] == 2


@pytest.mark.parametrize("damage", ["truncated images", "a label of 2**40"])
def test_a_damaged_dataset_cache_is_rebuilt_with_a_warning(damage, tmp_path):
    write_cifar10(tmp_path / "data", per_batch=20, test=20)
    cfg = DataConfig(name="cifar10", root=str(tmp_path / "data"), download=False, cache_dir=str(tmp_path / "cache"))
    data.load(cfg, Dist(Launch("single"), torch.device("cpu"), None))  # builds the cache, as a first run would
    (cache,) = (tmp_path / "cache").glob("cifar10-*")
    if damage == "truncated images":
        images = cache / "train_images.npy"
        images.write_bytes(images.read_bytes()[:1000])
    else:
        labels = np.load(cache / "train_labels.npy")
        labels[3] = 2**40
        np.save(cache / "train_labels.npy", labels)
    proc = ok(train(*cifar_args(tmp_path, tmp_path / "data"), cwd=tmp_path))
    problem = "train_images.npy" if damage == "truncated images" else "train_labels.npy"
    assert (
        f"warning: the dataset cache {cache} cannot be trusted ({problem} does not match the digest written with it); "
        f"rebuilt it from the source files"
    ) in proc.stdout
    assert np.load(cache / "train_labels.npy").max() < 10


# ---------------------------------------------------------------------------- one line for every mistake


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels in a few bytes: PIL checks the size before decoding."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def _cifar_with(meta_names: int | None = None, label: int | None = None):
    def make(tmp_path: Path) -> list[str]:
        write_cifar10(tmp_path / "data", per_batch=20, test=20)
        folder = tmp_path / "data" / FOLDER
        if meta_names is not None:
            names = [f"c{i}" for i in range(meta_names)]
            (folder / "batches.meta").write_bytes(py2_pickle({"label_names": names, "num_cases_per_batch": 20}))
        if label is not None:
            images = np.zeros((20, 3072), dtype=np.uint8)
            (folder / "data_batch_2").write_bytes(py2_pickle({"data": images, "labels": [1] * 19 + [label]}))
        return cifar_args(tmp_path, tmp_path / "data")

    return make


def _images_with(problem: str):
    def make(tmp_path: Path) -> list[str]:
        _image_folder(tmp_path / "imgs", ["a", "b"], per_class=2)
        where = tmp_path / "imgs" / "train" / "b"
        if problem == "empty class":
            shutil.rmtree(where)
            where.mkdir()
        elif problem == "non-images":
            shutil.rmtree(where)
            where.mkdir()
            (where / "notes.txt").write_text("not an image")
        elif problem == "symlink loop":
            os.symlink("loop.png", where / "loop.png")
        elif problem == "bomb":
            (where / "bomb.png").write_bytes(_png_header(10000, 10000))  # 100 M pixels, over PIL's 89 M
        base = ["--config", SMOKE, "data.name=imagefolder", f"data.root={tmp_path / 'imgs'}"]
        return [*base, f"data.cache_dir={tmp_path / 'cache'}", f"log.run_dir={tmp_path / 'run'}", "train.batch_size=2"]

    return make


def _smoke(*overrides: str):
    return lambda tmp_path: ["--config", SMOKE, f"log.run_dir={tmp_path / 'run'}", *overrides]


def _file_at(*overrides: str):
    """The smoke run with a file at <tmp>/f, and overrides that name it."""

    def make(tmp_path: Path) -> list[str]:
        (tmp_path / "f").write_text("a file")
        return ["--config", SMOKE, f"log.run_dir={tmp_path / 'run'}", *(o.format(tmp=tmp_path) for o in overrides)]

    return make


def _cache_is_a_file(tmp_path: Path) -> list[str]:
    (tmp_path / "f").write_text("a file")
    return _cifar_with()(tmp_path) + [f"data.cache_dir={tmp_path / 'f'}"]


MISTAKES = {
    "run_dir is a file": (_file_at("log.run_dir={tmp}/f"), "error: log.run_dir {tmp}/f cannot be used (it is a file)"),
    "run_dir under a file": (
        _file_at("log.run_dir={tmp}/f/run"),
        "error: log.run_dir {tmp}/f/run cannot be used (it lies under {tmp}/f, which is a file)",
    ),
    "cache_dir is a file": (
        _cache_is_a_file,
        "error: cannot write the dataset cache in {tmp}/f (it is a file); set data.cache_dir to a writable folder",
    ),
    "label outside the classes": (
        _cifar_with(label=12),
        "error: CIFAR-10 file {tmp}/data/cifar-10-batches-py/data_batch_2 has label 12, but "
        "{tmp}/data/cifar-10-batches-py/batches.meta names 10 classes (labels 0 to 9)",
    ),
    "batches.meta names too few classes": (
        _cifar_with(meta_names=3),
        "error: CIFAR-10 file {tmp}/data/cifar-10-batches-py/data_batch_1 has label ",
    ),
    "an empty class folder": (_images_with("empty class"), "error: class folder {tmp}/imgs/train/b holds no images"),
    "a class folder of non-images": (_images_with("non-images"), "error: class folder {tmp}/imgs/train/b holds no images"),
    "a symlink loop": (
        _images_with("symlink loop"),
        "error: {tmp}/imgs/train/b/loop.png cannot be read (Too many levels of symbolic links)",
    ),
    "a decompression bomb": (
        _images_with("bomb"),
        "error: image {tmp}/imgs/train/b/bomb.png is refused: Image size (100000000 pixels) exceeds limit of 89478485",
    ),
    "image size the CNN cannot take": (
        lambda t: _images_with("")(t) + ["data.image_size=64"],
        "error: config key 'data.image_size' must be 32 for model.name=cnn (its Linear(1024, 64)), got 64",
    ),
    "VGG16 below its minimum": (
        lambda t: _images_with("")(t) + ["model.name=vgg16", "data.image_size=16"],
        "error: config key 'data.image_size' must be >= 32 for model.name=vgg16 (five 2x2 poolings), got 16",
    ),
    "infinite lr": (_smoke("optim.lr=.inf"), "error: config key 'optim.lr' must be a finite number, got inf"),
    "nan weight decay": (_smoke("optim.weight_decay=.nan"), "error: config key 'optim.weight_decay' must be a finite number"),
    "infinite warm-up": (_smoke("optim.warmup_epochs=inf"), "error: config key 'optim.warmup_epochs' must be a finite number"),
    "infinite timeout": (_smoke("dist.timeout_s=inf"), "error: config key 'dist.timeout_s' must be a finite number, got inf"),
    "SIGKILL as a stop signal": (
        _smoke("dist.stop_signals=[SIGTERM,SIGKILL]"),
        "error: config key 'dist.stop_signals' has SIGKILL, which no process can catch; use SIGTERM or SIGUSR1",
    ),
    "SIGSTOP as a stop signal": (_smoke("dist.stop_signals=[SIGSTOP]"), "error: config key 'dist.stop_signals' has SIGSTOP"),
    "AdamW with momentum 1": (
        _smoke("optim.name=adamw", "optim.momentum=1.0"),
        "error: config key 'optim.momentum' is AdamW's beta1 and must be below 1.0, got 1.0",
    ),
    "a seed beyond 64 bits": (
        _smoke("train.seed=18446744073709551616"),
        "error: config key 'train.seed' must be between 0 and 4294967295, got 18446744073709551616",
    ),
    "more synthetic images than memory": (
        _smoke("data.synthetic_train=1000000000000"),
        "error: data.synthetic_train=1000000000000 and data.synthetic_test=256 images do not fit in memory",
    ),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_mistake_is_one_line_and_writes_nothing_outside_its_folders(mistake, tmp_path):
    make, expected = MISTAKES[mistake]
    args = make(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    proc = train(*args, cwd=tmp_path)
    line = one_error_line(proc)
    assert proc.returncode == 2
    assert line.startswith(expected.format(tmp=tmp_path)), line
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    new = [p for p in after if p not in before]
    assert all(p.parts[0] in ("run", "cache") for p in new), new  # nothing outside the run folder and the cache
    assert not [p for p in new if p.name.startswith(".")], new  # no temporary file or folder left


def test_predict_skips_a_fifo_a_device_and_a_bomb_and_predicts_the_rest(finished, tmp_path):
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "good.png")
    os.mkfifo(tmp_path / "fifo.png")  # opening it would wait for a writer forever
    (tmp_path / "bomb.png").write_bytes(_png_header(20000, 20000))
    images = [tmp_path / "good.png", tmp_path / "fifo.png", "/dev/zero", tmp_path / "bomb.png"]
    proc = run(
        [sys.executable, PREDICT, "--checkpoint", finished / "checkpoints" / "best.pt", *images], cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(tmp_path / "good.png") in proc.stdout
    assert proc.stderr.splitlines() == [
        f"error: image {tmp_path / 'fifo.png'} is not a regular file (a folder, FIFO or device); give image files only",
        "error: image /dev/zero is not a regular file (a folder, FIFO or device); give image files only",
        f"error: image {tmp_path / 'bomb.png'} is refused: Image size (400000000 pixels) exceeds limit of 178956970 pixels, "
        f"could be decompression bomb DOS attack; shrink it or remove it",
    ]


@pytest.mark.parametrize(
    "script, flags, expected",
    [
        (PREDICT, ["--std", "0", "1", "1"], "error: argument --std: must be a number > 0 (a standard deviation), got '0'"),
        (PREDICT, ["--mean", "nan", "0", "0"], "error: argument --mean: must be a finite number, got 'nan'"),
        (EVALUATE, ["--batch-size", "0"], "error: argument --batch-size: must be a whole number >= 1, got '0'"),
        (EVALUATE, ["--batch-size", "-8"], "error: argument --batch-size: must be a whole number >= 1, got '-8'"),
    ],
)
def test_inference_flags_out_of_range_are_one_line(script, flags, expected, finished, tmp_path):
    best = finished / "checkpoints" / "best.pt"
    inputs = [tmp_path / "x.png"] if script == PREDICT else []
    line = one_error_line(run([sys.executable, script, "--checkpoint", best, *flags, *inputs], cwd=tmp_path))
    assert line.startswith(expected)
