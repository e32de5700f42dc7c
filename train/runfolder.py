"""The run folder (`log.run_dir`): what lives in it, and who owns it. Only rank 0 writes it.

config.yaml     the config as the user gave it, resolved (`auto` stays `auto`: it loads anywhere)
runtime.yaml    what train/runtime.py chose for it on this machine, in this attempt
metrics.jsonl   one line per epoch (train/logger.py)
events.out.tfevents.*   TensorBoard (train/board.py), in the run folder itself: `--logdir runs` names the run after it
checkpoints/    last.pt, prev.pt, best.pt (train/checkpoint.py)
attempts.jsonl  one line per attempt of the run (`Attempt`): job, nodes, how it ended, work redone, time saving
attempt.json    the attempt running now: where it got to, rewritten every few seconds (`Attempt`)
trainer.lock    who trains in this folder now: the lock below, and a line naming its holder
earlier-*/      an earlier run's best.pt, metrics, TensorBoard and attempts, moved aside when a run had to start over

One trainer at a time: rank 0 holds an exclusive `flock` on `trainer.lock` for the whole run.
The kernel releases it when the process ends, however it ends (kill -9, a torchrun restart, a
SLURM requeue), so a lock is never stale; a second trainer on the same folder stops in one line
naming the holder instead of interleaving its metrics and checkpoints with the first one's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
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
        settings = [self.path / name for name in ("config.yaml", "runtime.yaml", ATTEMPTS, LIVE)]
        moved = [p for p in history + settings if p.exists()]
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


ATTEMPTS, LIVE = "attempts.jsonl", "attempt.json"
HEARTBEAT_S = 5.0  # how often the running attempt says where it is (a lost attempt's end is known to this)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))


def read_attempts(folder: Path) -> list[dict]:
    """The finished attempts of a run folder, oldest first (unreadable lines skipped)."""
    try:
        lines = (folder / ATTEMPTS).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):  # a hand-edited or damaged line is skipped, never trusted
            out.append(record)
    return out


def read_live(folder: Path) -> dict | None:
    """The attempt running now (or killed without a last word): its heartbeat, or None."""
    try:
        record = json.loads((folder / LIVE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


class Attempt:
    """One attempt of a run, recorded by rank 0: a line in attempts.jsonl when it ends, a heartbeat while it runs.

    An attempt that never wrote its end (SIGKILL, out of memory, a lost node) is written by the next
    one as `lost`, from its last heartbeat. Work redone: the steps between where the previous attempt
    got to and where this one resumed, at the previous attempt's pace (0 after a stop that saved).
    """

    def __init__(self, folder: Path, record: dict, step_of: Callable[[], int]):
        self.folder, self.record, self.step_of = folder, record, step_of
        self._first: tuple[float, int] | None = None  # (time, step) of the first heartbeat after a step was taken
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="attempt-heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def begin(cls, folder: Path, resumed_step: int, where: dict, ranks: int, step_of: Callable[[], int]) -> Attempt:
        finished = read_attempts(folder)
        lost = read_live(folder)
        if lost is not None:
            end = number(lost.pop("time", lost.get("start_time")))
            lost.update(ended="lost", exit_code=None, end=_iso(end), end_time=end)
            _append(folder, lost)
            finished.append(lost)
        previous = finished[-1] if finished else {}
        redone = max(0.0, number(previous.get("step", resumed_step)) - resumed_step) * number(previous.get("pace_s"))
        now = time.time()
        record = dict(attempt=len(finished) + 1, **where, ranks=ranks, start=_iso(now), start_time=now)
        record.update(resumed_step=resumed_step, step=resumed_step, redone_s=round(redone, 1))
        return cls(folder, record, step_of)

    def _pace(self, now: float, step: int) -> float | None:
        """Seconds per step since the first step of this attempt (evaluation and saves included)."""
        if self._first is None and step > self.record["resumed_step"]:
            self._first = (now, step)
        if self._first is None or step <= self._first[1]:
            return None
        return (now - self._first[0]) / (step - self._first[1])

    def _sample(self) -> None:
        now, step = time.time(), self.step_of()
        self.record.update(step=step, time=now)
        pace = self._pace(now, step)
        if pace is not None:
            self.record["pace_s"] = round(pace, 4)

    def _beat(self) -> None:
        while True:
            self._sample()
            tmp = self.folder / f".{LIVE}.tmp"
            try:  # not fsync'ed: a heartbeat lost in a power cut costs nothing
                tmp.write_text(json.dumps(self.record))
                os.replace(tmp, self.folder / LIVE)
            except OSError:
                pass
            if self._done.wait(HEARTBEAT_S):
                return

    def end(self, ended: str, code: int, saving_s: float, signals: list[str]) -> dict:
        """The attempt's line in attempts.jsonl (ended: completed, preempted, timed out, cancelled, stopped, failed)."""
        self._done.set()
        self._thread.join()
        self._sample()
        now = self.record.pop("time")
        record = dict(self.record, ended=ended, exit_code=int(code), end=_iso(now), end_time=now, saving_s=round(saving_s, 2))
        if signals:
            record["signal"] = signals[0]
        if "pace_s" not in record and record["step"] > record["resumed_step"]:  # shorter than one heartbeat
            record["pace_s"] = round((now - record["start_time"]) / (record["step"] - record["resumed_step"]), 4)
        _append(self.folder, record)
        (self.folder / LIVE).unlink(missing_ok=True)
        return record


def _append(folder: Path, record: dict) -> None:
    with open(folder / ATTEMPTS, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def goodput(attempts: list[dict]) -> str:
    """`3 attempts (2 preempted, 1 completed), 41 s of work redone and 6.0 s saving in 812 s of training`.

    The time of an attempt runs from the trainer's start (after the process group and the data) to its end.
    """
    counts = Counter(str(a.get("ended", "?")) for a in attempts)
    how = ", ".join(f"{n} {ended}" for ended, n in counts.items())
    total = sum(_seconds(a) for a in attempts)
    redone = sum(number(a.get("redone_s")) for a in attempts)
    saving = sum(number(a.get("saving_s")) for a in attempts)
    n = f"{len(attempts)} attempt{'' if len(attempts) == 1 else 's'}"
    return f"{n} ({how}), {redone:.0f} s of work redone and {saving:.1f} s saving in {total:.0f} s of training"


def _seconds(attempt: dict) -> float:
    start = number(attempt.get("start_time"))
    end = number(attempt.get("end_time") or attempt.get("time"))  # a running attempt: its last heartbeat
    return max(0.0, end - start) if start and end else 0.0


def number(value) -> float:
    """A number from a record, 0 for anything else (the file is the user's: it may have been edited). Every
    number recorded (times, steps, seconds) is finite and not negative: an edited -5 or NaN reads as 0."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf
    return float(value) if ok else 0.0
