"""One optimizer step on one batch: the images' random draws, augmentation, forward and backward, the update.

The loop (train/engine.py) calls `Step` once per batch and keeps the schedule, the metrics and the
saves. A step is the same code for every precision, compile setting and number of ranks: its
forward and backward run once on the rank's batch with DDP (`train.reproducible=fast`), or once
per bitwise shard (train/shards.py); its random draws are the images' keys (train/randomness.py),
so nothing in it depends on how many ranks share the batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from train import augment, checkpoint, faults, graphs, models, randomness, shards
from train.config import Config
from train.distributed import Dist
from train.runtime import Runtime


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    # no cast cache: each weight is cast once per step anyway, and a CUDA graph must not capture one (train/graphs.py)
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


def wrap(model: nn.Module, dist: Dist, compile: bool, sharded: bool) -> nn.Module:
    """The model the step calls: DDP across ranks (not in bitwise mode: train/shards.py combines the ranks there),
    compiled when asked. Checkpoints keep the plain `model`."""
    if dist.active and not sharded:
        model = DistributedDataParallel(model, device_ids=[dist.device] if dist.device.type == "cuda" else None)
    return torch.compile(model) if compile else model


class Step:
    """`step(images, labels, indices, global_step)` -> (loss, correct) of the batch, after the optimizer's update.

    With train.cuda_graphs (as train/runtime.py resolved it: one GPU, sgd) the update is replayed from a
    CUDA graph after a few eager steps (train/graphs.py); its results are then the graph's tensors,
    rewritten by the next step.
    """

    def __init__(
        self, cfg: Config, state: checkpoint.TrainState, dist: Dist, runtime: Runtime, preprocess: augment.Preprocess, n: int
    ):
        """`n`: the training images (their keys); `runtime`: train/runtime.py's choices (dtype, CUDA graphs)."""
        dtype, graphed = runtime.dtype, runtime.cuda_graphs
        self.state, self.device, self.dtype, self.preprocess = state, dist.device, dtype, preprocess
        self.passes = shards.passes(cfg.train, state.model, dist)  # one pass (DDP) or bitwise shards
        self.model = wrap(state.model, dist, cfg.model.compile, self.passes.sharded)  # what the forward calls
        self.keys = randomness.SampleKeys(cfg.train.seed, n, self.device)
        models.attach(state.model, self.keys)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
        self.first_batch: Callable[[torch.Tensor], None] | None = None  # shown the run's very first input once
        self.taken = 0
        self.run = graphs.runner(self._update, state.optimizer, graphed)  # `_update` itself, or its CUDA graph

    def start_epoch(self, epoch: int) -> None:
        self.model.train()
        self.keys.start_epoch(epoch)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, step: int):
        """`step`: the global steps taken before this one (for the fault injection points' lines)."""
        self.taken = step
        return self.run(images, labels, indices)

    def _update(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor):
        draws = self.keys.draws(indices)  # (B, 4) int64: each image's random bits, keyed by (seed, epoch, index)
        self.state.optimizer.zero_grad(set_to_none=True)
        for part in self.passes.parts():  # the whole batch; in bitwise mode each of this rank's shards in turn
            x = self.preprocess.train(images[part], draws[part])  # (b, 3, H, W) float, augmented, normalised
            y = labels[part].to(self.device, non_blocking=True)
            if self.first_batch is not None:
                self.first_batch(x)
                self.first_batch = None
            self.keys.current = draws[part, randomness.ROW]  # the dropout masks' keys for this forward
            with autocast(self.device, self.dtype):
                out = self.model(x)
                loss = self.criterion(out, y)
            self.state.scaler.scale(loss).backward()  # the scaler is a pass-through unless train.amp=fp16
            self.passes.keep(loss, out, y)
        loss, correct = self.passes.combine()  # bitwise: every shard's gradient, added in shard order
        faults.point("step", f"(step {self.taken + 1})")  # in eager steps only: a replay runs no Python
        self.state.scaler.step(self.state.optimizer)
        self.state.scaler.update()
        return loss, correct
