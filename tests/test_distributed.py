"""DDP on the CPU with gloo and real processes: torchrun, srun-style variables, faults and signals."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import MAIN, SMOKE, assert_same_weights, env_for_tests, free_port, load, ok, only_rank_zero_wrote, torchrun
from train import data as data_mod
from train import models
from train.augment import Preprocess
from train.config import ModelConfig
from train.distributed import Dist, Launch, detect
from train.engine import evaluate


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_exact_evaluation_and_only_rank_zero_writes(tmp_path):
    """101 test images on 2 ranks: 64 + 37 (whole batches of 64 each), each counted once, the same accuracy as
    one process; one set of files in the run folder, and rank 1 printed nothing. (1 process vs N ranks in
    training: tests/test_scale.py.)"""
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    ok(
        torchrun(
            2,
            "--config",
            SMOKE,
            "data.synthetic_test=101",
            "train.epochs=1",
            f"log.run_dir={run_dir}",
            cwd=tmp_path,
            extra=("--log-dir", logs, "--redirects", "3"),
        )
    )
    logged = metrics(run_dir)[-1]
    assert logged["test_count"] == 101
    ckpt = load(run_dir / "checkpoints" / "last.pt")
    model = models.build(ModelConfig(name="cnn"), 10)
    model.load_state_dict(ckpt["model"])
    ds = data_mod.synthetic(1024, 101)
    one = Dist(Launch("single"), torch.device("cpu"), None)
    result = evaluate(model, data_mod.eval_loader(ds.test, 64, 0, 1), Preprocess((), one.device, True), one, 10)
    assert result["count"] == 101
    assert result["correct"] == round(logged["test_acc"] * 101)

    only_rank_zero_wrote(run_dir, checkpoints=("best.pt", "last.pt"))
    out0 = next(logs.rglob("0/stdout.log")).read_text()
    assert "done: test_acc" in out0
    for name in ("stdout.log", "stderr.log"):
        assert next(logs.rglob(f"1/{name}")).read_text().strip() == "", name


def slurm_env(rank: int, job_id: int, **extra) -> dict:
    """What srun gives each task, and nothing of torchrun's."""
    env = {
        k: v for k, v in env_for_tests().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(
        SLURM_PROCID=str(rank),
        SLURM_LOCALID=str(rank),
        SLURM_NTASKS="2",
        SLURM_JOB_NODELIST="localhost",
        SLURM_JOB_ID=str(job_id),
        SLURM_NODEID="0",
        **extra,
    )
    return env


def start_srun_pair(tmp_path, args, **extra):
    job_id = free_port() - 15000 + 20000  # the trainer listens on 15000 + job_id % 20000: a free port
    return [
        subprocess.Popen(
            [sys.executable, str(MAIN), *map(str, args)],
            cwd=tmp_path,
            env=slurm_env(r, job_id, **extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]


def test_srun_variables_form_a_group_of_two(tmp_path):
    launch = detect(slurm_env(1, 7))
    assert launch == Launch(
        "slurm", rank=1, local_rank=1, world_size=2, local_world_size=2, master_port=15007, nodelist="localhost"
    )
    assert launch.master() == "localhost"
    procs = start_srun_pair(tmp_path, ["--config", SMOKE, "train.epochs=1", f"log.run_dir={tmp_path / 'run'}"])
    (out0, err0), (out1, err1) = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], err0 + err1
    assert "on 2 x cpu" in out0 and "done: test_acc" in out0
    assert out1 == "" and err1 == ""
    assert metrics(tmp_path / "run")[-1]["test_count"] == 256


def test_network_interface_is_never_loopback():
    """The interface gloo is pinned to across nodes: the one that reaches the master, else the main one."""
    from train.distributed import interface_towards, ipv4_of

    found = interface_towards("localhost")  # the master is this machine under a loopback name
    if found is None:
        pytest.skip("this machine has no network interface besides loopback")
    name, address = found
    assert name != "lo" and not address.startswith("127.") and ipv4_of(name) == address
    assert interface_towards(address) == (name, address)  # the master at this machine's own address


def test_a_lone_slurm_task_is_one_process():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "n1"}
    assert detect(env).launcher == "single"


def test_a_dead_rank_ends_the_others_promptly(tmp_path):
    procs = start_srun_pair(tmp_path, ["--config", SMOKE, f"log.run_dir={tmp_path / 'run'}"], SCAFFOLD_FAULT="step@5:1")
    start = time.monotonic()
    (out0, err0), _ = [p.communicate(timeout=120) for p in procs]
    assert time.monotonic() - start < 60
    assert procs[1].returncode == -9 and procs[0].returncode == 1
    assert err0.strip().startswith("error: rank 0 of 2 lost contact with the other ranks") and "Traceback" not in err0
    assert len(err0.strip().splitlines()) == 1


def test_elastic_restart_resumes_and_matches(tmp_path):
    """Rank 1 dies in step 20; torchrun restarts both from last.pt (saved every 8 steps) and finishes."""
    args = ["--config", SMOKE, "data.augment=[crop,flip]", "train.save_every_steps=8"]
    ok(torchrun(2, *args, f"log.run_dir={tmp_path / 'straight'}", cwd=tmp_path))
    env = env_for_tests(SCAFFOLD_FAULT="step@20:1")  # SIGKILL in the middle of step 20
    proc = ok(torchrun(2, *args, f"log.run_dir={tmp_path / 'run'}", cwd=tmp_path, env=env, extra=("--max-restarts=1",)))
    assert "resumed from" in proc.stdout and "at epoch 1 step 16/16 (global step 16)" in proc.stdout
    assert_same_weights(
        tmp_path / "straight" / "checkpoints" / "last.pt", tmp_path / "run" / "checkpoints" / "last.pt", exact=True
    )
    assert [m["epoch"] for m in metrics(tmp_path / "run")] == [1, 2]


def test_sigterm_saves_the_step_and_a_rerun_matches(tmp_path):
    """SIGTERM to the torchrun group mid-epoch: every rank stops at the same step, rank 0 saves it, exit 75."""
    args = [
        "--config",
        SMOKE,
        "data.augment=[crop,flip]",
        "data.synthetic_train=2048",
        "log.every_steps=2",
        "train.epochs=1",
        "optim.schedule=step",
        "optim.warmup_epochs=0",
    ]
    ok(torchrun(2, *args, f"log.run_dir={tmp_path / 'straight'}", cwd=tmp_path))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        str(MAIN),
        *map(str, args),
        f"log.run_dir={tmp_path / 'run'}",
    ]
    agent = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=env_for_tests(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen = []
    for line in agent.stdout:
        seen.append(line)
        if line.startswith("epoch 1 step 10/"):
            os.killpg(agent.pid, signal.SIGTERM)
            break
    rest = agent.communicate(timeout=120)[0]
    output = "".join(seen) + rest
    assert "stopped by signal at epoch 1 step " in output, output
    ckpt = load(tmp_path / "run" / "checkpoints" / "last.pt")
    step = ckpt["progress"]["step"]
    assert 10 <= step < 32 and ckpt["progress"]["step_in_epoch"] == step  # mid-epoch, at a step boundary
    assert f"saved {tmp_path / 'run' / 'checkpoints' / 'last.pt'}" in output
    proc = ok(torchrun(2, *args, f"log.run_dir={tmp_path / 'run'}", cwd=tmp_path))
    assert (
        f"resumed from {tmp_path / 'run' / 'checkpoints' / 'last.pt'} at epoch 1 step {step}/32 (global step {step})"
        in proc.stdout
    )
    assert_same_weights(
        tmp_path / "straight" / "checkpoints" / "last.pt", tmp_path / "run" / "checkpoints" / "last.pt", exact=True
    )
    stopped, finished = [json.loads(line) for line in (tmp_path / "run" / "attempts.jsonl").read_text().splitlines()]
    assert (stopped["ended"], stopped["signal"], stopped["step"], stopped["exit_code"]) == ("stopped", "SIGTERM", step, 75)
    assert (finished["ended"], finished["resumed_step"], finished["step"], finished["redone_s"]) == ("completed", step, 32, 0)
    assert "goodput: 2 attempts (1 stopped, 1 completed), 0 s of work redone and " in proc.stdout
    for a, b in zip(metrics(tmp_path / "straight"), metrics(tmp_path / "run"), strict=True):
        assert (a["epoch"], a["step"], a["test_acc"], a["test_loss"]) == (b["epoch"], b["step"], b["test_acc"], b["test_loss"])
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-9)  # float64 partial sums, added in another order


