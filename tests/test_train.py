"""The single-process trainer, run as a user runs it: `python train/main.py ...` in a subprocess."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import torch

from conftest import REPO, SMOKE, env_for_tests, load, ok, one_error_line, train


def test_seed_cnn_learns_synthetic_data_to_90_percent(tmp_path):
    """The default config (the seed's CNN, crop+flip) on the built-in synthetic data, four epochs, normalised (on
    ToTensor() input, the default, it needs about ten: README, Training): what a newcomer's first run writes
    (metrics, checkpoints, TensorBoard), and that rerunning it changes nothing."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fast = ["data.normalize=cifar10", "optim.lr=0.01"]
    args = ["data.name=synthetic", *fast, "train.epochs=4", f"log.run_dir={tmp_path / 'run'}"]
    proc = ok(train(*args, cwd=tmp_path))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3, 4]
    assert lines[0]["test_acc"] < 0.9 <= lines[-1]["test_acc"], lines  # it learned, it did not start there
    assert lines[-1]["test_count"] == 1000
    assert "done: test_acc" in proc.stdout
    for name in ("config.yaml", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (tmp_path / "run" / name).is_file(), name
    ckpt = load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert ckpt["config"]["model"]["name"] == "cnn" and ckpt["progress"]["epoch"] == 4

    # TensorBoard: in the run folder itself (so `--logdir runs` names the run after it), every value at a global step
    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    epoch_ends = [m["step"] for m in lines]
    for tag in ("Loss/Train", "Loss/Test", "Test/Accuracy", "Train/Accuracy", "Train/Images per second"):
        assert [e.step for e in acc.Scalars(tag)] == epoch_ends, tag  # the seed's tags and companions, where each epoch ended
    assert [e.step for e in acc.Scalars("Test accuracy per class/class_3")] == epoch_ends
    assert "Train/Learning rate" in tags["scalars"]
    # 39 steps per epoch and a log line every 50: the step loss would repeat Loss/Train, so it is not written
    assert "Train/Step loss" not in tags["scalars"] and not any(t.startswith("hparam") for t in tags["scalars"])
    assert {"Train/First batch", "Test/Confusion matrix", "Test/Misclassified"} <= set(tags["images"])
    assert tags["graph"]  # the model graph was written

    before = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    again = ok(train(*args, cwd=tmp_path))
    assert "already finished 4 epochs" in again.stdout
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == before


def test_resume_is_exact(tmp_path, smoke_args):
    """2 epochs straight == 1 epoch, stop, 1 more epoch resumed: weights and optimizer state bit for bit.

    A step schedule, whose learning rate does not depend on train.epochs (one-cycle and cosine
    re-plan their decay when train.epochs is raised), and random augmentation, whose generator
    state the checkpoint restores.
    """
    straight = tmp_path / "straight"
    same = ["data.augment=[crop,flip]", "optim.schedule=step", "optim.step_epochs=1", "optim.gamma=0.5"]
    ok(train("--config", SMOKE, *same, "train.epochs=2", f"log.run_dir={straight}", cwd=tmp_path))
    ok(train(*smoke_args, *same, "train.epochs=1", cwd=tmp_path))
    proc = ok(train(*smoke_args, *same, "train.epochs=2", cwd=tmp_path))
    assert "re-plans" not in proc.stdout  # a step schedule does not depend on train.epochs: nothing to say
    assert "resumed from" in proc.stdout
    a, b = load(straight / "checkpoints" / "last.pt"), load(tmp_path / "run" / "checkpoints" / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]
    runs = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (straight, tmp_path / "run")]
    assert [(m["epoch"], m["train_loss"], m["test_acc"]) for m in runs[0]] == [
        (m["epoch"], m["train_loss"], m["test_acc"]) for m in runs[1]
    ]


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, smoke_args):
    """Epoch 1 trains normally; the step schedule then multiplies lr by 1000 and the loss explodes in epoch 2."""
    boom = ["optim.schedule=step", "optim.step_epochs=1", "optim.gamma=1000", "optim.warmup_epochs=0", "train.epochs=3"]
    proc = train(*smoke_args, *boom, cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    line = one_error_line(proc)
    step = int(re.search(r"loss became \S+ at epoch 2 step \d+/16 \(global step (\d+)\)", line).group(1))
    assert 16 < step <= 32 and "last good checkpoint is" in line and "last.pt" in line
    ckpt = load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["progress"]["epoch"] == 1 and ckpt["progress"]["step"] == 16
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lrr=0.1", "error: unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
        ("trian.epochs=3", "error: unknown config key 'trian.epochs' (did you mean 'train.epochs'?)"),
        ("train.epochs=three", "error: config key 'train.epochs' expects an int, got 'three'"),
        ("train.batch_size=0", "error: config key 'train.batch_size' must be >= 1, got 0"),
        ("optim.lr=-1", "error: config key 'optim.lr' must be > 0.0, got -1.0"),
    ],
)
def test_config_errors_are_one_line(tmp_path, override, expected):
    proc = train("--config", SMOKE, override, cwd=tmp_path)
    assert proc.returncode == 2
    assert one_error_line(proc) == expected


