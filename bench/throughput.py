"""Training throughput, measured side by side: the model's own limit, this trainer, the seed's loop.

    python bench/throughput.py                      # cnn and vgg16 on this machine's device, DDP scaling on the CPU
    python bench/throughput.py --models cnn --rounds 7 --json bench/results.json

All variants run in one process, interleaved round by round, so that the machine's drift
(other load, clock changes) hits them alike; the table shows medians over rounds.

  limit    forward, backward and optimizer step on tensors already in memory: the same model,
           batch, dtype and memory format as the trainer. Nothing can feed the model faster.
  trainer  `train.engine.Trainer.train_one_epoch` at the project's defaults on CIFAR-format files
           read through the project's reader (cached, memory-mapped), with crop + flip, the log
           line every 50 steps and a checkpoint save each epoch, as `train/main.py` runs it.
  seed     the seed notes' loop: a Dataset that decodes each image to PIL and applies ToTensor
           (what torchvision's CIFAR10 does per item), a DataLoader, SGD, contiguous NCHW float32.

b/a near 1 means the data path costs nothing; b/c is what the user gains over the notes.
The DDP part starts `torchrun` with 1 and 2 processes on the same cores (gloo), and reports
images per second, scaling efficiency and each rank's peak resident memory (VmHWM, read
from /proc while it runs).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from train import config, data, engine, models, runtime, step
from train.distributed import Dist, Launch
from train.optimizer import make_optimizer

REPO = Path(__file__).resolve().parent.parent
CIFAR10_EPOCH_STEPS = 50000 // 128  # the defaults: a checkpoint every 390 steps


# ---------------------------------------------------------------------------- data in the official format


def write_cifar_format(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """Random images in CIFAR-10's python layout (5 training pickles, a test pickle, batches.meta)."""
    folder = root / data.CIFAR10_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = [n_train // 5] * 4 + [n_train - 4 * (n_train // 5)]  # exactly n_train images over the five files
    for name, n in list(zip(data.CIFAR10_TRAIN_FILES, sizes)) + [("test_batch", n_test)]:
        entry = {
            "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, n).tolist(),
            "batch_label": name,
            "filenames": [f"{i}.png" for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}, protocol=2))


# ---------------------------------------------------------------------------- the three variants


