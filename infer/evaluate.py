"""Evaluate a checkpoint on a dataset's test split: accuracy, per-class accuracy and the confusion matrix.

    python infer/evaluate.py --checkpoint runs/cifar10_cnn/checkpoints/best.pt
    python infer/evaluate.py --checkpoint best.pt data.name=imagefolder data.root=my_images --out confusion.png
    torchrun --nproc_per_node=2 infer/evaluate.py --checkpoint best.pt --tensorboard runs/cifar10_cnn/tb

The dataset is the one in the checkpoint's config, changed by `data.key=value` overrides; a plain
state_dict has no config, so it gets the defaults (CIFAR-10 in ./data) and the overrides. The test
split is evaluated as the trainer does it (train.engine.evaluate, the same batches, precision and
memory format): under torchrun each rank takes a contiguous share and the counts are summed
exactly, so the accuracy is the `test_acc` the trainer logged for the same checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from infer import loading
from train import cli, config, data, distributed, engine, runtime
from train.cli import UserError


def data_config(saved: config.Config | None, overrides: list[str]) -> config.DataConfig:
    """The checkpoint's data section (or the defaults) with `data.key=value` overrides, checked like train/main.py's."""
    return config.override(saved or config.Config(), overrides, sections=("data",)).data


def run(args: argparse.Namespace, dist: distributed.Dist) -> dict | None:
    """Evaluate on every rank; rank 0 gets the report, the others None."""
    loaded = loading.from_args(args, dist.device)
    cfg = data_config(loaded.config, args.overrides)
    datasets = data.load(cfg, dist)
    classes = datasets.classes
    if len(classes) != len(loaded.classes):
        raise UserError(f"the model has {len(loaded.classes)} outputs, but the {cfg.name} test split has {len(classes)} classes")
    if loaded.config is not None and classes != loaded.classes:
        raise UserError(
            f"the {cfg.name} classes ({', '.join(classes[:4])}, ...) are not the checkpoint's "
            f"({', '.join(loaded.classes[:4])}, ...) in the same order; evaluate on the data it was trained for"
        )
    train_cfg = loaded.config.train if loaded.config else None
    # the trainer's evaluation batch (twice the training batch per rank) and precision: the same numbers
    batch = args.batch_size or 2 * (train_cfg.batch_size if train_cfg else 128)
    loader = data.eval_loader(datasets.test, max(1, batch // dist.world_size), dist.rank, dist.world_size)
    dtype = runtime.DTYPES[runtime.amp_setting(train_cfg.amp, dist.device, loaded.config.model.name)] if train_cfg else None
    result = engine.evaluate(loaded.model, loader, loaded.preprocess(dist.device), dist, len(classes), dtype)
    if not dist.is_main:
        return None
    confusion = result["confusion"]  # (C, C): rows the true class, columns the predicted one
    counts, correct = confusion.sum(1).tolist(), confusion.diag().tolist()
    return {
        "checkpoint": str(args.checkpoint),
        "kind": loaded.kind,
        "epoch": loaded.epoch,
        "dataset": cfg.name,
        "count": result["count"],
        "correct": result["correct"],
        "accuracy": result["acc"],
        "loss": result["loss"],
        "classes": classes,
        "per_class": [
            {"class": c, "count": n, "correct": k, "accuracy": k / n if n else None} for c, n, k in zip(classes, counts, correct)
        ],
        "confusion": confusion.tolist(),
    }


def table(report: dict) -> str:
    classes, confusion = report["classes"], report["confusion"]
    name_width = max(len("class"), *(len(c) for c in classes)) + len(str(len(classes))) + 1
    epoch = f", epoch {report['epoch']}" if report["epoch"] else ""
    lines = [
        f"{report['checkpoint']} ({report['kind']}{epoch}) on the {report['dataset']} test split",
        f"accuracy {report['accuracy']:.4f} ({report['correct']}/{report['count']})  loss {report['loss']:.4f}",
        "",
        f"{'class'.ljust(name_width)}  accuracy  correct/count",
    ]
    for i, row in enumerate(report["per_class"]):
        acc = f"{row['accuracy']:.4f}" if row["accuracy"] is not None else "-"
        name = f"{i} {row['class']}"
        lines.append(f"{name.ljust(name_width)}  {acc:>8}  {row['correct']}/{row['count']}")
    width = max(len(str(v)) for r in confusion for v in r) + 1
    lines += [
        "",
        "confusion matrix (rows: true class, columns: predicted class, by number)",
        " " * name_width + "".join(str(j).rjust(width) for j in range(len(classes))),
    ]
    for i, row in enumerate(confusion):
        lines.append(f"{i} {classes[i]}".ljust(name_width) + "".join(str(v).rjust(width) for v in row))
    return "\n".join(lines)


def confusion_image(report: dict, cell: int = 40) -> Image.Image:
    """A heat map of the confusion matrix with its counts: each row shaded by the share of its true class."""
    classes, confusion = report["classes"], np.array(report["confusion"])
    n = len(classes)
    font = ImageFont.load_default(size=cell // 3)
    left, top = 9 * cell // 2, 2 * cell  # room for the class names and the title
    image = Image.new("RGB", (left + n * cell + cell // 2, top + n * cell + cell // 2), "white")
    draw = ImageDraw.Draw(image)
    draw.text(
        (cell // 4, cell // 2),
        f"accuracy {report['accuracy']:.4f}: rows true class, columns predicted",
        fill="black",
        anchor="lm",
        font=font,
    )
    share = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    for i in range(n):
        draw.text((left - cell // 4, top + i * cell + cell // 2), f"{i} {classes[i][:14]}", fill="black", anchor="rm", font=font)
        draw.text((left + i * cell + cell // 2, top - cell // 3), str(i), fill="black", anchor="mm", font=font)
        for j in range(n):
            x, y = left + j * cell, top + i * cell
            shade = int(round(255 * (1 - share[i, j])))
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(shade, shade, 255), outline=(200, 200, 200))
            draw.text(
                (x + cell // 2, y + cell // 2),
                str(confusion[i, j]),
                anchor="mm",
                font=font,
                fill="white" if share[i, j] > 0.5 else "black",
            )
    return image


def write_outputs(report: dict, out: Path | None, tensorboard: Path | None) -> None:
    image = confusion_image(report)
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            image.save(out)
        except (OSError, ValueError) as e:  # ValueError: a file name PIL cannot tell the format of
            raise UserError(f"cannot write {out} ({e}); give a writable path ending in .png") from None
    if tensorboard is not None:
        from torch.utils.tensorboard import SummaryWriter  # slow to import: only when asked for

        with SummaryWriter(str(tensorboard)) as writer:
            writer.add_image("Confusion/Test", np.asarray(image), global_step=report["epoch"], dataformats="HWC")
            writer.add_scalar("Accuracy/Evaluate", report["accuracy"], global_step=report["epoch"])


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(
        prog="infer/evaluate.py",
        description="Accuracy, per-class accuracy and confusion matrix of a checkpoint on a test split.",
        epilog="example: torchrun --nproc_per_node=2 infer/evaluate.py --checkpoint runs/cifar10_cnn/checkpoints/best.pt "
        "--out confusion.png",
    )
    loading.add_arguments(parser)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=0,
        metavar="N",
        help="global evaluation batch (default: the trainer's, twice train.batch_size)",
    )
    parser.add_argument("--out", type=Path, metavar="FILE.png", help="also draw the confusion matrix into this PNG")
    parser.add_argument(
        "--tensorboard", type=Path, metavar="DIR", help="also add the confusion matrix image to TensorBoard in DIR"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="data.key=value",
        help="change the checkpoint's dataset, e.g. data.name=imagefolder data.root=DIR",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)

    def body() -> int:
        launch = distributed.detect()
        dev = loading.device(args.device, launch)  # a missing GPU is one line before any process group forms
        with distributed.setup(launch, dev, runtime.backend("auto", dev, launch)) as dist:
            report = run(args, dist)
        if report is not None:
            print(json.dumps(report, indent=2) if args.json else table(report), flush=True)
            write_outputs(report, args.out, args.tensorboard)
        return cli.Exit.OK

    return cli.guarded(body)


if __name__ == "__main__":
    sys.exit(main())
