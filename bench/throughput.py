"""Training throughput as a user gets it: whole runs of this project beside the model's limit, the seed's loop and Lightning.

    python bench/throughput.py                               # the cnn on this machine's device
    python bench/throughput.py --models cnn,vgg16 --json bench/results.json
    python bench/throughput.py --train-images 10000 --test-images 2000 --rounds 2   # a quick look

Every variant is a whole run, built from nothing and trained for E1 and then for E2 epochs of the
same data (CIFAR-10's files and sizes, random pixels), evaluating and saving as it does by
default. Its throughput is the extra images over the extra time,

    (E2 - E1) x N / (T(E2) - T(E1)),

so that what a run pays once cancels (reading the data, building the model, TensorBoard's graph of
the first batch, capturing a CUDA graph, the allocator's warm-up) and what it pays per epoch counts
(evaluation, metric sums, checkpoints, TensorBoard, re-shuffling). All runs share this process, so
imports are paid once, before the first round. The variants run in turn, round by round, in
reversed order every other round, so that drift on a shared machine hits them alike; the tables
give medians over rounds, and each ratio is the median of the rounds' own ratios (a loaded machine
moves absolute numbers more than ratios).

  project         train/main.py at the defaults: the Trainer that run() builds, CIFAR-format files
                  through the project's reader and cache, crop + flip, log lines, TensorBoard, the
                  checkpoint cadence (train.save_every_minutes: only the last save falls in a short run)
  project+saves   the same with train.save_every_epochs=1: what a checkpoint per epoch costs
  project+graphs  the same with train.cuda_graphs=true (CUDA only)
  limit           the model's own limit at the same settings: forward, backward and optimizer step on
                  one batch already on the device, in the trainer's dtype and memory format, the
                  trainer's steps per epoch; no data path, no evaluation, no saving
  limit+eval      the limit plus each epoch's evaluation forward passes on a test batch on the device
  limit+graphs    the limit's step replayed from a CUDA graph (train/graphs.py; CUDA only)
  seed            the seed notes' loop: per-image PIL + ToTensor in a DataLoader, a test pass and
                  torch.save(module) each epoch (bench/baselines.py)
  lightning       PyTorch Lightning where it is installed (it is not a dependency of the project:
                  `pip install lightning`), bench/baselines.py says how it is set up

The project's own "img/s" (metrics.jsonl: training steps only) is reported beside as `in-loop`:
the gap between it and the whole-run figure is what happens between epochs. `--precision`
measures the limit in fp32 and bf16, channels-last and NCHW: what train.amp=auto and
model.channels_last default to per model. `--ddp-epochs` runs train/main.py under torchrun with 1
and 2 processes on the CPU (gloo) and reports the in-loop rate, scaling and peak memory per rank.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import pickle
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import baselines  # bench/baselines.py: this script's folder is first on sys.path
import numpy as np
import torch

from train import cli, config, data, distributed, engine, runtime

REPO = Path(__file__).resolve().parent.parent


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


# ---------------------------------------------------------------------------- the project, as train/main.py runs it


class Project:
    """A whole run of train/main.py's `run()` in this process: the same runtime, Trainer and fit, stdout to a log file."""

    def __init__(self, overrides: list[str], folder: Path, name: str):
        self.overrides, self.folder, self.name = overrides, folder, name
        self.runs = 0
        self.blocked: list[float] = []  # seconds each run's training thread spent on saving (checkpoint.Saver)
        self.in_loop: list[float] = []  # the images/s each run printed for its epochs (medians)

    def __call__(self, epochs: int) -> None:
        self.runs += 1
        run_dir = self.last = self.folder / f"{self.name}_{self.runs}"
        cfg = config.from_files_and_overrides(
            config.DEFAULT_CONFIG, [*self.overrides, f"train.epochs={epochs}", f"log.run_dir={run_dir}"]
        )
        launch = distributed.detect()
        chosen, _ = runtime.resolve(cfg, launch)
        torch.set_num_threads(chosen.threads)
        run_dir.mkdir(parents=True)
        with open(run_dir / "stdout.txt", "w") as log, contextlib.redirect_stdout(log):
            with distributed.setup(launch, chosen.torch_device, chosen.backend, cfg.dist.timeout_s) as dist:
                trainer = engine.Trainer(cfg, chosen, dist, cli.StopFlag())
                try:
                    code = trainer.fit()
                finally:
                    trainer.logger.close()
        if code != cli.Exit.OK:
            raise RuntimeError(f"{self.name} exited {code}; see {run_dir / 'stdout.txt'}")
        self.blocked.append(trainer.saver.blocked)
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        self.in_loop.append(statistics.median(m["images_per_s"] for m in lines))

    def cleanup(self) -> None:
        shutil.rmtree(self.last, ignore_errors=True)  # VGG16 writes a 1 GB checkpoint per run


