"""The model registry: the seed's CIFAR-10 CNN and torchvision's VGG16 with the seed's two heads.

VGG16's two nn.Dropout layers become KeyedDropout: the same layer (no parameters, so the same
state_dict keys), whose masks in training are drawn per sample from `train/randomness.py`'s keys.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from train import randomness
from train.cli import UserError
from train.config import ModelConfig


class SeedCNN(nn.Module):
    """The seed notes' `MyModule`, layer for layer: its `state_dict` loads here with strict=True.

    Like the seed, there is no activation between layers: max-pooling is the only non-linearity.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(3, 32, 5, padding=2),  # 3@32x32 -> 32@32x32
            nn.MaxPool2d(2),  # -> 32@16x16
            nn.Conv2d(32, 32, 5, padding=2),  # -> 32@16x16
            nn.MaxPool2d(2),  # -> 32@8x8
            nn.Conv2d(32, 64, 5, padding=2),  # -> 64@8x8
            nn.MaxPool2d(2),  # -> 64@4x4
            nn.Flatten(),  # -> 1024
            nn.Linear(1024, 64),
            nn.Linear(64, num_classes),
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs)


class KeyedDropout(nn.Dropout):
    """nn.Dropout whose mask for a sample depends only on (train.seed, epoch, the sample's index, this layer, the unit).

    So the rows of a global batch get the same masks whichever rank computes them, and a resumed
    run draws what an uninterrupted one draws. The trainer attaches its `randomness.SampleKeys`
    (`keys`) and sets `keys.current` to the batch's row keys before each forward. Without them
    (a model built for one's own loop, a graph trace before the first step) it is nn.Dropout.
    """

    def __init__(self, p: float, layer: str):
        super().__init__(p)
        self.layer_key = randomness.key("dropout", layer)
        self.keys: randomness.SampleKeys | None = None
        self._salts: dict[tuple[int, torch.device], torch.Tensor] = {}  # (units, device) -> (units,) int64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.keys.current if self.keys is not None else None
        if not self.training or self.p in (0, 1) or rows is None:
            return super().forward(x)
        if rows.shape[0] != x.shape[0]:
            raise ValueError(f"KeyedDropout: {rows.shape[0]} row keys for a batch of {x.shape[0]}")
        units = x[0].numel()
        salts = self._salts.get((units, x.device))
        if salts is None:
            salts = self._salts[(units, x.device)] = randomness.mix(torch.arange(units, device=x.device) ^ self.layer_key)
        keep = ~randomness.below(randomness.unit_bits(rows, salts), self.p)  # (B, units), kept with probability 1 - p
        return x * (keep.view(x.shape).to(x.dtype) * (1.0 / (1.0 - self.p)))  # as nn.Dropout: x * (mask / (1 - p))


def keyed(model: nn.Module) -> nn.Module:
    """`model` with every nn.Dropout replaced by a KeyedDropout of the same p (named by its path); keys unchanged."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                setattr(module, child_name, KeyedDropout(child.p, f"{name}.{child_name}" if name else child_name))
    return model


def attach(model: nn.Module, keys: randomness.SampleKeys) -> None:
    """Let every KeyedDropout of `model` draw from `keys`."""
    for module in model.modules():
        if isinstance(module, KeyedDropout):
            module.keys = keys


# torchvision's file name for VGG16_Weights.IMAGENET1K_V1, looked up in $TORCH_HOME/hub/checkpoints/.
VGG16_WEIGHTS_FILE = "vgg16-397923af.pth"


def _vgg16(cfg: ModelConfig, num_classes: int) -> nn.Module:
    import torchvision  # slow to import; only VGG16 needs it

    model = torchvision.models.vgg16()  # 1000 ImageNet classes, so ImageNet weights load as they are
    if cfg.pretrained is True:
        model.load_state_dict(_imagenet_weights(torchvision))
    elif isinstance(cfg.pretrained, str) and cfg.pretrained:
        model.load_state_dict(_weights_file(Path(cfg.pretrained), model))
    if cfg.head == "replace":
        model.classifier[6] = nn.Linear(model.classifier[6].in_features, num_classes)  # 4096
    else:  # the seed's other way: keep the 1000-way layer and map it to the classes
        model.classifier.add_module("Linear", nn.Linear(1000, num_classes))
    if cfg.freeze_features:
        for p in model.features.parameters():
            p.requires_grad_(False)
    return keyed(model)


def _imagenet_weights(torchvision) -> dict:
    weights = torchvision.models.VGG16_Weights.IMAGENET1K_V1
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        # torchvision's own loader: reads torch hub's cache first, downloads only when the file is missing
        return weights.get_state_dict(progress=False, check_hash=False)
    except Exception as e:  # URLError / OSError offline
        raise UserError(
            f"VGG16 ImageNet weights are not in {hub_dir} and cannot be downloaded ({type(e).__name__}); "
            f"put {VGG16_WEIGHTS_FILE} (from {weights.url}) in {hub_dir}/, or pass model.pretrained=PATH, "
            f"or model.pretrained=false"
        ) from None


def _weights_file(path: Path, model: nn.Module) -> dict:
    if not path.is_file():
        raise UserError(
            f"model.pretrained file {path} not found; give an existing VGG16 state_dict file, true for ImageNet weights, or false"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"model.pretrained file {path} is not a loadable state_dict ({type(e).__name__}); "
            f"give a VGG16 state_dict saved with torch.save"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # one of this project's checkpoints
    expected = model.state_dict()
    if not isinstance(state, dict) or set(state) != set(expected) or any(state[k].shape != v.shape for k, v in expected.items()):
        raise UserError(f"model.pretrained file {path} is not an ImageNet VGG16 state_dict (keys or shapes differ)")
    return state


def build(cfg: ModelConfig, num_classes: int) -> nn.Module:
    if cfg.name == "cnn":
        return SeedCNN(num_classes)
    return _vgg16(cfg, num_classes)
