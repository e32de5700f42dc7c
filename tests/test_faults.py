"""Nothing lost, whatever happens: kills at chosen points, damaged checkpoints, full disks, hostile input.

Each kill test runs the smoke config (two epochs of 16 steps, a periodic save every 8 steps,
random crop + flip) with SCAFFOLD_FAULT set, checks on disk and in the dying process's last
line that the kill landed where it says, reruns the same command without the fault, and
compares with an uninterrupted run: the weights with torch.equal, metrics.jsonl line by line.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import SMOKE, env_for_tests, load, ok, one_error_line, torchrun, train
from train import checkpoint, models
from train.config import ModelConfig

ARGS = ["--config", SMOKE, "data.augment=[crop,flip]", "train.save_every_steps=8"]


def run_dir_args(run_dir: Path) -> list[str]:
    return [*ARGS, f"log.run_dir={run_dir}"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted single-process run every recovered run must equal."""
    run_dir = tmp_path_factory.mktemp("faults") / "reference"
    ok(train(*run_dir_args(run_dir), cwd=run_dir.parent))
    return run_dir


def metrics(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k != "images_per_s"} for m in lines]


def assert_same_run(expected: Path, actual: Path):
    a, b = load(expected / "checkpoints" / "last.pt"), load(actual / "checkpoints" / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])
    assert metrics(expected) == metrics(actual)
    assert not list((actual / "checkpoints").glob(".*"))  # no temporary file survives the rerun


def step_of(path: Path) -> int:
    return load(path)["progress"]["step"]


# Where each kill lands (FAULT), and what must then be on disk before the rerun.
KILLS = {
    "mid-step": ("step@20", "SIGKILL at step (hit 20) on rank 0 (step 20)", 16),
    "mid-evaluation": ("eval@1", "SIGKILL at eval (hit 1)", 8),
    "checkpoint half written": ("ckpt_write@2", "SIGKILL at ckpt_write (hit 2)", 8),
    "checkpoint written, before rename": ("ckpt_rename@2", "SIGKILL at ckpt_rename (hit 2)", 8),
    "checkpoint renamed, before fsync": ("ckpt_renamed@2", "SIGKILL at ckpt_renamed (hit 2)", 16),
}


@pytest.mark.parametrize("where", list(KILLS))
def test_kill_9_then_rerun_equals_uninterrupted(where, reference, tmp_path):
    kill_and_rerun(where, reference, tmp_path)


@pytest.mark.parametrize("where", [k for k in KILLS if k.startswith("checkpoint")])
def test_kill_9_in_a_background_write_then_rerun_equals_uninterrupted(where, reference, tmp_path):
    """The writer thread used on GPUs (forced here on the CPU): a kill inside its write loses nothing either."""
    kill_and_rerun(where, reference, tmp_path, "train.save_in_background=always")


def kill_and_rerun(where: str, reference: Path, tmp_path: Path, *extra: str) -> None:
    fault, evidence, saved_step = KILLS[where]
    run_dir = tmp_path / "run"
    killed = train(*run_dir_args(run_dir), *extra, cwd=tmp_path, env=env_for_tests(SCAFFOLD_FAULT=fault))
    assert killed.returncode == -9, killed.stderr
    last_line = killed.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"fault injected: {evidence}"), last_line
    ckpts = run_dir / "checkpoints"
    assert step_of(ckpts / "last.pt") == saved_step
    temporary = list(ckpts.glob(".last.pt.tmp.*"))
    if fault.startswith("ckpt_write"):
        # the temporary file really is half written, and not loadable
        held, total = (int(v) for v in last_line.split("holds ")[1].split(" bytes")[0].split(" of "))
        assert len(temporary) == 1 and temporary[0].stat().st_size == held and 0 < held < total
        with pytest.raises(checkpoint.CheckpointError):
            checkpoint.load(temporary[0])
    elif fault.startswith("ckpt_rename@"):
        # complete and valid, but not yet last.pt
        assert len(temporary) == 1 and step_of(temporary[0]) == 16
    else:
        assert not temporary
    if fault.startswith("eval"):
        assert not (run_dir / "metrics.jsonl").exists() or not metrics(run_dir)
    proc = ok(train(*run_dir_args(run_dir), *extra, cwd=tmp_path))
    assert (
        f"resumed from {ckpts / 'last.pt'} at epoch {(saved_step - 1) // 16 + 1} step {(saved_step - 1) % 16 + 1}/16 "
        in proc.stdout
    )
    # the killed attempt never wrote its end: the rerun records it from its heartbeat, as lost
    lost, done = [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]
    assert (lost["ended"], lost["exit_code"], lost["resumed_step"]) == ("lost", None, 0)
    assert (done["ended"], done["resumed_step"], done["step"]) == ("completed", saved_step, 32)
    assert "goodput: 2 attempts (1 lost, 1 completed)" in proc.stdout
    assert_same_run(reference, run_dir)


