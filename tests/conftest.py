"""Shared helpers: run the real entry points as subprocesses, write datasets in their real formats."""

from __future__ import annotations

import io
import os
import pickle
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
MAIN = REPO / "train" / "main.py"
SMOKE = REPO / "configs" / "smoke.yaml"


# The seed notes' CIFAR-10 CNN, as written there: tests paste it into the user scripts they run.
SEED_MODULE = """
from torch.nn import Conv2d, MaxPool2d, Flatten, Linear


class MyModule(torch.nn.Module):
    def __init__(self):
        super(MyModule, self).__init__()
        self.model = torch.nn.Sequential(
            Conv2d(3, 32, 5, padding=2), MaxPool2d(2), Conv2d(32, 32, 5, padding=2), MaxPool2d(2),
            Conv2d(32, 64, 5, padding=2), MaxPool2d(2), Flatten(), Linear(1024, 64), Linear(64, 10))

    def forward(self, inputs):
        return self.model(inputs)
"""


def env_for_tests(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # keep the subprocesses of one test from oversubscribing the 2 cores
    env.pop("OMP_NUM_THREADS", None)
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env or env_for_tests(), capture_output=True, text=True, timeout=timeout
    )


def train(*args, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python train/main.py ARGS` as a user runs it."""
    return run([sys.executable, MAIN, *args], cwd=cwd, env=env, timeout=timeout)


def torchrun(nproc: int, *args, cwd: Path, env: dict | None = None, extra: tuple = (), timeout: float = 300, script: Path = MAIN):
    """`torchrun --nproc_per_node=N SCRIPT ARGS` (train/main.py unless told otherwise)."""
    return run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}",
            *extra,
            script,
            *args,
        ],
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a_path: Path, b_path: Path, exact: bool, atol: float = 1e-4) -> None:
    """Two checkpoints' weights: bit for bit, or within `atol` (float32 sums in another order: one batch of 64
    vs two of 32 and DDP's all-reduce; each caller states the drift it measured)."""
    a, b = load(a_path)["model"], load(b_path)["model"]
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            assert torch.allclose(a[k], b[k], rtol=0, atol=atol), (k, (a[k] - b[k]).abs().max())


def only_rank_zero_wrote(run_dir: Path, checkpoints: tuple[str, ...] = ("best.pt", "last.pt", "prev.pt")) -> None:
    """A finished run's folder holds what rank 0 writes, and nothing of the other ranks (submitit's logs aside)."""
    files = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file() and "submitit" not in p.parts)
    assert [f for f in files if "tfevents" not in f] == [
        "attempts.jsonl",
        *(f"checkpoints/{name}" for name in checkpoints),
        "config.yaml",
        "metrics.jsonl",
        "runtime.yaml",
        "trainer.lock",  # rank 0's lock on the run folder (train/runfolder.py)
    ], files
    assert len([f for f in files if "tfevents" in f]) == 1, files  # scalars and the HParams row: one writer, rank 0's


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The process failed with exactly one line on stderr, `error: ...`, and no traceback."""
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# ------------------------------------------------------------------ CIFAR-10 in its own format


class Py2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle wrote CIFAR-10: str and bytes as py2 strings, numpy by its old path."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_string(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = save_py2_string
    dispatch[bytes] = save_py2_string

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", "")
        if module.startswith("numpy._core"):  # py2-era files name numpy.core.multiarray
            self.write(pickle.GLOBAL + f"numpy.core{module[len('numpy._core') :]}\n{obj.__name__}\n".encode())
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(root: Path, per_batch: int = 100, test: int = 100, seed: int = 0) -> dict:
    """`root/cifar-10-batches-py/` with the official file names and layout; labels follow a pattern so
    a model can learn them (the class's colour in one image quadrant)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}

    def batch(n, label_name):
        labels = rng.integers(0, 10, size=n)
        images = rng.integers(0, 80, size=(n, 3, 32, 32), dtype=np.uint8)
        for i, c in enumerate(labels):
            images[i, c % 3, (c // 3) * 8 : (c // 3) * 8 + 8, :] = 255
        data = images.reshape(n, 3072)  # rows of 1024 R, 1024 G, 1024 B values, as in the official files
        return (
            {
                "batch_label": label_name,
                "labels": [int(v) for v in labels],
                "data": data,
                "filenames": [f"img_{i}.png" for i in range(n)],
            },
            images,
            labels,
        )

    for i in range(1, 6):
        entry, images, labels = batch(per_batch, f"training batch {i} of 5")
        (folder / f"data_batch_{i}").write_bytes(py2_pickle(entry))
        written[f"data_batch_{i}"] = (images, labels)
    entry, images, labels = batch(test, "testing batch 1 of 1")
    (folder / "test_batch").write_bytes(py2_pickle(entry))
    written["test_batch"] = (images, labels)
    (folder / "batches.meta").write_bytes(
        py2_pickle({"label_names": CIFAR_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072})
    )
    return written


# A run long enough to be signalled in the middle (64 steps of 2 x 32), with a learning-rate
# schedule that does not depend on where it stops; the preemption tests compare against it.
PREEMPTIBLE = [
    "--config",
    SMOKE,
    "data.synthetic_train=4096",
    "train.epochs=1",
    "log.every_steps=4",
    "data.augment=[crop,flip]",
    "optim.schedule=step",
    "optim.warmup_epochs=0",
]


@pytest.fixture(scope="session")
def preemptible_reference(tmp_path_factory) -> Path:
    """PREEMPTIBLE on 2 ranks, uninterrupted: the run folder whose last.pt preempted jobs must equal."""
    run_dir = tmp_path_factory.mktemp("preemptible") / "straight"
    ok(torchrun(2, *PREEMPTIBLE, f"log.run_dir={run_dir}", cwd=run_dir.parent))
    return run_dir


# One epoch of the smoke set (16 steps of 64 images) that learns (test accuracy about 0.45), saving every 4 steps:
# the 1-process-vs-N-ranks comparisons train it in each mode (tests/test_scale.py, tests/test_multinode.py).
SCALE = ["--config", SMOKE, "optim.lr=0.05", "train.epochs=1", "train.save_every_steps=4"]
FAST = [*SCALE, "data.augment=[crop,flip]"]  # the default mode and augmentation
BITWISE = [*SCALE, "data.augment=[crop,flip,grayscale,jitter]", "train.reproducible=bitwise"]


@pytest.fixture(scope="session")
def one_process_run(tmp_path_factory):
    """`one_process_run(args)`: the run folder of `train/main.py ARGS` in one process, trained once per session."""
    done: dict[tuple, Path] = {}

    def reference(args: list) -> Path:
        if tuple(args) not in done:
            run_dir = tmp_path_factory.mktemp("one_process") / "run"
            ok(train(*args, f"log.run_dir={run_dir}", cwd=run_dir.parent))
            done[tuple(args)] = run_dir
        return done[tuple(args)]

    return reference


@pytest.fixture
def smoke_args(tmp_path):
    """The smoke config with its run folder in the test's own folder."""
    return ["--config", SMOKE, f"log.run_dir={tmp_path / 'run'}"]
