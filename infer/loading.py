"""Any checkpoint a user has, as a model ready for inference, with the preprocessing it was trained with.

Three kinds of file, one result (`Loaded`):
- this project's checkpoints (`best.pt`, `last.pt`): the digest is checked, and the file says
  everything: the architecture (`config.model`), the class names and the normalisation;
- a plain `state_dict` (the seed's `torch.save(model.state_dict(), ...)`): the architecture and
  the number of classes are read from its key names and shapes (`--model` decides when they
  cannot); the file does not say how images were preprocessed, so the seed's `ToTensor()` alone
  is assumed (no normalisation) and `warning` says so, unless `--mean`/`--std` say otherwise;
- a whole pickled model (the seed's `torch.save(model, ...)`): unpickling runs code from the
  file, so it is refused unless the user passes `--unsafe-load`. Then the seed's class
  `__main__.MyModule` is read as SeedCNN, and the weights take the `state_dict` path.
Every file is loaded with `map_location`, so a model saved on a GPU loads on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pickle
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from train import augment, checkpoint, config, data, models, runtime
from train.checkpoint import CheckpointError
from train.cli import UserError
from train.distributed import Launch

# The seed resized to 32x32 and used ToTensor() only: pixels in [0, 1], no mean/std normalisation.
SEED_IMAGE_SIZE = 32
SEED_MEAN, SEED_STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
# The seed's first MyModule named its layers (conv_00, ...); its Sequential version, SeedCNN, numbers them.
SEED_LAYER_NAMES = {
    "conv_00": "model.0",
    "conv_01": "model.2",
    "conv_02": "model.4",
    "linear_00": "model.7",
    "linear_01": "model.8",
}
# Wrappers whose prefixes a user's state_dict may carry: DataParallel / DDP, and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class Loaded:
    model: nn.Module  # on the device, in eval mode
    classes: list[str]  # the name of each output, in order
    image_size: int  # images are resized to image_size x image_size
    mean: tuple[float, ...]  # per-channel normalisation, in [0, 1] units, as in training
    std: tuple[float, ...]
    channels_last: bool  # the memory format it was trained (and evaluated) in
    config: config.Config | None  # the training config: this project's checkpoints only
    epoch: int  # completed training epochs (0 when the file does not say)
    kind: str  # "checkpoint" | "state_dict" | "whole model"
    step: int = 0  # optimizer steps taken (0 when the file does not say): TensorBoard's x-axis
    warning: str | None = None  # what was assumed about the file, for a `warning:` line

    def preprocess(self, device: torch.device) -> augment.Preprocess:
        """uint8 batches (B, 3, H, W) to the normalised float batches the model was trained on."""
        return augment.Preprocess((), device, self.channels_last, self.mean, self.std)


def add_arguments(parser: argparse.ArgumentParser, device: bool = True) -> None:
    """The options predict.py, evaluate.py and export.py share: which file, how to read it, where to run (`device`)."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        metavar="PATH",
        help="this project's best.pt / last.pt, a state_dict file (torch.save(model.state_dict(), ...)), "
        "or with --unsafe-load a whole pickled model (torch.save(model, ...))",
    )
    parser.add_argument(
        "--model",
        choices=("cnn", "vgg16"),
        help="the architecture of a state_dict whose key names do not say it (default: read from the keys)",
    )
    parser.add_argument(
        "--unsafe-load",
        action="store_true",
        help="accept a whole pickled model: loading it runs code from the file, so only for files you trust",
    )
    if device:
        parser.add_argument(
            "--device",
            default="auto",
            type=_device_name,
            help="auto (CUDA when there is one, else the CPU), cpu, cuda (under torchrun: each rank's own) or cuda:N",
        )
    parser.add_argument(
        "--mean",
        nargs=3,
        type=_finite_float,
        metavar="M",
        help="per-channel mean in [0, 1] units (default: the checkpoint's; 0 0 0 for a state_dict, as the seed's ToTensor())",
    )
    parser.add_argument(
        "--std", nargs=3, type=_positive_float, metavar="S", help="per-channel std (default: as --mean says, 1 1 1)"
    )


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    # a std of 0 divides by zero: every prediction would be NaN or the same class
    if not _finite_float(text) > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0 (a standard deviation), got {text!r}")
    return float(text)


