"""Classify images with a trained model: image files or folders in, a class and its probability per image out.

    python infer/predict.py --checkpoint runs/cifar10_cnn/checkpoints/best.pt dog.png plane.png
    python infer/predict.py --checkpoint SavedStateDict.pth --topk 5 --json photos/
    python infer/predict.py --checkpoint SavedModule.pth --unsafe-load dog.png   # the seed's torch.save(model, ...)

Folders are walked for image files. Each image, of any mode and size, is converted to RGB (alpha
dropped as the seed's convert('RGB'); palette, grayscale, 16-bit and CMYK converted), resized to
the model's input size and normalised as in training. A file that cannot be read gets an `error:`
line on stderr, the others are still predicted, and the exit code is then 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from infer import loading
from train import cli, data
from train.cli import UserError

BATCH = 64  # images per forward pass; they are small (3 x 32 x 32), so memory is never the limit


def image_files(inputs: list[str]) -> list[Path]:
    """The files named, in order, and the image files under each folder named (sorted, recursively).

    Hidden files are skipped (macOS leaves `._dog.png` beside `dog.png`). A folder without image
    files stands for itself, so that reading it reports the problem.
    """
    files = []
    for path in map(Path, inputs):
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.suffix.lower() in data.IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
            )
            files += found or [path]
        else:
            files.append(path)
    return files


def read(path: Path, size: int) -> torch.Tensor:
    """(3, size, size) uint8, or a UserError naming the file."""
    if path.is_dir():
        raise UserError(f"folder {path} holds no image files ({', '.join(data.IMAGE_EXTENSIONS)})")
    if not path.exists():
        raise UserError(f"image {path} not found")
    return torch.from_numpy(data.read_image(path, size))


@torch.no_grad()
def predict(loaded: loading.Loaded, dev: torch.device, paths: list[Path], topk: int) -> list[dict]:
    """One entry per path: `class`, `prob` and the `topk` best classes, or the `error` that stopped it."""
    preprocess = loaded.preprocess(dev)
    results = []
    for start in range(0, len(paths), BATCH):
        entries, images = [], []
        for path in paths[start : start + BATCH]:
            entry = {"path": str(path)}
            results.append(entry)
            try:
                images.append(read(path, loaded.image_size))
                entries.append(entry)
            except UserError as e:
                entry["error"] = str(e)
        if not images:
            continue
        probs = loaded.model(preprocess.test(torch.stack(images))).float().softmax(1)
        best = probs.topk(topk, dim=1)
        for entry, values, indices in zip(entries, best.values.tolist(), best.indices.tolist()):
            entry["topk"] = [{"class": loaded.classes[i], "prob": p} for i, p in zip(indices, values)]
            entry["class"], entry["prob"] = entry["topk"][0]["class"], entry["topk"][0]["prob"]
    return results


def table(results: list[dict], topk: int) -> str:
    """One row per image that was classified, under a header; nothing at all when none was."""
    rows = [
        (r["path"], r["class"], f"{r['prob']:.4f}", ", ".join(f"{t['class']} {t['prob']:.4f}" for t in r["topk"]))
        for r in results
        if "error" not in r
    ]
    if not rows:
        return ""
    rows.insert(0, ("image", "class", "prob", f"top-{topk}"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[3]]) for row in rows)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(
        prog="infer/predict.py",
        description="Classify images: a class and its probability per image, from any checkpoint you have.",
        epilog="example: python infer/predict.py --checkpoint runs/cifar10_cnn/checkpoints/best.pt dog.png plane.png photos/",
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders walked for image files")
    loading.add_arguments(parser)
    parser.add_argument("--topk", type=_positive, default=3, help="how many of the most likely classes to list (default: 3)")
    parser.add_argument(
        "--classes",
        type=lambda s: [c.strip() for c in s.split(",")],
        metavar="NAME,NAME,...",
        help="class names of a state_dict, in label order (default: CIFAR-10's for 10 outputs)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list, one entry per image, instead of the table")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when every image was classified, 2 when any could not be read or the checkpoint was refused."""
    args = parse(argv)

    def body() -> int:
        dev = loading.device(args.device)
        loaded = loading.from_args(args, dev)
        if args.classes is not None:
            if len(args.classes) != len(loaded.classes):
                raise UserError(f"--classes names {len(args.classes)} classes, but the model has {len(loaded.classes)} outputs")
            loaded = dataclasses.replace(loaded, classes=args.classes)
        loading.warn(loaded.warning)
        topk = min(args.topk, len(loaded.classes))
        if topk < args.topk:
            loading.warn(f"--topk {args.topk} is more than the model's {len(loaded.classes)} classes; listing all {topk}")
        results = predict(loaded, dev, image_files(args.inputs), topk)
        report = json.dumps(results, indent=2) if args.json else table(results, topk)
        if report:
            print(report, flush=True)
        errors = [r["error"] for r in results if "error" in r]
        for line in errors:
            cli.report(line)
        return cli.Exit.USAGE if errors else cli.Exit.OK

    return cli.guarded(body)


if __name__ == "__main__":
    sys.exit(main())
