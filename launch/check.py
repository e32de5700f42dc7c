"""The preflight check: `launch/submit.py --check [resources]` proves the signal chain before the real job.

It submits a short job with the real job's resources and config. Its first attempt, on every rank:
- (e) network: the interface and address each rank would talk over (never loopback across nodes);
- (d) shared run folder: each rank writes a file in `<run>/preflight/<id>/`, every rank reads rank 0's
  and rank 0 reads everyone's (resuming needs every node to read what rank 0 saved);
- (a) save: rank 0 saves this model's checkpoint (weights and optimizer state, digest, fsync) there
  and times it, against `--signal-delay` and SLURM's KillWait;
- (b) signal: the ranks step like the trainer (a stop flag read at step boundaries, all ranks agreeing)
  while rank 0 sends the job the preemption signal as SLURM would: to the tasks (srun, the launcher's
  way) or, with `--torchrun`, to slurm/torchrun.sbatch itself, which passes it through srun and
  launch/torchrun.py; every rank must see it and all must stop at the same step;
- (c) requeue: the job then requeues itself from the compute node exactly as a real one does
  (submitit's handler, or the sbatch script's `scontrol requeue`), and its second attempt reports back.
The launcher waits for the job, prints a verdict table and exits 1 naming the checks that failed.

    python launch/check.py --config CFG --report DIR --preempt-with SIG [--batch]    (one rank, as torchrun runs it)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import submitit

from launch import resources, watch
from launch.job import finish
from train import cli, config
from train.cli import STOP_SIGNALS, Exit, StopFlag, UserError

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- in the job, on every rank


def measure_save(cfg: config.Config, folder: Path, device) -> dict:
    """Save this model's checkpoint (weights and optimizer state, as the trainer's) once; how long and how big."""
    import torch

    from train import checkpoint, models, optimizer

    model = models.build(dataclasses.replace(cfg.model, pretrained=False), 10).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer.make_optimizer(cfg.optim, params)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()  # momentum buffers: a checkpoint holds them as well
    (folder / "ckpt").mkdir(exist_ok=True)
    start = time.perf_counter()
    path = checkpoint.save(folder / "ckpt", {"model": model.state_dict(), "optimizer": opt.state_dict()}, is_best=False)
    seconds = time.perf_counter() - start
    size = path.stat().st_size
    path.unlink()
    return {"seconds": round(seconds, 3), "bytes": size, "model": cfg.model.name}


def filesystem(path: Path) -> str:
    """The type of the filesystem holding `path` (nfs, lustre, ext4, ...), from /proc/mounts."""
    best, kind, where = "", "?", str(path.resolve())
    try:
        for line in open("/proc/mounts"):
            _, mount, fstype, *_ = line.split()
            inside = mount == "/" or where == mount or where.startswith(mount + "/")
            if inside and len(mount) > len(best):
                best, kind = mount, fstype
    except OSError:
        pass
    return kind


def shared_folder(dist, folder: Path) -> dict:
    """Every rank reads rank 0's file, rank 0 reads every rank's (retrying 10 s: network filesystems cache)."""
    token = dist.broadcast(secrets.token_hex(8))
    nodes = folder / "nodes"
    nodes.mkdir(parents=True, exist_ok=True)
    (nodes / f"rank{dist.rank}").write_text(f"{token} {socket.gethostname()}")
    dist.any(False)  # everyone has written

    def reads(rank: int) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if (nodes / f"rank{rank}").read_text().startswith(token):
                    return True
            except OSError:
                pass
            time.sleep(0.5)
        return False

    unread = [r for r in range(dist.world_size) if not reads(r)] if dist.is_main else ([] if reads(0) else [0])
    return {"unread": unread, "fs": filesystem(folder)}


def signal_drill(dist, stop: StopFlag, send: list[str], timeout_s: float = 60.0) -> dict:
    """Step like the trainer while rank 0 signals the job; where each rank stopped and what it received."""
    step, deadline, said = 0, time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        step += 1
        if dist.is_main and step == 5:
            proc = subprocess.run(send, capture_output=True, text=True, timeout=30)
            said = proc.stderr.strip() if proc.returncode else None  # scancel refused: the verdict says why
        if dist.any(stop.requested):  # all ranks leave at the same step, as the trainer's loop does
            break
        time.sleep(0.05)
    return {"step": step, "signals": sorted({signal.Signals(s).name for s in stop.received}), "scancel": said}


def first_attempt(cfg: config.Config, folder: Path, send: list[str], stop: StopFlag) -> dict | None:
    """Checks (e), (d), (a), (b) on every rank; the report on rank 0 (None elsewhere)."""
    from train import distributed, preemption, runtime

    launch = distributed.detect()
    chosen, _ = runtime.resolve(cfg, launch)
    with distributed.setup(launch, chosen.torch_device, chosen.backend, cfg.dist.timeout_s) as dist:
        found = distributed.interface_towards(launch.master()) if launch.spans_nodes else ("lo", "127.0.0.1")
        network = dist.gather(
            {
                "host": socket.gethostname(),
                "interface": found[0] if found else None,
                "address": found[1] if found else None,
                "spans_nodes": launch.spans_nodes,
            }
        )
        files = dist.gather(shared_folder(dist, folder))
        saved = measure_save(cfg, folder, dist.device) if dist.is_main else None
        stop.at_step_boundaries()
        drill = dist.gather(signal_drill(dist, stop, send))
    if not dist.is_main:
        return None
    return {
        "job": preemption.slurm_job_id(),
        "nodes": os.environ.get("SLURM_JOB_NODELIST"),
        "network": network,
        "files": files,
        "save": saved,
        "kill_wait_s": preemption.kill_wait_s(),
        "drill": drill,
        "sent": send,
    }


def probe(argv: list[str], stop: StopFlag) -> int:
    """One rank of the check job: the first attempt's checks, or the second attempt's report that the job came back."""
    p = argparse.ArgumentParser(prog="launch/check.py")
    p.add_argument("--config", required=True)
    p.add_argument("--report", required=True, type=Path)
    # not --signal: torchrun's parser takes any prefix of its --signals-to-handle for its own, wherever it stands
    p.add_argument("--preempt-with", required=True, metavar="SIG", help="the preemption signal to send the job")
    p.add_argument("--batch", action="store_true", help="send it to the batch script (as --signal=B: does), not to the tasks")
    args = p.parse_args(argv)
    report = args.report / "report.json"
    from train.distributed import detect
    from train.preemption import slurm_job_id

    if int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0) > 0:  # (c): the requeued job came back
        if detect().rank == 0:
            data = json.loads(report.read_text())
            data["came_back"] = {"restart": int(os.environ["SLURM_RESTART_COUNT"]), "nodes": os.environ.get("SLURM_JOB_NODELIST")}
            write_report(report, data)
        return Exit.OK
    send = ["scancel", *(["--batch"] if args.batch else []), f"--signal={args.preempt_with}", str(slurm_job_id())]
    data = first_attempt(config.from_files_and_overrides(args.config, []), args.report, send, stop)
    if data is not None:
        write_report(report, data)
    return Exit.STOPPED  # the stop path a real job takes: it requeues


def write_report(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class CheckJob(submitit.helpers.Checkpointable):
    """The check as a launcher job: the same environment, stop flag and end (`launch.job.finish`) as TrainJob."""

    def __init__(self, argv: list[str]):
        self.argv = list(argv)

    def __call__(self) -> int:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        stop = StopFlag(STOP_SIGNALS)
        try:
            code = probe(self.argv, stop)
        finally:
            stop.restore()
        return finish(code, stop)


# ---------------------------------------------------------------------------- the launcher's side


def main(args: argparse.Namespace, jobs: list, name: str) -> int:
    """Submit the check job with the real job's resources, wait for it, print the verdict; 1 when a check failed."""
    if args.cluster != "slurm":
        raise UserError("--check submits a short job to SLURM; run it where sbatch is (the cluster's login node)")
    if len(jobs) > 1:
        raise UserError("--check checks one job's resources; drop --sweep (every element asks for the same)")
    if args.dry_run:
        raise UserError("--check submits a short job of its own; drop --dry-run (which shows the training job's script)")
    cfg = jobs[0][0]
    folder = cfg.run_dir / "preflight" / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(config.dump(cfg))
    sig = resources.signal_name(args.signal) if args.signal else ("USR1" if args.torchrun else "USR2")
    argv = ["--config", str(folder / "config.yaml"), "--report", str(folder), "--preempt-with", sig]
    job_id, log = submit_torchrun(args, folder, name, sig, argv) if args.torchrun else submit_srun(args, folder, name, argv)
    print(f"preflight job {job_id}{f' on partition {args.partition}' if args.partition else ''}: log {log}", flush=True)
    outcome = watch.follow_slurm(job_id, watch.LogTail(log, None) if args.follow else None)
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        report = None
    rows = verdict(report, outcome, args, sig)
    width = max(len(row[0]) for row in rows)
    print(f"{'check'.ljust(width)}  result  detail")
    for check, result, detail in rows:
        print(f"{check.ljust(width)}  {result.ljust(6)}  {detail}", flush=True)
    failed = [check for check, result, _ in rows if result == "FAIL"]
    if failed:
        cli.report(f"preflight check failed: {', '.join(failed)} (the table above says why; the job's log: {log})")
        return Exit.FAILED
    return Exit.OK


