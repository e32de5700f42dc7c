"""The training step as one CUDA graph (`train.cuda_graphs=true`): captured once, replayed at every step.

The seed's CNN is launch-bound on a big GPU: its ~2 ms step for 128 images is the CPU queueing
some sixty small kernels (augmentation, forward, backward, optimizer, the meter's sums) while the
GPU waits. A CUDA graph records those kernels once and launches them all with one call. What a
replay cannot do, and how the step stays the eager step (equal up to float rounding; checked on
a GPU by bench/gpu_check.sh):

- It reads and writes fixed addresses: the step's tensor arguments are copied into buffers the
  graph owns (images, labels and the images' indices), and its outputs are the graph's own tensors, valid until the
  next call.
- The learning rate changes at every step: during the capture each param group's `lr` is a
  float32 tensor on the GPU and the optimizer runs its fused kernel, which reads it there; before
  each replay the tensor is refilled from the float the scheduler wrote. `lr` and `fused` are put
  back after the capture, so logs and checkpoints see the optimizer as the eager path has it.
- Random numbers: the step draws none from a generator. Its augmentation and dropout come from
  its images' keys (train/randomness.py): an index into a table the loop rewrites in place at
  each epoch's start, so a replay reads this epoch's draws for this batch's images.
- Autocast keeps no cast cache (train/step.py's `autocast`): cached casts would live in the graph.
- The first `WARMUP` steps run eagerly on a side stream, so that lazy initialisations (cuBLAS
  and cuDNN handles, autograd's streams) happen before the capture, as CUDA requires.

`train/runtime.py` refuses what never works (fp16's loss scaling, optimizers other than SGD,
model.compile) and runs the steps eagerly, with a warning, on the CPU or under several ranks. The
step's only change is which callable runs it (train/step.py): `GraphedStep(step, ...)(*inputs)` returns
what `step(*inputs)` returns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from train.cli import UserError

WARMUP = 3  # eager steps before the capture (PyTorch's CUDA graph notes use 3 for a whole network)


@contextlib.contextmanager
def device_learning_rate(optimizer: torch.optim.Optimizer, rates: Sequence[torch.Tensor]):
    """Each param group's `lr` as the tensor in `rates`, read by the fused kernel; floats again on exit."""
    groups = optimizer.param_groups
    kept = [(g["lr"], g["fused"], g["foreach"]) for g in groups]
    try:
        for group, rate in zip(groups, rates):
            group.update(lr=rate, fused=True, foreach=None)
        yield
    finally:
        for group, (lr, fused, foreach) in zip(groups, kept):
            group.update(lr=lr, fused=fused, foreach=foreach)


class GraphedStep:
    """`step(*inputs) -> outputs` (tensors), eager for the first WARMUP calls, then replayed from a CUDA graph."""

    def __init__(self, step: Callable, optimizer: torch.optim.Optimizer):
        self.step, self.optimizer = step, optimizer
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[torch.Tensor] = []  # the graph's input buffers
        self.outputs = None  # the graph's outputs, rewritten by every replay
        self.rates: list[torch.Tensor] = []  # the learning rate of each param group, on the device
        self.side = torch.cuda.Stream()

    def __call__(self, *inputs: torch.Tensor):
        if self.graph is None:
            self.calls += 1
            if self.calls <= WARMUP:
                return self._eager(inputs)
            self._capture(inputs)
        for buffer, x in zip(self.inputs, inputs):
            buffer.copy_(x, non_blocking=True)
        for rate, group in zip(self.rates, self.optimizer.param_groups):
            rate.fill_(group["lr"])  # a kernel argument: no host-device sync
        self.graph.replay()
        return self.outputs

    def _eager(self, inputs):
        current = torch.cuda.current_stream()
        self.side.wait_stream(current)
        with torch.cuda.stream(self.side):
            outputs = self.step(*inputs)
        current.wait_stream(self.side)
        return outputs

    def _capture(self, inputs) -> None:
        device = inputs[0].device
        self.inputs = [x.detach().clone() for x in inputs]
        self.rates = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=device) for g in self.optimizer.param_groups]
        graph = torch.cuda.CUDAGraph()
        try:
            with device_learning_rate(self.optimizer, self.rates), torch.cuda.graph(graph):
                self.outputs = self.step(*self.inputs)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"capturing the training step as a CUDA graph failed ({first[:200]}); set train.cuda_graphs=false "
                f"and rerun the same command to resume from the last checkpoint"
            ) from None
        self.graph = graph


def runner(step: Callable, optimizer: torch.optim.Optimizer, graphed: bool) -> Callable:
    """What the step's caller runs: `step` itself, or a GraphedStep of it when `graphed` (train.cuda_graphs)."""
    return GraphedStep(step, optimizer) if graphed else step
