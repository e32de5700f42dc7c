"""Measure the times and sizes the README states, on this machine; print them as JSON (README quotes them as a table).

    python bench/readme_times.py                          # the first training command, the venv sizes
    python bench/readme_times.py --suite                  # also the test command (about 10 minutes on 2 idle cores)
    python bench/readme_times.py --install --cpu-only     # also fresh installs: PyPI's default (CUDA) torch, and CPU-only

What it measures, each in a temporary folder that it removes:
- `train/main.py data.name=synthetic` (the README's first command, after its install): wall time, test accuracy;
- with --suite, `python -m pytest -q` from the repository root (the README's test command, after its
  install; it starts what the tests need, e.g. the dev SLURM cluster must already be up);
- the size of this interpreter's environment and of its largest packages;
- with --install, a fresh `python3 -m venv` + `pip install -e .`: its time and size (pip's default
  torch: on Linux the CUDA build, whatever the machine);
- with --cpu-only, the same after installing PyTorch's CPU-only build first (`--cpu-torch` names
  the requirements pip should fetch; the default is PyTorch's CPU index).

The machine (CPU, cores, GPU, load average before and after) is printed with the numbers: times
measured while the machine is busy are upper bounds. JSON goes to --json (bench/results_readme.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def machine() -> dict:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line), "?"
    )
    gpu = (
        subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip() if shutil.which("nvidia-smi") else ""
    )
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
        "gpu": gpu or "none",
        "python": platform.python_version(),
        "load_average_before": round(os.getloadavg()[1], 1),
    }


def size_mb(path: Path) -> int:
    """Disk use in MB, as `du -s` counts it (blocks, hard links once)."""
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0]) // 1024


def timed(cmd: list[str], cwd: Path, env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, proc


def first_training(python: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="readme_times_") as tmp:
        run_dir = Path(tmp) / "synthetic_cnn"
        seconds, proc = timed([python, str(REPO / "train" / "main.py"), "data.name=synthetic", f"log.run_dir={run_dir}"], REPO)
        if proc.returncode:
            raise SystemExit(f"the first training command failed ({proc.returncode}): {proc.stderr[-500:]}")
        last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return {"seconds": round(seconds), "test_acc": last["test_acc"], "epochs": last["epoch"]}


def suite(python: str) -> dict:
    seconds, proc = timed([python, "-m", "pytest", "-q", "-p", "no:cacheprovider"], REPO)
    summary = next((line for line in reversed(proc.stdout.splitlines()) if re.search(r"\d+ (passed|failed)", line)), "?")
    return {"seconds": round(seconds), "exit": proc.returncode, "summary": summary.strip("= ")}


def environment(prefix: Path) -> dict:
    site = next(prefix.glob("lib/python*/site-packages"))
    largest = sorted(((size_mb(p), p.name) for p in site.iterdir() if p.is_dir()), reverse=True)[:4]
    return {"path": str(prefix), "total_mb": size_mb(prefix), "largest_mb": {name: mb for mb, name in largest}}


def install(cpu_first: list[str] | None) -> dict:
    """A fresh venv and `pip install -e .` (after `pip install CPU_FIRST` when given): time and size."""
    with tempfile.TemporaryDirectory(prefix="readme_venv_") as tmp:
        venv = Path(tmp) / ".venv"
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        steps = ([pip + cpu_first] if cpu_first else []) + [pip + ["-e", str(REPO)]]
        for step in steps:
            proc = subprocess.run(step, capture_output=True, text=True)
            if proc.returncode:
                return {"error": f"{' '.join(step[4:])}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"}
        seconds = time.perf_counter() - start
        torch = subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True
        ).stdout.strip()
        return {"seconds": round(seconds), "torch": torch, **environment(venv)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", action="store_true", help="also time the test suite (the README's test command)")
    parser.add_argument("--install", action="store_true", help="also time and size a fresh install (pip's default torch)")
    parser.add_argument("--cpu-only", action="store_true", help="also a fresh install with PyTorch's CPU-only build first")
    parser.add_argument(
        "--cpu-torch",
        default=f"torch torchvision --index-url {CPU_INDEX}",
        help="what --cpu-only installs first, as pip arguments (default: %(default)s)",
    )
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results_readme.json")
    args = parser.parse_args()

    results = {"machine": machine()}
    results["first_training"] = first_training(sys.executable)
    if args.suite:
        results["suite"] = suite(sys.executable)
    results["this_environment"] = environment(Path(sys.prefix))
    if args.install:
        results["install_default"] = install(None)
    if args.cpu_only:
        results["install_cpu_only"] = install(args.cpu_torch.split())
    results["machine"]["load_average_after"] = round(os.getloadavg()[1], 1)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
