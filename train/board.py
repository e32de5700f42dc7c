"""TensorBoard, on rank 0: what a person opens to see how a run went.

The event files live in the run folder itself, so `tensorboard --logdir runs` names every run
after its folder. One x-axis for everything: the global step (optimizer steps taken) at which a
value was measured; a value of a whole epoch sits at the step that ended the epoch.

TensorBoard's Time Series sorts tag groups by name and opens the first two; the tags are named
so that those two are the seed's `Loss` and the test results:

    Loss/Train, Loss/Test                 the seed's tags: each epoch's mean loss
    Test/Accuracy                         each epoch
    Test/Confusion matrix                 each epoch: counts, mistakes in red, per-class accuracy
    Test/Misclassified                    each epoch: the first test images predicted wrong, true and predicted class
    Test accuracy per class/<class>       each epoch
    Train/Accuracy, Train/Images per second   each epoch
    Train/Learning rate                   every log.every_steps steps
    Train/Step loss                       every log.every_steps steps, only when an epoch has more than one such
                                          window (otherwise it would repeat Loss/Train)
    Train/First batch                     step 0: the first batch as the model sees it (augmented)
    Precision-recall/<class>              each epoch, in the PR Curves tab
    HParams tab                           the settings that define a run, with Test/Accuracy and Loss/Test

A resumed run opens its writer with TensorBoard's purge step: whatever a killed attempt wrote
after the checkpoint it resumes from is hidden, so curves continue without duplicate points.
TensorBoard is imported only when a Board is enabled (it is slow to import). A folder that is full or
cannot be written stops TensorBoard with one warning, never the run: checkpoints matter more than logs.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from pathlib import Path

import numpy as np
import torch

from train import pictures

# What defines a run, for the HParams tab (config keys, plus the world size); the rest is in config.yaml.
RUN_SETTINGS = (
    "model.name",
    "optim.name",
    "optim.lr",
    "optim.schedule",
    "train.batch_size",
    "train.epochs",
    "data.augment",
    "train.seed",
)
MISCLASSIFIED = 10  # test images shown per epoch in Test/Misclassified: two rows of five stay readable in a card


class TestExamples:
    """What an evaluation shows besides its counts: every test image's class probabilities and the first mistakes.

    `add` sees each evaluation batch on its rank; `gather` brings every rank's share to rank 0 (a
    collective), so the precision-recall curves cover the whole test split exactly once.
    """

    def __init__(self, keep: int = MISCLASSIFIED):
        self.keep = keep
        self.probs: list[torch.Tensor] = []  # (B, C) float32 per batch
        self.labels: list[torch.Tensor] = []  # (B,) int64 per batch
        self.wrong: list[torch.Tensor] = []  # (K, 3, H, W) uint8: the first mistakes
        self.pairs: list[torch.Tensor] = []  # (K, 3): true class, predicted class, its probability (float)

    def add(self, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> None:
        probs = logits.float().softmax(1).cpu()
        labels = labels.cpu()
        self.probs.append(probs)
        self.labels.append(labels)
        have = sum(len(w) for w in self.wrong)
        if have < self.keep:
            confidence, predicted = probs.max(1)
            wrong = (predicted != labels).nonzero().flatten()[: self.keep - have]
            self.wrong.append(images[wrong.to(images.device)].cpu())
            self.pairs.append(torch.stack([labels[wrong].float(), predicted[wrong].float(), confidence[wrong]], 1))

    def gather(self, dist) -> dict | None:
        """On rank 0: `probs` (N, C), `labels` (N,), `wrong` (K, 3, H, W) uint8, `pairs` (K, 3), over all ranks."""
        empty = torch.zeros(0)
        mine = {
            "probs": torch.cat(self.probs) if self.probs else empty,
            "labels": torch.cat(self.labels) if self.labels else empty.long(),
            "wrong": torch.cat(self.wrong) if self.wrong else empty.to(torch.uint8),
            "pairs": torch.cat(self.pairs) if self.pairs else empty,
        }
        shares = dist.gather(mine)
        if shares is None:
            return None
        together = {k: torch.cat([s[k] for s in shares if s[k].numel()] or [mine[k]]) for k in mine}
        together["wrong"], together["pairs"] = together["wrong"][: self.keep], together["pairs"][: self.keep]
        return together


def _or_stop(method):
    """Run a Board method; if TensorBoard cannot write (a full disk, a read-only folder), warn once and
    write nothing more. Its writer thread raises a failed write at the next call, hence every method."""

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
    def __init__(self, folder: Path, enabled: bool, graph: bool = True, purge_step: int | None = None):
        """`purge_step`: the first step a resumed run writes; TensorBoard hides older events at or after it."""
        self.tb = None  # TensorBoard's SummaryWriter
        self.folder, self.graph = folder, graph
        self.warnings: list[str] = []  # what could not be written, for the caller's log
        self._end = None  # the HParams tab's "finished" summary, written by hparams_end
        if enabled:
            self._open(purge_step)

    @_or_stop
    def _open(self, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(self.folder), purge_step=purge_step)

    @_or_stop
    def step(self, global_step: int, loss: float, lr: float, whole_epoch: bool) -> None:
        """Every log.every_steps steps; `whole_epoch`: this window is the whole epoch, so its loss is Loss/Train's."""
        if self.tb:
            if not whole_epoch:
                self.tb.add_scalar("Train/Step loss", loss, global_step)
            self.tb.add_scalar("Train/Learning rate", lr, global_step)

    @_or_stop
    def epoch(self, metrics: dict, test: dict, classes: list[str]) -> None:
        """The seed's writer.add_scalar('Loss/Train', ...) and its companions, at the step that ended the epoch."""
        if not self.tb:
            return
        step = metrics["step"]
        self.tb.add_scalar("Loss/Train", metrics["train_loss"], step)
        self.tb.add_scalar("Loss/Test", metrics["test_loss"], step)
        self.tb.add_scalar("Test/Accuracy", metrics["test_acc"], step)
        self.tb.add_scalar("Train/Accuracy", metrics["train_acc"], step)
        self.tb.add_scalar("Train/Images per second", metrics["images_per_s"], step)
        confusion = test["confusion"].numpy()  # (C, C): rows the true class, columns the predicted one
        for i, name in enumerate(classes):
            if confusion[i].sum():
                self.tb.add_scalar(f"Test accuracy per class/{name}", confusion[i, i] / confusion[i].sum(), step)
        title = f"epoch {metrics['epoch']}, step {step}: test accuracy {metrics['test_acc']:.4f}"
        picture = pictures.confusion_matrix(confusion, classes, title)
        self.tb.add_image("Test/Confusion matrix", np.asarray(picture), step, dataformats="HWC")
        if test.get("examples") is not None:
            self._examples(test["examples"], classes, step)
        self.tb.flush()

    def _examples(self, examples: dict, classes: list[str], step: int) -> None:
        probs, labels = examples["probs"], examples["labels"]
        for c, name in enumerate(classes):
            self.tb.add_pr_curve(f"Precision-recall/{name}", labels == c, probs[:, c], step)
        if len(examples["wrong"]):
            captions = [
                (f"true {classes[int(t)][:10]}", f"pred {classes[int(p)][:10]} {q:.0%}") for t, p, q in examples["pairs"].tolist()
            ]
            grid = pictures.labelled_grid(examples["wrong"].numpy(), captions)
            self.tb.add_image("Test/Misclassified", np.asarray(grid), step, dataformats="HWC")

    @_or_stop
    def first_batch(self, model: torch.nn.Module, batch: torch.Tensor, mean, std) -> None:
        """A grid of the first training batch as the model sees it (augmented, normalisation undone), and the model graph."""
        if not self.tb:
            return
        x = batch[:32].detach().float().cpu()
        x = x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
        self.tb.add_images("Train/First batch", x.clamp(0, 1), 0)
        if not self.graph:
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.tb.add_graph(model, batch[:1])
        except Exception as e:  # tracing fails for some models; the run goes on
            self.warnings.append(f"model graph not added to TensorBoard ({type(e).__name__}: {str(e)[:120]})")

    @_or_stop
    def hparams_start(self, flat_config: dict, world_size: int) -> None:
        """The HParams tab's row for this run: the settings that define it, with their own types."""
        if not self.tb:
            return
        from torch.utils.tensorboard.summary import hparams

        values = {key: flat_config[key] for key in RUN_SETTINGS}
        values["data.augment"] = ",".join(values["data.augment"]) or "none"
        values["world_size"] = world_size
        # the metrics are the scalars of the same names: no extra single-point charts
        experiment, start, self._end = hparams(values, {"Test/Accuracy": 0.0, "Loss/Test": 0.0})
        self.tb.file_writer.add_summary(experiment)
        self.tb.file_writer.add_summary(start)

    @_or_stop
    def hparams_end(self) -> None:
        """Marks the run finished in the HParams tab."""
        if self.tb and self._end is not None:
            self.tb.file_writer.add_summary(self._end)

    @_or_stop
    def close(self) -> None:
        if self.tb:
            self.tb.close()