@pytest.mark.parametrize("background", ["never", "always"])
def test_single_process_sigterm_exits_75(tmp_path, background):
    """The stop signal's checkpoint is on disk before the process says so, also from the background writer.
    SLURM signals every process of a job: sent to the process group, the DataLoader workers ignore it."""
    args = [
        "--config",
        SMOKE,
        "data.synthetic_train=4096",
        "log.every_steps=2",
        f"log.run_dir={tmp_path / 'run'}",
        f"train.save_in_background={background}",
        "data.workers=1",
    ]
    proc = subprocess.Popen(
        [sys.executable, str(MAIN), *map(str, args)],
        cwd=tmp_path,
        env=env_for_tests(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    for line in proc.stdout:
        if line.startswith("epoch 1 step 6/"):
            workers = [p for p in children(proc.pid) if "python" in open(f"/proc/{p}/cmdline").read()]
            ignored = [int(re.search(r"^SigIgn:\s+(\S+)", open(f"/proc/{p}/status").read(), re.M).group(1), 16) for p in workers]
            os.killpg(proc.pid, signal.SIGUSR1)
            break
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert "Rerun the same command to continue" in out and "SIGUSR1 on 1 of 1 ranks" in out
    assert load(tmp_path / "run" / "checkpoints" / "last.pt")["progress"]["step_in_epoch"] >= 6
    stop_bits = sum(1 << (s - 1) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2))
    assert workers and all(mask & stop_bits == stop_bits for mask in ignored), (workers, ignored)


def children(pid: int) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == pid]


