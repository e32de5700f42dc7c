"""Configuration: frozen dataclasses, filled from YAML, overridden by `section.key=value`.

Resolution order: the defaults below < the `--config` YAML file < command-line overrides.
Every key is checked: an unknown key names the nearest valid one, a wrong type names
the expected type, an out-of-range value names the key. The resolved config is what
the run folder's `config.yaml` and every checkpoint hold; nothing changes it afterwards.
The defaults below are `configs/cifar10_cnn.yaml` (a test keeps the two equal).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import re
import signal
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from train.cli import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "cifar10_cnn.yaml"

AUGMENTATIONS = ("crop", "flip", "grayscale", "jitter")
MAX_SEED = 2**32 - 1  # seeds are mixed with the rank into torch's 64-bit seeds: headroom, and numpy's limit
MAX_TIMEOUT_S = 7 * 24 * 3600.0  # dist.timeout_s: a week; a wait longer than that is a hang
DEVICE_NAMES = r"auto|cpu|cuda(:\d+)?"  # train.device and the --device of infer/: resolved in train/runtime.py


class ConfigError(UserError):
    pass


@dataclass(frozen=True)
class DataConfig:
    name: str = "cifar10"  # cifar10 | imagefolder | synthetic
    root: str = "data"  # cifar10: the folder holding cifar-10-batches-py/; imagefolder: holds train/<class>/* and test/<class>/*
    download: bool = True  # cifar10 missing from root: fetch the official archive (md5 checked); never falls back to synthetic
    # cifar10: check a local cifar-10-python.tar.gz against the official MD5 before extracting it; false for an
    # archive you repacked yourself (its members are still checked: only files and folders, none outside data.root)
    verify: bool = True
    # applied to whole batches, in this order: crop (pad 4), flip, grayscale (p=.4), jitter (brightness .4)
    augment: tuple[str, ...] = ("crop", "flip")
    # after ToTensor()'s [0, 1]: none (the seed's ToTensor() alone: the seed's MyModule and transforms answer as predict.py)
    # | cifar10 | imagenet ((x - mean) / std with those statistics; vgg16 with ImageNet weights). Checkpoints carry it,
    # infer/ applies it, infer/export.py builds it into the exported model. What `none` costs: README, Training.
    normalize: str = "none"
    # imagefolder images are resized to image_size x image_size (the CNN's Linear(1024, 64) needs 32, VGG16 at least 32)
    image_size: int = 32
    synthetic_train: int = 5000  # synthetic: training images (class patterns plus noise, fixed by synthetic_seed)
    synthetic_test: int = 1000  # synthetic: test images
    synthetic_classes: int = 10  # synthetic: number of classes (2 to 10000)
    synthetic_seed: int = 0  # synthetic: the same seed gives the same images everywhere
    # decoded datasets as .npy files, memory-mapped and so shared by the ranks of a node
    cache_dir: str = "~/.cache/cifar-scaffold"
    workers: int = 0  # DataLoader workers; batches are slices of an in-memory uint8 tensor, so the main process is enough

    def __post_init__(self):
        _choice("data.name", self.name, ("cifar10", "imagefolder", "synthetic"))
        for name in self.augment:
            _choice("data.augment", name, AUGMENTATIONS)
        _choice("data.normalize", self.normalize, ("none", "cifar10", "imagenet"))
        _at_least("data.image_size", self.image_size, 8)
        _at_least("data.synthetic_train", self.synthetic_train, 1)
        _at_least("data.synthetic_test", self.synthetic_test, 1)
        _between("data.synthetic_classes", self.synthetic_classes, 2, 10000)
        _between("data.synthetic_seed", self.synthetic_seed, 0, MAX_SEED)
        _at_least("data.workers", self.workers, 0)  # its limit depends on the machine: train/runtime.py clamps it


@dataclass(frozen=True)
class ModelConfig:
    name: str = "cnn"  # cnn: the seed's CIFAR-10 CNN | vgg16: torchvision's VGG16
    # vgg16 only: replace classifier[6] with Linear(4096, C), or append Linear(1000, C) to the classifier (the seed's two ways)
    head: str = "replace"
    # vgg16 only: true = torchvision's IMAGENET1K_V1 weights (torch hub cache), or a path to a state_dict file
    pretrained: bool | str = False
    freeze_features: bool = False  # vgg16 only: train the classifier only
    channels_last: bool = True  # NHWC memory format: measured faster for these convolutions on CPU and GPU
    compile: bool = False  # torch.compile the model; checkpoints keep plain key names either way

    def __post_init__(self):
        _choice("model.name", self.name, ("cnn", "vgg16"))
        _choice("model.head", self.head, ("replace", "append"))


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    # peak learning rate, for the global batch size. The CNN on ToTensor() input (data.normalize=none) diverged at 0.01
    # (NaN in epoch 5, 2 seeds of 2, bench/normalize_cost.py); 0.005 trains
    lr: float = 0.005
    momentum: float = 0.9  # sgd momentum; adamw uses it as beta1
    nesterov: bool = True  # sgd only
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # none | step | cosine | onecycle (linear up during warm-up, then linear down to 0)
    warmup_epochs: float = 1.0  # linear warm-up from 0 to lr over this many epochs (fractions allowed)
    step_epochs: int = 10  # step schedule: multiply lr by gamma every step_epochs epochs
    gamma: float = 0.1  # step schedule factor

    def __post_init__(self):
        _choice("optim.name", self.name, ("sgd", "adamw"))
        _choice("optim.schedule", self.schedule, ("none", "step", "cosine", "onecycle"))
        _above("optim.lr", self.lr, 0.0)
        _between("optim.momentum", self.momentum, 0.0, 1.0)
        _at_least("optim.weight_decay", self.weight_decay, 0.0)
        _at_least("optim.warmup_epochs", self.warmup_epochs, 0.0)
        _at_least("optim.step_epochs", self.step_epochs, 1)
        _above("optim.gamma", self.gamma, 0.0)
        if self.name == "adamw" and self.momentum >= 1:  # AdamW's beta1 must be below 1
            raise ConfigError(f"config key 'optim.momentum' is AdamW's beta1 and must be below 1.0, got {self.momentum}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20  # a rerun of a finished run with more epochs continues it
    batch_size: int = 128  # global: each of N ranks takes batch_size / N
    seed: int = 0  # model init, shuffling, augmentation and dropout: every draw is keyed by (seed, epoch, image index)
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    # auto: fp32 on the CPU (bf16 is ~11x slower on CPUs without bf16 units); on CUDA bf16 autocast, except fp32 for the
    # launch-bound cnn (1.18x faster than bf16 on an H200) | bf16 | fp16 | fp32
    amp: str = "auto"
    threads: int = 0  # CPU threads per rank; 0: the cores this process may use divided by the ranks on this node
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    # last.pt is written at the end of the run, at a stop signal, and when one of these three comes due (0: off).
    # By time: at the first log line (or epoch end) this many minutes after the last save; a few minutes keeps saving
    # under 5% of the wall time even for VGG16's 1 GB checkpoint, and a crash costs at most that much training.
    save_every_minutes: float = 5.0
    save_every_steps: int = 0  # every N optimizer steps (a step at an epoch's end is saved after its evaluation)
    save_every_epochs: int = 0  # at the end of every N-th epoch, after its evaluation (1: every epoch)
    # write checkpoints on a thread of their own from a snapshot in host memory, so that a save blocks training only for
    # the snapshot. auto: on CUDA (the CPU is idle while the GPU trains), not on the CPU (the writer would take its time
    # from the cores that train; the cnn's write blocks ~25 ms per save) | always | never
    save_in_background: str = "auto"
    # fast: 1 process and N ranks train the same model up to float32 summation order (DDP's all-reduce) |
    # bitwise: bit for bit, at some cost: gradients of train.shards fixed shards combined in shard order (an audit mode)
    reproducible: str = "fast"
    shards: int = 8  # bitwise: the global batch is cut into this many shards; it divides the batch, the ranks divide it
    # capture the whole training step (augmentation, forward, backward, optimizer) as one CUDA graph and replay it: the
    # seed's cnn is launch-bound on a big GPU. sgd, fp32/bf16; on one GPU (elsewhere the steps run eagerly, with a warning)
    cuda_graphs: bool = False

    def __post_init__(self):
        _at_least("train.epochs", self.epochs, 0)
        _at_least("train.batch_size", self.batch_size, 1)
        _between("train.seed", self.seed, 0, MAX_SEED)
        _at_least("train.threads", self.threads, 0)
        _between("train.label_smoothing", self.label_smoothing, 0.0, 1.0)
        _at_least("train.save_every_steps", self.save_every_steps, 0)
        _at_least("train.save_every_minutes", self.save_every_minutes, 0.0)
        _at_least("train.save_every_epochs", self.save_every_epochs, 0)
        _choice("train.amp", self.amp, ("auto", "bf16", "fp16", "fp32"))
        _choice("train.save_in_background", self.save_in_background, ("auto", "always", "never"))
        _choice("train.reproducible", self.reproducible, ("fast", "bitwise"))
        _at_least("train.shards", self.shards, 1)
        if not re.fullmatch(DEVICE_NAMES, self.device):
            raise ConfigError(f"config key 'train.device' must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass(frozen=True)
class DistConfig:
    backend: str = "auto"  # auto: nccl with CUDA, gloo otherwise | nccl | gloo
    timeout_s: float = 300.0  # a collective that waits longer (a rank died) fails the run instead of hanging (<= a week)
    # on these, all ranks stop at the next step, rank 0 saves last.pt, and the process exits 75 (train/cli.py's Exit):
    # SLURM's SIGTERM (requeue, preemption) and the time-limit signals of the sbatch scripts (USR1) and submitit (USR2)
    stop_signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1", "SIGUSR2")

    def __post_init__(self):
        _choice("dist.backend", self.backend, ("auto", "nccl", "gloo"))
        _between("dist.timeout_s", self.timeout_s, 1e-3, MAX_TIMEOUT_S)
        for name in self.stop_signals:
            if not isinstance(getattr(signal, name, None), signal.Signals):
                raise ConfigError(
                    f"config key 'dist.stop_signals' has {name!r}, which is not a signal name (e.g. SIGTERM, SIGUSR1)"
                )
            if name in ("SIGKILL", "SIGSTOP"):
                raise ConfigError(
                    f"config key 'dist.stop_signals' has {name}, which no process can catch; use SIGTERM or SIGUSR1"
                )


@dataclass(frozen=True)
class LogConfig:
    run_dir: str = "runs/{data.name}_{model.name}"  # the run folder; {section.key} is replaced by that config value
    every_steps: int = 50  # a console line and step scalars every N steps (the only host syncs in the loop)
    progress: str = "auto"  # auto: a bar on a terminal, plain lines in files (cluster logs) | bar | lines | none
    tensorboard: bool = True  # scalars, a grid of the first batch, the model graph, hyperparameters
    graph: bool = True  # add the model graph to TensorBoard (a model that cannot be traced is skipped with a warning)

    def __post_init__(self):
        _at_least("log.every_steps", self.every_steps, 1)
        _choice("log.progress", self.progress, ("auto", "bar", "lines", "none"))
        if not self.run_dir:
            raise ConfigError("config key 'log.run_dir' is empty; give the run folder, e.g. log.run_dir=runs/my_run")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self):
        # the model's input size, for the only dataset whose size is configurable (CIFAR-10 and synthetic are 32)
        size = self.data.image_size
        if self.data.name == "imagefolder" and self.model.name == "cnn" and size != 32:
            raise ConfigError(f"config key 'data.image_size' must be 32 for model.name=cnn (its Linear(1024, 64)), got {size}")
        if self.data.name == "imagefolder" and self.model.name == "vgg16" and size < 32:
            raise ConfigError(f"config key 'data.image_size' must be >= 32 for model.name=vgg16 (five 2x2 poolings), got {size}")

    @property
    def run_dir(self) -> Path:
        return Path(self.log.run_dir)


# Keys that may differ between a run folder's config and the config that resumes it:
# where and how the run executes, not what it computes.
RESUMABLE_CHANGES = frozenset(
    {
        "train.epochs",
        "train.device",
        "train.threads",
        "train.save_every_steps",
        "train.save_every_minutes",
        "train.save_every_epochs",
        "train.save_in_background",
        "train.cuda_graphs",
        "data.root",
        "data.download",
        "data.verify",
        "data.cache_dir",
        "data.workers",
        "dist.backend",
        "dist.timeout_s",
        "dist.stop_signals",
        "log.every_steps",
        "log.progress",
        "log.tensorboard",
        "log.graph",
        "model.compile",
    }
)


def _choice(key, value, choices):
    if value not in choices:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(choices)}; got {value!r}")


def _finite(key, value):
    # inf and nan pass comparisons they should fail (inf > 0, not nan < 0) and break the run later
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key '{key}' must be a finite number, got {value}")


def _at_least(key, value, low):
    _finite(key, value)
    if value < low:
        raise ConfigError(f"config key '{key}' must be >= {low}, got {value}")


def _above(key, value, low):
    _finite(key, value)
    if not value > low:
        raise ConfigError(f"config key '{key}' must be > {low}, got {value}")


def _between(key, value, low, high):
    _finite(key, value)
    if not low <= value <= high:
        raise ConfigError(f"config key '{key}' must be between {low} and {high}, got {value}")


def _hints(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _sections() -> dict[str, type]:
    return _hints(Config)


def all_keys() -> list[str]:
    return [f"{s}.{k}" for s, cls in _sections().items() for k in _hints(cls)]


def _unknown(key: str) -> ConfigError:
    near = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    hint = f" (did you mean '{near[0]}'?)" if near else f"; valid sections: {', '.join(_sections())}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _type_name(annotation) -> str:
    if annotation == tuple[str, ...]:
        return "a list of strings"
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    return {int: "an int", float: "a float", bool: "a bool (true/false)", str: "a string"}[annotation]


def _coerce(key: str, value, annotation):
    """`value` as `annotation`, or a ConfigError naming the key and the expected type."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                pass
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation == tuple[str, ...]:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
    raise ConfigError(f"config key '{key}' expects {_type_name(annotation)}, got {value!r}")


