"""Readers, augmentation and models, in process: what each returns for files the tests write."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import CIFAR_CLASSES, write_cifar10
from train import augment, config, data, models, randomness, runtime, shards
from train.cli import UserError
from train.distributed import Dist, Launch

ONE = Dist(Launch("single"), torch.device("cpu"), None)


def cfg_data(**kw) -> config.DataConfig:
    return config.DataConfig(**kw)


def test_cifar10_reader_reads_the_official_layout(tmp_path):
    written = write_cifar10(tmp_path / "data", per_batch=30, test=20)
    ds = data.load(cfg_data(name="cifar10", root=str(tmp_path / "data"), download=False, cache_dir=str(tmp_path / "cache")), ONE)
    assert ds.train.images.shape == (150, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert ds.train.labels.shape == (150,) and ds.train.labels.dtype == torch.int64
    assert ds.test.images.shape == (20, 3, 32, 32)
    assert ds.classes == CIFAR_CLASSES
    images, labels = written["data_batch_2"]
    assert torch.equal(ds.train.images[30:60], torch.from_numpy(images))  # channel-major rows decoded as (3, 32, 32)
    assert ds.train.labels[30:60].tolist() == labels.tolist()
    test_images, test_labels = written["test_batch"]
    assert torch.equal(ds.test.images, torch.from_numpy(test_images)) and ds.test.labels.tolist() == test_labels.tolist()
    # the second load memory-maps the cache instead of decoding again
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and (cached[0] / "train_images.npy").is_file()
    again = data.load(
        cfg_data(name="cifar10", root=str(tmp_path / "data"), download=False, cache_dir=str(tmp_path / "cache")), ONE
    )
    assert torch.equal(again.train.images, ds.train.images)


def test_cifar10_root_may_be_the_batches_folder_or_the_archive(tmp_path):
    import tarfile

    write_cifar10(tmp_path / "src", per_batch=5, test=5)
    folder = data.cifar10_folder(tmp_path / "src" / "cifar-10-batches-py", download=False)
    assert folder == tmp_path / "src" / "cifar-10-batches-py"
    (tmp_path / "user").mkdir()
    with tarfile.open(tmp_path / "user" / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    # a repacked archive is not the official one: data.verify=false skips the MD5 check
    assert data.cifar10_folder(tmp_path / "user", download=False, verify=False) == tmp_path / "user" / "cifar-10-batches-py"


def test_damaged_cifar10_file_is_named(tmp_path):
    write_cifar10(tmp_path / "data", per_batch=5, test=5)
    (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(UserError, match=r"CIFAR-10 file .*data_batch_3 cannot be read"):
        data.load(cfg_data(name="cifar10", root=str(tmp_path / "data"), download=False, cache_dir=str(tmp_path / "c")), ONE)


def _save_modes(folder, colour):
    """The same picture in the modes users have: RGBA, palette with transparency, grayscale, 16-bit, JPEG."""
    folder.mkdir(parents=True)
    rgb = Image.new("RGB", (40, 30), colour)
    rgb.putalpha(255)
    rgb.save(folder / "a.png")  # RGBA
    p = Image.new("RGB", (20, 20), colour).convert("P")
    p.info["transparency"] = 0
    p.save(folder / "b.png", transparency=0)
    Image.new("L", (64, 64), 128).save(folder / "c.png")
    Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(folder / "d.png")  # 16-bit greyscale
    Image.new("RGB", (50, 50), colour).save(folder / "e.jpg")


def test_imagefolder_converts_every_mode(tmp_path):
    for split in ("train", "test"):
        _save_modes(tmp_path / "imgs" / split / "cat", (200, 30, 30))
        _save_modes(tmp_path / "imgs" / split / "dog", (30, 30, 200))
    ds = data.load(cfg_data(name="imagefolder", root=str(tmp_path / "imgs"), image_size=32, cache_dir=str(tmp_path / "c")), ONE)
    assert ds.classes == ["cat", "dog"]
    assert ds.train.images.shape == (10, 3, 32, 32) and ds.train.labels.tolist() == [0] * 5 + [1] * 5
    assert ds.train.images[0, 0].float().mean() > 190  # RGBA: the red cat stays red
    assert abs(ds.train.images[3].float().mean() - 40000 / 65535 * 255) < 2  # 16-bit scaled, not clipped to white


def test_unreadable_image_is_named(tmp_path):
    _save_modes(tmp_path / "imgs" / "train" / "cat", (1, 2, 3))
    _save_modes(tmp_path / "imgs" / "test" / "cat", (1, 2, 3))
    (tmp_path / "imgs" / "train" / "cat" / "broken.png").write_bytes(b"")
    with pytest.raises(UserError, match=r"image .*broken\.png cannot be read"):
        data.load(cfg_data(name="imagefolder", root=str(tmp_path / "imgs"), cache_dir=str(tmp_path / "c")), ONE)


def test_synthetic_is_deterministic_and_balanced():
    a, b = data.synthetic(200, 50, seed=3), data.synthetic(200, 50, seed=3)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.images, data.synthetic(200, 50, seed=4).train.images)
    assert torch.bincount(a.train.labels).tolist() == [20] * 10


def test_batched_crop_and_flip_match_per_image_definitions():
    """Each output image is a 32x32 window of the zero-padded input, mirrored or not; the choices vary."""
    x = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8)
    padded = nn.functional.pad(x, (4, 4, 4, 4))
    crop_flip = augment.CropFlip(32, 32, pad=4, flip=True, device=torch.device("cpu"))
    keys = randomness.SampleKeys(seed=0, n=256, device=torch.device("cpu"))
    keys.start_epoch(0)
    bits = keys.draws(torch.arange(256))[:, randomness.CROP_FLIP]
    out = crop_flip(x, randomness.choice(bits, len(crop_flip.table))).clone()
    choices = set()
    for i in range(256):
        found = [
            (dy, dx, m)
            for dy in range(9)
            for dx in range(9)
            for m in (False, True)
            if torch.equal(
                out[i], padded[i, :, dy : dy + 32, dx : dx + 32].flip(2) if m else padded[i, :, dy : dy + 32, dx : dx + 32]
            )
        ]
        assert found, f"image {i} is no window of its padded input"
        choices.add(found[0])
    assert len({(dy, dx) for dy, dx, _ in choices}) > 60 and {m for _, _, m in choices} == {False, True}
    again = crop_flip(x, randomness.choice(bits, len(crop_flip.table)))
    assert torch.equal(again, out)  # the same draws, the same batch; the kept buffers hold no stale pixels
    flip_only = augment.CropFlip(32, 32, pad=0, flip=True, device=torch.device("cpu"))(x, randomness.choice(bits, 2))
    for i in range(256):
        assert torch.equal(flip_only[i], x[i]) or torch.equal(flip_only[i], x[i].flip(2))
    assert not torch.equal(flip_only, x) and not torch.equal(flip_only, x.flip(3))


def test_random_draws_depend_only_on_seed_epoch_and_image():
    """An image's bits are the same in any batch, in any order, on any rank's share; another epoch or seed, others."""
    cpu = torch.device("cpu")
    keys = randomness.SampleKeys(seed=3, n=1000, device=cpu)
    keys.start_epoch(2)
    every = keys.draws(torch.arange(1000))
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    for world in (1, 2, 4):  # rank r's batch: positions r, r + W, ... of the global batch
        for rank in range(world):
            share = order[:64][rank::world]
            assert torch.equal(keys.draws(share), every[share])
    fresh = randomness.SampleKeys(seed=3, n=1000, device=cpu)
    fresh.start_epoch(2)
    assert torch.equal(fresh.draws(torch.arange(1000)), every)  # a resumed run: nothing but (seed, epoch, index)
    keys.start_epoch(3)
    assert (keys.draws(torch.arange(1000)) != every).all(dim=1).float().mean() > 0.99
    fresh = randomness.SampleKeys(seed=4, n=1000, device=cpu)
    fresh.start_epoch(2)
    assert (fresh.draws(torch.arange(1000)) != every).all(dim=1).float().mean() > 0.99
    # The scheme's first values, pinned: if they change, so do the draws of every run; bump randomness.SCHEME
    first = [[1039079894, 1704938194, 2190715761, 821007284], [1850561342, 1916193540, 1983195562, 791711620]]
    assert every[:2].tolist() == first

    # The 32-bit hash equals its definition in plain Python (no int64 overflow on any device)
    def reference(x):
        x ^= x >> 16
        x = (x * 0x21F0AAAD) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x735A2D97) & 0xFFFFFFFF
        return x ^ (x >> 15)

    sample = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 123456789])
    assert randomness.mix(sample).tolist() == [reference(v) for v in sample.tolist()]
    # Uniform enough: 100000 draws, each of the 162 crop-flip choices within 15 % of its share, grayscale at 0.4
    big = randomness.SampleKeys(seed=0, n=100_000, device=cpu)
    big.start_epoch(0)
    draws = big.draws(torch.arange(100_000))
    counts = torch.bincount(randomness.choice(draws[:, randomness.CROP_FLIP], 162), minlength=162)
    assert counts.min() > 0.85 * 100_000 / 162 and counts.max() < 1.15 * 100_000 / 162
    assert abs(randomness.below(draws[:, randomness.GRAYSCALE], 0.4).float().mean() - 0.4) < 0.005
    u = randomness.uniform(draws[:, randomness.JITTER])
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.005


def test_vgg16_dropout_masks_follow_the_image(monkeypatch):
    """VGG16's dropout draws each row's mask from the image's keys: the same rows of a batch get the same masks
    when the batch is split over ranks; keys and shapes of the state_dict are torchvision's; without keys,
    nn.Dropout; in eval, the identity."""
    import torchvision
    from slim_vgg import slim_vgg16

    monkeypatch.setattr(torchvision.models, "vgg16", slim_vgg16)
    model = models.build(config.ModelConfig(name="vgg16"), 10)
    reference = slim_vgg16()
    reference.classifier[6] = nn.Linear(512, 10)
    assert [(k, v.shape) for k, v in model.state_dict().items()] == [(k, v.shape) for k, v in reference.state_dict().items()]
    dropout = model.classifier[2]
    assert type(dropout) is models.KeyedDropout and type(model.classifier[5]) is models.KeyedDropout
    keys = randomness.SampleKeys(seed=0, n=64, device=torch.device("cpu"))
    keys.start_epoch(0)
    models.attach(model, keys)
    model.train()
    ones = torch.ones(16, 512)
    rows = keys.draws(torch.arange(16))[:, randomness.ROW]
    keys.current = rows
    whole = dropout(ones)
    assert set(whole.unique().tolist()) == {0.0, 2.0} and abs((whole == 0).float().mean() - 0.5) < 0.05
    for world in (2, 4):
        for rank in range(world):
            keys.current = rows[rank::world]
            assert torch.equal(dropout(ones[rank::world]), whole[rank::world])
    keys.current = rows
    assert not torch.equal(model.classifier[5](ones), whole)  # each layer draws its own masks
    x = torch.randn(16, 3, 32, 32)
    out = model(x)
    keys.current = rows[1::2]
    assert torch.allclose(model(x[1::2]), out[1::2], atol=1e-6)
    keys.current = None
    assert not torch.equal(dropout(ones), dropout(ones))  # nn.Dropout's own draws
    assert torch.equal(dropout.eval()(ones), ones)


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (5, 5), (9, 9), (3, 8)])
def test_matrix_average_pool_is_adaptive_average_pool(size):
    """The deterministic stand-in for VGG16's avgpool in bitwise mode on CUDA: the same values and gradients."""
    x = torch.randn(2, 4, *size, requires_grad=True)
    y = x.detach().clone().requires_grad_(True)
    expected, got = nn.AdaptiveAvgPool2d((7, 7))(x), shards.MatrixAvgPool((7, 7))(y)
    assert torch.allclose(got, expected, atol=1e-6)
    weights = torch.randn_like(expected)
    (expected * weights).sum().backward()
    (got * weights).sum().backward()
    assert torch.allclose(y.grad, x.grad, atol=1e-5)


