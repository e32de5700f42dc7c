"""The run folder (`log.run_dir`): what lives in it, and who owns it. Only rank 0 writes it.

config.yaml     the config as the user gave it, resolved (`auto` stays `auto`: it loads anywhere)
runtime.yaml    what train/runtime.py chose for it on this machine, in this attempt
metrics.jsonl   one line per epoch (train/logger.py)
events.out.tfevents.*   TensorBoard (train/board.py), in the run folder itself: `--logdir runs` names the run after it
checkpoints/    last.pt, prev.pt, best.pt (train/checkpoint.py)
trainer.lock    who trains in this folder now: the lock below, and a line naming its holder
earlier-*/      an earlier run's best.pt, metrics and TensorBoard, moved aside when a run had to start over

One trainer at a time: rank 0 holds an exclusive `flock` on `trainer.lock` for the whole run.
The kernel releases it when the process ends, however it ends (kill -9, a torchrun restart, a
SLURM requeue), so a lock is never stale; a second trainer on the same folder stops in one line
naming the holder instead of interleaving its metrics and checkpoints with the first one's.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from train import atomic, config
from train.cli import UserError
from train.runtime import Runtime

LOCK = "trainer.lock"


class RunFolder:
    def __init__(self, path: Path):
        self.path = path
        self.checkpoints = path / "checkpoints"
        self.metrics = path / "metrics.jsonl"
        self.tensorboard = path  # TensorBoard's event files (before, in tb/)
        self._lock: int | None = None  # the open lock file while this process owns the folder

    def write_settings(self, cfg: config.Config, runtime: Runtime) -> None:
        """config.yaml and runtime.yaml, each written atomically."""
        atomic.write_atomic(self.path / "config.yaml", data=config.dump(cfg).encode())
        atomic.write_atomic(self.path / "runtime.yaml", data=yaml.safe_dump(runtime.to_dict(), sort_keys=False).encode())

    # ------------------------------------------------------------------ one owner at a time

    def claim(self) -> list[str]:
        """Make the folder and own it until `release` (or this process ends); warning lines for the log.

        A UserError when the folder cannot be made or written, or when another trainer owns it.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise UserError(
                f"log.run_dir {self.path} cannot be used ({atomic.unusable(self.path, e)}); choose a folder you can write in"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "a process that has not said who it is"
            os.close(fd)
            raise UserError(
                f"log.run_dir {self.path} is in use by another trainer ({holder}); wait for it to end or stop it, "
                f"or choose another log.run_dir"
            ) from None
        except OSError as e:  # a filesystem without flock (some network mounts)
            os.close(fd)
            return [f"cannot lock {self.path / LOCK} ({e.strerror or e}): nothing stops a second trainer in this folder"]
        self._lock = fd
        with contextlib.suppress(OSError):  # a full disk: the lock holds all the same, only the name is missing
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{holder_line()}\n".encode(), 0)
        return self._keep_history()

    def release(self) -> None:
        """Give the folder up (closing the lock file releases the lock); the holder line stays for the curious."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _keep_history(self) -> list[str]:
        """When no last.pt or prev.pt is left to resume from, but an earlier run's best.pt or metrics are here,
        the new run would overwrite them: move them (with its TensorBoard and settings) to earlier-<time>/."""
        if (self.checkpoints / "last.pt").exists() or (self.checkpoints / "prev.pt").exists():
            return []
        best = self.checkpoints / "best.pt"
        if not best.exists() and not (self.metrics.exists() and self.metrics.read_bytes().strip()):
            return []
        aside = self.path / f"earlier-{time.strftime('%Y%m%d-%H%M%S')}"
        if aside.exists():
            aside = aside.with_name(f"{aside.name}-{os.getpid()}")
        events = sorted(self.path.glob("events.out.tfevents.*"))  # TensorBoard's files, in the run folder itself
        history = [best, self.checkpoints / "last.pt.rejected", self.metrics, self.path / "tb", *events]
        moved = [p for p in history + [self.path / "config.yaml", self.path / "runtime.yaml"] if p.exists()]
        try:
            aside.mkdir()
            for path in moved:
                os.rename(path, aside / path.name)
        except OSError as e:
            raise UserError(
                f"{self.path} holds an earlier run but no last.pt or prev.pt to resume from, and moving it aside "
                f"failed ({e.strerror or e}); move {_names(moved)} away yourself to start over"
            ) from None
        return [
            f"{self.path} holds an earlier run ({_names(moved)}) but no last.pt or prev.pt to resume "
            f"from; moved it to {aside} and starting over"
        ]


def _names(paths: list[Path]) -> str:
    """File names for a message, TensorBoard's event files as one item."""
    names = [p.name for p in paths if not p.name.startswith("events.out.tfevents.")]
    events = len(paths) - len(names)
    return ", ".join(names + ([f"{events} TensorBoard event file{'s' if events > 1 else ''}"] if events else []))


def holder_line() -> str:
    """Who holds a run folder: host, pid, the SLURM job when there is one, and since when."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '?')}"
    slurm = f", SLURM job {job}" if job else ""
    return f"host {socket.gethostname()}, pid {os.getpid()}{slurm}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"


@contextlib.contextmanager
def owned(path: Path, dist) -> Iterator[list[str]]:
    """Rank 0 owns the run folder inside this block; every rank stops with the same UserError when it cannot.

    Yields rank 0's warning lines. Leaving the block releases the folder, so a rerun in the same
    process (the launcher's debug executor) can own it again.
    """
    folder = RunFolder(path)
    notes, error = [], None
    if dist.is_main:
        try:
            notes = folder.claim()
        except UserError as e:
            error = str(e)
    error = dist.broadcast(error)  # the other ranks stop too, instead of waiting for rank 0 in a collective
    if error is not None:
        raise UserError(error)
    try:
        yield notes
    finally:
        folder.release()
