"""What `data.normalize` costs the default CNN config: `none` (the seed's ToTensor() alone) against `cifar10`.

    python bench/normalize_cost.py [--variants none:0.01,cifar10:0.01] [--seeds 0,1] [--epochs 20]

Trains configs/cifar10_cnn.yaml (every default but the dataset, the run folder and the variant's
`data.normalize` and `optim.lr`) once per dataset, variant and seed, each in a temporary run folder, and prints the final and best
test accuracy of each. Datasets: the built-in synthetic one (README's first command), and
CIFAR-format files (`cifar-10-batches-py` pickles, 5 x 1000 training and 1000 test images of
tests/conftest.py's learnable pattern) read through the project's CIFAR-10 reader. Real CIFAR-10
is used too when `--cifar10-root DIR` names a folder holding it (it cannot be downloaded on the
machines these numbers were measured on).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # conftest.write_cifar10: CIFAR-10's own file format


def train(run_dir: Path, overrides: list[str]) -> dict:
    """One run of train/main.py; its metrics.jsonl lines, the wall time and the exit code."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(REPO / "train" / "main.py"), f"log.run_dir={run_dir}", "log.tensorboard=false", *overrides],
        capture_output=True,
        text=True,
    )
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    metrics = [json.loads(line) for line in lines if line.strip()]
    return {
        "exit": proc.returncode,
        "error": proc.stderr.strip().splitlines()[-1] if proc.returncode else None,
        "seconds": round(time.perf_counter() - start, 1),
        "final_test_acc": metrics[-1]["test_acc"] if metrics else None,
        "best_test_acc": max(m["test_acc"] for m in metrics) if metrics else None,
        "test_acc_by_epoch": [round(m["test_acc"], 4) for m in metrics],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="none:0.01,cifar10:0.01", help="data.normalize:optim.lr pairs, comma-separated")
    parser.add_argument("--seeds", default="0,1", help="train.seed values, comma-separated")
    parser.add_argument("--epochs", type=int, default=20, help="train.epochs (the default config's 20)")
    parser.add_argument("--datasets", default="synthetic,cifar-format", help="which of synthetic, cifar-format (and cifar10)")
    parser.add_argument("--cifar10-root", type=Path, help="a folder holding the real cifar-10-batches-py/")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results_normalize.json")
    args = parser.parse_args()
    from conftest import write_cifar10

    results = []
    with tempfile.TemporaryDirectory(prefix="normalize_cost_") as tmp:
        tmp = Path(tmp)
        write_cifar10(tmp / "cifar_format", per_batch=1000, test=1000)
        datasets = {
            "synthetic": ["data.name=synthetic"],
            "cifar-format": ["data.name=cifar10", f"data.root={tmp / 'cifar_format'}", f"data.cache_dir={tmp / 'cache'}"],
        }
        if args.cifar10_root:
            datasets["cifar10"] = ["data.name=cifar10", f"data.root={args.cifar10_root}", "data.download=false"]
        for name, overrides in datasets.items():
            if name not in args.datasets.split(",") and name != "cifar10":
                continue
            for seed in args.seeds.split(","):
                for variant in args.variants.split(","):
                    normalize, lr = variant.split(":")
                    run_dir = tmp / f"{name}_{normalize}_{lr}_{seed}"
                    extra = [f"data.normalize={normalize}", f"optim.lr={lr}", f"train.seed={seed}", f"train.epochs={args.epochs}"]
                    result = {"dataset": name, "normalize": normalize, "lr": float(lr), "seed": int(seed)}
                    result.update(train(run_dir, overrides + extra))
                    results.append(result)
                    print(json.dumps({k: v for k, v in result.items() if k != "test_acc_by_epoch"}), flush=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