def _merge(tree: dict, updates: dict, source: str) -> None:
    """Check `updates` ({section: {key: value}}) against the schema and merge into `tree`."""
    sections = _sections()
    for section, values in updates.items():
        if section not in sections:
            first = next(iter(values), None) if isinstance(values, dict) else None
            raise _unknown(f"{section}.{first}" if first is not None else str(section))
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping of keys to values")
        hints = _hints(sections[section])
        for key, value in values.items():
            dotted = f"{section}.{key}"
            if key not in hints:
                raise _unknown(dotted)
            tree.setdefault(section, {})[key] = _coerce(dotted, value, hints[key])


def _parse_override(text: str) -> tuple[str, str, object, str]:
    """`section.key=value` as (section, key, value read as YAML, the raw text)."""
    key, sep, raw = text.partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"override '{text}' is not of the form section.key=value (e.g. optim.lr=0.1)")
    section, _, name = key.strip().partition(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return section, name, value, raw


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found; pass an existing YAML file to --config (see configs/)")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        # safe_load refuses Python tags (!!python/object...): a config is data, never code.
        problem = str(getattr(e, "problem", None) or e).splitlines()[0]
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"config file '{path}' is not plain YAML data{where}: {problem}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file '{path}' must hold sections (data:, model:, ...), not {type(tree).__name__}")
    return tree


