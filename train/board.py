"""TensorBoard, on rank 0: the seed's tags (`Loss/Train`, `Loss/Test`), accuracy, learning rate,
throughput, the first training batch, the model graph and the hyperparameters.

TensorBoard is imported only when a Board is enabled (it is slow to import). A folder that is full or
cannot be written stops TensorBoard with one warning, never the run: checkpoints matter more than logs.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from pathlib import Path

import torch


def _or_stop(method):
    """Run a Board method; if TensorBoard cannot write (a full disk, a read-only folder, tb/ a file), warn once
    and write nothing more. Its writer thread raises a failed write at the next call, hence every method."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as e:
            self.warnings.append(
                f"TensorBoard stopped: cannot write in {self.folder} ({type(e).__name__}: {e}); training goes on"
            )
            tb, self.tb = self.tb, None
            if tb is not None:
                with contextlib.suppress(Exception):  # the writer's thread may raise the same error again
                    tb.close()

    return guarded


class Board:
    def __init__(self, folder: Path, enabled: bool, graph: bool = True):
        self.tb = None  # TensorBoard's SummaryWriter
        self.folder, self.graph = folder, graph
        self.warnings: list[str] = []  # what could not be written, for the caller's log
        if enabled:
            self._open()

    @_or_stop
    def _open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(self.folder))

    @_or_stop
    def step(self, global_step: int, loss: float, lr: float) -> None:
        if self.tb:
            self.tb.add_scalar("Loss/TrainStep", loss, global_step)
            self.tb.add_scalar("LearningRate", lr, global_step)

    @_or_stop
    def epoch(self, metrics: dict) -> None:
        """The seed's writer.add_scalar('Loss/Train', ..., epoch) and its companions."""
        if not self.tb:
            return
        e = metrics["epoch"]
        self.tb.add_scalar("Loss/Train", metrics["train_loss"], e)
        self.tb.add_scalar("Loss/Test", metrics["test_loss"], e)
        self.tb.add_scalar("Accuracy/Train", metrics["train_acc"], e)
        self.tb.add_scalar("Accuracy/Test", metrics["test_acc"], e)
        self.tb.add_scalar("Throughput/ImagesPerSecond", metrics["images_per_s"], e)
        self.tb.flush()

    @_or_stop
    def first_batch(self, model: torch.nn.Module, batch: torch.Tensor, mean, std) -> None:
        """A grid of the first training batch as the model sees it (augmented, normalisation undone), and the model graph."""
        if not self.tb:
            return
        x = batch[:32].detach().float().cpu()
        x = x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
        self.tb.add_images("Train/FirstBatch", x.clamp(0, 1), 0)
        if not self.graph:
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.tb.add_graph(model, batch[:1])
        except Exception as e:  # tracing fails for some models; the run goes on
            self.warnings.append(f"model graph not added to TensorBoard ({type(e).__name__}: {str(e)[:120]})")

    @_or_stop
    def hparams(self, hparams: dict, final: dict) -> None:
        if self.tb:
            values = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
            self.tb.add_hparams(values, {f"hparam/{k}": v for k, v in final.items()}, run_name=".")

    @_or_stop
    def close(self) -> None:
        if self.tb:
            self.tb.close()
