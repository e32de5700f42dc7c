"""Send a training job to SLURM, or run it here, through submitit.

    python launch/submit.py [--config FILE] [key=value ...] [--cluster slurm|local|debug] [resources]
    python launch/submit.py --config configs/cifar10_cnn.yaml --nodes 2 --gpus-per-node 4 --time 240 --follow
    python launch/submit.py --config configs/smoke.yaml --sweep optim.lr=0.01,0.02   # one job array
    python launch/submit.py --check --nodes 2 --gpus-per-node 4 --partition gpu      # preflight the signal chain
    python launch/submit.py --status runs/                                          # the runs below a folder

The same config and overrides as `train/main.py`. The job runs `train.main.main` in every task
(one task per GPU, no torchrun inside); a preempted or timed-out job saves at a step boundary,
requeues itself and resumes from `<run>/checkpoints/last.pt`. submitit's files and the job's logs
go to `<run>/submitit/`, beside TensorBoard and the checkpoints; a sweep element's logs to its own
run folder. Every resource is checked before anything is submitted (launch/resources.py). The exit
code is the job's outcome (launch/watch.py): with `--follow`, and always for local and debug jobs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from launch import resources, watch
from train import cli, config
from train.cli import UserError


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="launch/submit.py", description="Submit train/main.py to SLURM, or run it here.")
    config.add_arguments(p)
    p.add_argument(
        "--cluster",
        choices=("slurm", "local", "debug"),
        help="slurm (default when sbatch is on PATH), local (this machine, default otherwise), debug (this process)",
    )
    r = p.add_argument_group("resources (SLURM; local uses --gpus-per-node and --tasks-per-node)")
    r.add_argument("--nodes", type=int, default=1)
    r.add_argument("--gpus-per-node", type=int, default=0, help="one task per GPU")
    r.add_argument("--tasks-per-node", type=int, help="tasks (ranks) per node; default: --gpus-per-node, or 1 on CPUs")
    r.add_argument("--cpus-per-task", type=int)
    r.add_argument("--mem", metavar="SIZE", help="memory per node with a unit: 16G, 500M (at least 1G)")
    r.add_argument("--partition")
    r.add_argument("--time", type=int, default=60, metavar="MIN", help="time limit in minutes (default 60)")
    r.add_argument("--account")
    r.add_argument("--qos")
    r.add_argument("--constraint")
    r.add_argument("--job-name", help="default: the run folder's name")
    r.add_argument("--signal", metavar="SIG", help="preemption signal sent before the time limit (default USR2, submitit's)")
    r.add_argument("--signal-delay", type=int, default=120, metavar="S", help="send it S seconds before the time limit")
    r.add_argument("--requeues", type=int, default=3, help="how many times a timed-out job may requeue itself")
    r.add_argument(
        "--sbatch", action="append", default=[], metavar="KEY=VALUE", help="any other sbatch option (repeatable): mail-type=END"
    )
    r.add_argument("--max-parallel", type=int, metavar="N", help="array elements of a --sweep that may run at once")
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="submit one job array over these values (repeat for a grid)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the batch script and the resolved config; submit nothing")
    p.add_argument("--follow", action="store_true", help="stream the job's log until it ends; exit with its outcome")
    p.add_argument("--status", metavar="DIR", type=Path, help="print a table of the runs below DIR (a run or a sweep) and exit")
    p.add_argument("--check", action="store_true", help="preflight: a short job that checks saving, signals, requeue and files")
    p.add_argument("--torchrun", action="store_true", help="with --check: check slurm/torchrun.sbatch's signal chain instead")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- what to run


def sweep_points(specs: list[str]) -> list[list[str]]:
    """`["optim.lr=0.1,0.2", "train.seed=0,1"]` -> the grid of override lists."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not values or "." not in key:
            raise UserError(f"--sweep {spec!r} is not of the form section.key=v1,v2 (e.g. --sweep optim.lr=0.01,0.05)")
        repeated = sorted({v for v in values.split(",") if values.split(",").count(v) > 1})
        if repeated:  # two jobs would train in one run folder
            raise UserError(f"--sweep {spec!r} repeats {', '.join(repeated)}; give each value once")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(p) for p in itertools.product(*axes)] if axes else [[]]


def resolve(args: argparse.Namespace) -> list[tuple[config.Config, list[str]]]:
    """One resolved config per job (more than one: a sweep), with absolute paths, checked like train/main.py does."""
    config_file = args.config if args.config is not None else config.DEFAULT_CONFIG
    base = config.from_files_and_overrides(config_file, args.overrides)
    jobs = []
    for point in sweep_points(args.sweep):
        overrides = list(args.overrides) + point
        if point:
            name = ",".join(o.replace("/", "_") for o in point)
            overrides.append(f"log.run_dir={Path(base.log.run_dir) / name}")
        cfg = config.from_files_and_overrides(config_file, overrides)
        absolute = [f"log.run_dir={Path(cfg.log.run_dir).resolve()}", f"data.root={Path(cfg.data.root).expanduser().resolve()}"]
        jobs.append((config.from_files_and_overrides(config_file, overrides + absolute), point))
    folders = [cfg.log.run_dir for cfg, _ in jobs]
    shared = next((f for f in folders if folders.count(f) > 1), None)
    if shared is not None:  # e.g. --sweep data.root=a/b,a_b: folder names replace / with _
        raise UserError(f"two sweep points would train in one run folder, {shared}; sweep each key once, each value once")
    return jobs


