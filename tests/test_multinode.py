"""Across nodes for real: a 2-node SLURM on this machine (slurm/devcluster/up --nodes 2, network namespaces).

Each node is a network namespace with its own address and hostname; the jobs below run gloo
between them. The nodes share this machine's cores, so every task is given one core
(--cpus-per-task=1) and the ranks do not oversubscribe it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
from test_launch import attempts, job_id_of, sacct_state, sbatch, slurm_problem, submit, wait_for

from conftest import BITWISE, PREEMPTIBLE, REPO, SMOKE, assert_same_weights, load, ok, only_rank_zero_wrote, run


def two_node_problem() -> str | None:
    problem = slurm_problem()
    if problem:
        return problem
    nodes = set(subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split())
    if len(nodes) >= 2:
        return None
    probe = subprocess.run(["ip", "netns", "add", "scaffold-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"network namespaces are not allowed here ({probe.stderr.strip() or 'ip netns failed'}): no 2-node cluster"
    subprocess.run(["ip", "netns", "del", "scaffold-probe"], capture_output=True)
    return f"the running dev cluster has {len(nodes)} node(s); start it with slurm/devcluster/up --nodes 2"


pytestmark = pytest.mark.skipif(two_node_problem() is not None, reason=str(two_node_problem()))

SBATCH_ENV = f"--export=ALL,PYTHON={sys.executable}"
MN = ["--config", SMOKE, "data.augment=[crop,flip]"]  # the smoke run with the default augmentation


def batch(script: str, *args, options=(), export=SBATCH_ENV, out):
    """slurm/SCRIPT ARGS submitted from the repository root; (job id, final state) once it ended."""
    return sbatch(REPO / "slurm" / script, *args, options=(*options, export, f"--output={out}"))


@pytest.fixture(scope="module")
def one_process(one_process_run):
    """The same global batch in one process: what every multi-node run must reach."""
    return one_process_run(MN)


def network_line(log: str) -> list[tuple[str, str, str]]:
    line = next(line for line in log.splitlines() if line.startswith("network: "))
    return re.findall(r"rank \d+ (\S+) (\S+) (\S+)", line)


def two_nodes_one_task_each(tmp_path, *args) -> tuple[str, str]:
    """slurm/train.sbatch ARGS on 2 nodes, one task and one core each, into tmp_path/run: (job id, its log), COMPLETED."""
    out = tmp_path / "job.out"
    options = ("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1")
    job, state = batch("train.sbatch", *args, f"log.run_dir={tmp_path / 'run'}", options=options, out=out)
    log = out.read_text()
    assert state == "COMPLETED", log[-3000:]
    return job, log


def test_srun_path_across_two_nodes(one_process, tmp_path):
    job, log = two_nodes_one_task_each(tmp_path, *MN)
    assert "on 2 x cpu" in log and "done: test_acc" in log
    bindings = network_line(log)  # each rank on its own node, on the namespace's interface, never loopback
    assert [b[0] for b in bindings] == ["node1", "node2"]
    assert all(iface != "lo" and addr.startswith("10.77.0.") for _, iface, addr in bindings), bindings
    # crop + flip keyed per image: measured drift from 1 process 2.3e-5 (max abs weight difference, 32 steps); atol 1e-4
    assert_same_weights(one_process / "checkpoints" / "last.pt", tmp_path / "run" / "checkpoints" / "last.pt", exact=False)
    only_rank_zero_wrote(tmp_path / "run")


def test_torchrun_sbatch_two_nodes_two_processes_each(one_process, tmp_path):
    out = tmp_path / "job.out"
    job, state = batch(
        "torchrun.sbatch",
        *MN,
        f"log.run_dir={tmp_path / 'run'}",
        options=("--nodes=2", "--cpus-per-task=2"),
        export=f"{SBATCH_ENV},NPROC_PER_NODE=2",
        out=out,
    )
    log = out.read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "on 4 x cpu" in log
    assert [b[0] for b in network_line(log)] == ["node1", "node1", "node2", "node2"]
    # measured drift from 1 process: 2.2e-8 on these 4 ranks; atol 1e-4
    assert_same_weights(one_process / "checkpoints" / "last.pt", tmp_path / "run" / "checkpoints" / "last.pt", exact=False)
    only_rank_zero_wrote(tmp_path / "run")


def test_launcher_two_node_job_survives_preemption(preemptible_reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = ok(
        submit(
            *PREEMPTIBLE,
            "--cluster",
            "slurm",
            "--nodes",
            "2",
            "--tasks-per-node",
            "1",
            "--cpus-per-task",
            "1",
            f"log.run_dir={run_dir}",
            cwd=tmp_path,
        )
    )
    job = job_id_of(proc.stdout)
    log = run_dir / "submitit" / f"{job}_0_log.out"
    wait_for(lambda: log.exists() and re.search(r"^epoch 1 step \d+/64", log.read_text(), re.M), 120, "training")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait_for(lambda: "Requeued job" in log.read_text(), 60, "the requeue")
    wait_for(lambda: sacct_state(job) in ("COMPLETED", "FAILED", "CANCELLED"), 180, "the requeued job to end")
    text = log.read_text()
    assert sacct_state(job) == "COMPLETED", text[-3000:]
    stopped = int(re.search(r"stopped by signal at epoch 1 step (\d+)/64", text).group(1))
    assert f"resumed from {run_dir / 'checkpoints' / 'last.pt'} at epoch 1 step {stopped}/64 (global step {stopped})" in text
    assert text.count("network: rank 0 node1") == 2  # both runs of the job spanned the two nodes
    assert [(a["ended"], a["nodes"], a["signal"] if "signal" in a else None) for a in attempts(run_dir)] == [
        ("timed out", "node[1-2]", "SIGUSR2"),  # submitit's time-limit signal, as --signal-delay sends it
        ("completed", "node[1-2]", None),
    ]
    assert_same_weights(preemptible_reference / "checkpoints" / "last.pt", run_dir / "checkpoints" / "last.pt", exact=True)


def test_torchrun_sbatch_time_limit_signal_resumes_at_the_signals_step(preemptible_reference, tmp_path):
    """torchrun.sbatch's time-limit signal (B:USR1, here by scancel -b): the ranks save at that step, the script requeues,
    the job resumes there, not at the last periodic save; one log holds both attempts."""
    out, run_dir = tmp_path / "job.out", tmp_path / "run"
    options = ("--nodes=2", "--cpus-per-task=1", SBATCH_ENV, f"--output={out}")
    job = run(
        ["sbatch", "--parsable", *options, REPO / "slurm" / "torchrun.sbatch", *PREEMPTIBLE, f"log.run_dir={run_dir}"], cwd=REPO
    )
    job = job.stdout.strip()
    wait_for(lambda: out.exists() and re.search(r"^epoch 1 step \d+/64", out.read_text(), re.M), 180, "training to start")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    state = wait_for(lambda: (s := sacct_state(job)) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") and s, 240, "the end")
    log = out.read_text()
    assert state == "COMPLETED", log[-3000:]
    assert f"torchrun.sbatch: job {job} (restart 0)" in log and f"torchrun.sbatch: job {job} (restart 1)" in log
    stopped = int(
        re.search(r"stopped by signal at epoch 1 step (\d+)/64 \(global step \d+\), [A-Z0-9, ]+ on 2 of 2 ranks", log).group(1)
    )
    assert 4 <= stopped < 64  # the signal's step: this run saves nowhere else in the epoch
    assert f"resumed from {run_dir / 'checkpoints' / 'last.pt'} at epoch 1 step {stopped}/64 (global step {stopped})" in log
    assert "torchrun: the workers stopped after SIGUSR1 and saved; exit 75" in log and "Traceback" not in log
    assert [a["ended"] for a in attempts(run_dir)] == ["timed out", "completed"]
    assert_same_weights(preemptible_reference / "checkpoints" / "last.pt", run_dir / "checkpoints" / "last.pt", exact=True)


def verdict(stdout: str) -> dict[str, tuple[str, str]]:
    """The check's table: {check: (ok | warn | FAIL, detail)}."""
    rows = stdout[stdout.index("check ") :].splitlines()[1:]
    return {m.group(1): (m.group(2), m.group(3)) for m in (re.match(r"(\S.*?) {2,}(ok|warn|FAIL) {2,}(.*)", r) for r in rows)}