def warn(message: str | None) -> None:
    """A `warning: ...` line on stderr (stdout stays the report, parseable with --json)."""
    if message:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def writable_folder(folder: Path, option: str) -> None:
    """UserError unless `folder` exists and can be written: infer/ never creates a folder the user did not name."""
    folder = folder if str(folder) else Path(".")
    if not folder.is_dir():
        raise UserError(f"{option}: folder {folder} does not exist; create it first (nothing is created for you)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{option}: folder {folder} is not writable; choose a folder you can write to")


def writable_file(path: Path, suffix: str, option: str) -> None:
    """UserError unless `path` can be written as a new or replaced file ending in `suffix`, checked before any work."""
    if path.suffix.lower() != suffix:
        raise UserError(f"{option} {path} must be a file name ending in {suffix}")
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file name, e.g. {path / ('model' + suffix)}")
    writable_folder(path.parent, f"{option} {path}")


def _device_name(text: str) -> str:
    if not re.fullmatch(config.DEVICE_NAMES, text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def device(name: str, launch: Launch | None = None) -> torch.device:
    """--device as a torch.device for this process (train/runtime.py's rules); a GPU that is not there is one line."""
    return runtime.device(name, launch or Launch("single"), key="--device")


def from_args(args: argparse.Namespace, dev: torch.device) -> Loaded:
    loaded = load(args.checkpoint, dev, args.model, args.unsafe_load)
    if args.mean is not None or args.std is not None:
        mean, std = tuple(args.mean or loaded.mean), tuple(args.std or loaded.std)
        loaded = dataclasses.replace(loaded, mean=mean, std=std, warning=None)  # the user said it
    return loaded


def load(path: Path, dev: torch.device, model_name: str | None = None, unsafe: bool = False) -> Loaded:
    """The model in `path` on `dev`, whatever kind of file it is, or a CheckpointError of one line."""
    obj = _read(path, dev, unsafe)
    kind = "state_dict"
    if isinstance(obj, nn.Module):  # a whole model: keep its weights, rebuild the model from the registry
        obj, kind = obj.state_dict(), "whole model"
    if checkpoint.is_checkpoint(obj):
        return _project_checkpoint(path, obj, dev)
    state = _state_dict(obj)
    if state is None:
        what = f"a dict with keys {', '.join(map(str, list(obj)[:5]))}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise CheckpointError(
            f"checkpoint {path} holds {what}, not a model: expected this project's checkpoint, a state_dict, "
            f"or a whole model saved with torch.save(model, ...)"
        )
    model_cfg, num_classes = _architecture(path, state, model_name)
    model = _filled(models.build(model_cfg, num_classes), state, path, f"the {model_cfg.name} model")
    classes = (
        list(data.CIFAR10_CLASSES) if num_classes == len(data.CIFAR10_CLASSES) else [f"class_{i}" for i in range(num_classes)]
    )
    assumed = (
        f"{path} is {'a bare state_dict' if kind == 'state_dict' else 'a whole pickled model'}: it does not say how its "
        f"images were preprocessed in training; assuming the seed's "
        f"Resize(({SEED_IMAGE_SIZE}, {SEED_IMAGE_SIZE})) and ToTensor() alone (pixels in [0, 1], no normalisation). "
        f"If it was trained with transforms.Normalize(mean, std), pass --mean M M M --std S S S"
    )
    return Loaded(model.to(dev).eval(), classes, SEED_IMAGE_SIZE, SEED_MEAN, SEED_STD, False, None, 0, kind, 0, assumed)


def _read(path: Path, dev: torch.device, unsafe: bool):
    """torch.load with weights_only=True; pickled objects other than tensors only with `unsafe`."""
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; give a file, e.g. {path / 'checkpoints' / checkpoint.BEST}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr: the error line says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=dev, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} not found") from None
    except Exception as e:  # zip, pickle and storage readers raise many types for a damaged file
        pickled = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))  # a class, as in torch.save(model, ...)
        if pickled and not unsafe:
            raise CheckpointError(
                f"checkpoint {path} holds pickled Python objects (class {pickled.group(1)}), as torch.save(model, ...) "
                f"writes a whole model: loading it runs code from the file. If you trust the file, rerun with "
                f"--unsafe-load; safer: save model.state_dict() where that class is defined and pass that file"
            ) from None
        if not (unsafe and "Weights only load failed" in str(e)):
            raise CheckpointError(f"checkpoint {path} is damaged or not a PyTorch file ({_reason(e)})") from None
    try:
        return torch.load(path, map_location=dev, weights_only=False, pickle_module=_SeedPickle)
    except _MissingClass as e:
        raise CheckpointError(
            f"checkpoint {path} pickles the class {e}, which cannot be imported here; load it where that class is "
            f"defined, save model.state_dict() and pass that file (with --model if needed)"
        ) from None
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be unpickled ({_reason(e)})") from None