def array_logs(params: dict, folder: Path) -> dict:
    """Each array element's logs in its own run folder: `folder/elements/<index>` links to `<run>/submitit`.

    SLURM can only name a log by the array index (%a); the link turns the index into the run folder.
    """
    elements = folder / "elements"
    logs = {"output": f"{elements}/%a/%A_%a_0_log.out", "error": f"{elements}/%a/%A_%a_0_log.err"}
    params = dict(params, additional_parameters={**params["additional_parameters"], **logs})
    srun_logs = ["--output", f"{elements}/%a/%A_%a_%t_log.out", "--error", f"{elements}/%a/%A_%a_%t_log.err"]
    params["srun_args"] = [*params["srun_args"], *srun_logs]  # srun takes the last --output
    return params


def link_elements(folder: Path, jobs: list[tuple[config.Config, list[str]]]) -> None:
    elements = folder / "elements"
    elements.mkdir(parents=True, exist_ok=True)
    for index, (cfg, _) in enumerate(jobs):
        logs = Path(cfg.log.run_dir) / "submitit"
        logs.mkdir(parents=True, exist_ok=True)
        link = elements / str(index)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(logs)


def make_executor(args: argparse.Namespace, folder: Path, name: str, array: bool):
    import submitit

    if args.cluster == "slurm":
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=args.requeues)
        params = resources.slurm_parameters(args, name)
        executor.update_parameters(**(array_logs(params, folder) if array else params))
    elif args.cluster == "local":
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=args.requeues)
        executor.update_parameters(
            timeout_min=args.time,
            gpus_per_node=args.gpus_per_node,
            tasks_per_node=args.tasks_per_node or max(1, args.gpus_per_node),
            signal_delay_s=args.signal_delay,
        )
    else:
        executor = submitit.DebugExecutor(folder=folder)
    return executor


def batch_script(args: argparse.Namespace, folder: Path, name: str, array: int = 0) -> str:
    """The sbatch file submitit would write, without needing SLURM on this machine.

    submitit has no public way to render it: `_make_sbatch_string` and the `submitit.core._submit`
    command are its own, which is why pyproject.toml pins submitit to the 1.5 series.
    """
    # imported after main() set SUBMITIT_PREEMPT_SIGNAL: submitit reads it once, at import
    from submitit.slurm.slurm import _make_sbatch_string

    params = resources.slurm_parameters(args, name)
    if array:
        params = dict(array_logs(params, folder), map_count=array)
    command = " ".join([sys.executable, "-u -m submitit.core._submit", str(folder)])
    return _make_sbatch_string(command=command, folder=folder, **params)


# ---------------------------------------------------------------------------- the command


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)

    def body() -> int:
        if args.status is not None:
            from launch import status

            return status.main(args.status)
        resources.check(args)
        if args.signal:
            # submitit reads its preemption signal from the environment when it is imported; the
            # job inherits the variable, so both sides agree
            os.environ["SUBMITIT_PREEMPT_SIGNAL"] = resources.signal_name(args.signal)
        if args.cluster is None:
            args.cluster = "slurm" if shutil.which("sbatch") else "local"
        if args.torchrun and not args.check:
            raise UserError(
                "--torchrun goes with --check (the launcher starts one task per GPU; for torchrun use slurm/torchrun.sbatch)"
            )
        if args.cluster == "slurm" and not args.dry_run and not shutil.which("sbatch"):
            raise UserError("--cluster slurm but sbatch is not on PATH; run on the cluster's login node, or use --cluster local")
        if args.print_config:
            args.dry_run = True
        jobs = resolve(args)
        root = Path(jobs[0][0].log.run_dir) if len(jobs) == 1 else Path(jobs[0][0].log.run_dir).parent
        name = args.job_name or root.name
        if args.check:
            from launch import check

            return check.main(args, jobs, name)
        if args.dry_run:
            return dry_run(args, jobs, root / "submitit", name)
        return submit(args, jobs, root, name)

    return cli.guarded(body)


def dry_run(args, jobs, folder: Path, name: str) -> int:
    if args.cluster == "slurm":
        print(batch_script(args, folder, name, array=len(jobs) if len(jobs) > 1 else 0), end="")
    else:
        tasks = args.tasks_per_node or max(1, args.gpus_per_node)
        print(f"# --cluster {args.cluster}: {len(jobs)} job(s) of {tasks} task(s) on this machine")
    for cfg, point in jobs:
        print(f"# config{' for ' + ' '.join(point) if point else ''}:")
        print(config.dump(cfg), end="")
    return cli.Exit.OK