def test_missing_config_file_is_one_line(tmp_path):
    proc = train("--config", "nope.yaml", cwd=tmp_path)
    assert (
        one_error_line(proc) == "error: config file 'nope.yaml' not found; pass an existing YAML file to --config (see configs/)"
    )


def test_yaml_with_python_tags_is_refused(tmp_path):
    evil = tmp_path / "evil.yaml"
    marker = tmp_path / "pwned"
    evil.write_text(f"train:\n  epochs: !!python/object/apply:os.system ['touch {marker}']\n")
    line = one_error_line(train("--config", evil, cwd=tmp_path))
    assert "is not plain YAML data (line 2)" in line and "python/object/apply" in line
    assert not marker.exists()


def test_print_config_round_trips(tmp_path):
    proc = ok(train("--config", SMOKE, "optim.lr=0.5", "train.amp=fp32", "--print-config", cwd=tmp_path))
    (tmp_path / "resolved.yaml").write_text(proc.stdout)
    again = ok(train("--config", tmp_path / "resolved.yaml", "--print-config", cwd=tmp_path))
    assert again.stdout == proc.stdout
    assert "lr: 0.5" in proc.stdout and "run_dir: runs/smoke" in proc.stdout
    assert not (tmp_path / "runs").exists()  # printing trains nothing