def test_preprocess_normalises_with_cifar10_statistics():
    x = torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)
    out = augment.Preprocess((), torch.device("cpu"), channels_last=True).test(x)
    expected = (1.0 - torch.tensor(data.CIFAR10_MEAN)) / torch.tensor(data.CIFAR10_STD)
    assert torch.allclose(out[0, :, 0, 0], expected, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)


class SeedModule(nn.Module):
    """A verbatim copy of the seed notes' MyModule (the Sequential version)."""

    def __init__(self):
        super().__init__()
        from torch.nn import Conv2d, Flatten, Linear, MaxPool2d

        self.model = torch.nn.Sequential(
            Conv2d(3, 32, 5, padding=2),
            MaxPool2d(2),
            Conv2d(32, 32, 5, padding=2),
            MaxPool2d(2),
            Conv2d(32, 64, 5, padding=2),
            MaxPool2d(2),
            Flatten(),
            Linear(1024, 64),
            Linear(64, 10),
        )

    def forward(self, inputs):
        return self.model(inputs)


def test_seed_state_dict_loads_strictly(tmp_path):
    seed = SeedModule()
    torch.save(seed.state_dict(), tmp_path / "SavedStateDict.pth")
    cnn = models.build(config.ModelConfig(name="cnn"), 10)
    cnn.load_state_dict(torch.load(tmp_path / "SavedStateDict.pth", weights_only=True), strict=True)
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(cnn(x), seed(x))


