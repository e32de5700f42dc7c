"""Batched augmentation and normalisation: uint8 batches in, the model's float input out, on the device.

Every operation acts on a whole batch (B, 3, H, W) at once; nothing runs in Python per image.
The random choices come in as the batch's per-sample bits (`train/randomness.py`: a function of
the seed, the epoch and each image's index), so an image is augmented the same way whichever
rank trains it, in whatever batch.
"""

from __future__ import annotations

import torch

from train import randomness
from train.data import CIFAR10_MEAN, CIFAR10_STD


class Preprocess:
    """uint8 batches to normalised float batches on the device; training batches augmented first.

    All operations act on the whole batch (B, 3, H, W) at once, their choices read from the
    batch's draws (B, 4) int64. The training path writes into buffers kept from one step to the
    next (one set per batch shape): a step allocates nothing but a few bytes of choices and indices.
    """

    def __init__(
        self,
        augment: tuple[str, ...],
        device: torch.device,
        channels_last: bool,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        pad: int = 4,
    ):
        self.augment, self.device, self.pad = augment, device, pad
        self.mean, self.std = tuple(mean), tuple(std)  # in [0, 1] units, per channel
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
        # x / 255 normalised = x * scale + shift, one fused multiply-add per pixel
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -torch.tensor(mean, device=device).view(1, 3, 1, 1) / std_t
        self.crop_flip: CropFlip | None = None
        self.outputs: dict[torch.Size, torch.Tensor] = {}

    def recipe(self, image_size: int) -> dict:
        """What inference does to an image before the model (a checkpoint's `preprocess` entry), also as torchvision code."""
        steps = [f"transforms.Resize(({image_size}, {image_size}))", "transforms.ToTensor()"]
        if self.mean != (0.0, 0.0, 0.0) or self.std != (1.0, 1.0, 1.0):
            steps.append(f"transforms.Normalize({list(self.mean)}, {list(self.std)})")
        return {
            "image_size": image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "torchvision": f"transforms.Compose([{', '.join(steps)}])(Image.open(path).convert('RGB'))",
        }

    def _normalise(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        # uint8 (or float) in, float out, written straight into the model's memory format: one pass
        if out is None:
            out = torch.empty(x.shape, device=self.device, memory_format=self.memory_format)
        return torch.addcmul(self.shift, x, self.scale, out=out)

    def test(self, x: torch.Tensor) -> torch.Tensor:
        return self._normalise(x)

    def train(self, x: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """`draws`: the batch's (B, 4) int64 random bits (randomness.SampleKeys.draws). The returned tensor is
        overwritten by the next call with the same batch shape: the model has used it by then."""
        x = x.to(self.device, non_blocking=True)
        if "crop" in self.augment or "flip" in self.augment:
            h, w = x.shape[-2:]
            if self.crop_flip is None or self.crop_flip.size != (h, w):
                self.crop_flip = CropFlip(h, w, self.pad if "crop" in self.augment else 0, "flip" in self.augment, self.device)
            x = self.crop_flip(x, randomness.choice(draws[:, randomness.CROP_FLIP], len(self.crop_flip.table)))
        out = self.outputs.get(x.shape)
        if out is None:
            out = self.outputs[x.shape] = torch.empty(x.shape, device=self.device, memory_format=self.memory_format)
        if "grayscale" not in self.augment and "jitter" not in self.augment:
            return self._normalise(x, out)
        x = x.float()
        if "grayscale" in self.augment:
            x = random_grayscale(x, randomness.below(draws[:, randomness.GRAYSCALE], 0.4))
        if "jitter" in self.augment:
            x = random_brightness(x, 0.4, randomness.uniform(draws[:, randomness.JITTER]))
        return self._normalise(x.clamp_(0, 255), out)


class CropFlip:
    """torchvision's RandomCrop(size, padding=pad) and RandomHorizontalFlip on a whole batch, as one gather.

    Each choice of (dy, dx, mirrored) is one row of a table, built once, of the flat source index
    of every output pixel in the zero-padded image: output pixel (i, j) reads padded pixel
    (dy + i, dx + j), or (dy + i, dx + W - 1 - j) when mirrored. A step is given one row per image
    (drawn uniformly: dy and dx uniform in [0, 2 pad], mirrored with probability 1/2,
    independently), copies the batch into the middle of a zero buffer it keeps, and gathers:
    about ten tensor operations per batch, whatever its size.
    """

    def __init__(self, h: int, w: int, pad: int, flip: bool, device: torch.device):
        self.size, self.pad = (h, w), pad
        rows = torch.arange(h, device=device)[:, None]
        cols = torch.arange(w, device=device)[None, :]
        width = w + 2 * pad
        table = [
            ((dy + rows) * width + dx + (w - 1 - cols if mirrored else cols)).reshape(-1)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for mirrored in ((False, True) if flip else (False,))
        ]
        self.table = torch.stack(table)  # (choices, H * W) int64
        self.buffers: dict[torch.Size, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """`choice`: (B,) int64, each image's row of the table."""
        b, c, h, w = x.shape
        p = self.pad
        if x.shape not in self.buffers:  # the padding stays zero: only the middle is ever written
            self.buffers[x.shape] = (x.new_zeros(b, c, h + 2 * p, w + 2 * p), x.new_empty(b, c, h * w))
        padded, out = self.buffers[x.shape]
        padded[:, :, p : p + h, p : p + w] = x
        index = self.table[choice].unsqueeze(1).expand(b, c, h * w)
        return torch.gather(padded.view(b, c, -1), 2, index, out=out).view(b, c, h, w)


def random_grayscale(x: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    """The seed's RandomGrayscale on a float batch in [0, 255]: the images where `pick` (B,) bool is true."""
    # written out channel by channel: the same additions in the same order for every batch shape
    gray = (x[:, 0:1] * 0.299 + x[:, 1:2] * 0.587 + x[:, 2:3] * 0.114).expand_as(x)
    return torch.where(pick[:, None, None, None], gray, x)


def random_brightness(x: torch.Tensor, strength: float, u: torch.Tensor) -> torch.Tensor:
    """The seed's ColorJitter(strength): brightness scaled by 1 + s (2u - 1), in [1 - s, 1 + s], per image; u (B,) in [0, 1)."""
    factor = 1.0 + strength * (2.0 * u - 1.0)
    return x * factor[:, None, None, None]
