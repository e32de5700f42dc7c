"""How a rank turns its part of the global batch into the step's gradient: one pass (fast) or fixed shards (bitwise).

`train.reproducible=fast` (the default), `OnePass`: the rank's B/W images in one forward and
backward; DDP averages the gradients over the ranks during backward, in an order that depends
on the number of ranks W, so N ranks train what 1 process trains up to float32 summation order.

`train.reproducible=bitwise`, `Shards`: the global batch of B images is cut into S = train.shards
fixed shards; shard k holds the batch's positions k, k + S, k + 2S, ... (B/S images, in order).
The loader gives rank r the positions r, r + W, r + 2W, ... (train/data.py), so rank r holds
shards r, r + W, r + 2W, ...: its m-th shard is rows m, m + S/W, ... of its own batch. Each
shard's gradient, mean loss and correct count come from one forward and backward of the same
B/S images, whichever rank computes them; every rank gathers all S rows and adds them in shard
order 0, 1, ..., S - 1, then scales by 1/S: the same float operations in the same order in one
process and on any W dividing S, so the weights and metrics are bit for bit the same. The cost:
S/W passes of B/S images instead of one of B/W, and an all-gather of S gradient vectors
(memory: S/W + S copies of the trainable parameters) instead of DDP's all-reduce of one.
Deterministic algorithms are switched on (CUDA needs them; see `deterministic`).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from train.cli import UserError
from train.config import TrainConfig
from train.distributed import Dist


class OnePass:
    """The fast mode: the rank's batch in one pass; DDP (train/engine.py's `wrap`) combines the ranks."""

    sharded = False

    def parts(self) -> list[slice]:
        return [slice(None)]

    def keep(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss, self.correct = loss.detach(), (logits.argmax(1) == labels).sum()

    def combine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's mean loss and correct count (the gradients were averaged by DDP during backward)."""
        return self.loss, self.correct


class Shards:
    """The bitwise mode: this rank's shards, one pass each; every shard's gradient added in shard order on every rank."""

    sharded = True

    def __init__(self, params, shards: int, dist: Dist):
        self.params = [p for p in params if p.requires_grad]
        self.dist, self.total, self.local = dist, shards, shards // dist.world_size
        numel = sum(p.numel() for p in self.params)
        # one row per shard: its gradient (every trainable parameter, flattened), its mean loss, its correct count
        self.rows = torch.zeros(self.local, numel + 2, device=self.params[0].device)
        self.gathered = torch.zeros(dist.world_size, *self.rows.shape, device=self.rows.device)  # (W, S/W, numel + 2)
        self.m = 0  # the shard being computed

    def parts(self) -> list[slice]:
        """The rows of this rank's batch in each of its shards, in shard order."""
        return [slice(m, None, self.local) for m in range(self.local)]

    def _views(self, row: torch.Tensor) -> list[torch.Tensor]:
        views, start = [], 0
        for p in self.params:
            views.append(row[start : start + p.numel()].view(p.shape))
            start += p.numel()
        return views

    def keep(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Set the shard's gradient, loss and correct count aside; the next shard's backward starts from no gradient."""
        row = self.rows[self.m]
        for view, p in zip(self._views(row), self.params):
            view.copy_(p.grad)
            p.grad = None
        row[-2] = loss.detach()
        row[-1] = (logits.argmax(1) == labels).sum()
        self.m = (self.m + 1) % self.local

    def combine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch's gradient (into each parameter's .grad), mean loss and correct count: the same bits on every rank."""
        every = self.dist.all_gather(self.rows, self.gathered)  # (W, S/W, numel + 2); shard k = r + W m is every[r, m]
        total = every[0, 0].clone()
        for m in range(self.local):
            for r in range(self.dist.world_size):  # m outer, r inner: shards 0, 1, ..., S - 1 in order
                if m or r:
                    total += every[r, m]
        total.mul_(1.0 / self.total)
        for view, p in zip(self._views(total), self.params):
            p.grad = torch.empty_like(p).copy_(view)  # empty_like keeps the parameter's memory format
        return total[-2], every[..., -1].sum()  # correct counts are small integers: exact in float32


def passes(cfg: TrainConfig, model: nn.Module, dist: Dist) -> OnePass | Shards:
    """How the step passes the batch through the model for train.reproducible; a UserError when the shards cannot be dealt out."""
    if cfg.reproducible == "fast":
        return OnePass()
    if cfg.batch_size % cfg.shards:
        raise UserError(
            f"train.batch_size={cfg.batch_size} is not divisible by train.shards={cfg.shards}; bitwise mode cuts the global "
            f"batch into train.shards equal shards: use a batch size that is a multiple of {cfg.shards}, or change train.shards"
        )
    if cfg.shards % dist.world_size:
        divisors = ", ".join(str(n) for n in range(1, cfg.shards + 1) if cfg.shards % n == 0)
        raise UserError(
            f"train.shards={cfg.shards} is not divisible by the {dist.world_size} ranks; in bitwise mode each rank computes "
            f"whole shards: run on {divisors} rank(s)"
        )
    deterministic(model, dist.device)
    return Shards(model.parameters(), cfg.shards, dist)


def deterministic(model: nn.Module, device: torch.device) -> None:
    """Deterministic kernels: torch's switch, and on CUDA cuBLAS's fixed workspace and no cuDNN autotuning.

    On CUDA, nn.AdaptiveAvgPool2d's backward (VGG16's `avgpool`) has no deterministic kernel
    (torch refuses it in this mode), so it is swapped for the same averages as two matrix
    products (`MatrixAvgPool`, no parameters: the state_dict keys stay). On the CPU the thread
    count also changes sums: train/runtime.py gives each rank one thread in this mode.
    """
    torch.use_deterministic_algorithms(True)
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when the first cuBLAS handle is made: no matmul ran yet
    torch.backends.cudnn.benchmark = False
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.AdaptiveAvgPool2d:
                setattr(module, name, MatrixAvgPool(child.output_size))


class MatrixAvgPool(nn.Module):
    """nn.AdaptiveAvgPool2d(output_size) as P_h @ x @ P_w^T: the same windows and averages, and a deterministic backward."""

    def __init__(self, output_size):
        super().__init__()
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        oh, ow = (o or s for o, s in zip(self.output_size, (h, w)))  # None keeps that size, as in torch
        return pooling_matrix(oh, h, x) @ x @ pooling_matrix(ow, w, x).T


def pooling_matrix(out: int, size: int, like: torch.Tensor) -> torch.Tensor:
    """(out, size): row i averages inputs floor(i size / out) to ceil((i + 1) size / out) - 1, torch's adaptive windows."""
    matrix = torch.zeros(out, size, dtype=like.dtype, device=like.device)
    for i in range(out):
        start, end = (i * size) // out, -(-(i + 1) * size // out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix
