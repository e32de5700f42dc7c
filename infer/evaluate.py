"""Evaluate a checkpoint on a dataset's test split: accuracy, per-class accuracy and the confusion matrix.

    python infer/evaluate.py --checkpoint runs/cifar10_cnn/checkpoints/best.pt
    python infer/evaluate.py --checkpoint best.pt data.name=imagefolder data.root=my_images --out confusion.png
    torchrun --nproc_per_node=2 infer/evaluate.py --checkpoint best.pt --tensorboard runs/cifar10_cnn

The dataset is the one in the checkpoint's config, changed by `data.key=value` overrides; a plain
state_dict has no config, so it gets the defaults (CIFAR-10 in ./data) and the overrides. The test
split is evaluated as the trainer does it (train.engine.evaluate, the same batches, precision and
memory format): under torchrun each rank takes a contiguous share and the counts are summed
exactly, so the accuracy is the `test_acc` the trainer logged for the same checkpoint.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np

from infer import loading
from train import atomic, cli, config, data, distributed, engine, pictures, runtime
from train.cli import UserError


def data_config(saved: config.Config | None, overrides: list[str]) -> config.DataConfig:
    """The checkpoint's data section (or the defaults) with `data.key=value` overrides, checked like train/main.py's."""
    return config.override(saved or config.Config(), overrides, sections=("data",)).data


def run(args: argparse.Namespace, dist: distributed.Dist) -> dict | None:
    """Evaluate on every rank; rank 0 gets the report, the others None."""
    loaded = loading.from_args(args, dist.device)
    if dist.is_main:
        loading.warn(loaded.warning)
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
        "step": loaded.step,
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


def check_destinations(out: Path | None, tensorboard: Path | None) -> None:
    """Refuse, before evaluating, a place that cannot be written; no folder is made but the one --tensorboard names."""
    if out is not None:
        loading.writable_file(out, ".png", "--out")
    if tensorboard is not None:
        if tensorboard.exists() and not tensorboard.is_dir():
            raise UserError(f"--tensorboard {tensorboard} is a file; give a folder (a run folder, or a new one)")
        loading.writable_folder(tensorboard if tensorboard.is_dir() else tensorboard.parent, f"--tensorboard {tensorboard}")


def write_outputs(report: dict, out: Path | None, tensorboard: Path | None) -> None:
    """The confusion matrix as a PNG and/or in TensorBoard; a line on stderr says what was written where."""
    title = f"{report['dataset']} test split: accuracy {report['accuracy']:.4f} ({report['correct']}/{report['count']})"
    image = pictures.confusion_matrix(report["confusion"], report["classes"], title)
    if out is not None:
        png = io.BytesIO()
        image.save(png, format="PNG")
        try:
            atomic.write_atomic(out, data=png.getvalue())  # a full disk leaves no half-written file
        except OSError as e:
            raise UserError(f"cannot write {out} ({e.strerror or e}); give a writable path ending in .png") from None
        print(f"wrote the confusion matrix ({image.width}x{image.height} PNG) to {out}", file=sys.stderr, flush=True)
    if tensorboard is not None:
        from torch.utils.tensorboard import SummaryWriter  # slow to import: only when asked for

        created = not tensorboard.exists()
        step = report["step"]  # the checkpoint's global step: the trainer's x-axis, so the points line up with its curves
        with SummaryWriter(str(tensorboard)) as writer:
            writer.add_image("Test/Confusion matrix (evaluate.py)", np.asarray(image), global_step=step, dataformats="HWC")
            writer.add_scalar("Test/Accuracy (evaluate.py)", report["accuracy"], global_step=step)
        print(
            f"{'created ' + str(tensorboard) + ' and ' if created else ''}added 'Test/Accuracy (evaluate.py)' and "
            f"'Test/Confusion matrix (evaluate.py)' at step {step} to TensorBoard events in {tensorboard}; "
            f"see them with: tensorboard --logdir {tensorboard.resolve().parent}",
            file=sys.stderr,
            flush=True,
        )


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
        type=loading.positive_int,
        metavar="N",
        help="global evaluation batch (default: the trainer's, twice train.batch_size)",
    )
    parser.add_argument(
        "--out", type=Path, metavar="FILE.png", help="also draw the confusion matrix into this PNG (its folder must exist)"
    )
    parser.add_argument(
        "--tensorboard",
        type=Path,
        metavar="DIR",
        help="also add the accuracy and the confusion matrix to TensorBoard in DIR (the run folder puts them beside its "
        "curves, at the checkpoint's step)",
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
        check_destinations(args.out, args.tensorboard)
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
