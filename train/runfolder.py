"""The run folder (`log.run_dir`): what lives in it. Only rank 0 writes it.

config.yaml     the config as the user gave it, resolved (`auto` stays `auto`: it loads anywhere)
runtime.yaml    what train/runtime.py chose for it on this machine, in this attempt
metrics.jsonl   one line per epoch (train/logger.py)
tb/             TensorBoard (train/logger.py)
checkpoints/    last.pt, prev.pt, best.pt (train/checkpoint.py)
attempts.jsonl  one line per attempt of the run (`Attempt`): job, nodes, how it ended, work redone, time saving
attempt.json    the attempt running now: where it got to, rewritten every few seconds (`Attempt`)
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import yaml

from train import atomic, config
from train.runtime import Runtime


class RunFolder:
    def __init__(self, path: Path):
        self.path = path
        self.checkpoints = path / "checkpoints"
        self.metrics = path / "metrics.jsonl"
        self.tensorboard = path / "tb"

    def write_settings(self, cfg: config.Config, runtime: Runtime) -> None:
        """config.yaml and runtime.yaml, each written atomically."""
        atomic.write_atomic(self.path / "config.yaml", data=config.dump(cfg).encode())
        atomic.write_atomic(self.path / "runtime.yaml", data=yaml.safe_dump(runtime.to_dict(), sort_keys=False).encode())


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
    """A number from a record, 0 for anything else (the file is the user's: it may have been edited)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0
