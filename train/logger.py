"""Rank-0 output: TensorBoard (the seed's tags), console progress and metrics.jsonl.

Every method is a no-op on ranks other than 0, so callers need no `if is_main:` of their own.
TensorBoard is imported only on rank 0 and only when enabled (it is slow to import).
"""

from __future__ import annotations

import json
import sys
import time
import warnings

import torch

from train.config import Config


class Logger:
    def __init__(self, cfg: Config, enabled: bool, resumed_epochs: int = 0):
        self.enabled = enabled
        self.cfg = cfg
        self.metrics_path = cfg.run_dir / "metrics.jsonl"
        self.writer = None
        mode = cfg.log.progress
        self.bar = enabled and (mode == "bar" or (mode == "auto" and sys.stderr.isatty()))
        self.lines = enabled and (mode == "lines" or (mode == "auto" and not self.bar))
        self._last_bar = 0.0
        if not enabled:
            return
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        self._keep_epochs(resumed_epochs)
        if cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(cfg.run_dir / "tb"))

    def _keep_epochs(self, epochs: int) -> None:
        """Drop metrics lines of epochs the checkpoint does not hold (a run killed after logging, before saving)."""
        if not self.metrics_path.exists():
            return
        kept = [
            line
            for line in self.metrics_path.read_text().splitlines()
            if line.strip() and json.loads(line).get("epoch", 0) <= epochs
        ]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def info(self, message: str) -> None:
        if self.enabled:
            self._end_bar()
            print(message, flush=True)

    def warn(self, message: str) -> None:
        if self.enabled:
            self._end_bar()
            print(f"warning: {message}", file=sys.stderr, flush=True)

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

    def step(self, epoch: int, step: int, steps: int, global_step: int, loss: float, lr: float, images_per_s: float) -> None:
        """Every log.every_steps steps: a plain line (cluster logs are files) and step scalars."""
        if not self.enabled:
            return
        if self.lines:
            print(f"epoch {epoch} step {step}/{steps} loss {loss:.4f} lr {lr:.4g} {images_per_s:.0f} img/s", flush=True)
        if self.writer:
            self.writer.add_scalar("Loss/TrainStep", loss, global_step)
            self.writer.add_scalar("LearningRate", lr, global_step)

    def epoch(self, metrics: dict) -> None:
        """The seed's tags per epoch, a metrics.jsonl line and a one-line summary."""
        if not self.enabled:
            return
        e = metrics["epoch"]
        if self.writer:
            self.writer.add_scalar("Loss/Train", metrics["train_loss"], e)
            self.writer.add_scalar("Loss/Test", metrics["test_loss"], e)
            self.writer.add_scalar("Accuracy/Train", metrics["train_acc"], e)
            self.writer.add_scalar("Accuracy/Test", metrics["test_acc"], e)
            self.writer.add_scalar("Throughput/ImagesPerSecond", metrics["images_per_s"], e)
            self.writer.flush()
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        self.info(
            f"epoch {e}/{self.cfg.train.epochs} train_loss {metrics['train_loss']:.4f} train_acc {metrics['train_acc']:.4f} "
            f"test_loss {metrics['test_loss']:.4f} test_acc {metrics['test_acc']:.4f} "
            f"lr {metrics['lr']:.4g} {metrics['images_per_s']:.0f} img/s"
        )

    def images(self, batch: torch.Tensor, mean, std) -> None:
        """A grid of the first training batch as the model sees it (augmented), undone normalisation."""
        if not self.writer:
            return
        x = batch[:32].detach().float().cpu()
        x = x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
        self.writer.add_images("Train/FirstBatch", x.clamp(0, 1), 0)

    def graph(self, model: torch.nn.Module, example: torch.Tensor) -> None:
        if not (self.writer and self.cfg.log.graph):
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.writer.add_graph(model, example[:1])
        except Exception as e:  # tracing fails for some models; the run goes on
            self.warn(f"model graph not added to TensorBoard ({type(e).__name__}: {str(e)[:120]})")

    def hparams(self, hparams: dict, final: dict) -> None:
        if not self.writer:
            return
        values = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        self.writer.add_hparams(values, {f"hparam/{k}": v for k, v in final.items()}, run_name=".")

    def close(self) -> None:
        self._end_bar()
        if self.writer:
            self.writer.close()