@pytest.fixture(scope="module")
def reference_two_ranks(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("faults") / "reference2"
    ok(torchrun(2, *run_dir_args(run_dir), cwd=run_dir.parent))
    return run_dir


@pytest.mark.parametrize(
    "fault, evidence",
    [
        ("ckpt_write@2:0", "SIGKILL at ckpt_write (hit 2) on rank 0"),
        ("step@20:1", "SIGKILL at step (hit 20) on rank 1 (step 20)"),
    ],
)
def test_kill_9_of_one_rank_under_torchrun(fault, evidence, reference_two_ranks, tmp_path):
    run_dir = tmp_path / "run"
    killed = torchrun(2, *run_dir_args(run_dir), cwd=tmp_path, env=env_for_tests(SCAFFOLD_FAULT=fault))
    assert killed.returncode != 0 and f"fault injected: {evidence}" in killed.stderr
    proc = ok(torchrun(2, *run_dir_args(run_dir), cwd=tmp_path))
    assert "resumed from" in proc.stdout
    assert_same_run(reference_two_ranks, run_dir)


# ---------------------------------------------------------------------------- damaged checkpoints


def copy_run(reference: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    return run_dir


def flip_a_bit_in_tensor_data(path: Path) -> None:
    """Flip one bit in the middle of the largest tensor's bytes (zip entry archive/data/N)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        where = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(where)
        byte = f.read(1)[0]
        f.seek(where)
        f.write(bytes([byte ^ 0x10]))


def foreign_checkpoint(path: Path) -> None:
    """A valid checkpoint of this project, for another architecture (a 5-class head)."""
    payload = load(path)
    payload["model"] = models.build(ModelConfig(name="cnn"), 5).state_dict()
    path.unlink()
    checkpoint.save(path.parent, {k: v for k, v in payload.items() if k not in ("digest", "format", "versions")}, is_best=False)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 3]), "is damaged or not a checkpoint"),
        (flip_a_bit_in_tensor_data, "is corrupt: its contents do not match the digest written with it"),
        (foreign_checkpoint, "checkpoint holds another model (model.name=cnn, different layers)"),
    ],
)
def test_damaged_last_checkpoint_falls_back_to_the_previous_one(damage, message, reference, tmp_path):
    run_dir = copy_run(reference, tmp_path)
    ckpts = run_dir / "checkpoints"
    assert step_of(ckpts / "prev.pt") == 24 and step_of(ckpts / "last.pt") == 32
    damage(ckpts / "last.pt")
    proc = ok(train(*run_dir_args(run_dir), cwd=tmp_path))
    warning = [line for line in proc.stdout.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and message in warning[0] and warning[0].endswith("resuming from prev.pt instead"), proc.stdout
    assert f"resumed from {ckpts / 'prev.pt'} at epoch 2 step 8/16 (global step 24)" in proc.stdout
    assert (ckpts / "last.pt.rejected").exists()  # kept for inspection, out of the rotation
    assert_same_run(reference, run_dir)


def test_no_good_checkpoint_is_refused_with_instructions(reference, tmp_path):
    run_dir = copy_run(reference, tmp_path)
    ckpts = run_dir / "checkpoints"
    flip_a_bit_in_tensor_data(ckpts / "last.pt")
    (ckpts / "prev.pt").write_bytes(b"PK\x03\x04 truncated")
    before = {p.name: p.read_bytes() for p in ckpts.iterdir()}
    line = one_error_line(train(*run_dir_args(run_dir), cwd=tmp_path))
    assert line.startswith(f"error: cannot resume from {ckpts}: ")
    assert "last.pt is corrupt" in line and "prev.pt is damaged" in line
    assert line.endswith(f"move {ckpts} away to start over")
    assert {p.name: p.read_bytes() for p in ckpts.iterdir()} == before  # nothing trained, nothing written


def test_checkpoint_format_is_written_and_checked(reference, tmp_path):
    """A format newer than this code is refused in one line; format 1 (the position in the epoch was
    `progress.batch`, `rng` a list of per-rank generator states) is upgraded, and a resume from it says
    once that the draws are now keyed per image and still equals the uninterrupted run (whose draws are)."""
    from train import atomic

    run_dir = copy_run(reference, tmp_path)
    ckpts = run_dir / "checkpoints"
    assert load(ckpts / "last.pt")["format"] == checkpoint.FORMAT

    def rewrite(source: Path, target: Path, **changes) -> None:
        payload = {k: v for k, v in load(source).items() if k != "digest"} | changes
        payload["digest"] = atomic.digest(payload)
        torch.save(payload, target)

    rewrite(ckpts / "last.pt", tmp_path / "future.pt", format=99)
    with pytest.raises(
        checkpoint.CheckpointError,
        match=r"has format 99, written by cifar-scaffold .*; this version reads "
        rf"formats up to {checkpoint.FORMAT}: update the project to load it",
    ):
        checkpoint.load(tmp_path / "future.pt")
    progress = load(ckpts / "prev.pt")["progress"]
    old = {k: v for k, v in progress.items() if k != "step_in_epoch"} | {"batch": progress["step_in_epoch"]}
    assert old["batch"] == 8
    per_rank = [{"torch": torch.get_rng_state(), "augment": torch.Generator().manual_seed(1).get_state()}]
    rewrite(ckpts / "prev.pt", ckpts / "last.pt", format=1, progress=old, rng=per_rank)
    (ckpts / "prev.pt").unlink()
    proc = ok(train(*run_dir_args(run_dir), cwd=tmp_path))
    assert f"resumed from {ckpts / 'last.pt'} at epoch 2 step 8/16 (global step 24)" in proc.stdout
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {ckpts / 'last.pt'} was written with random draws from per-rank generator states, this version keys "
        f"them per image (per-sample keys v1): weights, optimizer, schedule and data order continue exactly; the "
        f"augmentation and dropout drawn from here on differ from what that version would have drawn"
    ]
    assert_same_run(reference, run_dir)
    # A crafted scheme is shown on one line, clipped: its newline cannot forge an `error:` line (the run is finished:
    # the resume only reads the file)
    rewrite(ckpts / "last.pt", ckpts / "last.pt", rng={"scheme": "x\nerror: all lost\n\x1b[2J" + "y" * 10_000})
    proc = ok(train(*run_dir_args(run_dir), cwd=tmp_path))
    lines = (proc.stdout + proc.stderr).splitlines()
    assert not [line for line in lines if line.startswith("error") or "y" * 80 in line]
    assert f"warning: {ckpts / 'last.pt'} was written with random draws from x error: all lost [2Jyyy" in proc.stdout


# ---------------------------------------------------------------------------- full disk


@pytest.mark.parametrize("background", ["never", "always"])
def test_file_size_limit_keeps_the_previous_checkpoint(background, tmp_path):
    """In the trainer's thread or the background writer's, a failed write stops the run with one line."""
    run_dir = tmp_path / "run"
    ok(train(*run_dir_args(run_dir), "train.epochs=1", cwd=tmp_path))
    before = (run_dir / "checkpoints" / "last.pt").read_bytes()
    limit = len(before) // 2  # a checkpoint no longer fits in one file

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parent.parent / "train" / "main.py"),
            *map(str, run_dir_args(run_dir)),
            f"train.save_in_background={background}",
        ],
        cwd=tmp_path,
        env=env_for_tests(),
        capture_output=True,
        text=True,
        preexec_fn=limited,
        timeout=300,
    )
    line = one_error_line(proc)
    assert line.startswith(f"error: could not write checkpoint in {run_dir / 'checkpoints'} (File too large)")
    assert "the previous last.pt is untouched" in line
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["progress"]["step"] == 16
    assert not list((run_dir / "checkpoints").glob(".*"))  # no half file left behind


def test_full_disk_keeps_the_previous_checkpoint(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()[:100]}); the file-size limit test covers EFBIG")
    try:
        run_dir = small / "run"
        proc = train(*run_dir_args(run_dir), "log.tensorboard=false", cwd=tmp_path)
        line = one_error_line(proc)
        assert line.startswith(f"error: could not write checkpoint in {run_dir / 'checkpoints'} (No space left on device)")
        assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["progress"]["step"] == 8  # the last one that fitted
        assert not list((run_dir / "checkpoints").glob(".*"))
    finally:
        subprocess.run(["umount", str(small)], check=False)


# ---------------------------------------------------------------------------- hostile input


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_objects_in_last_pt_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "last.pt").write_bytes(pickle.dumps({"model": Exploit(marker)}))
    torch.save({"model": {}, "payload": Exploit(marker)}, ckpts / "prev.pt")
    line = one_error_line(train(*run_dir_args(tmp_path / "run"), cwd=tmp_path))
    assert "holds pickled Python objects, not only tensors; refusing to run code from it" in line
    assert not marker.exists()


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.epochs=-1", "error: config key 'train.epochs' must be >= 0, got -1"),
        ("optim.lr=0", "error: config key 'optim.lr' must be > 0.0, got 0.0"),
        ("data.workers=-1", "error: config key 'data.workers' must be >= 0, got -1"),
        ("optim.momentum=1.5", "error: config key 'optim.momentum' must be between 0.0 and 1.0, got 1.5"),
        ("dist.stop_signals=[SIGFOO]", "error: config key 'dist.stop_signals' has 'SIGFOO', which is not a signal name"),
    ],
)
def test_out_of_range_values_name_the_key(override, expected, tmp_path):
    assert one_error_line(train("--config", SMOKE, override, cwd=tmp_path)).startswith(expected)


def test_dataset_folder_with_an_empty_file_names_it(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "imgs" / split / cls / "ok.png")
    (tmp_path / "imgs" / "train" / "b" / "empty.jpg").write_bytes(b"")
    line = one_error_line(
        train(
            "--config",
            SMOKE,
            "data.name=imagefolder",
            f"data.root={tmp_path / 'imgs'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"log.run_dir={tmp_path / 'run'}",
            cwd=tmp_path,
        )
    )
    assert line.startswith(f"error: image {tmp_path / 'imgs' / 'train' / 'b' / 'empty.jpg'} cannot be read")
