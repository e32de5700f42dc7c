"""Every random draw of training as a pure function of (train.seed, epoch, sample index): no random state.

The crop, flip, grayscale and brightness choices for a training image, and VGG16's dropout
masks for it, depend only on the run's seed, the epoch and the image's index in the training
set: never on the rank, the world size, the per-rank batch or how many steps this process has
run. So 1 process and N ranks draw the same, a run resumed on any world size draws what the
uninterrupted run draws, and a checkpoint holds no random state, only the name of this scheme
(SCHEME), so that a future change of it can be told apart.

How: a 32-bit integer hash (`mix`: C. Wellons' hash-prospector construction, two xorshift-multiply
rounds; a bijection of [0, 2^32)) on int64 tensors, on the training device:

    epoch key   key("epoch", seed, epoch)         a Python int, once per epoch (BLAKE2b)
    row         mix(index ^ epoch key)            one per training image: distinct within an epoch
    draw        mix(row ^ key(purpose))           32 random bits per image and purpose

`SampleKeys` computes the rows and draws of all images once per epoch into a table it keeps
(N x 4 int64, written in place); a step reads its batch's rows with one index,
`table[indices]`. Integer tensor ops only: the same bits on CPU and CUDA, no generator call in
the step, no shape that depends on the data. Dropout draws per unit: mix(row ^ mix(unit ^ layer key)).
"""

from __future__ import annotations

import hashlib

import torch

SCHEME = "per-sample keys v1"  # a checkpoint's `rng` entry; another value means draws were made another way
MASK = 0xFFFFFFFF
# The columns of a batch's draws, (B, 4) int64: the row key (dropout derives its masks from it), then one per augmentation.
ROW, CROP_FLIP, GRAYSCALE, JITTER = range(4)
PURPOSES = ("crop_flip", "grayscale", "jitter")


def key(*parts) -> int:
    """A 32-bit constant from any printable parts (an epoch's key, a purpose's salt)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=4).digest(), "little")


def mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit hash of every element of an int64 tensor holding values in [0, 2^32); a bijection of that range.

    Both multipliers are below 2^31, so no int64 product overflows: the result is exact on every device.
    """
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & MASK
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & MASK
    return x ^ (x >> 15)


def below(bits: torch.Tensor, p: float) -> torch.Tensor:
    """True with probability p (to 2^-32): 32 random bits under p * 2^32."""
    return bits < round(p * 2**32)


def uniform(bits: torch.Tensor) -> torch.Tensor:
    """Floats uniform in [0, 1) with 24 random bits each (exact in float32)."""
    return (bits >> 8).float() * 2.0**-24


def choice(bits: torch.Tensor, n: int) -> torch.Tensor:
    """Integers uniform in [0, n) (bias below n / 2^32), for n < 2^31."""
    return (bits * n) >> 32


class SampleKeys:
    """The random bits of every training image in the current epoch, and the rows of the forward pass in progress.

    `start_epoch(e)` fills the table for epoch e; `draws(indices)` is a batch's (B, 4) int64 bits.
    The trainer sets `current` (the batch's ROW column) before each forward: KeyedDropout
    (train/models.py) reads it.
    """

    def __init__(self, seed: int, n: int, device: torch.device):
        self.seed = seed
        self.table = torch.zeros(n, 1 + len(PURPOSES), dtype=torch.int64, device=device)  # written in place each epoch
        self.index = torch.arange(n, device=device)
        self.salts = torch.tensor([key(p) for p in PURPOSES], dtype=torch.int64, device=device)
        self.current: torch.Tensor | None = None  # (B,) int64 row keys of the samples being forwarded

    def start_epoch(self, epoch: int) -> None:
        rows = mix(self.index ^ key("epoch", self.seed, epoch))
        self.table[:, ROW] = rows
        self.table[:, ROW + 1 :] = mix(rows[:, None] ^ self.salts)

    def draws(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, 4) int64: the random bits of the images `indices` (their positions in the training set)."""
        return self.table[indices]


def unit_bits(rows: torch.Tensor, salts: torch.Tensor) -> torch.Tensor:
    """(B, F) random bits, one per sample row and unit: `salts` is (F,), one per unit, from mix(unit ^ layer key)."""
    return mix(rows[:, None] ^ salts)
