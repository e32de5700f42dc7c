"""A trained model outside this project: loaded by the seed's own code, and exported as ONNX and .pt2 for deployment.

Every route must give the classes `infer/predict.py` gives on the same image files.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CIFAR_CLASSES, REPO, SEED_MODULE, env_for_tests, load, ok, one_error_line, run, train, write_cifar10

PREDICT = REPO / "infer" / "predict.py"
EXPORT = REPO / "infer" / "export.py"

# The seed notes' inference, as written there: MyModule, Image.open(...).convert('RGB'), Resize((32, 32)) and
# ToTensor(), reshape to (1, 3, 32, 32), argmax. With --normalize, the README's two extra lines for a
# checkpoint that normalises: Normalize with the checkpoint's own preprocess entry.
SEED_PREDICT = (
    """
import json, sys
import torch, torchvision
from PIL import Image
"""
    + SEED_MODULE
    + """


normalize = sys.argv[1] == "--normalize"
checkpoint = torch.load(sys.argv[2], map_location="cpu")
model = MyModule()
model.load_state_dict(checkpoint["model"])
model.eval()
transformer = torchvision.transforms.Compose([torchvision.transforms.Resize((32, 32)), torchvision.transforms.ToTensor()])
predicted = []
for path in sys.argv[3:]:
    image = transformer(Image.open(path).convert('RGB'))
    if normalize:
        image = torchvision.transforms.Normalize(checkpoint["preprocess"]["mean"], checkpoint["preprocess"]["std"])(image)
    image = torch.reshape(image, (1, 3, 32, 32))
    with torch.no_grad():
        predicted.append(int(torch.argmax(model(image))))
print(json.dumps(predicted))
"""
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The default CNN config (configs/cifar10_cnn.yaml) on CIFAR-10-format files, as is and with data.normalize=cifar10;
    and 16 of the test split's images as PNG files (two enlarged RGBA ones among them, resized on reading)."""
    root = tmp_path_factory.mktemp("deploy")
    written = write_cifar10(root / "data", per_batch=400, test=200)
    common = ["data.root=" + str(root / "data"), f"data.cache_dir={root / 'cache'}", "train.epochs=3", "log.tensorboard=false"]
    for name, extra in (("plain", []), ("normalised", ["data.normalize=cifar10"])):
        ok(train(*common, *extra, f"log.run_dir={root / name}", cwd=root))
    images, _ = written["test_batch"]
    paths = []
    for i, image in enumerate(images[:16]):
        picture = Image.fromarray(image.transpose(1, 2, 0))
        if i % 8 == 7:
            picture = picture.resize((48, 48), Image.NEAREST).convert("RGBA")
        paths.append(root / f"test_{i:02d}.png")
        picture.save(paths[-1])
    return root, paths


def predicted_classes(checkpoint, paths, cwd) -> tuple[list[str], str]:
    proc = ok(run([sys.executable, PREDICT, "--checkpoint", checkpoint, *paths, "--json"], cwd=cwd))
    return [entry["class"] for entry in json.loads(proc.stdout)], proc.stderr


def seed_style(checkpoint, paths, cwd, normalize: bool) -> list[str]:
    (cwd / "seed_predict.py").write_text(SEED_PREDICT)
    flag = "--normalize" if normalize else "--as-is"
    proc = ok(run([sys.executable, "seed_predict.py", flag, checkpoint, *paths], cwd=cwd))
    return [CIFAR_CLASSES[i] for i in json.loads(proc.stdout)]


def test_the_seeds_own_code_predicts_what_predict_py_does(trained):
    """Default config: the seed's MyModule with ToTensor() alone; a normalising config: plus the README's two lines."""
    root, paths = trained
    plain = root / "plain" / "checkpoints" / "best.pt"
    assert load(plain)["preprocess"]["mean"] == [0.0, 0.0, 0.0] and load(plain)["preprocess"]["std"] == [1.0, 1.0, 1.0]
    plain_classes, stderr = predicted_classes(plain, paths, root)
    assert stderr == "" and len(set(plain_classes)) >= 3, plain_classes  # a model that tells images apart
    assert seed_style(plain, paths, root, normalize=False) == plain_classes

    normalised = root / "normalised" / "checkpoints" / "best.pt"
    assert "transforms.Normalize([0.4914, 0.4822, 0.4465]" in load(normalised)["preprocess"]["torchvision"]
    classes, _ = predicted_classes(normalised, paths, root)
    assert seed_style(normalised, paths, root, normalize=True) == classes

    # the weights alone, as the seed saves them: predict.py assumes the seed's ToTensor() and says so
    torch.save(load(plain)["model"], root / "SavedStateDict.pth")
    bare, stderr = predicted_classes(root / "SavedStateDict.pth", paths, root)
    assert bare == plain_classes
    assert stderr.startswith(f"warning: {root / 'SavedStateDict.pth'} is a bare state_dict: it does not say how") and (
        "assuming the seed's Resize((32, 32)) and ToTensor() alone" in stderr and "--mean M M M --std S S S" in stderr
    )