def write_job_configs(jobs) -> list[Path]:
    """Each job's resolved config in its run folder's submitit/: the job reads it (a preemption resumes the same config)."""
    paths = []
    for cfg, _ in jobs:
        path = Path(cfg.log.run_dir) / "submitit" / "config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config.to_dict(cfg), sort_keys=False))
        paths.append(path)
    return paths


def submit_all(args, jobs, root: Path, name: str) -> list:
    """The submitit jobs: one SLURM array for a sweep; locally one job per run folder (each its own logs)."""
    from launch.job import TrainJob

    if args.cluster == "local" and args.gpus_per_node:
        import torch  # only here: the launcher's other paths need no torch

        if not torch.cuda.is_available():
            print(
                f"warning: --gpus-per-node {args.gpus_per_node} but torch sees no GPU on this machine: "
                f"the job runs on the CPU ({args.tasks_per_node or args.gpus_per_node} process(es))",
                file=sys.stderr,
                flush=True,
            )
    calls = [TrainJob(["--config", str(path)]) for path in write_job_configs(jobs)]
    try:
        # submitit prints sbatch's stderr before raising it: the one line below says it once
        with contextlib.redirect_stderr(io.StringIO()):
            return _submit_all(args, jobs, root, name, calls)
    except UserError:
        raise
    except Exception as e:  # submitit reports sbatch's failure with its whole output
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        said = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else type(e).__name__)
        raise UserError(f"could not submit the job: {said[:300]} (is SLURM reachable from here? try sinfo)") from None


def _submit_all(args, jobs, root: Path, name: str, calls: list) -> list:
    if args.cluster == "slurm" and len(calls) > 1:
        folder = root / "submitit"
        link_elements(folder, jobs)
        submitted = make_executor(args, folder, name, array=True).submit_array(calls)
        name_elements(submitted, jobs, name)
        return submitted
    folders = [Path(cfg.log.run_dir) / "submitit" for cfg, _ in jobs]
    return [make_executor(args, folder, name, array=False).submit(call) for folder, call in zip(folders, calls)]


def name_elements(submitted, jobs, name: str) -> None:
    """Each array element named for its point (`sweep:optim.lr=0.01`), so that squeue and sacct tell them apart."""
    for job, (cfg, _) in zip(submitted, jobs):
        element = f"{name}:{Path(cfg.log.run_dir).name}"
        proc = subprocess.run(["scontrol", "update", f"JobId={job.job_id}", f"JobName={element}"], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"warning: could not name job {job.job_id} {element!r}: {proc.stderr.strip()}", file=sys.stderr, flush=True)


def log_paths(job, cfg: config.Config) -> tuple[Path, Path]:
    """Task 0's stdout and stderr of a submitted job: in its run folder's submitit/."""
    folder = Path(cfg.log.run_dir) / "submitit"
    return folder / f"{job.job_id}_0_log.out", folder / f"{job.job_id}_0_log.err"


def submit(args, jobs, root: Path, name: str) -> int:
    submitted = submit_all(args, jobs, root, name)
    where = {"slurm": "SLURM", "local": "this machine", "debug": "this process"}[args.cluster]
    print(f"submitted job {', '.join(j.job_id for j in submitted)} to {where}", flush=True)
    for job, (cfg, point) in zip(submitted, jobs):
        label = f" ({' '.join(point)})" if point else ""
        print(f"  run folder{label}: {cfg.log.run_dir}", flush=True)
        if args.cluster != "debug":
            print(f"  log: {log_paths(job, cfg)[0]}", flush=True)
    print(f"  tensorboard --logdir {root}", flush=True)
    if args.cluster == "slurm" and not args.follow:
        return cli.Exit.OK  # submitted; `--follow` waits for the outcome, `--status` shows it
    return outcome(args, submitted, jobs)


def outcome(args, submitted, jobs) -> int:
    """Follow every job to its end; the launcher's exit code is the first failing job's (0 when all completed)."""
    codes = []
    try:
        for job, (cfg, _) in zip(submitted, jobs):
            tail = watch.LogTail(*log_paths(job, cfg)) if args.cluster != "debug" else None
            if args.cluster == "slurm":
                result = watch.follow_slurm(job.job_id, tail)
            else:
                result = watch.follow_local(job, tail)
            print(result.line(job.job_id), flush=True)
            codes.append(result.exit_code)
    except KeyboardInterrupt:
        if args.cluster != "slurm":
            raise  # Ctrl-C reached the local job too: it stops, and the command says "interrupted"
        print(f"stopped following; the job goes on (scancel {' '.join(j.job_id for j in submitted)} stops it)", flush=True)
        return cli.Exit.INTERRUPTED
    return next((code for code in codes if code != cli.Exit.OK), cli.Exit.OK)


if __name__ == "__main__":
    sys.exit(main())
