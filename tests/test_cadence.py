"""When checkpoints are written: by time (train.save_every_minutes), by steps, by epochs, at the end; and
a new best that falls between two saves is held, then written, never lost."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import load, ok, one_error_line, train
from train import checkpoint


def test_time_cadence_saves_at_log_lines(tmp_path, smoke_args):
    """A cadence that is always due (a millionth of a minute) saves at every log line (every 4 steps) and not in
    between; a run of the smoke config with no epoch saves otherwise writes only at its end."""
    args = [*smoke_args, "train.save_every_epochs=0", "train.save_every_minutes=0.000001"]
    ok(train(*args, cwd=tmp_path))
    ckpts = tmp_path / "run" / "checkpoints"
    assert load(ckpts / "last.pt")["progress"]["step"] == 32
    assert load(ckpts / "prev.pt")["progress"]["step"] == 28  # the log line before the last: step 28, not 31


def test_a_held_best_is_written_when_the_run_stops_without_a_save(tmp_path, smoke_args):
    """No save comes due in seconds at the default cadence: epoch 1's best is held in memory. The loss then
    explodes in epoch 2 (lr x1000): the run stops with exit 3, and the held best is on disk as best.pt."""
    boom = ["optim.schedule=step", "optim.step_epochs=1", "optim.gamma=1000", "optim.warmup_epochs=0", "train.epochs=3"]
    proc = train(*smoke_args, *boom, "train.save_every_epochs=0", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    line = one_error_line(proc)
    ckpts = tmp_path / "run" / "checkpoints"
    assert re.search(r"loss became \S+ at epoch 2 step", line) and f"the best model so far is in {ckpts / 'best.pt'}" in line
    assert not (ckpts / "last.pt").exists()
    best = checkpoint.load(ckpts / "best.pt")
    assert best["progress"]["epoch"] == 1 and best["progress"]["step"] == 16
    assert all(torch.isfinite(v).all() for v in best["model"].values())


def fake_payload(value: float, epoch: int) -> dict:
    return {"model": {"w": torch.full((3,), value)}, "progress": {"epoch": epoch}}


@pytest.mark.parametrize("background", [False, True])
def test_saver_writes_a_held_best_with_the_next_save(tmp_path, background):
    """hold_best keeps a copy (training may change the tensors it was given); the next save writes it as best.pt
    beside the new last.pt; a save that is itself the best replaces the held one."""
    saver = checkpoint.Saver(tmp_path, background=background)
    held = fake_payload(1.0, 1)
    saver.hold_best(held)
    held["model"]["w"].add_(100.0)  # training goes on in place
    assert not (tmp_path / "best.pt").exists()
    saver.save(fake_payload(2.0, 2), is_best=False)
    saver.wait()
    assert checkpoint.load(tmp_path / "best.pt")["model"]["w"].tolist() == [1.0, 1.0, 1.0]
    assert checkpoint.load(tmp_path / "last.pt")["progress"]["epoch"] == 2
    saver.hold_best(fake_payload(3.0, 3))
    saver.save(fake_payload(4.0, 4), is_best=True)
    saver.wait()
    assert checkpoint.load(tmp_path / "best.pt")["progress"]["epoch"] == 4
    saver.flush_best()  # nothing held any more: nothing written
    assert checkpoint.load(tmp_path / "best.pt")["progress"]["epoch"] == 4
    assert saver.blocked > 0