def build(tree: dict) -> Config:
    """A Config from a {section: {key: value}} tree that was already checked by _merge."""
    sections = _sections()
    try:
        parts = {s: sections[s](**tree.get(s, {})) for s in sections}
    except TypeError as e:  # a missing or extra argument: the tree bypassed _merge
        raise ConfigError(f"config is incomplete: {e}") from None
    cfg = Config(**parts)
    return _resolve_run_dir(cfg)


def _resolve_run_dir(cfg: Config) -> Config:
    flat = flatten(cfg)

    def value(match):
        key = match.group(1)
        if key not in flat:
            raise _unknown(key)
        return str(flat[key]).replace("/", "_")

    run_dir = os.path.expanduser(re.sub(r"\{([a-z_]+\.[a-z_]+)\}", value, cfg.log.run_dir))  # ~ as data.root has it
    return dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, run_dir=run_dir))


def _apply_overrides(tree: dict, overrides: list[str], sections: tuple[str, ...] | None = None) -> None:
    for text in overrides:
        section, key, value, raw = _parse_override(text)
        if sections is not None and section not in sections:
            raise ConfigError(f"override '{text}' changes '{section}', but only {', '.join(sections)} can be changed here")
        try:
            _merge(tree, {section: {key: value}}, "override")
        except ConfigError:
            if value == raw:
                raise
            _merge(tree, {section: {key: raw}}, "override")  # the text as typed, e.g. a run name "2024" or "no"


