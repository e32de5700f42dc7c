"""`train/main.py` with VGG16 at 1/8 of its width: for tests only, run by path exactly like train/main.py.

The same layers in the same places as torchvision's VGG16 (13 convolutions, 5 max-pools, the
adaptive average pool, the classifier with its two nn.Dropout layers), so `model.name=vgg16`
goes through train/models.py's VGG16 path unchanged (heads, keyed dropout), with 64x fewer
weights: a step on the CPU takes milliseconds instead of a second.
"""

from __future__ import annotations

import sys

import torchvision
from torch import nn
from torchvision.models import vgg

WIDTH = 8  # every layer's width divided by this


def slim_vgg16(**kwargs) -> vgg.VGG:
    layers = [c if c == "M" else c // WIDTH for c in vgg.cfgs["D"]]
    model = vgg.VGG(vgg.make_layers(layers), **kwargs)
    hidden, channels = 4096 // WIDTH, 512 // WIDTH
    model.classifier = nn.Sequential(
        nn.Linear(channels * 7 * 7, hidden),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(hidden, hidden),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(hidden, 1000),
    )
    for m in model.classifier:
        if isinstance(m, nn.Linear):  # VGG's own initialisation of its classifier
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model


if __name__ == "__main__":
    torchvision.models.vgg16 = slim_vgg16
    from train.main import main

    sys.exit(main())
