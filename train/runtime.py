"""Every `auto` in the config, decided once at start-up for this machine and this launch.

The stored config stays what the user wrote (`device: auto` loads anywhere); what this run
actually uses is a `Runtime`: logged in one line at start-up ("running on: ...") and written to
`runtime.yaml` beside `config.yaml`. Checks against the machine live here, where the run starts,
and they warn or clamp rather than refuse: a config written on a 16-core node loads on a laptop.
Devices are validated and resolved here only, for training and for inference alike.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass

import torch

from train.cli import UserError
from train.config import Config
from train.distributed import Launch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    device: str  # "cpu" or "cuda:N"
    backend: str | None  # nccl | gloo; None for one process
    amp: str  # fp32 | bf16 | fp16
    threads: int  # torch's CPU threads in this process
    workers: int  # DataLoader workers
    save_in_background: bool  # checkpoints written by a thread of their own from a CPU snapshot
    progress: str  # bar | lines | none
    ranks: int
    cuda_graphs: bool = False  # the training step replayed from one CUDA graph (train/graphs.py)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype; None for float32 (no autocast)."""
        return DTYPES[self.amp]

    def line(self) -> str:
        ranks = (
            f"{self.ranks} ranks x {self.device.split(':')[0]}, {self.backend}" if self.backend else f"1 process on {self.device}"
        )
        saves = "in the background" if self.save_in_background else "in the training thread"
        graphs = ", the step as a CUDA graph" if self.cuda_graphs else ""
        return (
            f"running on: {ranks}, {self.threads} CPU threads each, {self.amp}{graphs}, {self.workers} loader workers, "
            f"checkpoints written {saves}, progress {self.progress}"
        )

    def to_dict(self) -> dict:
        return asdict(self)


def device(name: str, launch: Launch, key: str = "train.device") -> torch.device:
    """`auto`, `cpu`, `cuda` (this rank's GPU: cuda:LOCAL_RANK) or `cuda:N`, checked against this machine.

    `key` names the setting in the error line: `train.device` (written `train.device=cpu`) or `--device` (`--device cpu`).
    """
    sep = " " if key.startswith("--") else "="
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"{key}{sep}{name} but CUDA is not available here; use {key}{sep}cpu (or auto)")
    visible = torch.cuda.device_count()
    if ":" in name:
        index = int(name.split(":")[1])
        if launch.world_size > 1:
            raise UserError(
                f"{key}{sep}{name} names one GPU, but {launch.world_size} ranks each need their own; use {key}{sep}cuda"
            )
        if index >= visible:
            raise UserError(f"{key}{sep}{name}, but this machine has {visible} GPU(s), cuda:0 to cuda:{visible - 1}")
        return torch.device(name)
    if launch.local_rank >= visible:
        raise UserError(
            f"local rank {launch.local_rank} needs GPU {launch.local_rank}, but only {visible} GPU(s) are visible on this node; "
            f"start at most {visible} processes per node (--nproc_per_node / --gpus-per-node)"
        )
    return torch.device("cuda", launch.local_rank)


def amp_setting(setting: str, dev: torch.device, model: str) -> str:
    """`train.amp` for this device and model (`model.name`); measured by bench/throughput.py's precision part.

    On CPUs without bf16 units autocast was measured ~11x slower than float32. On an H200 the seed's
    cnn, launch-bound, ran 1.18x faster in fp32 than in bf16 (README, Performance); vgg16 is compute-bound.
    """
    if setting == "auto":
        return "bf16" if dev.type == "cuda" and model != "cnn" else "fp32"
    return setting


