"""What bench/throughput.py compares the project with: whole runs of the model's own limit, the seed
notes' loop, and PyTorch Lightning, each `run(epochs)` building everything it needs from nothing.

Every run trains on the same data (CIFAR-10's layout, uint8 arrays) with the same model, batch and
optimizer settings as the project's config, and each does per epoch what its way of training
does: the limit only steps (with `eval`, also the test set's forward passes), the seed loop and
Lightning evaluate, log and save as their users would.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from train import config, data, graphs, models, runtime
from train.optimizer import make_optimizer
from train.step import autocast


class Limit:
    """The model's own limit at the trainer's settings: forward, backward and optimizer step on one batch already
    on the device, normalised, in the trainer's dtype and memory format; `steps` per epoch. With `evaluate`, each
    epoch also runs the forward passes of a test set of `n_test` images already on the device (the trainer's
    evaluation batch, twice the training batch): the model's own work for a run that evaluates every epoch.
    With `graphs` (CUDA), the step is replayed from a CUDA graph (train/graphs.py)."""

    def __init__(self, cfg: config.Config, device: torch.device, steps: int, n_test: int, evaluate=False, graphs=False):
        self.cfg, self.device, self.steps, self.n_test = cfg, device, steps, n_test
        self.evaluate, self.graphs = evaluate, graphs

    def __call__(self, epochs: int) -> None:
        cfg, device = self.cfg, self.device
        torch.manual_seed(0)
        fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        model = models.build(cfg.model, 10).to(device, memory_format=fmt)
        opt = make_optimizer(cfg.optim, model.parameters())
        dtype = runtime.DTYPES[runtime.amp_setting(cfg.train.amp, device, cfg.model.name)]
        batch = cfg.train.batch_size
        x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
        y = torch.randint(0, 10, (batch,), device=device)
        test = torch.randn(2 * batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)

        def step(x, y):
            with autocast(device, dtype):
                loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return (loss,)

        run_step = graphs.GraphedStep(step, opt) if self.graphs else step
        for _ in range(epochs):
            for _ in range(self.steps):
                run_step(x, y)
            if self.evaluate:
                model.eval()
                with torch.no_grad(), autocast(device, dtype):
                    for _ in range(-(-self.n_test // len(test))):
                        model(test).argmax(1)
                model.train()
        if device.type == "cuda":
            torch.cuda.synchronize(device)


class CifarLike(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per item: a PIL image from the uint8 array, then `transform`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform  # (N, 32, 32, 3) uint8, (N,) int

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


class SeedLoop:
    """The seed notes' loop (seed-notes.zh.txt): ToTensor per image in a DataLoader, default memory format and
    float32, SGD; after each epoch a test pass under no_grad, `Loss/Train` and `Loss/Test` to TensorBoard,
    and `torch.save(module, f"module_{epoch}.pth")`."""

    def __init__(self, cfg, device, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], folder: Path):
        from torchvision import transforms

        self.cfg, self.device, self.folder = cfg, device, folder
        self.train = CifarLike(*train, transforms.ToTensor())
        self.test = CifarLike(*test, transforms.ToTensor())
        self.runs = 0

    def __call__(self, epochs: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.runs += 1
        folder = self.last = self.folder / f"seed_{self.runs}"
        folder.mkdir(parents=True)
        batch = self.cfg.train.batch_size
        train_loader = torch.utils.data.DataLoader(self.train, batch_size=batch, shuffle=True, drop_last=True)
        test_loader = torch.utils.data.DataLoader(self.test, batch_size=batch)
        torch.manual_seed(0)
        module = models.build(self.cfg.model, 10).to(self.device)
        loss_fun = nn.CrossEntropyLoss().to(self.device)
        optim = torch.optim.SGD(module.parameters(), lr=0.01)
        writer = SummaryWriter(str(folder / "logs"))
        for epoch in range(epochs):
            epoch_train_loss = 0
            for imgs, targets in train_loader:
                imgs, targets = imgs.to(self.device), targets.to(self.device)
                res_loss = loss_fun(module(imgs), targets)
                optim.zero_grad()
                res_loss.backward()
                optim.step()
                epoch_train_loss += res_loss
            epoch_test_loss = 0
            with torch.no_grad():
                for imgs, targets in test_loader:
                    imgs, targets = imgs.to(self.device), targets.to(self.device)
                    epoch_test_loss += loss_fun(module(imgs), targets)
            writer.add_scalar("Loss/Train", epoch_train_loss.item(), epoch)
            writer.add_scalar("Loss/Test", epoch_test_loss.item(), epoch)
            torch.save(module, folder / f"module_{epoch}.pth")
        writer.close()

    def cleanup(self) -> None:
        shutil.rmtree(self.last, ignore_errors=True)


def lightning_version() -> str | None:
    try:
        import lightning
    except ImportError:
        return None
    return lightning.__version__


class LightningRun:
    """PyTorch Lightning as its users write it: a LightningModule around the same model, SGD with the config's
    settings and schedule (stepped per batch), crop + flip + normalise per image in DataLoader workers (8 on a
    GPU, with pinned memory; the cores on a CPU), validation every epoch, Lightning's default checkpoint (each
    epoch) and TensorBoard logger; bf16-mixed on CUDA, 32-true on the CPU. No progress bar (the output is a file)."""

    def __init__(self, cfg, device, train, test, folder: Path, workers: int):
        from torchvision import transforms

        norm = transforms.Normalize(data.CIFAR10_MEAN, data.CIFAR10_STD)
        augment = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
        self.train = CifarLike(*train, transforms.Compose([*augment, transforms.ToTensor(), norm]))
        self.test = CifarLike(*test, transforms.Compose([transforms.ToTensor(), norm]))
        self.cfg, self.device, self.folder, self.workers = cfg, device, folder, workers
        self.runs = 0

    def __call__(self, epochs: int) -> None:
        import logging

        import lightning as L

        for name in ("lightning.pytorch", "lightning.fabric"):  # its start-up lines and tips, on every run
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", message=r".*`srun` command is available")  # this machine has SLURM's tools
        self.runs += 1
        self.last = self.folder / f"lightning_{self.runs}"
        cuda = self.device.type == "cuda"
        loader = dict(batch_size=self.cfg.train.batch_size, num_workers=self.workers, pin_memory=cuda)
        loader["persistent_workers"] = self.workers > 0
        train_loader = torch.utils.data.DataLoader(self.train, shuffle=True, drop_last=True, **loader)
        test_loader = torch.utils.data.DataLoader(self.test, **loader)
        torch.manual_seed(0)
        module = _lightning_module(L, self.cfg, epochs, len(train_loader))
        trainer = L.Trainer(
            max_epochs=epochs,
            accelerator="gpu" if cuda else "cpu",
            devices=1,
            precision="bf16-mixed" if cuda else "32-true",
            default_root_dir=str(self.last),
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            trainer.fit(module, train_loader, test_loader)

    def cleanup(self) -> None:
        shutil.rmtree(self.last, ignore_errors=True)


def _lightning_module(L, cfg: config.Config, epochs: int, steps_per_epoch: int):
    from train.optimizer import lr_factor

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = models.build(cfg.model, 10)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self.model(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            out = self.model(x)
            self.log("val_loss", nn.functional.cross_entropy(out, y))
            self.log("val_acc", (out.argmax(1) == y).float().mean())

        def configure_optimizers(self):
            opt = make_optimizer(cfg.optim, self.parameters())
            schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg.optim, epochs, steps_per_epoch))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    return Classifier()
