"""Watching a submitted job to its end: its state through requeues, its logs as they grow, its outcome as an exit code.

A SLURM job that is requeued (by itself after saving, by `scontrol requeue`, by a preempting
partition) comes back under the same id and appends to the same log; it has ended only when
SLURM says COMPLETED, FAILED, CANCELLED, TIMEOUT, ... and no longer lists it as pending or
running. `scontrol show job` answers at once while the controller remembers the job; `sacct`
afterwards. The launcher's exit code is the job's outcome: 0 only when training completed, the
training's own exit code when it failed with one, 1 otherwise.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from train.cli import Exit, UserError

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
FINAL.add("SPECIAL_EXIT")  # requeued and held: it waits for `scontrol release`, not for us


@dataclass
class Outcome:
    state: str  # SLURM's (COMPLETED, FAILED, ...), or FINISHED / INTERRUPTED for a local job
    code: int | None  # the job's exit code when known
    restarts: int = 0  # times SLURM requeued it

    @property
    def exit_code(self) -> int:
        """What the launcher exits with for this job."""
        if self.state in ("COMPLETED", "FINISHED") and not self.code:
            return Exit.OK
        return self.code if self.code else Exit.FAILED

    def line(self, job_id: str) -> str:
        requeued = f", requeued {self.restarts} time{'s' if self.restarts != 1 else ''}" if self.restarts else ""
        code = f" (exit {self.code})" if self.code is not None else ""
        return f"job {job_id} ended: {self.state}{code}{requeued}"


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise UserError(f"{cmd[0]} failed ({e}); is SLURM reachable from here (sinfo)?") from None


def slurm_outcome(job_id: str) -> Outcome | None:
    """The job's state, exit code and restarts; None when SLURM knows nothing of it (yet)."""
    proc = _run(["scontrol", "show", "job", "-o", job_id])
    fields = dict(kv.split("=", 1) for kv in proc.stdout.split() if "=" in kv)
    if proc.returncode == 0 and "JobState" in fields:
        code, _, sig = fields.get("ExitCode", "0:0").partition(":")
        return Outcome(fields["JobState"], int(code) if sig in ("", "0") else None, int(fields.get("Restarts", 0)))
    proc = _run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State,ExitCode"])
    rows = [line.split("|") for line in proc.stdout.splitlines() if "|" in line]
    if not rows:
        return None
    state, exit_code = rows[-1][0].split()[0], rows[-1][1]  # "CANCELLED by 0", "2:0"
    code, _, sig = exit_code.partition(":")
    return Outcome(state, int(code) if sig in ("", "0") else None)


class LogTail:
    """Print files as they grow (the job's stdout and stderr, task 0)."""

    def __init__(self, stdout: Path, stderr: Path | None):
        self.streams = [(stdout, sys.stdout)] + ([(stderr, sys.stderr)] if stderr else [])
        self.offsets: dict[Path, int] = {}

    def drain(self) -> None:
        for path, stream in self.streams:
            try:
                with open(path, errors="replace") as f:
                    f.seek(self.offsets.get(path, 0))
                    text = f.read()
                    self.offsets[path] = f.tell()
            except OSError:
                continue
            if text:
                stream.write(text)
                stream.flush()


def follow_slurm(job_id: str, tail: LogTail | None, poll_s: float = 2.0) -> Outcome:
    """Until SLURM says the job has ended (through any number of requeues), printing its log if `tail`."""
    seen_restarts, unknown_since = 0, time.monotonic()
    while True:
        if tail:
            tail.drain()
        outcome = slurm_outcome(job_id)
        if outcome is None:
            if time.monotonic() - unknown_since > 120:
                raise UserError(f"SLURM does not know job {job_id} (squeue, sacct): was it purged, or is this another cluster?")
        else:
            unknown_since = time.monotonic()
            if outcome.restarts > seen_restarts:
                seen_restarts = outcome.restarts
                print(f"job {job_id} requeued (restart {seen_restarts})", flush=True)
            if outcome.state.split()[0] in FINAL:
                if tail:
                    tail.drain()
                return outcome
        time.sleep(poll_s)


def follow_local(job, tail: LogTail | None, poll_s: float = 1.0) -> Outcome:
    """A submitit local or debug job: its result is the trainer's exit code (launch/job.py's `finish`).

    A debug job runs in this process when its result is asked for: give it no `tail`.
    """
    while tail is not None and not job.done():
        if tail:
            tail.drain()
        time.sleep(poll_s)
    if tail:
        tail.drain()
    try:
        code = int(job.result())
    except Exception:  # the task died without a result (a signal, a crash); its log says why
        return Outcome(job.state, None)
    return Outcome("FINISHED" if code == Exit.OK else "FAILED", code)
