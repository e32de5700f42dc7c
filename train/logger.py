"""What rank 0 tells the user: console lines and progress, `metrics.jsonl`, and TensorBoard (train/board.py).

Every method is a no-op on ranks other than 0, so callers need no `if is_main:` of their own.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from train import atomic
from train.board import Board
from train.checkpoint import Progress
from train.cli import UserError
from train.config import Config, flatten


def keep_epochs(path: Path, epochs: int) -> list[str]:
    """Rewrite metrics.jsonl (atomically) without the lines of epochs the checkpoint does not hold (a run killed
    after logging, before saving) and without lines that are not JSON (cut short by a kill or a full disk);
    a warning line for those."""
    if not path.exists():
        return []
    kept, damaged = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            epoch = json.loads(line).get("epoch")
        except (ValueError, AttributeError):  # not JSON, or JSON but not one of our lines
            damaged.append(number)
            continue
        if isinstance(epoch, int) and epoch <= epochs:
            kept.append(line)
    atomic.write_atomic(path, data="".join(line + "\n" for line in kept).encode())
    if not damaged:
        return []
    which = f"line {damaged[0]} is" if len(damaged) == 1 else f"lines {', '.join(map(str, damaged))} are"
    return [f"{path} {which} damaged (cut short by a kill or a full disk?); dropped"]


class Logger:
    def __init__(self, cfg: Config, progress: str, enabled: bool, resumed_epochs: int = 0, resumed_step: int = 0):
        """`progress`: bar | lines | none, as train/runtime.py resolved log.progress; `resumed_*`: where the checkpoint is."""
        self.enabled = enabled
        self.cfg = cfg
        self.metrics_path = cfg.run_dir / "metrics.jsonl"
        self.bar = enabled and progress == "bar"
        self.lines = enabled and progress == "lines"
        self._last_bar = 0.0
        if enabled:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            atomic.remove_temporary(cfg.run_dir)  # of metrics.jsonl or config.yaml, left by a kill mid-write
            for line in keep_epochs(self.metrics_path, resumed_epochs):
                self.warn(line)
        # a resumed run hides what a killed attempt logged after its checkpoint (steps > resumed_step)
        purge = resumed_step + 1 if resumed_step else None
        self.board = Board(cfg.run_dir, enabled and cfg.log.tensorboard, cfg.log.graph, purge)
        self._board_warnings()

    def info(self, message: str) -> None:
        if self.enabled:
            self._end_bar()
            print(message, flush=True)

    def warn(self, message: str) -> None:
        self.info(f"warning: {message}")

    def _end_bar(self) -> None:
        if self.bar and self._last_bar:
            print(file=sys.stderr, flush=True)
            self._last_bar = 0.0

    def progress(self, epoch: int, step: int, steps: int) -> None:
        """A terminal bar, redrawn at most 10 times a second; it reads no device values."""
        if not self.bar:
            return
        now = time.monotonic()
        if now - self._last_bar < 0.1 and step != steps:
            return
        self._last_bar = now
        width = 30
        done = width * step // max(steps, 1)
        print(f"\repoch {epoch} [{'#' * done}{'.' * (width - done)}] {step}/{steps}", end="", file=sys.stderr, flush=True)

    def step(self, p: Progress, steps: int, loss: float, lr: float, images_per_s: float) -> None:
        """Every log.every_steps steps: a plain line (cluster logs are files) and step scalars."""
        if not self.enabled:
            return
        if self.lines:
            print(
                f"epoch {p.epoch + 1} step {p.step_in_epoch}/{steps} loss {loss:.4f} lr {lr:.4g} {images_per_s:.0f} img/s",
                flush=True,
            )
        self.board.step(p.step, loss, lr, whole_epoch=self.cfg.log.every_steps >= steps)
        self._board_warnings()

    def epoch(self, metrics: dict, test: dict, classes: list[str]) -> None:
        """The seed's tags per epoch (and the evaluation's pictures), a metrics.jsonl line and a one-line summary."""
        if not self.enabled:
            return
        self.board.epoch(metrics, test, classes)
        self._board_warnings()
        try:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        except OSError as e:  # this epoch's checkpoint is not written yet: a rerun trains and logs it again
            raise UserError(
                f"could not append to {self.metrics_path} ({e.strerror or e}); nothing after the last checkpoint is kept. "
                f"Free space (or fix permissions) and rerun the same command to resume"
            ) from None
        self.info(
            f"epoch {metrics['epoch']}/{self.cfg.train.epochs} train_loss {metrics['train_loss']:.4f} "
            f"train_acc {metrics['train_acc']:.4f} test_loss {metrics['test_loss']:.4f} test_acc {metrics['test_acc']:.4f} "
            f"lr {metrics['lr']:.4g} {metrics['images_per_s']:.0f} img/s"
        )

    def first_batch(self, model: torch.nn.Module, batch: torch.Tensor, mean, std) -> None:
        if self.enabled:
            self.board.first_batch(model, batch, mean, std)
            self._board_warnings()

    def _board_warnings(self) -> None:
        """What TensorBoard could not write (the graph of a model, a full or unwritable folder), as warnings."""
        for line in self.board.warnings:
            self.warn(line)
        self.board.warnings.clear()

    # ------------------------------------------------------------------ the run's story

    def start(self, runtime_line: str, resumed_from: Path | None, where: str) -> None:
        self.info(runtime_line)
        if resumed_from is not None:
            self.info(f"resumed from {resumed_from} at {where}")

    def training(self, n_train: int, n_test: int, world_size: int, device, steps: int) -> None:
        cfg = self.cfg
        self.info(
            f"training {cfg.model.name} on {cfg.data.name} ({n_train} train / {n_test} test images) on {world_size} x "
            f"{device} for {cfg.train.epochs} epochs of {steps} steps; run folder {cfg.run_dir}"
        )
        if self.enabled:
            self.board.hparams_start(flatten(cfg), world_size)
            self._board_warnings()

    def nothing_to_do(self, p: Progress) -> None:
        """What a rerun of a run that has reached train.epochs says."""
        cfg, best = self.cfg, f"best test_acc {max(p.best_acc, 0):.4f}"
        if p.step_in_epoch:  # stopped inside an epoch that train.epochs no longer asks for
            self.info(
                f"{cfg.run_dir} stopped {p.step_in_epoch} steps into epoch {p.epoch + 1}, but train.epochs="
                f"{cfg.train.epochs}; nothing to do ({best}). Raise train.epochs to {p.epoch + 1} to finish that epoch, "
                f"or choose another log.run_dir"
            )
        else:
            self.info(
                f"{cfg.run_dir} already finished {p.epoch} epochs ({best}); nothing to do. "
                f"Raise train.epochs to train on, or choose another log.run_dir"
            )

    def done(self, metrics: dict, best_acc: float, checkpoints: Path) -> None:
        """The run marked finished in TensorBoard, and the last line of a finished run."""
        if not self.enabled:
            return
        self.board.hparams_end()
        self._board_warnings()
        # TensorBoard names a run by its folder below --logdir: the parent shows this run as its folder's name
        self.info(
            f"done: test_acc {metrics['test_acc']:.4f} (best {best_acc:.4f}); checkpoints in {checkpoints}, "
            f"TensorBoard: tensorboard --logdir {self.cfg.run_dir.resolve().parent}"
        )

    def close(self) -> None:
        self._end_bar()
        self.board.close()
        self._board_warnings()


def epoch_metrics(p: Progress, totals: list[float], test: dict, lr: float) -> dict:
    """One line of metrics.jsonl: the epoch's training sums (all ranks) and its evaluation."""
    loss_sum, correct, n = totals
    return {
        "epoch": p.epoch,
        "step": p.step,
        "train_loss": loss_sum / n,
        "train_acc": correct / n,
        "test_loss": test["loss"],
        "test_acc": test["acc"],
        "test_count": test["count"],
        "lr": lr,
        "images_per_s": n / max(p.seconds, 1e-9),
    }
