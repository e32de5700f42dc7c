"""The launcher and the sbatch scripts, against a real SLURM (slurm/devcluster) where one is reachable."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import PREEMPTIBLE, REPO, SMOKE, assert_same_weights, env_for_tests, load, ok, one_error_line, run

SUBMIT = REPO / "launch" / "submit.py"


def submit(*args, cwd: Path, env=None, timeout=300):
    return run([sys.executable, SUBMIT, *args], cwd=cwd, env=env, timeout=timeout)


def slurm_problem() -> str | None:
    if not shutil.which("sbatch"):
        return "no SLURM here (sbatch not on PATH); .ci/run starts slurm/devcluster"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return f"sinfo failed: {e}"
    states = set(out.stdout.split())
    if out.returncode != 0 or not states & {"idle", "mix", "alloc"}:
        return (
            f"SLURM not reachable or no usable node (sinfo: {(out.stdout + out.stderr).strip()[:200]}); run slurm/devcluster/up"
        )
    return None


needs_slurm = pytest.mark.skipif(slurm_problem() is not None, reason=str(slurm_problem()))


def sacct_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True).stdout
    return out.split()[0] if out.split() else "UNKNOWN"


def wait_for(predicate, timeout: float, what: str, poll: float = 0.3):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def sbatch(script: Path, *args, options=(), env=None, timeout: float = 300) -> tuple[str, str]:
    """Submit a batch script from the repository root and wait for its end: (job id, final state).

    Polls sacct: `sbatch --wait` backs off up to 30 s between its own checks.
    """
    proc = run(["sbatch", "--parsable", *options, script, *args], cwd=REPO, env=env or env_for_tests())
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    state = wait_for(
        lambda: (s := sacct_state(job)) not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "UNKNOWN") and s,
        timeout,
        f"job {job} to end",
    )
    return job, state


def job_id_of(proc_stdout: str) -> str:
    return re.search(r"submitted job (\S+?)(,| to)", proc_stdout).group(1)


def test_dry_run_prints_the_batch_script(tmp_path):
    proc = ok(
        submit(
            "--config",
            SMOKE,
            "--cluster",
            "slurm",
            "--nodes",
            "2",
            "--gpus-per-node",
            "4",
            "--time",
            "30",
            "--partition",
            "gpu",
            "--signal",
            "USR1",
            "--signal-delay",
            "90",
            "--dry-run",
            f"log.run_dir={tmp_path / 'run'}",
            cwd=tmp_path,
        )
    )
    lines = proc.stdout.splitlines()
    for expected in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --time=30",
        "#SBATCH --signal=USR1@90",
        "#SBATCH --partition=gpu",
        "#SBATCH --requeue",
        f"#SBATCH --output={tmp_path / 'run' / 'submitit'}/%j_0_log.out",
    ):
        assert expected in lines, (expected, proc.stdout)
    assert any(line.startswith("srun ") and "--kill-on-bad-exit=1" in line for line in lines)
    assert "  name: synthetic" in lines and f"  run_dir: {tmp_path / 'run'}" in lines  # the resolved config
    assert not (tmp_path / "run").exists()  # nothing submitted, nothing written


def test_dry_run_cpu_job_has_no_gpus(tmp_path):
    proc = ok(submit("--config", SMOKE, "--cluster", "slurm", "--tasks-per-node", "2", "--dry-run", cwd=tmp_path))
    assert "#SBATCH --ntasks-per-node=2" in proc.stdout and "gpus" not in proc.stdout


def test_slurm_without_sbatch_is_one_line(tmp_path):
    env = env_for_tests(PATH=str(Path(sys.executable).parent))
    line = one_error_line(submit("--config", SMOKE, "--cluster", "slurm", cwd=tmp_path, env=env))
    assert line == "error: --cluster slurm but sbatch is not on PATH; run on the cluster's login node, or use --cluster local"


def test_bad_override_is_one_line(tmp_path):
    line = one_error_line(submit("--config", SMOKE, "--cluster", "local", "optim.lrr=1", cwd=tmp_path))
    assert line == "error: unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"


def test_local_executor_runs_the_smoke_config(tmp_path):
    """One GPU asked for: where torch sees none, the launcher says the job runs on the CPU."""
    args = ["--config", SMOKE, "--cluster", "local", "--gpus-per-node", "1", "train.epochs=1", f"log.run_dir={tmp_path / 'run'}"]
    proc = ok(submit(*args, cwd=tmp_path))
    if not torch.cuda.is_available():
        assert "warning: --gpus-per-node 1 but torch sees no GPU on this machine: the job runs on the CPU" in proc.stderr
        assert "running on: 1 process on cpu" in proc.stdout
    assert re.search(r"job \d+ ended: FINISHED", proc.stdout), proc.stdout
    assert "done: test_acc" in proc.stdout  # the job's log, streamed
    run_dir = tmp_path / "run"
    assert (run_dir / "checkpoints" / "last.pt").is_file() and (run_dir / "metrics.jsonl").is_file()
    assert list((run_dir / "submitit").glob("*_0_log.out"))  # submitit's logs in the run folder
    assert f"tensorboard --logdir {run_dir}" in proc.stdout


@needs_slurm
def test_slurm_two_task_job_completes_and_only_rank_zero_writes(tmp_path):
    run_dir = tmp_path / "run"
    proc = ok(
        submit(
            "--config", SMOKE, "--cluster", "slurm", "--tasks-per-node", "2", "--follow", f"log.run_dir={run_dir}", cwd=tmp_path
        )
    )
    job = job_id_of(proc.stdout)
    assert f"job {job} ended: COMPLETED" in proc.stdout
    assert wait_for(lambda: sacct_state(job) == "COMPLETED", 30, "sacct COMPLETED")
    assert "on 2 x cpu" in proc.stdout
    outside = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file() and "submitit" not in p.parts)
    assert [f for f in outside if "tfevents" not in f] == [
        "checkpoints/best.pt",
        "checkpoints/last.pt",
        "checkpoints/prev.pt",
        "config.yaml",
        "metrics.jsonl",
        "runtime.yaml",
        "trainer.lock",  # rank 0's lock on the run folder (train/runfolder.py)
    ]
    assert len([f for f in outside if "tfevents" in f]) == 1  # one writer, rank 0's
    rank1 = (run_dir / "submitit" / f"{job}_1_log.out").read_text().splitlines()
    assert rank1 and all(line.startswith("submitit ") for line in rank1), rank1  # rank 1 printed nothing of its own


@needs_slurm
def test_slurm_preemption_requeues_and_resumes_exactly(preemptible_reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = ok(submit(*PREEMPTIBLE, "--cluster", "slurm", "--tasks-per-node", "2", f"log.run_dir={run_dir}", cwd=tmp_path))
    job = job_id_of(proc.stdout)
    log = run_dir / "submitit" / f"{job}_0_log.out"
    wait_for(lambda: log.exists() and re.search(r"^epoch 1 step \d+/64", log.read_text(), re.M), 120, "training to start")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # what SLURM sends before the time limit
    wait_for(lambda: "Requeued job" in log.read_text(), 60, "submitit to requeue the job")
    # The requeued job starts after its BeginTime (cred_expire + 1 s: ~11 s on the dev cluster).
    # Forcing StartTime=now at once fails it: "Job credential revoked".
    wait_for(lambda: sacct_state(job) in ("COMPLETED", "FAILED", "CANCELLED"), 180, "the requeued job to end")
    assert sacct_state(job) == "COMPLETED", log.read_text()[-3000:]
    text = log.read_text()
    stopped = int(re.search(r"stopped by signal at epoch 1 step (\d+)/64", text).group(1))
    assert 4 <= stopped < 64
    assert f"resumed from {run_dir / 'checkpoints' / 'last.pt'} at epoch 1 step {stopped}/64 (global step {stopped})" in text
    assert_same_weights(preemptible_reference / "checkpoints" / "last.pt", run_dir / "checkpoints" / "last.pt", exact=True)


@needs_slurm
def test_plain_sbatch_script_trains(tmp_path):
    out = tmp_path / "job.out"
    job, state = sbatch(
        REPO / "slurm" / "train.sbatch",
        "--config",
        SMOKE,
        f"log.run_dir={tmp_path / 'run'}",
        options=(f"--export=ALL,PYTHON={sys.executable}", f"--output={out}"),
    )
    assert state == "COMPLETED", out.read_text()[-3000:] if out.exists() else state
    assert "done: test_acc" in out.read_text()
    assert load(tmp_path / "run" / "checkpoints" / "last.pt")["progress"]["epoch"] == 2


@needs_slurm
def test_sweep_is_one_job_array(tmp_path):
    base = tmp_path / "sweep"
    proc = ok(
        submit(
            "--config",
            SMOKE,
            "--cluster",
            "slurm",
            "--sweep",
            "optim.lr=0.01,0.02",
            "train.epochs=1",
            "--follow",
            f"log.run_dir={base}",
            cwd=tmp_path,
        )
    )
    array = re.search(r"submitted job (\d+)_0, \1_1 to SLURM", proc.stdout)
    assert array, proc.stdout
    assert f"job {array.group(1)}_0, {array.group(1)}_1 ended: COMPLETED, COMPLETED" in proc.stdout
    for lr in ("0.01", "0.02"):
        ckpt = load(base / f"optim.lr={lr}" / "checkpoints" / "last.pt")
        assert ckpt["config"]["optim"]["lr"] == float(lr) and ckpt["progress"]["epoch"] == 1
    assert "#SBATCH --array=0-1%2" in (base / "submitit" / f"{array.group(1)}_submission.sh").read_text()
    assert os.path.isfile(base / "submitit" / f"{array.group(1)}_1_0_log.out")
