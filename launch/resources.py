"""What the launcher asks SLURM for: every resource checked before anything is submitted, then as sbatch parameters.

Each mistake is one line that names the option and says what to give instead, in `--dry-run`
too: a time limit of 0 or a memory of `0` (which SLURM reads as "all of the node's memory") never
reaches a batch script. `--sbatch KEY=VALUE` passes what the launcher does not model (mail,
dependency, exclusive, gres, reservation, exclude, nodelist, ...) straight into the script.
"""

from __future__ import annotations

import argparse
import re

from train.cli import UserError

# A training process alone takes about 1 GB (README: 966 MB peak resident per CPU rank).
MEM_FLOOR_MB = 1024
MEM_UNITS_MB = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}
# Signals a job can catch and save on; KILL and STOP cannot be caught.
SIGNALS = ("USR1", "USR2", "TERM", "INT", "HUP", "QUIT", "ALRM")
# sbatch options the launcher sets itself: --sbatch must not contradict them.
MODELLED = {
    "nodes": "--nodes",
    "ntasks-per-node": "--tasks-per-node",
    "ntasks": "--nodes and --tasks-per-node",
    "gpus-per-node": "--gpus-per-node",
    "cpus-per-task": "--cpus-per-task",
    "mem": "--mem",
    "partition": "--partition",
    "time": "--time",
    "account": "--account",
    "qos": "--qos",
    "constraint": "--constraint",
    "job-name": "--job-name",
    "signal": "--signal and --signal-delay",
    "requeue": "--requeues",
    "no-requeue": "--requeues 0",
    "array": "--sweep and --max-parallel",
}
OWN = ("output", "error", "open-mode", "wrap")  # the launcher puts the logs in the run folder


def memory_mb(text: str) -> int:
    """`16G`, `500M`, `1.5T`, `2048K` in MB; a bare number or a memory below the floor is refused."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT])B?", text.strip(), re.I)
    if not m:
        if re.fullmatch(r"\d+(\.\d+)?", text.strip()):
            raise UserError(f"--mem {text} has no unit (SLURM would read megabytes); give one, e.g. --mem 16G or --mem 4000M")
        raise UserError(f"--mem {text!r} is not a memory; give a number with a unit, e.g. --mem 16G or --mem 4000M")
    mb = float(m.group(1)) * MEM_UNITS_MB[m.group(2).upper()]
    if mb < MEM_FLOOR_MB:
        raise UserError(
            f"--mem {text} is below the {MEM_FLOOR_MB // 1024}G floor: one training process alone takes about 1 GB; "
            f"give e.g. --mem 16G (memory per node)"
        )
    return int(mb)


def signal_name(text: str) -> str:
    """`USR1`, `SIGUSR1`, `usr1` -> `USR1`; anything a job cannot catch and save on is refused."""
    name = text.strip().upper().removeprefix("SIG")
    if name not in SIGNALS:
        why = "cannot be caught, so the job could not save" if name in ("KILL", "STOP") else "is not a signal a job can stop on"
        raise UserError(f"--signal {text} {why}; use one of {', '.join(SIGNALS)} (USR2 by default)")
    return name


def sbatch_extra(specs: list[str]) -> dict[str, str | bool]:
    """`--sbatch KEY=VALUE` (or a bare `--sbatch KEY` for a flag) as sbatch parameters."""
    extra: dict[str, str | bool] = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        key = key.strip().removeprefix("--")
        if not re.fullmatch(r"[a-z][a-z0-9-]*", key) or (sep and not value) or any(c < " " for c in value):
            raise UserError(f"--sbatch {spec!r} is not KEY=VALUE with an sbatch option name, e.g. --sbatch mail-type=END")
        if key in MODELLED:
            raise UserError(f"--sbatch {key}: the launcher sets this itself; use {MODELLED[key]}")
        if key in OWN:
            raise UserError(f"--sbatch {key}: the launcher writes the job's logs into the run folder itself")
        extra[key] = value if sep else True
    return extra


def check(args: argparse.Namespace) -> None:
    """Refuse, in one line, every resource that would make a job SLURM refuses, runs nothing, or cannot save."""
    if args.time <= 0:
        raise UserError(f"--time {args.time}: give the time limit in minutes, more than 0 (e.g. --time 60)")
    if args.nodes < 1:
        raise UserError(f"--nodes {args.nodes}: a job needs at least 1 node")
    if args.gpus_per_node < 0:
        raise UserError(f"--gpus-per-node {args.gpus_per_node}: give 0 (CPUs only) or more")
    for option, value in (("--tasks-per-node", args.tasks_per_node), ("--cpus-per-task", args.cpus_per_task)):
        if value is not None and value < 1:
            raise UserError(f"{option} {value}: give 1 or more")
    if args.mem is not None:
        memory_mb(args.mem)
    if args.signal is not None:
        signal_name(args.signal)
    if not 0 <= args.signal_delay < args.time * 60:
        raise UserError(
            f"--signal-delay {args.signal_delay}: give the seconds before the time limit at which the job is told to "
            f"save, from 0 to less than --time ({args.time * 60} s)"
        )
    if args.requeues < 0:
        raise UserError(f"--requeues {args.requeues}: give 0 (never requeue) or more")
    for option in ("partition", "account", "qos", "constraint", "job_name"):
        value = getattr(args, option)
        if value is not None and (not value or any(c < " " for c in value)):
            raise UserError(f"--{option.replace('_', '-')} {value!r}: give a name without line breaks or control characters")
    if args.max_parallel is not None and args.max_parallel < 1:
        raise UserError(f"--max-parallel {args.max_parallel}: give how many array elements may run at once, 1 or more")
    sbatch_extra(args.sbatch)


def slurm_parameters(args: argparse.Namespace, name: str) -> dict:
    """sbatch parameters in submitit's SlurmExecutor names."""
    tasks = args.tasks_per_node or max(1, args.gpus_per_node)
    params = {
        "job_name": args.job_name or name,
        "time": args.time,
        "nodes": args.nodes,
        "ntasks_per_node": tasks,
        "signal_delay_s": args.signal_delay,
        "srun_args": ["--kill-on-bad-exit=1"],  # one failed rank ends the job instead of leaving the others blocked
        "additional_parameters": {"requeue": True, **sbatch_extra(args.sbatch)},
    }
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.mem:
        mb = memory_mb(args.mem)
        params["mem"] = f"{mb // 1024}G" if mb % 1024 == 0 else f"{mb}M"
    if args.max_parallel:
        params["array_parallelism"] = args.max_parallel
    for key in ("cpus_per_task", "partition", "account", "qos", "constraint"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    return params