CHECKS = ["save", "signal (srun)", "requeue", "shared run folder", "network"]


def test_preflight_check_passes_through_srun(tmp_path):
    check = ("--check", "--nodes", "2", "--tasks-per-node", "1", "--cpus-per-task", "1", f"log.run_dir={tmp_path / 'run'}")
    table = verdict(ok(submit("--config", SMOKE, *check, cwd=tmp_path, timeout=400)).stdout)
    assert list(table) == CHECKS and {result for result, _ in table.values()} == {"ok"}, table
    assert re.match(r"SIGUSR2 sent; SIGUSR2 seen by all 2 ranks, all stopped at step \d+$", table["signal (srun)"][1])
    assert table["network"][1] == "rank 0 node1 eth0 10.77.0.11, rank 1 node2 eth0 10.77.0.12"
    assert "came back on node[1-2] (restart 1)" in table["requeue"][1]


def test_preflight_check_through_torchrun_fails_when_the_signal_delay_is_shorter_than_the_save(tmp_path):
    check = ("--check", "--torchrun", "--nodes", "2", "--tasks-per-node", "1", "--cpus-per-task", "1", "--signal-delay", "0")
    proc = submit("--config", SMOKE, *check, f"log.run_dir={tmp_path / 'run'}", cwd=tmp_path, timeout=400)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    table = verdict(proc.stdout)
    assert list(table) == ["save", "signal (torchrun)", *CHECKS[2:]], table
    assert table["save"][0] == "FAIL"
    assert re.match(r"cnn checkpoint \(\d+\.\d MB\) saved in \d+\.\d+ s on \S+: more than --signal-delay 0 s", table["save"][1])
    assert all(table[c][0] == "ok" for c in CHECKS[2:]) and table["signal (torchrun)"][0] == "ok", table  # the chain works
    assert table["signal (torchrun)"][1].startswith("SIGUSR1 sent; SIGTERM seen by all 2 ranks")
    assert proc.stderr.startswith("error: preflight check failed: save (the table above says why; the job's log: ")