def _parent(pid: int) -> int | None:
    try:
        return int(open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def test_sigterm_while_waiting_in_the_rendezvous_exits_at_once(tmp_path):
    """Rank 0 of 2 waits for a rank 1 that never comes (as when rank 1 failed on a missing GPU): a stop signal there
    ends it at once with one line, not after dist.timeout_s or torchrun's SIGKILL."""
    port = free_port()
    env = env_for_tests(
        RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    args = ["--config", SMOKE, "dist.timeout_s=600", f"log.run_dir={tmp_path / 'run'}"]
    proc = subprocess.Popen(
        [sys.executable, str(MAIN), *map(str, args)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # rank 0 serves the rendezvous store: it is waiting there once the port answers
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    time.sleep(1)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert time.monotonic() - sent < 60  # at once; without the fix it waits dist.timeout_s (600 s) for rank 1
    assert proc.returncode == 75, err
    assert err == "stopped by SIGTERM before training started; nothing to save. Rerun the same command to continue\n", err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_stop_during_the_last_evaluation_finishes_the_run(tmp_path):
    """Nothing is left to continue after the last epoch's evaluation: the run finishes (exit 0), it does not ask for a rerun."""
    args = ["--config", SMOKE, "train.epochs=1", "data.synthetic_train=256", "data.synthetic_test=8000", "log.every_steps=1"]
    cmd = [sys.executable, str(MAIN), *map(str, args), f"log.run_dir={tmp_path / 'run'}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env_for_tests(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("epoch 1 step 4/4"):  # the last step; the loop's stop check follows at once, then 8000 test images
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    assert "done: test_acc" in out and "Rerun" not in out
    [attempt] = [json.loads(line) for line in (tmp_path / "run" / "attempts.jsonl").read_text().splitlines()]
    assert (attempt["ended"], attempt.get("signal")) == ("completed", "SIGTERM")  # the signal did land while it ran
