"""Send a training job to SLURM, or run it here, through submitit.

    python launch/submit.py [--config FILE] [key=value ...] [--cluster slurm|local|debug] [resources]
    python launch/submit.py --config configs/cifar10_cnn.yaml --nodes 2 --gpus-per-node 4 --time 240 --follow
    python launch/submit.py --config configs/smoke.yaml --sweep optim.lr=0.01,0.02   # one job array

The same config and overrides as `train/main.py`. The job runs `train.main.main` in every task
(one task per GPU, no torchrun inside); a preempted or timed-out job saves at a step boundary,
requeues itself and resumes from `<run>/checkpoints/last.pt`. submitit's files and the job logs
go to `<run>/submitit/`, beside TensorBoard and the checkpoints.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

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
    r.add_argument("--mem", type=float, metavar="GB", help="memory per node in GB")
    r.add_argument("--partition")
    r.add_argument("--time", type=int, default=60, metavar="MIN", help="time limit in minutes (default 60)")
    r.add_argument("--account")
    r.add_argument("--qos")
    r.add_argument("--constraint")
    r.add_argument("--job-name", help="default: the run folder's name")
    r.add_argument(
        "--signal", default=None, metavar="SIG", help="preemption signal sent before the time limit (default USR2, submitit's)"
    )
    r.add_argument("--signal-delay", type=int, default=120, metavar="S", help="send it S seconds before the time limit")
    r.add_argument("--requeues", type=int, default=3, help="how many times a timed-out job may requeue itself")
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="submit one job array over these values (repeat for a grid)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the batch script and the resolved config; submit nothing")
    p.add_argument("--follow", action="store_true", help="stream the job's log until it ends")
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
        "additional_parameters": {"requeue": True},
    }
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.mem:
        params["mem"] = f"{int(args.mem)}GB" if args.mem == int(args.mem) else f"{int(args.mem * 1024)}MB"
    for key in ("cpus_per_task", "partition", "account", "qos", "constraint"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    return params


def make_executor(args: argparse.Namespace, folder: Path, name: str):
    import submitit

    if args.cluster == "slurm":
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=args.requeues)
        executor.update_parameters(**slurm_parameters(args, name))
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


def batch_script(args: argparse.Namespace, folder: Path, name: str) -> str:
    """The sbatch file submitit would write, without needing SLURM on this machine.

    submitit has no public way to render it: `_make_sbatch_string` and the `submitit.core._submit`
    command are its own, which is why pyproject.toml pins submitit to the 1.5 series.
    """
    # imported after main() set SUBMITIT_PREEMPT_SIGNAL: submitit reads it once, at import
    from submitit.slurm.slurm import _make_sbatch_string

    params = slurm_parameters(args, name)
    if len(sweep_points(args.sweep)) > 1:
        params["map_count"] = len(sweep_points(args.sweep))
    command = " ".join([sys.executable, "-u -m submitit.core._submit", str(folder)])
    return _make_sbatch_string(command=command, folder=folder, **params)


# ---------------------------------------------------------------------------- following a job


def follow(job, poll_s: float = 2.0) -> str:
    """Print the job's stdout and stderr (task 0) as they grow, until the job ends; return its state."""
    offsets: dict[Path, int] = {}

    def drain():
        for path, stream in ((job.paths.stdout, sys.stdout), (job.paths.stderr, sys.stderr)):
            if path.exists():
                with open(path, errors="replace") as f:
                    f.seek(offsets.get(path, 0))
                    text = f.read()
                    offsets[path] = f.tell()
                if text:
                    stream.write(text)
                    stream.flush()

    while not job.done(force_check=True):
        drain()
        time.sleep(poll_s)
    drain()
    # done() sees the result files; SLURM's accounting can take a few seconds to say so too
    deadline = time.monotonic() + 60
    while job.state in ("RUNNING", "PENDING", "REQUEUED", "COMPLETING", "UNKNOWN") and time.monotonic() < deadline:
        time.sleep(poll_s)
        job.watcher.update()
    return job.state


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.signal:
        # submitit reads its preemption signal from the environment when it is imported; the
        # job inherits the variable, so both sides agree
        os.environ["SUBMITIT_PREEMPT_SIGNAL"] = args.signal.upper().removeprefix("SIG")

    def body() -> int:
        if args.cluster is None:
            args.cluster = "slurm" if shutil.which("sbatch") else "local"
        if args.cluster == "slurm" and not args.dry_run and not shutil.which("sbatch"):
            raise UserError("--cluster slurm but sbatch is not on PATH; run on the cluster's login node, or use --cluster local")
        if args.print_config:
            args.dry_run = True
        jobs = resolve(args)
        root = Path(jobs[0][0].log.run_dir) if len(jobs) == 1 else Path(jobs[0][0].log.run_dir).parent
        folder = root / "submitit"
        name = args.job_name or root.name
        if args.dry_run:
            return dry_run(args, jobs, folder, name)
        return submit(args, jobs, root, folder, name)

    return cli.guarded(body)