def cuda_graphs(cfg: Config, dev: torch.device, launch: Launch, amp: str, warnings: list[str]) -> bool:
    """train.cuda_graphs for this run (train/graphs.py). A combination that never works is refused; where this
    machine or launch cannot (the CPU, several ranks) the steps run eagerly, with a warning, as configs travel."""
    if not cfg.train.cuda_graphs:
        return False
    off = "or set train.cuda_graphs=false"
    if amp == "fp16":
        raise UserError(
            f"train.cuda_graphs=true cannot replay fp16's loss scaling (it reads the device at every step); "
            f"use train.amp=bf16 or fp32, {off}"
        )
    if cfg.optim.name != "sgd":
        raise UserError(
            f"train.cuda_graphs=true needs optim.name=sgd (its fused step reads the learning rate on the "
            f"device), not {cfg.optim.name}; {off}"
        )
    if cfg.model.compile:
        raise UserError("train.cuda_graphs=true and model.compile=true are two ways to the same end; set one of them to false")
    if dev.type != "cuda":
        warnings.append(f"train.cuda_graphs=true needs a CUDA device and this run is on the {dev.type}: steps run eagerly")
        return False
    if launch.world_size > 1:
        warnings.append(
            f"train.cuda_graphs=true captures one process's step, and this run has {launch.world_size} ranks: steps run eagerly"
        )
        return False
    if cfg.train.reproducible == "bitwise":
        warnings.append(
            "train.cuda_graphs=true replays one pass over the batch, and train.reproducible=bitwise takes one per shard: "
            "steps run eagerly"
        )
        return False
    return True


def backend(setting: str, dev: torch.device, launch: Launch) -> str | None:
    if launch.world_size == 1:
        return None
    chosen = ("nccl" if dev.type == "cuda" else "gloo") if setting == "auto" else setting
    if chosen == "nccl" and dev.type != "cuda":
        raise UserError("dist.backend=nccl needs CUDA devices; use dist.backend=gloo (or auto) on the CPU")
    return chosen


def threads(setting: int, launch: Launch, one: bool = False) -> int:
    """Ranks x threads = the cores this process may use, unless train.threads says otherwise.

    Under SLURM a task gets SLURM_CPUS_PER_TASK cores even where no CPU binding shows in the affinity.
    `one`: bitwise mode on the CPU, where the kernels' sums depend on the thread count (measured:
    the CNN's gradients differ between 1 and 2 threads): one thread per rank unless set.
    """
    if one:
        return setting or 1
    cores = len(os.sched_getaffinity(0)) // launch.local_world_size
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        cores = min(cores, int(os.environ["SLURM_CPUS_PER_TASK"]))
    return setting or max(1, cores)


def at_most_4_per_core(key: str, value: int, warnings: list[str]) -> int:
    # more than 4 threads or workers per core only slow a run down (and torch crashed at train.threads=100000)
    limit = 4 * len(os.sched_getaffinity(0))
    if value > limit:
        warnings.append(f"{key}={value} is more than 4x the {limit // 4} cores this process may use; using {limit}")
        return limit
    return value


def resolve(cfg: Config, launch: Launch) -> tuple[Runtime, list[str]]:
    """The Runtime of this process, and a warning line for each setting that had to be clamped."""
    warnings: list[str] = []
    dev = device(cfg.train.device, launch)
    progress = cfg.log.progress
    if progress == "auto":
        progress = "bar" if sys.stderr.isatty() else "lines"
    background = cfg.train.save_in_background
    amp = amp_setting(cfg.train.amp, dev, cfg.model.name)
    runtime = Runtime(
        device=str(dev),
        backend=backend(cfg.dist.backend, dev, launch),
        amp=amp,
        threads=at_most_4_per_core(
            "train.threads",
            threads(cfg.train.threads, launch, one=cfg.train.reproducible == "bitwise" and dev.type == "cpu"),
            warnings,
        ),
        workers=at_most_4_per_core("data.workers", cfg.data.workers, warnings),
        save_in_background=background == "always" or (background == "auto" and dev.type == "cuda"),
        progress=progress,
        ranks=launch.world_size,
        cuda_graphs=cuda_graphs(cfg, dev, launch, amp, warnings),
    )
    return runtime, warnings
