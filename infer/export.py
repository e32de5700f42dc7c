"""Export a trained model for deployment: ONNX, or torch.export's `.pt2`, taking what `ToTensor()` gives.

    python infer/export.py --checkpoint runs/cifar10_cnn/checkpoints/best.pt --format onnx --out model.onnx
    python infer/export.py --checkpoint runs/cifar10_cnn/checkpoints/best.pt --format pt2 --out model.pt2

The exported model takes `images`: float32 (N, 3, H, W) with values in [0, 1], for any batch
size N, which is what `transforms.ToTensor()` gives for an RGB image resized to H x W. It applies
the checkpoint's normalisation itself and returns `logits` (N, C): the class is their argmax, the
probabilities their softmax. The class names, the input size and the preprocessing travel in the
file (ONNX `metadata_props`; the `.pt2` file's extra files `classes.json` and `preprocess.json`),
so a deployer needs nothing else.

Each export is checked where it is made: the file is loaded back and run on a few images at two
batch sizes (ONNX with onnxruntime where it is installed, else onnx's checker alone, which a
warning says; `.pt2` with `torch.export.load`), and its logits must match the PyTorch model's.
When the export cannot be made or does not match, one line says why and nothing is written.
ONNX needs the `[export]` extra: `pip install -e '.[export]'`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from infer import loading
from train import atomic, cli
from train.cli import UserError

SUFFIX = {"onnx": ".onnx", "pt2": ".pt2"}
CHECK_BATCHES = (1, 5)  # the check runs the exported model at these batch sizes: the batch dimension is free
TOLERANCE = 1e-4  # largest |logit| difference accepted, relative to the logits' scale (float32 with reordered sums)


class Deployable(nn.Module):
    """ToTensor()'s images in [0, 1] in, logits out: the checkpoint's normalisation, then the model."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) float in [0, 1] -> (N, C)
        return self.model((images - self.mean) / self.std)


def metadata(loaded: loading.Loaded) -> dict[str, str]:
    """What a deployer needs besides the weights, as strings (ONNX metadata, .pt2 extra files)."""
    size = loaded.image_size
    return {
        "classes.json": json.dumps(loaded.classes),
        "preprocess.json": json.dumps(
            {
                "input": f"images: float32 (N, 3, {size}, {size}), values in [0, 1]",
                "torchvision": f"transforms.Compose([transforms.Resize(({size}, {size})), transforms.ToTensor()])"
                "(Image.open(path).convert('RGB'))",
                "normalisation_included": {"mean": list(loaded.mean), "std": list(loaded.std)},
                "output": "logits: float32 (N, C); class = argmax, probabilities = softmax",
            }
        ),
    }


@contextlib.contextmanager
def quiet():
    """torch.onnx prints its progress and warns about its internals: a user sees our one line instead."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def export_onnx(model: Deployable, example: torch.Tensor, path: Path, extra: dict[str, str]) -> None:
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise UserError(
            "--format onnx needs the onnx and onnxscript packages: pip install -e '.[export]' "
            "(or use --format pt2, which needs nothing more)"
        ) from None
    with quiet():
        program = torch.onnx.export(
            model,
            (example,),
            None,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            dynamo=True,
        )
        for key, value in extra.items():
            program.model.metadata_props[key.removesuffix(".json")] = value
        program.save(path, external_data=False)  # one file (the format's limit is 2 GB; VGG16 is 0.5)


def run_onnx(path: Path) -> tuple[object, str]:
    """A function running the ONNX file, and how it was checked; without onnxruntime, onnx's checker only."""
    import onnx

    onnx.checker.check_model(str(path))
    try:
        import onnxruntime
    except ImportError:
        return None, "onnx's checker only (onnxruntime is not installed, so its outputs were not compared)"
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return (lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])), "onnxruntime"