@pytest.fixture(scope="module")
def vgg_weights(tmp_path_factory):
    """A VGG16 ImageNet-shaped state_dict saved under torchvision's file name in a fresh TORCH_HOME."""
    import torchvision

    home = tmp_path_factory.mktemp("torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(1)
    state = torchvision.models.vgg16().state_dict()
    torch.save(state, home / "hub" / "checkpoints" / models.VGG16_WEIGHTS_FILE)
    return home, state


def test_vgg16_heads_and_pretrained_weights_offline(vgg_weights, monkeypatch):
    home, state = vgg_weights
    monkeypatch.setenv("TORCH_HOME", str(home))
    x = torch.randn(2, 3, 32, 32)
    replace = models.build(config.ModelConfig(name="vgg16", head="replace", pretrained=True), 10).eval()
    assert replace(x).shape == (2, 10)
    assert replace.classifier[6].out_features == 10
    assert torch.equal(replace.features[0].weight, state["features.0.weight"])  # the cached file was loaded
    append = models.build(config.ModelConfig(name="vgg16", head="append"), 10).eval()
    assert append(x).shape == (2, 10)
    assert append.classifier[6].out_features == 1000 and append.classifier.Linear.in_features == 1000


def test_vgg16_pretrained_missing_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError) as e:
        models.build(config.ModelConfig(name="vgg16", pretrained=True), 10)
    assert models.VGG16_WEIGHTS_FILE in str(e.value) and str(tmp_path / "hub" / "checkpoints") in str(e.value)