def dry_run(args, jobs, folder: Path, name: str) -> int:
    if args.cluster == "slurm":
        print(batch_script(args, folder, name), end="")
    else:
        tasks = args.tasks_per_node or max(1, args.gpus_per_node)
        print(f"# --cluster {args.cluster}: {len(jobs)} job(s) of {tasks} task(s) on this machine")
    for cfg, point in jobs:
        print(f"# config{' for ' + ' '.join(point) if point else ''}:")
        print(config.dump(cfg), end="")
    return cli.Exit.OK


def submit(args, jobs, root: Path, folder: Path, name: str) -> int:
    from launch.job import TrainJob

    folder.mkdir(parents=True, exist_ok=True)
    calls = []
    for cfg, _ in jobs:
        job_config = Path(cfg.log.run_dir) / "submitit" / "config.yaml" if len(jobs) > 1 else folder / "config.yaml"
        job_config.parent.mkdir(parents=True, exist_ok=True)
        job_config.write_text(yaml.safe_dump(config.to_dict(cfg), sort_keys=False))
        calls.append(TrainJob(["--config", str(job_config)]))
    if args.cluster == "local" and args.gpus_per_node:
        import torch  # only here: the launcher's other paths need no torch

        if not torch.cuda.is_available():
            print(
                f"warning: --gpus-per-node {args.gpus_per_node} but torch sees no GPU on this machine: "
                f"the job runs on the CPU ({args.tasks_per_node or args.gpus_per_node} process(es))",
                file=sys.stderr,
                flush=True,
            )
    executor = make_executor(args, folder, name)
    submitted = executor.submit_array(calls) if len(calls) > 1 else [executor.submit(calls[0])]
    where = {"slurm": "SLURM", "local": "this machine", "debug": "this process"}[args.cluster]
    ids = ", ".join(j.job_id for j in submitted)
    print(f"submitted job {ids} to {where}", flush=True)
    for job, (cfg, point) in zip(submitted, jobs):
        label = f" ({' '.join(point)})" if point else ""
        print(f"  run folder{label}: {cfg.log.run_dir}", flush=True)
        print(f"  log: {job.paths.stdout}", flush=True)
    print(f"  tensorboard --logdir {root}", flush=True)
    if args.cluster == "debug":
        try:
            submitted[0].result()
        except Exception as e:  # the trainer already printed its one-line error
            print(f"job failed: {str(e).strip().splitlines()[-1]}", file=sys.stderr, flush=True)
            return 1
        return 0
    if args.follow or args.cluster == "local":
        states = [follow(job) for job in submitted]
        print(f"job {ids} ended: {', '.join(states)}", flush=True)
        return 0 if all(s in ("COMPLETED", "FINISHED", "DONE") for s in states) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