def _reason(e: Exception) -> str:
    """The informative line of a loading error: the weights-only unpickler's own reason, else the first line."""
    text = str(e)
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    line = found.group(1) if found else next((s for s in text.splitlines() if s.strip()), "")
    return f"{type(e).__name__}: {line.strip()[:200]}" if line else type(e).__name__


class _MissingClass(Exception):
    pass


class _SeedUnpickler(pickle.Unpickler):
    """The standard unpickler, but the seed's model class, defined in the user's script, is SeedCNN."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("__main__", "MyModule"):
            return models.SeedCNN  # any nn.Module would do: only the weights are kept
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            raise _MissingClass(f"{module}.{name}") from None


class _SeedPickle:
    """A pickle module for torch.load(pickle_module=...): `Unpickler` and `load` are what it uses."""

    Unpickler = _SeedUnpickler
    load = staticmethod(pickle.load)


def _project_checkpoint(path: Path, payload: dict, dev: torch.device) -> Loaded:
    found = checkpoint.contents(payload, path)
    cfg = found.config
    # every weight is in the file: never fetch ImageNet weights for a VGG16 trained from them
    model = models.build(dataclasses.replace(cfg.model, pretrained=False), len(found.classes))
    model = _filled(model, found.model, path, f"the {cfg.model.name} model of its config")
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Loaded(
        model.to(dev).eval(),
        found.classes,
        found.image_size,
        found.mean,
        found.std,
        cfg.model.channels_last,
        cfg,
        found.epoch,
        "checkpoint",
        found.step,
    )


def _is_tensors(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _state_dict(obj) -> dict[str, torch.Tensor] | None:
    """The weights with plain key names: at the top of the file or under a usual key; None when there are none."""
    if isinstance(obj, dict) and not _is_tensors(obj):
        obj = next((obj[k] for k in ("state_dict", "model_state_dict", "model") if _is_tensors(obj.get(k))), obj)
    if not _is_tensors(obj):
        return None
    state = dict(obj)
    while prefix := next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None):
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return {_seed_key(k): v for k, v in state.items()}


def _seed_key(key: str) -> str:
    layer, dot, rest = key.partition(".")
    return f"{SEED_LAYER_NAMES[layer]}{dot}{rest}" if layer in SEED_LAYER_NAMES else key


def _architecture(path: Path, state: dict, name: str | None) -> tuple[config.ModelConfig, int]:
    """The registry entry and the number of classes that a state_dict's keys and last layer describe."""
    if name is None:
        name = "cnn" if "model.0.weight" in state else "vgg16" if "features.0.weight" in state else None
    if name is None:
        raise CheckpointError(
            f"cannot tell which model {path} holds (its keys begin {', '.join(list(state)[:3])}); "
            f"pass --model cnn or --model vgg16"
        )
    head = "append" if "classifier.Linear.weight" in state else "replace"  # the seed's two ways of fitting VGG16 to 10 classes
    last = {"cnn": "model.8.weight", "vgg16": "classifier.Linear.weight" if head == "append" else "classifier.6.weight"}[name]
    if last not in state:
        raise CheckpointError(
            f"checkpoint {path} does not fit the {name} model: it has no {last} (its keys begin {', '.join(list(state)[:3])})"
        )
    return config.ModelConfig(name=name, head=head), state[last].shape[0]


def _filled(model: nn.Module, state: dict, path: Path, what: str) -> nn.Module:
    """`model` with the weights of `state`, or one line naming the keys that do not fit."""
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k} has shape {tuple(state[k].shape)}, not {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise CheckpointError(f"checkpoint {path} does not fit {what}: {'; '.join(problems[:3])}{more}")
    model.load_state_dict(state)
    return model
