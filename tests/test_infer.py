"""infer/predict.py and infer/evaluate.py run as a user runs them, on images and checkpoint files written here."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CIFAR_CLASSES, REPO, SEED_MODULE, SMOKE, load, ok, one_error_line, run, torchrun, train, write_cifar10
from train import data

PREDICT = REPO / "infer" / "predict.py"
EVALUATE = REPO / "infer" / "evaluate.py"


def predict(*args, cwd):
    return run([sys.executable, PREDICT, *args], cwd=cwd)


def evaluate(*args, cwd):
    return run([sys.executable, EVALUATE, *args], cwd=cwd)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One epoch of the smoke config: its run folder (checkpoints, metrics.jsonl)."""
    root = tmp_path_factory.mktemp("smoke")
    ok(train("--config", SMOKE, "train.epochs=1", "log.tensorboard=false", f"log.run_dir={root / 'run'}", cwd=root))
    return root / "run"


def logged(run_dir) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def picture() -> Image.Image:
    """A synthetic test image (what the smoke model was trained on), at 64x64 RGB."""
    image = data.synthetic(1024, 256).test.images[0].permute(1, 2, 0).numpy()  # (32, 32, 3) uint8
    return Image.fromarray(image).resize((64, 64), Image.NEAREST)


# file name -> (how the test writes it from the RGB picture, the mode PIL reads back)
IMAGES = {
    "rgb.png": (lambda im: im, "RGB"),
    "rgba.png": (lambda im: Image.merge("RGBA", (*im.split(), Image.linear_gradient("L").resize(im.size))), "RGBA"),
    "palette.png": (lambda im: im.quantize(64), "P"),  # saved with palette index 0 transparent
    "gray.png": (lambda im: im.convert("L"), "L"),
    "gray_alpha.png": (lambda im: im.convert("LA"), "LA"),
    "gray16.png": (lambda im: Image.fromarray(np.asarray(im.convert("L"), dtype=np.uint16) * 257), "I;16"),
    "photo.jpg": (lambda im: im, "RGB"),
    "cmyk.jpg": (lambda im: im.convert("CMYK"), "CMYK"),
    "one_pixel.png": (lambda im: im.resize((1, 1)), "RGB"),
    "huge.jpg": (lambda im: im.resize((4000, 3000), Image.BILINEAR), "RGB"),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    base = picture()
    for name, (make, _) in IMAGES.items():
        make(base).save(folder / name, **({"transparency": 0} if name == "palette.png" else {}))
    return folder


@pytest.fixture(scope="module")
def predicted(smoke_run, images):
    """predict.py --json on the image folder: {file name: entry}."""
    proc = ok(predict("--checkpoint", smoke_run / "checkpoints" / "last.pt", images, "--json", cwd=images))
    return {entry["path"].rsplit("/", 1)[-1]: entry for entry in json.loads(proc.stdout)}


def test_every_mode_and_size_is_predicted(images, predicted):
    for name, (_, mode) in IMAGES.items():
        with Image.open(images / name) as im:
            assert im.mode == mode, name  # the test really feeds predict.py this mode
            assert name != "palette.png" or "transparency" in im.info
    assert Image.open(images / "huge.jpg").size == (4000, 3000)
    assert sorted(predicted) == sorted(IMAGES)
    classes = [f"class_{i}" for i in range(10)]
    for entry in predicted.values():
        assert "error" not in entry, entry
        probs = [t["prob"] for t in entry["topk"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6, entry
        assert entry["class"] == entry["topk"][0]["class"] in classes and entry["prob"] == probs[0]


def test_rgba_and_rgb_give_the_same_class_and_probabilities(predicted):
    rgb, rgba = predicted["rgb.png"], predicted["rgba.png"]
    assert rgba["class"] == rgb["class"]
    for a, b in zip(rgba["topk"], rgb["topk"], strict=True):
        assert a["class"] == b["class"] and a["prob"] == pytest.approx(b["prob"], rel=1e-6, abs=1e-7)


def test_table_matches_json(smoke_run, images, predicted):
    proc = ok(predict("--checkpoint", smoke_run / "checkpoints" / "last.pt", images, cwd=images))
    header, *rows = proc.stdout.splitlines()
    assert re.split(r"\s{2,}", header) == ["image", "class", "prob", "top-3"]
    assert len(rows) == len(IMAGES)
    for row in rows:
        path, cls, prob, top = re.split(r"\s{2,}", row.strip())
        entry = predicted[path.rsplit("/", 1)[-1]]
        assert cls == entry["class"] and prob == f"{entry['prob']:.4f}"
        assert top == ", ".join(f"{t['class']} {t['prob']:.4f}" for t in entry["topk"])


def test_unreadable_files_are_reported_and_the_rest_predicted(smoke_run, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    picture().save(folder / "good.png")
    picture().convert("RGBA").save(folder / "good_too.png")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    noise.save(tmp_path / "whole.png")
    (folder / "truncated.png").write_bytes((tmp_path / "whole.png").read_bytes()[:5000])
    (folder / "notes.png").write_text("not an image\n")
    (folder / "notes.txt").write_text("not an image either, and not named like one: skipped\n")
    (folder / "._good.png").write_bytes(b"\x00\x05\x16\x07")  # macOS's AppleDouble companion: hidden, skipped
    (tmp_path / "empty").mkdir()
    proc = predict(
        "--checkpoint", smoke_run / "checkpoints" / "last.pt", folder, tmp_path / "missing.jpg", tmp_path / "empty", cwd=tmp_path
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    predicted = [line.split()[0] for line in proc.stdout.splitlines()[1:]]
    assert predicted == [str(folder / "good.png"), str(folder / "good_too.png")]
    errors = proc.stderr.splitlines()
    assert len(errors) == 4 and all(line.startswith("error: ") for line in errors), errors
    assert f"image {folder / 'notes.png'} cannot be read" in errors[0]
    assert f"image {folder / 'truncated.png'} cannot be read" in errors[1] and "truncated" in errors[1]
    assert errors[2] == f"error: image {tmp_path / 'missing.jpg'} not found"
    assert errors[3].startswith(f"error: folder {tmp_path / 'empty'} holds no image files")


SEED_SCRIPT = (
    """
import torch
"""
    + SEED_MODULE
    + """


class Net(MyModule):  # a class of the user's that predict.py cannot know
    pass


# Saved as on the seed's GPU: every storage is tagged cuda:0, which a CPU-only torch.load cannot place.
torch.serialization.register_package(0, lambda storage: "cuda:0", lambda storage, location: None)
torch.manual_seed(0)
module = MyModule()
torch.save(module, "SavedModule.pth")
torch.save(module.state_dict(), "SavedStateDict.pth")
torch.save(Net(), "Net.pth")
"""
)


@pytest.fixture(scope="module")
def seed_files(tmp_path_factory):
    """The seed's two kinds of file, written by the seed's own code in its own script (`__main__`)."""
    folder = tmp_path_factory.mktemp("seed")
    (folder / "seed.py").write_text(SEED_SCRIPT)
    ok(run([sys.executable, "seed.py"], cwd=folder))
    picture().convert("RGBA").save(folder / "dog.png")  # the seed's dog.png is a 4-channel PNG
    picture().save(folder / "plane.png")
    return folder


def test_seed_state_dict_saved_on_a_gpu_is_predicted(seed_files):
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):  # the file really names a GPU
            torch.load(seed_files / "SavedStateDict.pth", weights_only=True)
    proc = ok(predict("--checkpoint", "SavedStateDict.pth", "dog.png", "plane.png", "--json", cwd=seed_files))
    entries = json.loads(proc.stdout)
    assert [e["path"] for e in entries] == ["dog.png", "plane.png"]
    assert all(t["class"] in CIFAR_CLASSES for e in entries for t in e["topk"])  # a state_dict's default class names


def test_seed_whole_model_is_refused_then_loads_with_the_flag(seed_files):
    line = one_error_line(predict("--checkpoint", "SavedModule.pth", "dog.png", cwd=seed_files))
    assert "holds pickled Python objects (class __main__.MyModule)" in line and "runs code from the file" in line
    assert "--unsafe-load" in line
    unsafe = ok(predict("--checkpoint", "SavedModule.pth", "--unsafe-load", "dog.png", "plane.png", "--json", cwd=seed_files))
    safe = ok(predict("--checkpoint", "SavedStateDict.pth", "dog.png", "plane.png", "--json", cwd=seed_files))
    assert json.loads(unsafe.stdout) == json.loads(safe.stdout)  # the same weights, the same answers


def test_a_pickled_class_that_is_not_here_is_one_line(seed_files):
    line = one_error_line(predict("--checkpoint", "Net.pth", "--unsafe-load", "dog.png", cwd=seed_files))
    assert "pickles the class __main__.Net, which cannot be imported here" in line and "state_dict()" in line


def test_wrapped_and_early_seed_key_names_load(seed_files):
    """A DataParallel/DDP state_dict (`module.` keys) of the seed's first, unnumbered MyModule (conv_00, ...)."""
    state = torch.load(seed_files / "SavedStateDict.pth", map_location="cpu", weights_only=True)
    early = {"model.0": "conv_00", "model.2": "conv_01", "model.4": "conv_02", "model.7": "linear_00", "model.8": "linear_01"}
    renamed = {f"module.{early[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}": v for k, v in state.items()}
    torch.save(renamed, seed_files / "early_ddp.pth")
    a = ok(predict("--checkpoint", "early_ddp.pth", "plane.png", "--json", cwd=seed_files))
    b = ok(predict("--checkpoint", "SavedStateDict.pth", "plane.png", "--json", cwd=seed_files))
    assert json.loads(a.stdout) == json.loads(b.stdout)


def test_seed_vgg16_state_dict_with_appended_layer(tmp_path):
    """The seed's VGG16 with `classifier.add_module('Linear', Linear(1000, 10))`, saved as a state_dict."""
    import torchvision

    vgg = torchvision.models.vgg16()
    vgg.classifier.add_module("Linear", torch.nn.Linear(1000, 10))
    torch.save(vgg.state_dict(), tmp_path / "SavedStateDict.pth")
    del vgg
    picture().save(tmp_path / "plane.png")
    try:
        proc = ok(predict("--checkpoint", "SavedStateDict.pth", "plane.png", "--json", cwd=tmp_path))
        entry = json.loads(proc.stdout)[0]
        assert len(entry["topk"]) == 3 and entry["class"] in CIFAR_CLASSES
    finally:
        (tmp_path / "SavedStateDict.pth").unlink()  # 550 MB


def test_a_state_dict_of_another_model_is_one_line(seed_files):
    line = one_error_line(predict("--checkpoint", "SavedStateDict.pth", "--model", "vgg16", "plane.png", cwd=seed_files))
    assert line == (
        "error: checkpoint SavedStateDict.pth does not fit the vgg16 model: it has no classifier.6.weight "
        "(its keys begin model.0.weight, model.0.bias, model.2.weight)"
    )


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("digest", "is corrupt: its contents do not match the digest written with it"),
        ("truncated", "is damaged or not a PyTorch file"),
        ("foreign", "holds a dict with keys epoch, lr, not a model"),
        ("text", "is damaged or not a PyTorch file"),
    ],
)
def test_bad_checkpoints_are_one_line(smoke_run, tmp_path, damage, expected):
    good = smoke_run / "checkpoints" / "last.pt"
    bad = tmp_path / "bad.pt"
    if damage == "digest":  # a silent change of one weight, the file itself intact
        payload = load(good)
        payload["model"]["model.0.bias"][0] += 1.0
        torch.save(payload, bad)
    elif damage == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif damage == "foreign":
        torch.save({"epoch": 3, "lr": 0.1}, bad)
    else:
        bad.write_text("model weights: see the shared drive\n")
    picture().save(tmp_path / "plane.png")
    line = one_error_line(predict("--checkpoint", bad, "plane.png", cwd=tmp_path))
    assert line.startswith(f"error: checkpoint {bad} ") and expected in line


def test_evaluate_gives_the_logged_accuracy_with_table_png_and_tensorboard(smoke_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = logged(smoke_run)
    proc = ok(
        evaluate(
            "--checkpoint",
            smoke_run / "checkpoints" / "last.pt",
            "--out",
            tmp_path / "confusion.png",
            "--tensorboard",
            tmp_path / "tb",
            cwd=tmp_path,
        )
    )
    correct, count = map(int, re.search(r"^accuracy [\d.]+ \((\d+)/(\d+)\)", proc.stdout, re.M).groups())
    assert count == metrics["test_count"] == 256 and correct / count == metrics["test_acc"]
    assert "confusion matrix (rows: true class, columns: predicted class" in proc.stdout
    per_class = re.findall(r"^\d+ class_\d+ +[\d.]+ +(\d+)/(\d+)$", proc.stdout, re.M)
    assert len(per_class) == 10 and sum(int(c) for c, _ in per_class) == correct and sum(int(n) for _, n in per_class) == count
    with Image.open(tmp_path / "confusion.png") as png:
        assert png.format == "PNG" and png.width > 400
    step = load(smoke_run / "checkpoints" / "last.pt")["progress"]["step"]
    assert proc.stderr.splitlines() == [
        f"wrote the confusion matrix ({png.width}x{png.height} PNG) to {tmp_path / 'confusion.png'}",
        f"created {tmp_path / 'tb'} and added 'Test/Accuracy (evaluate.py)' and 'Test/Confusion matrix (evaluate.py)' at "
        f"step {step} to TensorBoard events in {tmp_path / 'tb'}; see them with: tensorboard --logdir {tmp_path}",
    ]
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert "Test/Confusion matrix (evaluate.py)" in acc.Tags()["images"]
    assert [e.step for e in acc.Scalars("Test/Accuracy (evaluate.py)")] == [step]  # the trainer's x-axis


@pytest.mark.parametrize(
    "option, path, expected",
    [
        ("--out", "missing/confusion.png", "--out {p}: folder {t}/missing does not exist; create it first"),
        ("--out", "confusion.jpg", "--out {p} must be a file name ending in .png"),
        ("--out", ".", "--out {p} must be a file name ending in .png"),
        ("--tensorboard", "missing/tb", "--tensorboard {p}: folder {t}/missing does not exist; create it first"),
        ("--tensorboard", "file.txt", "--tensorboard {p} is a file; give a folder"),
    ],
)
def test_evaluate_refuses_unusable_destinations_before_working(smoke_run, tmp_path, option, path, expected):
    (tmp_path / "file.txt").write_text("not a folder\n")
    target = tmp_path / path
    line = one_error_line(evaluate("--checkpoint", smoke_run / "checkpoints" / "last.pt", option, target, cwd=tmp_path))
    assert line.startswith("error: " + expected.format(p=target, t=tmp_path)), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # no folder made, nothing written


def test_predict_says_when_topk_is_clamped_and_prints_no_empty_table(smoke_run, tmp_path):
    proc = predict("--checkpoint", smoke_run / "checkpoints" / "last.pt", "--topk", "20", tmp_path / "missing.png", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""  # no image could be read: no header either
    assert proc.stderr.splitlines() == [
        "warning: --topk 20 is more than the model's 10 classes; listing all 10",
        f"error: image {tmp_path / 'missing.png'} not found",
    ]


def test_evaluate_on_two_ranks_gives_the_logged_accuracy(smoke_run, tmp_path):
    metrics = logged(smoke_run)
    proc = ok(torchrun(2, "--checkpoint", smoke_run / "checkpoints" / "last.pt", "--json", cwd=tmp_path, script=EVALUATE))
    report = json.loads(proc.stdout)
    assert report["count"] == metrics["test_count"] and report["accuracy"] == metrics["test_acc"]
    confusion = np.array(report["confusion"])
    assert confusion.sum() == report["count"] and np.trace(confusion) == report["correct"]
    assert [row["count"] for row in report["per_class"]] == confusion.sum(1).tolist()


def test_evaluate_on_an_image_folder(smoke_run, tmp_path):
    """The smoke test split written as PNGs in the seed's folder layout: the same images, the same counts."""
    split = data.synthetic(1024, 256).test
    for i, (image, label) in enumerate(zip(split.images, split.labels.tolist())):
        folder = tmp_path / "images" / "test" / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
        train_folder = tmp_path / "images" / "train" / f"class_{label}"  # the layout needs a train split too
        if not train_folder.is_dir():
            train_folder.mkdir(parents=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(train_folder / "0.png")
    proc = ok(
        evaluate(
            "--checkpoint",
            smoke_run / "checkpoints" / "last.pt",
            "--json",
            "data.name=imagefolder",
            f"data.root={tmp_path / 'images'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            cwd=tmp_path,
        )
    )
    report = json.loads(proc.stdout)
    assert report["dataset"] == "imagefolder"
    assert report["count"] == 256 and report["accuracy"] == logged(smoke_run)["test_acc"]


def test_evaluate_a_seed_state_dict_on_cifar10_files(seed_files, tmp_path):
    """A state_dict has no config: the default dataset (CIFAR-10, here in its official file format) with overrides."""
    write_cifar10(tmp_path / "data", per_batch=10, test=100)
    proc = ok(
        evaluate(
            "--checkpoint",
            seed_files / "SavedStateDict.pth",
            "--json",
            f"data.root={tmp_path / 'data'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            cwd=tmp_path,
        )
    )
    report = json.loads(proc.stdout)
    assert (report["dataset"], report["kind"], report["count"], report["classes"]) == (
        "cifar10",
        "state_dict",
        100,
        CIFAR_CLASSES,
    )
    assert np.array(report["confusion"]).sum() == 100 and report["accuracy"] == report["correct"] / 100


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.name=vgg16", "error: override 'model.name=vgg16' changes 'model', but only data can be changed here"),
        ("data.nmae=imagefolder", "error: unknown config key 'data.nmae' (did you mean 'data.name'?)"),
    ],
)
def test_evaluate_override_errors_are_one_line(smoke_run, tmp_path, override, expected):
    line = one_error_line(evaluate("--checkpoint", smoke_run / "checkpoints" / "last.pt", override, cwd=tmp_path))
    assert line.startswith(expected)