def test_vgg16_frozen_features_only_train_the_classifier(vgg_weights, monkeypatch):
    from train.optimizer import make_optimizer

    monkeypatch.setenv("TORCH_HOME", str(vgg_weights[0]))
    model = models.build(config.ModelConfig(name="vgg16", pretrained=True, freeze_features=True), 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_optimizer(config.OptimConfig(lr=0.01), [p for p in model.parameters() if p.requires_grad])
    nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2])).backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("classifier.") for k in changed)
    assert not any(k.startswith("features.") for k in changed)


def test_compiled_model_checkpoints_keep_plain_keys(tmp_path):
    """model.compile=true wraps the model for the step (OptimizedModule); checkpoints hold the plain module."""
    from conftest import SMOKE
    from train.engine import Trainer

    cfg = config.from_files_and_overrides(SMOKE, ["model.compile=true", f"log.run_dir={tmp_path / 'run'}"])
    chosen, _ = runtime.resolve(cfg, ONE.launch)
    trainer = Trainer(cfg, chosen, ONE, stop=None)
    assert (
        type(trainer.step.model).__name__ == "OptimizedModule" and "_orig_mod.model.0.weight" in trainer.step.model.state_dict()
    )
    trainer.save()
    keys = list(torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"])
    assert keys == list(models.SeedCNN().state_dict())