def test_readme_train_command_runs(tmp_path):
    """The README's first train command, as written, with the smoke config added so it takes seconds."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```(?:bash|sh)\n(.*?)```", readme, re.S).group(1)
    command = next(line for line in block.splitlines() if "train/main.py" in line)
    train_part = command.split("&&")[-1].strip()
    argv = shlex.split(train_part)
    assert argv[0].endswith("python") and argv[1] == "train/main.py", train_part
    proc = ok(train(*argv[2:], "--config", SMOKE, f"log.run_dir={tmp_path / 'run'}", cwd=REPO))
    assert "done: test_acc" in proc.stdout
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_missing_cifar10_without_network_is_one_line(tmp_path):
    """No dataset and no way to download it: exit non-zero with where to put the files, never synthetic data."""
    proc = train(
        "--config",
        SMOKE,
        "data.name=cifar10",
        f"data.root={tmp_path / 'data'}",
        "data.download=false",
        f"log.run_dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    line = one_error_line(proc)
    assert f"CIFAR-10 is not in {tmp_path / 'data'}/cifar-10-batches-py" in line
    assert "cifar-10-python.tar.gz" in line and "data.name=synthetic" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_failed_cifar10_download_is_one_line(tmp_path):
    """data.download=true with no network (this machine and CI reach package registries only)."""
    proc = train(
        "--config",
        SMOKE,
        "data.name=cifar10",
        f"data.root={tmp_path / 'data'}",
        "data.download=true",
        f"log.run_dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    line = one_error_line(proc)
    assert "the download failed" in line and "cifar-10-python.tar.gz" in line and "data.name=synthetic" in line


def test_trains_on_cifar10_files(tmp_path):
    """The real reader and cache on files written in the official format, end to end."""
    from conftest import write_cifar10

    write_cifar10(tmp_path / "data", per_batch=200, test=200)
    proc = ok(
        train(
            "--config",
            SMOKE,
            "data.name=cifar10",
            f"data.root={tmp_path / 'data'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "train.epochs=3",
            f"log.run_dir={tmp_path / 'run'}",
            cwd=tmp_path,
        )
    )
    assert "(1000 train / 200 test images)" in proc.stdout
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["test_count"] == 200 and metrics[-1]["test_acc"] > 0.5
    assert load(tmp_path / "run" / "checkpoints" / "last.pt")["classes"][0] == "airplane"


def test_default_config_file_states_the_defaults():
    from train import config

    assert config.from_files_and_overrides(config.DEFAULT_CONFIG, []) == config.from_files_and_overrides(None, [])


def test_main_runs_by_path_from_any_folder(tmp_path):
    proc = ok(train("--help", cwd=tmp_path))
    assert "section.key=value" in proc.stdout


def test_rerun_with_fewer_epochs_after_a_mid_epoch_stop_says_what_it_does(tmp_path, smoke_args):
    """Killed 4 steps into epoch 2 (after a periodic save), rerun with train.epochs=1, the epochs it finished:
    one line saying there is nothing to do and how to finish epoch 2, exit 0, nothing written."""
    args = [*smoke_args, "train.save_every_steps=4"]
    killed = train(*args, cwd=tmp_path, env=env_for_tests(SCAFFOLD_FAULT="step@23"))
    assert killed.returncode == -9, killed.stderr
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    assert load(last)["progress"]["step_in_epoch"] == 4  # saved at step 20, 16 steps per epoch
    before = last.read_bytes()
    proc = ok(train(*args, "train.epochs=1", cwd=tmp_path))
    assert f"{tmp_path / 'run'} stopped 4 steps into epoch 2, but train.epochs=1; nothing to do" in proc.stdout
    assert "Raise train.epochs to 2 to finish that epoch" in proc.stdout
    assert proc.stderr == "" and last.read_bytes() == before
    # raised to 3 instead: the one-cycle decay is re-planned over 3 epochs (16 steps each, warm-up 8 steps):
    # at step 20 the learning rate was 0.01 * (1 - 12/24), it is now 0.01 * (1 - 12/40)
    proc = ok(train(*args, "train.epochs=3", cwd=tmp_path))
    assert (
        "warning: train.epochs 2 -> 3 re-plans the onecycle learning-rate schedule: at global step 20 the learning rate "
        "goes from 0.005 to 0.007 and follows the new plan from there"
    ) in proc.stdout, proc.stdout
    assert "resumed from " in proc.stdout and " at epoch 2 step 4/16 (global step 20)" in proc.stdout


def test_a_checkpoint_from_a_bigger_machine_loads_here(tmp_path, smoke_args):
    """data.workers=1000, fine on a many-core node, in a checkpoint's config: predict.py reads the file, and a
    resume with that setting warns and clamps it to this machine instead of refusing the config."""
    from PIL import Image

    from train import atomic, checkpoint

    ok(train(*smoke_args, "train.epochs=1", cwd=tmp_path))
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    payload = {k: v for k, v in load(last).items() if k != "digest"}
    payload["config"]["data"]["workers"] = 1000
    payload["digest"] = atomic.digest(payload)
    torch.save(payload, last)
    assert checkpoint.load(last)["config"]["data"]["workers"] == 1000
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    ok(run_predict("--checkpoint", last, tmp_path / "red.png", cwd=tmp_path))
    proc = ok(train(*smoke_args, "train.epochs=1", "data.workers=1000", cwd=tmp_path))
    assert re.search(
        r"^warning: data.workers=1000 is more than 4x the \d+ cores this process may use; using \d+$", proc.stdout, re.M
    ), proc.stdout
    assert "running on: 1 process on cpu" in proc.stdout and "already finished 1 epochs" in proc.stdout


def run_predict(*args, cwd):
    import sys

    from conftest import run

    return run([sys.executable, REPO / "infer" / "predict.py", *args], cwd=cwd)
