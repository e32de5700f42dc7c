"""What a cluster does to a running job, as this process sees it: which job and nodes an attempt runs
on, how long a stop signal leaves before SIGKILL, and how an attempt was stopped.

- `grace`: after SIGTERM, SLURM sends SIGKILL `KillWait` seconds later (requeue, preemption,
  scancel, the time limit); plain `torchrun` forwards SIGTERM to its workers and kills them
  `--shutdown-timeout` (30 s by default) later. `launch/torchrun.py` (what slurm/torchrun.sbatch
  runs) lets the workers finish instead, so only SLURM's limit applies there.
- `how_stopped`: a SIGTERM on a job SLURM is requeueing (its restart count went up) is a
  preemption: `scontrol requeue` or a preempting partition. The time-limit signal (USR1 in the
  sbatch scripts, USR2 under the launcher) is a time-out; a SIGTERM otherwise is a cancellation
  (`scancel`), or a time-out when it came at the limit. Outside SLURM a signal is a plain stop.

Only rank 0 asks SLURM (`scontrol`), once at start-up and once when a stop signal arrived. Nothing
here imports torch.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess

from train.distributed import Launch

# The variable launch/torchrun.py sets for its workers: it forwards the stop signals and waits for them.
FORWARDED_BY_WRAPPER = "SCAFFOLD_TORCHRUN_WRAPPER"


def _scontrol(*args: str) -> str:
    """`scontrol ARGS` output, or "" when there is no SLURM or it does not answer within 10 s."""
    if not shutil.which("scontrol"):
        return ""
    try:
        return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def slurm_job_id(env=os.environ) -> str | None:
    """This job's id as SLURM names it (`123`, or `123_4` for an array element); None outside SLURM."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def job_fields(job_id: str) -> dict[str, str]:
    """`scontrol show job -o JOB` as a dict (JobState, Restarts, EndTime, ...); empty when SLURM does not know it."""
    return dict(kv.split("=", 1) for kv in _scontrol("show", "job", "-o", job_id).split() if "=" in kv)


def where(env=os.environ) -> dict:
    """The job and nodes of this attempt, for attempts.jsonl."""
    job = slurm_job_id(env)
    return {
        "job": job if job else f"local pid {os.getpid()}",
        "nodes": env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or socket.gethostname(),
    }


def kill_wait_s() -> float | None:
    """SLURM's KillWait (seconds from SIGTERM to SIGKILL), or None when it cannot be read."""
    for line in _scontrol("show", "config").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "KillWait":
            return float(value.split()[0])
    return None


def grace(launch: Launch, env=os.environ) -> tuple[float, str] | None:
    """The shortest time a stop signal leaves this process before SIGKILL, and who sends it; None: no limit known."""
    limits = []
    if launch.launcher == "torchrun" and env.get("TORCHELASTIC_RUN_ID") and not env.get(FORWARDED_BY_WRAPPER):
        # torchrun's --shutdown-timeout is not visible to its workers; the variables are
        seconds = float(env.get("PET_SHUTDOWN_TIMEOUT") or env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") or 30)
        limits.append((seconds, f"torchrun kills its workers {seconds:g} s after forwarding SIGTERM"))
    if slurm_job_id(env):
        seconds = kill_wait_s()
        if seconds is not None:
            limits.append((seconds, f"SLURM sends SIGKILL {seconds:g} s after SIGTERM (KillWait)"))
    return min(limits) if limits else None


def save_outlasts(grace: tuple[float, str] | None, written_s: float | None) -> str | None:
    """A save longer than what a stop signal leaves is killed midway: the stop resumes from the save before."""
    if not grace or not written_s or written_s <= grace[0]:
        return None
    return (
        f"saving a checkpoint took {written_s:.1f} s, longer than a stop signal leaves ({grace[1]}): a preemption "
        f"would be killed while saving and resume from the save before. Put log.run_dir on a faster filesystem, "
        f"or bound the loss with train.save_every_steps"
    )


def seen(names_per_rank: list[list[str]]) -> str:
    """`SIGTERM on 1 of 2 ranks`: which stop signals reached which ranks (each rank's own, gathered)."""
    names = ", ".join(sorted(set().union(*names_per_rank))) or "a stop signal"
    return f"{names} on {sum(map(bool, names_per_rank))} of {len(names_per_rank)} ranks"


def how_stopped(signals: list[int], env=os.environ) -> str:
    """preempted | timed out | cancelled under SLURM, `stopped` elsewhere (see the module docstring)."""
    job = slurm_job_id(env)
    if not signals or job is None:
        return "stopped"
    fields = job_fields(job)
    if int(fields.get("Restarts", 0) or 0) > int(env.get("SLURM_RESTART_COUNT", 0) or 0):
        return "preempted"  # SLURM requeues it itself
    if signals[0] != signal.SIGTERM:
        return "timed out"  # the time-limit signal, sent --signal-delay seconds before the limit
    ran, limit = _seconds(fields.get("RunTime", "")), _seconds(fields.get("TimeLimit", ""))
    return "timed out" if ran is not None and limit is not None and ran >= limit - 5 else "cancelled"


def _seconds(duration: str) -> float | None:
    """SLURM's `[D-]HH:MM:SS` (or MM:SS) in seconds; None for UNLIMITED or anything else."""
    days, _, clock = duration.rpartition("-")
    parts = clock.split(":")
    if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3 or (days and not days.isdigit()):
        return None
    seconds = 0
    for p in parts:
        seconds = seconds * 60 + int(p)
    return seconds + 86400 * int(days or 0)