def test_a_rank_killed_on_node_two_ends_the_job_and_a_rerun_resumes(one_process, tmp_path):
    out = tmp_path / "job.out"
    args = (*MN, "train.save_every_steps=8", f"log.run_dir={tmp_path / 'run'}")
    options = ("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1")
    start = time.monotonic()
    job, state = batch("train.sbatch", *args, options=options, export=f"{SBATCH_ENV},SCAFFOLD_FAULT=step@20:1", out=out)
    assert time.monotonic() - start < 60  # ended promptly, nobody left waiting for the dead rank
    log = out.read_text()
    assert state == "FAILED", log[-3000:]
    assert "fault injected: SIGKILL at step (hit 20) on rank 1" in log
    assert re.search(r"error: rank 0 of 2 lost contact with the other ranks|node2: task 1: Killed", log), log[-3000:]
    assert load(tmp_path / "run" / "checkpoints" / "last.pt")["progress"]["step"] == 16
    _, state = batch("train.sbatch", *args, options=options, out=tmp_path / "rerun.out")
    text = (tmp_path / "rerun.out").read_text()
    assert state == "COMPLETED", text[-3000:]
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / 'last.pt'} at epoch 1 step 16/16 (global step 16)" in text
    # measured drift from 1 process: 2.3e-5; atol 1e-4
    assert_same_weights(one_process / "checkpoints" / "last.pt", tmp_path / "run" / "checkpoints" / "last.pt", exact=False)


def test_bitwise_mode_across_two_nodes_equals_one_process(one_process_run, tmp_path):
    """train.reproducible=bitwise, crop + flip + grayscale + jitter: 2 ranks on 2 nodes (srun, one task and one
    core each, gloo over the namespaces' network) train the 1-process model bit for bit, metrics.jsonl too."""
    job, log = two_nodes_one_task_each(tmp_path, *BITWISE)
    assert [b[0] for b in network_line(log)] == ["node1", "node2"]
    one = one_process_run(BITWISE)
    assert_same_weights(one / "checkpoints" / "last.pt", tmp_path / "run" / "checkpoints" / "last.pt", exact=True)
    logged = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, tmp_path / "run")]
    for m in logged[0] + logged[1]:
        m.pop("images_per_s")
    assert logged[0] == logged[1]