def submit_srun(args: argparse.Namespace, folder: Path, name: str, argv: list[str]) -> tuple[str, Path]:
    """The launcher's own way: submitit, one task per GPU, the preemption signal to the tasks."""
    executor = submitit.SlurmExecutor(folder=folder / "submitit", max_num_timeout=args.requeues)
    executor.update_parameters(**resources.slurm_parameters(args, f"{name}-check"))
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's stderr before raising it
            job = executor.submit(CheckJob(argv))
    except Exception as e:
        raise UserError(f"could not submit the check job: {str(e).strip().splitlines()[-1][:300]}") from None
    return job.job_id, folder / "submitit" / f"{job.job_id}_0_log.out"


def submit_torchrun(args: argparse.Namespace, folder: Path, name: str, sig: str, argv: list[str]) -> tuple[str, Path]:
    """slurm/torchrun.sbatch itself, running this check instead of train/main.py; the signal to the batch script."""
    nproc = args.tasks_per_node or max(1, args.gpus_per_node)
    options = [f"--job-name={name}-check", f"--nodes={args.nodes}", "--ntasks-per-node=1", f"--time={args.time}"]
    options += [f"--signal={sig}@{args.signal_delay}", f"--output={folder}/%x-%j.out", "--requeue"]
    options += [f"--export=ALL,TRAIN_SCRIPT=launch/check.py,NPROC_PER_NODE={nproc},PYTHON={sys.executable}"]
    if args.cpus_per_task:
        options.append(f"--cpus-per-task={args.cpus_per_task * nproc}")
    if args.gpus_per_node:
        options.append(f"--gpus-per-node={args.gpus_per_node}")
    if args.mem:
        options.append(f"--mem={resources.memory_mb(args.mem)}M")
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(args, key):
            options.append(f"--{key}={getattr(args, key)}")
    options += [f"--{k}" if v is True else f"--{k}={v}" for k, v in resources.sbatch_extra(args.sbatch).items()]
    script = REPO / "slurm" / "torchrun.sbatch"
    proc = subprocess.run(
        ["sbatch", "--parsable", *options, str(script), *argv, "--batch"], cwd=REPO, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise UserError(f"could not submit the check job: {(proc.stderr.strip().splitlines() or ['sbatch failed'])[-1][:300]}")
    job_id = proc.stdout.strip().split(";")[0]
    return job_id, folder / f"{name}-check-{job_id}.out"


def verdict(report: dict | None, outcome: watch.Outcome, args: argparse.Namespace, sig: str) -> list[tuple[str, str, str]]:
    """(check, ok | warn | FAIL, what was seen) for each check."""
    if report is None:
        return [("job", "FAIL", f"the check job ended {outcome.state} before it reported; its log says why")]
    via = "torchrun" if args.torchrun else "srun"
    return [
        save_verdict(report, args.signal_delay),
        drill_verdict(report["drill"], {"SIGTERM"} if args.torchrun else {f"SIG{sig}"}, via, sig),
        requeue_verdict(report, outcome),
        files_verdict(report["files"], report["network"]),
        network_verdict(report["network"]),
    ]


def save_verdict(report: dict, delay: int) -> tuple[str, str, str]:
    save, kill_wait = report["save"], report.get("kill_wait_s")
    seconds, fs = save["seconds"], report["files"][0]["fs"]
    seen = f"{save['model']} checkpoint ({save['bytes'] / 1e6:.1f} MB) saved in {seconds:.2f} s on {fs}"
    if seconds >= delay:
        return "save", "FAIL", f"{seen}: more than --signal-delay {delay} s; give --signal-delay {int(2 * seconds) + 60} or more"
    if kill_wait is not None and seconds >= kill_wait:
        return "save", "warn", f"{seen}: more than SLURM's KillWait {kill_wait:g} s, so a SIGTERM (preemption) kills it midway"
    return "save", "ok", f"{seen} < --signal-delay {delay} s" + (f", KillWait {kill_wait:g} s" if kill_wait is not None else "")


def drill_verdict(drill: list[dict], expected: set[str], via: str, sig: str) -> tuple[str, str, str]:
    name = f"signal ({via})"
    blind = [rank for rank, d in enumerate(drill) if not expected & set(d["signals"])]
    steps = sorted({d["step"] for d in drill})
    want = " or ".join(sorted(expected))
    if len(blind) == len(drill):
        refused = f" (scancel: {drill[0]['scancel']})" if drill[0].get("scancel") else ""
        return name, "FAIL", f"SIG{sig} sent to the job{refused}; no rank saw {want} within a minute"
    if blind:
        return name, "FAIL", f"ranks {', '.join(map(str, blind))} of {len(drill)} never saw {want} (they stopped with the others)"
    if len(steps) > 1:
        return name, "FAIL", f"the ranks stopped at different steps: {steps}"
    return name, "ok", f"SIG{sig} sent; {want} seen by all {len(drill)} ranks, all stopped at step {steps[0]}"


def requeue_verdict(report: dict, outcome: watch.Outcome) -> tuple[str, str, str]:
    back = report.get("came_back")
    if back is None or outcome.state != "COMPLETED":
        return "requeue", "FAIL", f"the job did not come back after requeueing itself (it ended {outcome.state}); see its log"
    return (
        "requeue",
        "ok",
        f"requeued from the compute node ({report['nodes']}); came back on {back['nodes']} (restart {back['restart']})",
    )


def files_verdict(files: list[dict], network: list[dict]) -> tuple[str, str, str]:
    hosts = [n["host"] for n in network]
    # rank 0 lists the ranks whose files it cannot read; any other rank lists rank 0 when it cannot read rank 0's
    unread = sorted(set(files[0]["unread"]) | {r for r, f in enumerate(files) if r and f["unread"]})
    if unread:
        who = ", ".join(f"rank {r} ({hosts[r]})" for r in unread)
        return (
            "shared run folder",
            "FAIL",
            f"{who} and rank 0 cannot read each other's files: the run folder must be on a filesystem every node sees",
        )
    return (
        "shared run folder",
        "ok",
        f"every rank reads rank 0's files and rank 0 every rank's ({files[0]['fs']}; {', '.join(sorted(set(hosts)))})",
    )


def network_verdict(network: list[dict]) -> tuple[str, str, str]:
    seen = ", ".join(f"rank {r} {n['host']} {n['interface']} {n['address']}" for r, n in enumerate(network))
    bad = [r for r, n in enumerate(network) if n["spans_nodes"] and (not n["address"] or n["address"].startswith("127."))]
    if bad:
        return "network", "FAIL", f"{seen}: ranks {bad} have no interface towards the master but loopback; set GLOO_SOCKET_IFNAME"
    return "network", "ok", seen if network[0]["spans_nodes"] else f"{seen} (one node: loopback)"


def torchrun_main() -> int:
    """One rank under slurm/torchrun.sbatch (TRAIN_SCRIPT=launch/check.py)."""
    stop = StopFlag(STOP_SIGNALS)
    return cli.guarded(lambda: probe(sys.argv[1:], stop))


if __name__ == "__main__":
    sys.exit(torchrun_main())