class Limit:
    """(a) forward + backward + step on a batch that already sits on the device, normalised, in the trainer's format."""

    def __init__(self, cfg: config.Config, device: torch.device):
        torch.manual_seed(0)
        fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        self.model = models.build(cfg.model, 10).to(device, memory_format=fmt)
        self.opt = make_optimizer(cfg.optim, self.model.parameters())
        self.dtype = runtime.DTYPES[runtime.amp_setting(cfg.train.amp, device)]
        self.x = torch.randn(cfg.train.batch_size, 3, 32, 32, device=device).contiguous(memory_format=fmt)
        self.y = torch.randint(0, 10, (cfg.train.batch_size,), device=device)
        self.net = torch.compile(self.model) if cfg.model.compile else self.model
        self.device = device

    def run(self, steps: int) -> int:
        for _ in range(steps):
            with step.autocast(self.device, self.dtype):
                loss = nn.functional.cross_entropy(self.net(self.x), self.y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        return steps * len(self.y)


class TrainerLoop:
    """(b) the trainer's own epoch loop, one epoch per call, with the checkpoint save of the epoch before.

    As in a real run, the previous epoch's checkpoint is saved as the epoch starts: in the
    trainer's thread on a CPU, by its background writer on a GPU while this epoch trains, and
    the round ends only when that file is on disk, so every byte of the write is counted.
    With fewer steps than a CIFAR-10 epoch (VGG16 on a CPU) the save is left out: once per few
    steps it would weigh far more than once per 390 steps does in a real run.
    """

    def __init__(self, cfg: config.Config, device: torch.device, save: bool):
        chosen, _ = runtime.resolve(cfg, Launch("single"))
        self.trainer = engine.Trainer(cfg, chosen, Dist(Launch("single"), device, None), stop=_NeverStop())
        self.save = save

    def run(self, steps: int) -> int:
        p = self.trainer.progress
        assert self.trainer.steps_per_epoch == steps
        if self.save and p.step:
            self.trainer.save()
        self.trainer.train_one_epoch()
        self.trainer.saver.wait()
        p.epoch, p.step_in_epoch = p.epoch + 1, 0
        return steps * self.trainer.batch_per_rank


class _NeverStop:
    requested = False


class SeedLoop:
    """(c) the seed notes' way: per-image PIL + ToTensor in a DataLoader, default memory format, SGD."""

    def __init__(self, cfg: config.Config, device: torch.device, images: np.ndarray, labels: np.ndarray):
        from PIL import Image
        from torchvision import transforms

        class CifarLike(torch.utils.data.Dataset):  # what torchvision.datasets.CIFAR10 does per item
            def __len__(self):
                return len(labels)

            def __getitem__(self, i):
                return transforms.ToTensor()(Image.fromarray(images[i])), int(labels[i])

        torch.manual_seed(0)
        self.model = models.build(cfg.model, 10).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.loss = nn.CrossEntropyLoss().to(device)
        self.loader = torch.utils.data.DataLoader(CifarLike(), batch_size=cfg.train.batch_size, shuffle=True, drop_last=True)
        self.device = device
        self.batches = iter(())

    def run(self, steps: int) -> int:
        done = 0
        while done < steps:
            try:
                imgs, targets = next(self.batches)
            except StopIteration:
                self.batches = iter(self.loader)
                continue
            imgs, targets = imgs.to(self.device), targets.to(self.device)
            outputs = self.model(imgs)
            res_loss = self.loss(outputs, targets)
            self.opt.zero_grad()
            res_loss.backward()
            self.opt.step()
            done += 1
        return done * self.loader.batch_size


def timed(variant, steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    images = variant.run(steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images / (time.perf_counter() - start)


def bench_model(name: str, device: torch.device, rounds: int, steps: int, workdir: Path, extra: list[str]) -> dict:
    batch = 128
    n_train = steps * batch  # one trainer epoch == one round
    root = workdir / f"cifar_{name}"
    write_cifar_format(root, n_train=n_train, n_test=batch)
    overrides = [
        f"model.name={name}",
        f"data.root={root}",
        f"data.cache_dir={workdir / 'cache'}",
        "data.download=false",
        f"train.batch_size={batch}",
        f"train.device={device.type}",
        f"log.run_dir={workdir / ('run_' + name)}",
        "log.graph=false",
        "log.progress=lines",
        *extra,
    ]
    cfg = config.from_files_and_overrides(config.DEFAULT_CONFIG, overrides)
    trainer = TrainerLoop(cfg, device, save=steps >= CIFAR10_EPOCH_STEPS)
    ds = trainer.trainer.data
    hwc = ds.train.images[:n_train].permute(0, 2, 3, 1).contiguous().cpu().numpy()  # on a GPU the trainer moved it there
    variants = {
        "limit": Limit(cfg, device),
        "trainer": trainer,
        "seed": SeedLoop(cfg, device, hwc, ds.train.labels[:n_train].cpu().numpy()),
    }
    for v in (variants["limit"], variants["seed"]):  # warm-up: allocator, kernels, compile (the trainer's is round 1)
        v.run(min(steps, 5))
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))  # alternate who goes first
        for key in order:
            samples[key].append(timed(variants[key], steps, device))
        print(f"  {name} round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in samples.items()), flush=True)
    med = {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in samples.items()}  # round 1 warms up
    return {
        "model": name,
        "device": str(device),
        "batch": batch,
        "steps_per_round": steps,
        "rounds": rounds,
        "images_per_s": med,
        "samples": samples,
        "b_over_a": med["trainer"] / med["limit"],
        "b_over_c": med["trainer"] / med["seed"],
    }


def bench_choices(device: torch.device, rounds: int, workdir: Path) -> dict:
    """The limit of the seed's CNN under the defaults' alternatives: memory format, and bf16 autocast."""
    base = ["model.name=cnn", f"train.device={device.type}", f"log.run_dir={workdir / 'choices'}"]
    default_amp = "bf16" if device.type == "cuda" else "fp32"  # what train.amp=auto picks
    cpu = device.type == "cpu"
    options = {  # name: (overrides, steps per round); bf16 on a CPU without bf16 units is slow: fewer steps
        "channels_last fp32": (["train.amp=fp32"], 30 if cpu else 200),
        "contiguous NCHW fp32": (["model.channels_last=false", "train.amp=fp32"], 30 if cpu else 200),
        "channels_last bf16": (["train.amp=bf16"], 4 if cpu else 200),
        "contiguous NCHW bf16": (["model.channels_last=false", "train.amp=bf16"], 4 if cpu else 200),
    }
    default = f"channels_last {default_amp}"
    variants = {
        k: (Limit(config.from_files_and_overrides(config.DEFAULT_CONFIG, base + o), device), steps)
        for k, (o, steps) in options.items()
    }
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for v, _ in variants.values():
        v.run(2)
    for r in range(rounds):
        for key, (v, steps) in variants.items():
            samples[key].append(timed(v, steps, device))
        print(f"  choices round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in samples.items()), flush=True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "device": str(device),
        "default": default,
        "images_per_s": med,
        "relative_to_default": {k: v / med[default] for k, v in med.items()},
    }


# ---------------------------------------------------------------------------- DDP scaling


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb(pid: int) -> dict[str, float]:
    """VmHWM (peak resident) and RssAnon (private, not file-backed: a copied dataset would show here)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        return {k: int(fields[k].split()[0]) / 1024 for k in ("VmHWM", "RssAnon")}
    except (OSError, KeyError, ValueError):
        return {}


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def ddp_scaling(workdir: Path, epochs: int) -> dict:
    """train/main.py under torchrun with 1 and 2 processes on the same cores; images/s and peak RSS per rank."""
    root = workdir / "cifar_ddp"
    if not (root / data.CIFAR10_FOLDER).is_dir():
        write_cifar_format(root, n_train=50000, n_test=2000)  # full CIFAR-10 size: 150 MB of uint8 to share
    out = {}
    for nproc in (1, 2):
        run_dir = workdir / f"ddp{nproc}"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={_free_port()}",
            str(REPO / "train" / "main.py"),
            f"data.root={root}",
            f"data.cache_dir={workdir / 'cache'}",
            "data.download=false",
            f"train.epochs={epochs}",
            f"log.run_dir={run_dir}",
            "log.progress=lines",
            "log.graph=false",
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        peaks: dict[int, float] = {}
        anon: dict[int, float] = {}
        while proc.poll() is None:
            for rank, pid in enumerate(sorted(_children(proc.pid))):
                mem = _memory_mb(pid)
                if mem:
                    peaks[rank] = max(peaks.get(rank, 0.0), mem["VmHWM"])
                    anon[rank] = max(anon.get(rank, 0.0), mem["RssAnon"])
            time.sleep(0.2)
        log = proc.stdout.read()
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun with {nproc} process(es) failed:\n{log[-2000:]}")
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        out[nproc] = {
            "images_per_s": statistics.median(m["images_per_s"] for m in lines),
            "peak_rss_mb_per_rank": [round(peaks[r]) for r in sorted(peaks)],
            "peak_anon_mb_per_rank": [round(anon[r]) for r in sorted(anon)],
        }
        print(f"  ddp {nproc} process(es): {out[nproc]}", flush=True)
    out["efficiency"] = out[2]["images_per_s"] / out[1]["images_per_s"]
    out["rank1_over_rank0_rss"] = out[2]["peak_rss_mb_per_rank"][1] / out[2]["peak_rss_mb_per_rank"][0]
    return out


# ---------------------------------------------------------------------------- main


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="cnn,vgg16")
    p.add_argument("--rounds", type=int, default=4, help="rounds; the first is a warm-up, the medians are over the rest")
    p.add_argument(
        "--steps", type=int, default=0, help="steps per round and variant (default: a CIFAR-10 epoch, 390; 4 for vgg16 on a CPU)"
    )
    p.add_argument("--ddp-epochs", type=int, default=2, help="epochs of 50000 images per DDP run (0: skip DDP)")
    p.add_argument("--compile", action="store_true", help="torch.compile in the limit and trainer variants")
    p.add_argument("--json", default=str(REPO / "bench" / "results.json"))
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {"machine": machine(), "torch": torch.__version__, "threads": torch.get_num_threads(), "models": []}
    extra = ["model.compile=true"] if args.compile else []
    with tempfile.TemporaryDirectory() as tmp:
        for name in filter(None, args.models.split(",")):
            steps = args.steps or (CIFAR10_EPOCH_STEPS if name == "cnn" or device.type == "cuda" else 4)
            print(f"{name} on {results['machine']}: {args.rounds} rounds of {steps} steps per variant", flush=True)
            results["models"].append(bench_model(name, device, args.rounds, steps, Path(tmp), extra))
        if "cnn" in args.models.split(","):
            print("defaults: the CNN's limit with the alternatives", flush=True)
            results["choices"] = bench_choices(device, 3, Path(tmp))
        if args.ddp_epochs:
            print("DDP scaling, gloo on the CPU (train/main.py under torchrun):", flush=True)
            results["ddp"] = ddp_scaling(Path(tmp), args.ddp_epochs)

    print(f"\nthroughput on {results['machine']} (torch {results['torch']}), images/s, medians:")
    print("| model | device | batch | (a) limit | (b) trainer | (c) seed loop | b/a | b/c |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["models"]:
        m = r["images_per_s"]
        print(
            f"| {r['model']} | {r['device']} | {r['batch']} | {m['limit']:.0f} | {m['trainer']:.0f} | {m['seed']:.0f} | "
            f"{r['b_over_a']:.3f} | {r['b_over_c']:.2f} |"
        )
    if "choices" in results:
        c = results["choices"]
        print(
            f"\ndefaults on {c['device']} (the CNN's limit, relative to the default, {c['default']}): "
            + ", ".join(f"{k} {v:.2f}x" for k, v in c["relative_to_default"].items())
        )
    if "ddp" in results:
        d = results["ddp"]
        print(
            f"\nDDP on the CPU (gloo): 1 process {d[1]['images_per_s']:.0f} img/s, 2 processes {d[2]['images_per_s']:.0f} img/s, "
            f"efficiency {d['efficiency']:.3f}; peak RSS per rank: 1 process {d[1]['peak_rss_mb_per_rank']} MB, "
            f"2 processes {d[2]['peak_rss_mb_per_rank']} MB (rank 1 / rank 0 = {d['rank1_over_rank0_rss']:.2f}); "
            f"of it private (not the shared dataset or libraries): {d[1]['peak_anon_mb_per_rank']} and "
            f"{d[2]['peak_anon_mb_per_rank']} MB"
        )
    Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    print(f"\nwritten {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