# ---------------------------------------------------------------------------- whole runs at two sizes, interleaved


def cpu_seconds() -> float:
    """CPU time of this process (every thread) and of its children that have ended (DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(run, epochs: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds / torch's threads) of one run: the second is what a run takes on a machine where
    nothing else runs and all threads stay busy, a proxy that other processes' load moves much less."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
    start, cpu = time.perf_counter(), cpu_seconds()
    run(epochs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start, (cpu_seconds() - cpu) / torch.get_num_threads()
    if hasattr(run, "cleanup"):  # the run's files, removed after the clock stopped
        run.cleanup()
    return seconds


def measure(variants: dict, sizes: tuple[int, int], n_train: int, device, args, baseline_rounds: int | None = None) -> dict:
    """{variant: {"rates": img/s per round by args.clock, "rates_wall", "rates_cpu", "startup_s"}} from runs of sizes[0]
    and sizes[1] epochs, the variants in turn, in reversed order every other round."""
    e1, e2 = sizes
    rounds, baseline_rounds = args.rounds, baseline_rounds or args.rounds
    out = {name: {"rates": [], "rates_wall": [], "rates_cpu": [], "startup_s": []} for name in variants}
    if args.warmup:  # first-time costs a user pays once per process (cuDNN and allocator set-up, page cache), not timed
        for run in variants.values():
            timed(run, e1, device)
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            if name in ("seed", "lightning") and r >= baseline_rounds:
                continue
            first, second = (e1, e2) if r % 2 == 0 else (e2, e1)
            seconds = {first: timed(variants[name], first, device), second: timed(variants[name], second, device)}
            for i, clock in enumerate(("wall", "cpu")):
                out[name][f"rates_{clock}"].append((e2 - e1) * n_train / (seconds[e2][i] - seconds[e1][i]))
            rate = out[name][f"rates_{args.clock}"][-1]
            out[name]["rates"].append(rate)
            out[name]["startup_s"].append(seconds[e1][0 if args.clock == "wall" else 1] - e1 * n_train / rate)
        load = os.getloadavg()[0]
        line = ", ".join(f"{k} {v['rates'][-1]:.0f}" for k, v in out.items() if len(v["rates"]) > r)
        print(f"  round {r + 1}/{rounds} (load {load:.1f}, {args.clock} clock): {line} img/s", flush=True)
    return out


def ratio(results: dict, a: str, b: str, key: str = "rates") -> float | None:
    """The median over rounds of a's rate / b's rate in the same round (None when either is missing)."""
    if a not in results or b not in results:
        return None
    pairs = list(zip(results[a][key], results[b][key]))
    return statistics.median(x / y for x, y in pairs) if pairs else None


RATIOS = [  # (name, numerator, denominator): what the README's tables and the targets read
    ("project / limit", "project", "limit"),
    ("project / limit+eval", "project", "limit+eval"),
    ("project+saves / project", "project+saves", "project"),
    ("project+graphs / limit", "project+graphs", "limit"),
    ("project+graphs / project", "project+graphs", "project"),
    ("limit+graphs / limit", "limit+graphs", "limit"),
    ("project / seed", "project", "seed"),
    ("project / lightning", "project", "lightning"),
    ("project+graphs / lightning", "project+graphs", "lightning"),
]


def bench_model(name: str, device: torch.device, args, folder: Path) -> dict:
    root = folder / "cifar"
    if not (root / data.CIFAR10_FOLDER).is_dir():
        write_cifar_format(root, args.train_images, args.test_images)
    base = [
        f"model.name={name}",
        f"data.root={root}",
        f"data.cache_dir={folder / 'cache'}",
        "data.download=false",
        f"train.device={device.type}",
        "log.progress=lines",
        *args.override,
    ]
    cfg = config.from_files_and_overrides(config.DEFAULT_CONFIG, [*base, f"log.run_dir={folder / 'unused'}"])
    datasets = data.load(cfg.data, distributed.Dist(distributed.Launch("single"), torch.device("cpu"), None))
    train = (datasets.train.images.permute(0, 2, 3, 1).numpy(), datasets.train.labels.numpy())  # HWC for PIL
    test = (datasets.test.images.permute(0, 2, 3, 1).numpy(), datasets.test.labels.numpy())
    steps = data.steps_per_epoch(args.train_images, cfg.train.batch_size, 1)
    n_train = steps * cfg.train.batch_size  # full batches only, as every variant trains
    cuda = device.type == "cuda"
    workers = min(8, len(os.sched_getaffinity(0)))
    candidates = {
        "project": lambda: Project(base, folder, f"{name}_project"),
        "project+saves": lambda: Project([*base, "train.save_every_epochs=1"], folder, f"{name}_saves"),
        "project+graphs": lambda: Project([*base, "train.cuda_graphs=true"], folder, f"{name}_graphs") if cuda else None,
        "limit": lambda: baselines.Limit(cfg, device, steps, len(test[1])),
        "limit+eval": lambda: baselines.Limit(cfg, device, steps, len(test[1]), evaluate=True),
        "limit+graphs": lambda: baselines.Limit(cfg, device, steps, len(test[1]), graphs=True) if cuda else None,
        "seed": lambda: baselines.SeedLoop(cfg, device, train, test, folder),
        "lightning": lambda: (
            baselines.LightningRun(cfg, device, train, test, folder, workers) if baselines.lightning_version() else None
        ),
    }
    wanted = args.variants.split(",")
    variants = {k: make() for k, make in candidates.items() if k in wanted}
    skipped = [k for k, v in variants.items() if v is None]
    variants = {k: v for k, v in variants.items() if v is not None}
    for k in skipped:
        why = "lightning is not installed (pip install lightning)" if k == "lightning" else "needs CUDA"
        print(f"  {k}: skipped, {why}", flush=True)
    print(f"{name}: {n_train} training images ({steps} steps of {cfg.train.batch_size}), {len(test[1])} test images", flush=True)
    sizes = tuple(int(e) for e in args.epochs.split(","))
    results = measure(variants, sizes, n_train, device, args, args.baseline_rounds)
    extra = {}
    for k, v in variants.items():
        if isinstance(v, Project):
            extra[k] = {"in_loop": v.in_loop, "saving_blocked_s": v.blocked}
    return {
        "model": name,
        "train_images": n_train,
        "test_images": len(test[1]),
        "epochs": sizes,
        "skipped": skipped,
        "variants": {k: {**v, "median": statistics.median(v["rates"]), **extra.get(k, {})} for k, v in results.items()},
        "ratios": {label: ratio(results, a, b) for label, a, b in RATIOS if ratio(results, a, b) is not None},
        "ratios_cpu": {label: x for label, a, b in RATIOS if (x := ratio(results, a, b, "rates_cpu")) is not None},
    }


def bench_precision(name: str, device: torch.device, args, steps: int, folder: Path) -> dict:
    """The limit of `name` in fp32 and bf16, channels-last and NCHW (the difference method over 1 and 2 epochs of `steps`)."""
    options = {
        "channels_last fp32": ["train.amp=fp32"],
        "NCHW fp32": ["model.channels_last=false", "train.amp=fp32"],
        "channels_last bf16": ["train.amp=bf16"],
        "NCHW bf16": ["model.channels_last=false", "train.amp=bf16"],
    }
    base = [f"model.name={name}", f"train.device={device.type}", f"log.run_dir={folder / 'unused'}"]
    cfgs = {k: config.from_files_and_overrides(config.DEFAULT_CONFIG, base + o) for k, o in options.items()}
    variants = {k: baselines.Limit(c, device, steps, 0) for k, c in cfgs.items()}
    batch = cfgs["NCHW fp32"].train.batch_size
    print(f"{name} precision: the limit, {steps} steps per epoch", flush=True)
    results = measure(variants, (1, 2), steps * batch, device, args)
    best = max(results, key=lambda k: statistics.median(results[k]["rates"]))
    default = f"channels_last {runtime.amp_setting('auto', device, name)}"
    return {
        "model": name,
        "steps": steps,
        "images_per_s": {k: statistics.median(v["rates"]) for k, v in results.items()},
        "relative_to_default": {k: ratio(results, k, default) for k in results},
        "default": default,
        "fastest": best,
    }


# ---------------------------------------------------------------------------- DDP scaling on the CPU


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
    """train/main.py under torchrun with 1 and 2 processes on the same cores; in-loop images/s and peak RSS per rank."""
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


def report(results: dict) -> None:
    clock = "wall clock" if results["clock"] == "wall" else "CPU time / threads, not wall time"
    where = f"{results['machine']} ({results['device']}, torch {results['torch']}), {results['date']}"
    print(f"\nwhole runs on {where}, images/s by {clock}:")
    for m in results["models"]:
        v = m["variants"]
        print(f"\n{m['model']}: {m['train_images']} training images, epochs {m['epochs'][0]} and {m['epochs'][1]}")
        print("| variant | median | rounds | CPU-time proxy median | start-up s | in-loop (printed) | saving blocked s/run |")
        print("|---|---|---|---|---|---|---|")
        for k, r in v.items():
            in_loop = f"{statistics.median(r['in_loop']):.0f}" if r.get("in_loop") else ""
            blocked = f"{statistics.median(r['saving_blocked_s']):.3f}" if r.get("saving_blocked_s") else ""
            rates, cpu = " ".join(f"{x:.0f}" for x in r["rates"]), statistics.median(r["rates_cpu"])
            startup = statistics.median(r["startup_s"])
            print(f"| {k} | {r['median']:.0f} | {rates} | {cpu:.0f} | {startup:.1f} | {in_loop} | {blocked} |")
        print("ratios (median of per-round ratios): " + ", ".join(f"{k} {x:.3f}" for k, x in m["ratios"].items()))
        print("the same by the CPU-time proxy: " + ", ".join(f"{k} {x:.3f}" for k, x in m.get("ratios_cpu", {}).items()))
    for p in results.get("precision", []):
        rel = ", ".join(f"{k} {x:.2f}x" for k, x in p["relative_to_default"].items())
        print(f"\n{p['model']} limit by precision, relative to the default ({p['default']}): {rel}; fastest {p['fastest']}")
    if "ddp" in results:
        d = results["ddp"]
        print(
            f"\nDDP on the CPU (gloo, in-loop): 1 process {d[1]['images_per_s']:.0f} img/s, 2 processes "
            f"{d[2]['images_per_s']:.0f}, efficiency {d['efficiency']:.3f}; peak RSS per rank "
            f"{d[1]['peak_rss_mb_per_rank']} and {d[2]['peak_rss_mb_per_rank']} MB, "
            f"private {d[1]['peak_anon_mb_per_rank']} and {d[2]['peak_anon_mb_per_rank']} MB"
        )


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="cnn", help="cnn,vgg16 (vgg16 on a CPU takes hours at CIFAR-10's size)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    default_variants = "project,project+graphs,limit,limit+eval,limit+graphs,seed,lightning"
    p.add_argument("--variants", default=default_variants, help=f"default {default_variants}; also project+saves")
    p.add_argument("--epochs", default="1,3", help="the two run sizes E1,E2 in epochs")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline-rounds", type=int, default=0, help="rounds for seed and lightning (default: --rounds)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed first run of each variant")
    p.add_argument(
        "--clock",
        default="wall",
        choices=("wall", "cpu"),
        help="what the tables use: wall time (what a user gets; needs a quiet machine) or CPU time / threads "
        "(a proxy for a machine others load; both are stored)",
    )
    p.add_argument("--train-images", type=int, default=50000)
    p.add_argument("--test-images", type=int, default=10000)
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="a config override for every run")
    p.add_argument("--precision", action="store_true", help="also the limit by precision and memory format, per model")
    p.add_argument("--precision-steps", type=int, default=0, help="steps per epoch there (default 200 on CUDA, 20 on CPU)")
    p.add_argument("--ddp-epochs", type=int, default=0, help="epochs of 50000 images per torchrun run on the CPU (0: skip)")
    p.add_argument("--json", default=str(REPO / "bench" / "results.json"))
    return p.parse_args()


def main() -> int:
    args = parse()
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "device": str(device),
        "torch": torch.__version__,
        "lightning": baselines.lightning_version(),
        "threads": len(os.sched_getaffinity(0)),
        "load_before": os.getloadavg(),
        "clock": args.clock,
        "command": sys.argv,
        "models": [],
    }
    json_path = Path(args.json)
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # what train/runtime.py gives one process; the same for all variants
    with tempfile.TemporaryDirectory() as tmp:
        for name in filter(None, args.models.split(",")):
            results["models"].append(bench_model(name, device, args, Path(tmp) / name))
            json_path.write_text(json.dumps(results, indent=1))  # a later part that fails leaves this one
        if args.precision:
            steps = args.precision_steps or (200 if device.type == "cuda" else 20)
            names = [n for n in args.models.split(",") if n and (device.type == "cuda" or n == "cnn")]
            results["precision"] = [bench_precision(n, device, args, steps, Path(tmp)) for n in names]
        if args.ddp_epochs:
            print("DDP scaling, gloo on the CPU (train/main.py under torchrun):", flush=True)
            results["ddp"] = ddp_scaling(Path(tmp), args.ddp_epochs)
    results["load_after"] = os.getloadavg()
    report(results)
    json_path.write_text(json.dumps(results, indent=1))
    print(f"\nwritten {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
