"""The model registry: the seed's CIFAR-10 CNN and torchvision's VGG16 with the seed's two heads."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

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
        model.classifier[6] = nn.Linear(4096, num_classes)
    else:  # the seed's other way: keep the 1000-way layer and map it to the classes
        model.classifier.add_module("Linear", nn.Linear(1000, num_classes))
    if cfg.freeze_features:
        for p in model.features.parameters():
            p.requires_grad_(False)
    return model


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
