"""The launcher and the sbatch scripts, against a real SLURM (slurm/devcluster) where one is reachable."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import (
    PREEMPTIBLE,
    REPO,
    SMOKE,
    assert_same_weights,
    env_for_tests,
    load,
    ok,
    one_error_line,
    only_rank_zero_wrote,
    run,
)

SUBMIT = REPO / "launch" / "submit.py"


def submit(*args, cwd: Path, env=None, timeout=300):
    return run([sys.executable, SUBMIT, *args], cwd=cwd, env=env, timeout=timeout)


# The SLURM tests submit real jobs. They run against the project's dev cluster only (the marker
# slurm/devcluster/up leaves names the cluster sinfo must reach), or against whatever cluster sinfo
# reaches when this is 1 (on purpose; SBATCH_PARTITION etc. choose where); 0 turns them off.
SLURM_TESTS = "SCAFFOLD_SLURM_TESTS"


def dev_cluster_problem() -> str | None:
    """None when the cluster sinfo reaches is the dev cluster slurm/devcluster/up started here."""
    marker = Path(os.environ.get("DEVCLUSTER_DIR", "/tmp/devcluster")) / "marker"
    try:
        want = dict(line.split("=", 1) for line in marker.read_text().splitlines() if "=" in line and line[0] != "#")
    except OSError:
        return f"no {marker}: the SLURM tests run only on the dev cluster (slurm/devcluster/up), or with {SLURM_TESTS}=1"
    shown = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=20).stdout
    have = {k.strip().removesuffix("[0]"): v.strip() for k, _, v in (line.partition("=") for line in shown.splitlines())}
    if any(have.get(key) != value for key, value in want.items()):
        return (
            f"the SLURM reachable here (cluster {have.get('ClusterName')}, {have.get('SlurmctldHost')}) is not the dev "
            f"cluster of {marker}; set {SLURM_TESTS}=1 to run the SLURM tests against it on purpose"
        )
    return None


def slurm_problem() -> str | None:
    if os.environ.get(SLURM_TESTS) == "0":
        return f"{SLURM_TESTS}=0"
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
    return None if os.environ.get(SLURM_TESTS) == "1" else dev_cluster_problem()


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


def test_dry_run_of_a_sweep_logs_each_element_in_its_run_folder_and_passes_sbatch_options(tmp_path):
    base = tmp_path / "sweep"
    args = ["--sweep", "optim.lr=0.01,0.02,0.03", "--max-parallel", "2", "--sbatch", "exclusive", "--sbatch", "mail-type=END"]
    proc = ok(
        submit("--config", SMOKE, "--cluster", "slurm", "--dry-run", "--mem", "1.5G", *args, f"log.run_dir={base}", cwd=tmp_path)
    )
    lines = proc.stdout.splitlines()
    elements = base / "submitit" / "elements"  # elements/<index> links to <run>/submitit when submitted
    for expected in (
        "#SBATCH --array=0-2%2",
        "#SBATCH --exclusive",
        "#SBATCH --mail-type=END",
        "#SBATCH --mem=1536M",
        f"#SBATCH --output={elements}/%a/%A_%a_0_log.out",
    ):
        assert expected in lines, (expected, proc.stdout)
    srun = next(line for line in lines if line.startswith("srun "))
    logs = f"--output {elements}/%a/%A_%a_%t_log.out --error {elements}/%a/%A_%a_%t_log.err"
    assert f"{logs} {sys.executable} -u -m submitit.core._submit" in srun  # srun takes the last --output
    assert not base.exists()


# Each invalid resource, refused in one line before anything is written or submitted (--dry-run too).
INVALID = {
    "--time 0": "error: --time 0: give the time limit in minutes, more than 0 (e.g. --time 60)",
    "--nodes 0": "error: --nodes 0: a job needs at least 1 node",
    "--gpus-per-node -2": "error: --gpus-per-node -2: give 0 (CPUs only) or more",
    "--tasks-per-node 0": "error: --tasks-per-node 0: give 1 or more",
    "--mem 0.0001": "error: --mem 0.0001 has no unit (SLURM would read megabytes); give one, e.g. --mem 16G or --mem 4000M",
    "--mem 500M": "error: --mem 500M is below the 1G floor: one training process alone takes about 1 GB; give e.g. --mem 16G "
    "(memory per node)",
    "--signal BOGUS": "error: --signal BOGUS is not a signal a job can stop on; use one of USR1, USR2, TERM, INT, HUP, QUIT, "
    "ALRM (USR2 by default)",
    "--signal KILL": "error: --signal KILL cannot be caught, so the job could not save; use one of USR1, USR2, TERM, INT, HUP, "
    "QUIT, ALRM (USR2 by default)",
    "--signal-delay -5": "error: --signal-delay -5: give the seconds before the time limit at which the job is told to save, "
    "from 0 to less than --time (3600 s)",
    "--time 2 --signal-delay 120": "error: --signal-delay 120: give the seconds before the time limit at which the job is told "
    "to save, from 0 to less than --time (120 s)",
    "--requeues -1": "error: --requeues -1: give 0 (never requeue) or more",
    "--max-parallel 0": "error: --max-parallel 0: give how many array elements may run at once, 1 or more",
    "--sbatch time=10": "error: --sbatch time: the launcher sets this itself; use --time",
    "--sbatch output=x.log": "error: --sbatch output: the launcher writes the job's logs into the run folder itself",
}


@pytest.mark.parametrize("resources", list(INVALID))
def test_invalid_resources_are_refused_before_submission(resources, tmp_path):
    # --dry-run for SLURM (no SLURM needed), and a local job: nothing may start either way
    mode = ["--cluster", "slurm", "--dry-run"] if len(resources) % 2 else ["--cluster", "local"]
    proc = submit("--config", SMOKE, *mode, *resources.split(), f"log.run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert one_error_line(proc) == INVALID[resources] and proc.returncode == 2
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not shutil.which("sbatch"), reason="sbatch is not installed here")
def test_an_unreachable_controller_is_one_line(tmp_path):
    """The real sbatch, pointed at a controller that is not there."""
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=nowhere\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort=1\nNodeName=n1\n")
    env = env_for_tests(SLURM_CONF=str(conf))
    proc = submit("--config", SMOKE, "--cluster", "slurm", f"log.run_dir={tmp_path / 'run'}", cwd=tmp_path, env=env, timeout=120)
    line = one_error_line(proc)
    assert line.startswith("error: could not submit the job: sbatch: error: ") and line.endswith(
        "(is SLURM reachable from here? try sinfo)"
    )


def test_the_check_verdict_fails_what_a_cluster_gets_wrong():
    """The preflight's table for what the dev cluster cannot stage: a rank that never saw the signal, an unshared run
    folder, loopback across nodes, a job that did not come back; a save longer than KillWait warns, longer than the
    signal delay fails; ranks that stopped at different steps fail."""
    from launch.check import verdict
    from launch.watch import Outcome

    network = [
        {"host": h, "interface": i, "address": a, "spans_nodes": True}
        for h, i, a in (("n1", "eth0", "10.0.0.1"), ("n2", "lo", "127.0.0.1"))
    ]
    report = {
        "nodes": "n[1-2]",
        "kill_wait_s": 30.0,
        "save": {"seconds": 40.0, "bytes": 1074432739, "model": "vgg16"},
        "drill": [{"step": 6, "signals": ["SIGUSR2"]}, {"step": 6, "signals": []}],
        "files": [{"unread": [1], "fs": "ext4"}, {"unread": [0], "fs": "ext4"}],
        "network": network,
    }
    args = argparse.Namespace(signal_delay=120, torchrun=False)
    rows = {check: (result, detail) for check, result, detail in verdict(report, Outcome("FAILED", 1), args, "USR2")}
    assert {check: result for check, (result, _) in rows.items()} == {
        "save": "warn",
        "signal (srun)": "FAIL",
        "requeue": "FAIL",
        "shared run folder": "FAIL",
        "network": "FAIL",
    }
    assert rows["save"][1].endswith("more than SLURM's KillWait 30 s, so a SIGTERM (preemption) kills it midway")
    assert rows["signal (srun)"][1] == "ranks 1 of 2 never saw SIGUSR2 (they stopped with the others)"
    assert rows["shared run folder"][1].startswith("rank 1 (n2) and rank 0 cannot read each other's files")
    report.update(
        save={"seconds": 200.0, "bytes": 1, "model": "vgg16"},
        drill=[{"step": 6, "signals": ["SIGUSR2"]}, {"step": 7, "signals": ["SIGUSR2"]}],
    )
    rows = {check: (result, detail) for check, result, detail in verdict(report, Outcome("FAILED", 1), args, "USR2")}
    assert rows["save"][0] == "FAIL" and "give --signal-delay 460 or more" in rows["save"][1]
    assert rows["signal (srun)"] == ("FAIL", "the ranks stopped at different steps: [6, 7]")


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
    assert re.search(r"job \d+ ended: FINISHED \(exit 0\)", proc.stdout), proc.stdout
    assert "done: test_acc" in proc.stdout  # the job's log, streamed
    assert "goodput: 1 attempt (1 completed), 0 s of work redone and " in proc.stdout
    run_dir = tmp_path / "run"
    assert (run_dir / "checkpoints" / "last.pt").is_file() and (run_dir / "metrics.jsonl").is_file()
    assert list((run_dir / "submitit").glob("*_0_log.out"))  # submitit's logs in the run folder
    assert f"tensorboard --logdir {run_dir}" in proc.stdout
    [attempt] = [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]
    assert (attempt["ended"], attempt["exit_code"], attempt["step"], attempt["ranks"]) == ("completed", 0, 16, 1)
    table = ok(submit("--status", tmp_path, cwd=tmp_path)).stdout.splitlines()
    assert table[0].split() == ["run", "state", "epoch", "best", "test_acc", "attempts"]
    assert re.fullmatch(r"run +completed +1/1 +0\.\d{4} +1 attempt \(1 completed\).*", table[1]), table


@pytest.mark.parametrize("cluster", ["local", "debug"])
def test_a_failing_job_gives_its_exit_code(cluster, tmp_path):
    """The training's own code (2: bad input, here a dataset that is not there), never a 0 for a job that failed."""
    missing = ["data.name=cifar10", f"data.root={tmp_path / 'nothing'}", "data.download=false"]
    proc = submit("--config", SMOKE, "--cluster", cluster, *missing, f"log.run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert re.search(r"job \S+ ended: FAILED \(exit 2\)", proc.stdout), proc.stdout
    assert f"error: CIFAR-10 is not in {tmp_path / 'nothing' / 'cifar-10-batches-py'}" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


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
    only_rank_zero_wrote(run_dir)
    rank1 = (run_dir / "submitit" / f"{job}_1_log.out").read_text().splitlines()
    assert rank1 and all(line.startswith("submitit ") for line in rank1), rank1  # rank 1 printed nothing of its own


def attempts(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]


def assert_no_error_but_slurms(*logs: Path) -> None:
    """A preemption is a normal event: no traceback, no ERROR; the only error lines are SLURM's own notices."""
    for log in logs:
        text = log.read_text()
        assert "Traceback" not in text and "ERROR" not in text, (log, text[-3000:])
        for line in text.splitlines():
            if "error" in line.lower():
                assert re.match(
                    r"slurmstepd-\S+: error: \*\*\* (JOB|STEP) \S+ ON \S+ CANCELLED AT \S+ DUE TO JOB REQUEUE", line
                ), line


@needs_slurm
def test_scontrol_requeue_of_a_launcher_job_resumes_and_follow_exits_0(preemptible_reference, tmp_path):
    """SIGTERM, as `scontrol requeue` and a preempting partition send it: saved at a step, requeued by SLURM, resumed."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        SUBMIT,
        *PREEMPTIBLE,
        "--cluster",
        "slurm",
        "--tasks-per-node",
        "2",
        "--follow",
        f"log.run_dir={run_dir}",
    ]
    follower = subprocess.Popen(list(map(str, cmd)), cwd=tmp_path, env=env_for_tests(), stdout=subprocess.PIPE, text=True)
    seen = []
    for line in follower.stdout:  # --follow streams the job's log
        seen.append(line)
        if re.match(r"epoch 1 step (8|12|16)/64", line):
            subprocess.run(["scontrol", "requeue", job_id_of("".join(seen))], check=True)
            break
    out = "".join(seen) + follower.communicate(timeout=300)[0]
    job = job_id_of(out)
    assert follower.returncode == 0, out[-3000:]
    assert out.rstrip().endswith(f"job {job} ended: COMPLETED (exit 0), requeued 1 time"), out[-3000:]
    stopped = int(
        re.search(r"stopped by signal at epoch 1 step (\d+)/64 \(global step \d+\), SIGTERM on 2 of 2 ranks", out).group(1)
    )
    assert f"resumed from {run_dir / 'checkpoints' / 'last.pt'} at epoch 1 step {stopped}/64 (global step {stopped})" in out
    assert "goodput: 2 attempts (1 preempted, 1 completed), 0 s of work redone and " in out
    first, second = attempts(run_dir)
    assert (first["ended"], first["signal"], first["step"], first["job"]) == ("preempted", "SIGTERM", stopped, job)
    assert (second["ended"], second["resumed_step"], second["redone_s"]) == ("completed", stopped, 0)
    assert_no_error_but_slurms(*(run_dir / "submitit").glob("*_log.*"))
    assert_same_weights(preemptible_reference / "checkpoints" / "last.pt", run_dir / "checkpoints" / "last.pt", exact=True)


@needs_slurm
def test_plain_sbatch_script_requeued_resumes_and_keeps_the_first_attempts_log(preemptible_reference, tmp_path):
    """slurm/train.sbatch on 2 tasks, `scontrol requeue`d mid-epoch: one log, both attempts in it, the same weights."""
    out, run_dir = tmp_path / "job.out", tmp_path / "run"
    options = ("--ntasks-per-node=2", "--cpus-per-task=1", f"--export=ALL,PYTHON={sys.executable}", f"--output={out}")
    proc = run(
        ["sbatch", "--parsable", *options, REPO / "slurm" / "train.sbatch", *PREEMPTIBLE, f"log.run_dir={run_dir}"], cwd=REPO
    )
    job = proc.stdout.strip()
    wait_for(lambda: out.exists() and re.search(r"^epoch 1 step \d+/64", out.read_text(), re.M), 180, "training to start")
    subprocess.run(["scontrol", "requeue", job], check=True)
    state = wait_for(lambda: (s := sacct_state(job)) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") and s, 240, "the end")
    log = out.read_text()
    assert state == "COMPLETED", log[-3000:]
    assert f"train.sbatch: job {job} (restart 0)" in log and f"train.sbatch: job {job} (restart 1)" in log  # appended
    stopped = int(re.search(r"stopped by signal at epoch 1 step (\d+)/64", log).group(1))
    resumed = f"resumed from {run_dir / 'checkpoints' / 'last.pt'} at epoch 1 step {stopped}/64"
    assert log.index("stopped by signal") < log.index(resumed)
    assert [a["ended"] for a in attempts(run_dir)] == ["preempted", "completed"]
    assert "Traceback" not in log
    assert_same_weights(preemptible_reference / "checkpoints" / "last.pt", run_dir / "checkpoints" / "last.pt", exact=True)


@needs_slurm
def test_sweep_is_one_job_array_each_element_named_and_logged_in_its_run_folder(tmp_path):
    base = tmp_path / "sweep"
    sweep = ("--sweep", "optim.lr=0.01,0.02", "train.epochs=1", "--follow", f"log.run_dir={base}")
    proc = ok(submit("--config", SMOKE, "--cluster", "slurm", *sweep, cwd=tmp_path))
    array = re.search(r"submitted job (\d+)_0, \1_1 to SLURM", proc.stdout)
    assert array, proc.stdout
    a = array.group(1)
    assert f"job {a}_0 ended: COMPLETED (exit 0)" in proc.stdout and f"job {a}_1 ended: COMPLETED (exit 0)" in proc.stdout
    for index, lr in enumerate(("0.01", "0.02")):
        run_dir = base / f"optim.lr={lr}"
        ckpt = load(run_dir / "checkpoints" / "last.pt")
        assert ckpt["config"]["optim"]["lr"] == float(lr) and ckpt["progress"]["epoch"] == 1
        log = (run_dir / "submitit" / f"{a}_{index}_0_log.out").read_text()  # in the element's own run folder
        assert f"run folder {run_dir}" in log and "done: test_acc" in log
    names = run(["sacct", "-X", "-n", "-P", "-j", a, "-o", "JobID,JobName"], cwd=tmp_path).stdout.split()
    assert sorted(names) == [f"{a}_0|sweep:optim.lr=0.01", f"{a}_1|sweep:optim.lr=0.02"]
    table = ok(submit("--status", base, cwd=tmp_path)).stdout.splitlines()
    assert [row.split()[:3] for row in table[1:3]] == [
        ["optim.lr=0.01", "completed", "1/1"],
        ["optim.lr=0.02", "completed", "1/1"],
    ]
    assert table[3].startswith("all 2 runs: 2 attempts (2 completed), 0 s of work redone and ")