def from_files_and_overrides(config_file: str | Path | None, overrides: list[str]) -> Config:
    tree: dict = {}
    if config_file is not None:
        _merge(tree, load_yaml(config_file), str(config_file))
    _apply_overrides(tree, overrides)
    return build(tree)


def override(cfg: Config, overrides: list[str], sections: tuple[str, ...] | None = None) -> Config:
    """`cfg` with `section.key=value` overrides, checked as on the command line; only `sections` when given."""
    tree: dict = {}
    _merge(tree, to_dict(cfg), "config")
    _apply_overrides(tree, overrides, sections)
    return build(tree)


def to_dict(cfg: Config) -> dict:
    """Plain dicts and lists, for YAML, JSON and checkpoints (tuples become lists)."""

    def plain(v):
        return list(v) if isinstance(v, tuple) else v

    return {s: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, s)).items()} for s in _sections()}


def from_dict(tree: dict) -> Config:
    checked: dict = {}
    _merge(checked, tree, "checkpoint config")
    return build(checked)


def flatten(cfg: Config) -> dict[str, object]:
    return {f"{s}.{k}": v for s, values in to_dict(cfg).items() for k, v in values.items()}


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def differences(old: Config, new: Config) -> dict[str, tuple[object, object]]:
    a, b = flatten(old), flatten(new)
    return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help=f"YAML config (default: {DEFAULT_CONFIG.relative_to(REPO_ROOT)})")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="override config values, e.g. optim.lr=0.1 train.epochs=5"
    )


def from_args(args: argparse.Namespace) -> Config:
    config_file = args.config if args.config is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    return from_files_and_overrides(config_file, args.overrides)