def deployer_input(paths) -> torch.Tensor:
    """What a deployment script gives the exported model: Resize((32, 32)) and ToTensor() of each RGB image, stacked."""
    import torchvision

    transformer = torchvision.transforms.Compose([torchvision.transforms.Resize((32, 32)), torchvision.transforms.ToTensor()])
    return torch.stack([transformer(Image.open(p).convert("RGB")) for p in paths])


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_exported_model_takes_totensor_images_and_predicts_what_predict_py_does(trained, fmt):
    """The normalising checkpoint: the export includes its normalisation, so a deployer feeds ToTensor() output as is."""
    root, paths = trained
    checkpoint = root / "normalised" / "checkpoints" / "best.pt"
    out = root / f"model.{fmt}"
    proc = ok(run([sys.executable, EXPORT, "--checkpoint", checkpoint, "--format", fmt, "--out", out], cwd=root))
    assert proc.stdout.startswith(f"wrote {out} (") and "checked with" in proc.stdout and "at batch sizes 1 and 5" in proc.stdout
    assert not [p for p in root.iterdir() if ".tmp." in p.name]  # the temporary file was renamed
    expected, _ = predicted_classes(checkpoint, paths, root)
    images = deployer_input(paths)  # (16, 3, 32, 32) float in [0, 1]
    if fmt == "onnx":
        import onnx
        import onnxruntime

        classes = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["classes"])
        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        logits = [session.run(None, {"images": batch.numpy()})[0] for batch in (images, images[:1])]
    else:
        extra = {"classes.json": "", "preprocess.json": ""}
        module = torch.export.load(out, extra_files=extra).module()
        classes = json.loads(extra["classes.json"])
        assert json.loads(extra["preprocess.json"])["normalisation_included"]["mean"] == [0.4914, 0.4822, 0.4465]
        logits = [module(batch).detach().numpy() for batch in (images, images[:1])]
    assert classes == CIFAR_CLASSES
    assert [classes[i] for i in np.argmax(logits[0], 1)] == expected  # a batch of 16
    assert classes[int(np.argmax(logits[1]))] == expected[0]  # and a batch of 1


def test_export_refusals_are_one_line_and_write_nothing(trained, tmp_path):
    root, _ = trained
    checkpoint = root / "plain" / "checkpoints" / "best.pt"

    def export(*args, env=None):
        return run([sys.executable, EXPORT, "--checkpoint", checkpoint, *args], cwd=tmp_path, env=env)

    missing = tmp_path / "missing"
    line = one_error_line(export("--format", "onnx", "--out", missing / "model.onnx"))
    assert (
        line
        == f"error: --out {missing / 'model.onnx'}: folder {missing} does not exist; create it first (nothing is created for you)"
    )
    line = one_error_line(export("--format", "onnx", "--out", tmp_path / "model.pt2"))
    assert line == f"error: --out {tmp_path / 'model.pt2'} must be a file name ending in .onnx"
    # no onnxscript (a package that fails to import stands for a missing one): ONNX cannot be made, and says how to get it
    (tmp_path / "shadow" / "onnxscript").mkdir(parents=True)
    (tmp_path / "shadow" / "onnxscript" / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = env_for_tests(PYTHONPATH=f"{tmp_path / 'shadow'}:{REPO}")
    line = one_error_line(export("--format", "onnx", "--out", tmp_path / "model.onnx", env=env))
    assert "--format onnx needs the onnx and onnxscript packages: pip install -e '.[export]'" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shadow"]  # nothing written, no folder made