def export_pt2(model: Deployable, example: torch.Tensor, path: Path, extra: dict[str, str]) -> None:
    with quiet():
        program = torch.export.export(model, (example,), dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
        # into memory first: torch's zip writer, failing on a full disk, aborts the process when it is freed
        buffer = io.BytesIO()
        torch.export.save(program, buffer, extra_files=extra)
    path.write_bytes(buffer.getvalue())  # a full disk is an OSError here: one line, the temporary file removed


def run_pt2(path: Path) -> tuple[object, str]:
    with quiet():
        module = torch.export.load(path).module()
    return module, "torch.export.load"


def check(run, model: Deployable, size: int) -> float:
    """The largest |logit difference| between the file and the PyTorch model on random images; UserError above tolerance."""
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for n in CHECK_BATCHES:
        images = torch.rand(n, 3, size, size, generator=generator)
        with torch.no_grad():
            expected = model(images)
            got = run(images)
        if tuple(got.shape) != tuple(expected.shape):
            raise UserError(
                f"the exported model gives logits of shape {tuple(got.shape)} for {n} images, not {tuple(expected.shape)}"
            )
        scale = max(1.0, expected.abs().max().item())
        worst = max(worst, (got - expected).abs().max().item() / scale)
    if worst > TOLERANCE:
        raise UserError(f"the exported model's logits differ from the PyTorch model's by {worst:.2g} (relative); nothing written")
    return worst


def make_and_check(fmt: str, model: Deployable, loaded: loading.Loaded, path: Path) -> str:
    """Write the export to `path`, load it back and compare; how it was checked, or UserError."""
    make, run = (export_onnx, run_onnx) if fmt == "onnx" else (export_pt2, run_pt2)
    example = torch.rand(2, 3, loaded.image_size, loaded.image_size)  # 2: a batch of 1 would fix the batch size
    try:
        make(model, example, path, metadata(loaded))
    except (UserError, OSError):
        raise
    except Exception as e:  # the exporters raise many types; their first line says what failed
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        raise UserError(f"cannot export this model as {fmt} ({type(e).__name__}: {first[:200]}); nothing written") from None
    runner, how = run(path)
    if runner is None:
        loading.warn(f"the {fmt} file was {how}")
        return f"checked with {how}"
    worst = check(runner, model, loaded.image_size)
    sizes = " and ".join(map(str, CHECK_BATCHES))
    return (
        f"checked with {how} on {sum(CHECK_BATCHES)} images at batch sizes {sizes}: max |difference| / max |logit| = {worst:.1g}"
    )


def export(args: argparse.Namespace) -> str:
    """Write args.out, checked, or nothing; the line that says what was written."""
    out: Path = args.out
    loading.writable_file(out, SUFFIX[args.format], "--out")
    loaded = loading.from_args(args, torch.device("cpu"))
    loading.warn(loaded.warning)
    model = Deployable(loaded.model.to(memory_format=torch.contiguous_format), loaded.mean, loaded.std).eval()
    for stale in out.parent.glob(f".{out.name}.tmp.*"):  # left by an export that was killed (not one still running)
        if not _alive(stale.name.rsplit(".", 1)[-1]):
            stale.unlink(missing_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")  # renamed to `out` once checked
    try:
        detail = make_and_check(args.format, model, loaded, tmp)
        os.replace(tmp, out)
        atomic.fsync_dir(out.resolve().parent)
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror or e}); nothing written") from None
    finally:
        tmp.unlink(missing_ok=True)
    name = loaded.config.model.name if loaded.config else loaded.kind
    n, size = len(loaded.classes), loaded.image_size
    return (
        f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {args.format}): {name}, {n} classes; input float32 "
        f"(N, 3, {size}, {size}) in [0, 1] as ToTensor() gives, normalisation included; output logits (N, {n}); {detail}"
    )


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(
        prog="infer/export.py",
        description="Export a checkpoint as ONNX or torch.export .pt2: ToTensor() images in, logits out, normalisation included.",
        epilog="example: python infer/export.py --checkpoint runs/cifar10_cnn/checkpoints/best.pt --format onnx --out model.onnx",
    )
    loading.add_arguments(parser, device=False)
    parser.add_argument("--format", required=True, choices=("onnx", "pt2"), help="onnx (needs the [export] extra) or pt2")
    parser.add_argument("--out", required=True, type=Path, metavar="FILE", help="the file to write (.onnx or .pt2)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)

    def body() -> int:
        print(export(args), flush=True)
        return cli.Exit.OK

    return cli.guarded(body)


if __name__ == "__main__":
    sys.exit(main())
