"""TensorBoard as a person sees it: a run killed and resumed, served by `tensorboard --logdir` and opened in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from conftest import SMOKE, env_for_tests, free_port, ok, train
from train.board import RUN_SETTINGS

BROWSER = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)
# headless, and nothing that reaches out: without the background-networking flags a closed network refuses many connections
BROWSER_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1300",
    "--virtual-time-budget=15000",  # the page's own timers run ahead: TensorBoard has fetched and drawn by then
]


def browser(tmp_path, *what: str, url: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile_{time.monotonic_ns()}"  # a fresh profile each time: no state carried over
    return subprocess.run(
        [BROWSER, *BROWSER_FLAGS, f"--user-data-dir={profile}", *what, url], capture_output=True, text=True, timeout=180
    )


def get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def serve(logdir, port: int) -> subprocess.Popen:
    """`tensorboard --logdir LOGDIR` on 127.0.0.1, once it answers."""
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"tensorboard exited {server.returncode}: {server.stderr.read()[-2000:]}")
        try:
            if get(f"http://127.0.0.1:{port}/data/runs"):  # served, and the run's events read
                return server
        except OSError:
            pass
        time.sleep(0.5)
    server.kill()
    raise AssertionError("tensorboard did not answer within 120 s")


def scalar_steps(base: str, run: str, tag: str) -> list[int]:
    query = urllib.parse.urlencode({"run": run, "tag": tag})
    return [step for _, step, _ in get(f"{base}/data/plugin/scalars/scalars?{query}")]


@pytest.mark.skipif(BROWSER is None, reason="Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
def test_tensorboard_in_a_browser_shows_the_seeds_loss_first_and_a_resumed_run_once(tmp_path):
    run = tmp_path / "runs" / "seed_cnn"
    args = ["--config", SMOKE, "data.synthetic_train=256", "data.synthetic_test=64", f"log.run_dir={run}"]
    # killed while writing epoch 2's checkpoint, after epoch 2's TensorBoard points; the rerun resumes from
    # epoch 1 and logs epoch 2 again: TensorBoard must show it once
    killed = train(*args, cwd=tmp_path, env=env_for_tests(SCAFFOLD_FAULT="ckpt_write@2"))
    assert killed.returncode == -9, killed.stderr
    ok(train(*args, cwd=tmp_path))
    port = free_port()
    server = serve(tmp_path / "runs", port)
    try:
        base = f"http://127.0.0.1:{port}"
        assert get(f"{base}/data/runs") == ["seed_cnn"]  # named after its run folder
        epoch_ends = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert epoch_ends == [4, 8]
        for tag in ("Loss/Train", "Loss/Test", "Test/Accuracy", "Train/Accuracy"):
            assert scalar_steps(base, "seed_cnn", tag) == epoch_ends, tag  # one x-axis, no duplicate after the resume

        request = urllib.request.Request(
            f"{base}/data/plugin/hparams/experiment",
            data=b'{"experimentName": ""}',
            headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            experiment = json.loads(response.read())
        hparams = {h["name"]: h["type"] for h in experiment["hparamInfos"]}
        assert sorted(hparams) == sorted([*RUN_SETTINGS, "world_size"])  # what defines a run, not all 40 keys
        assert (
            hparams["optim.lr"] == hparams["train.batch_size"] == "DATA_TYPE_FLOAT64"
            and hparams["model.name"] == "DATA_TYPE_STRING"
        )
        assert {m["name"]["tag"] for m in experiment["metricInfos"]} == {"Test/Accuracy", "Loss/Test"}  # existing curves

        page = browser(tmp_path, "--dump-dom", url=f"{base}/")
        groups = re.findall(r'class="group-title" title="([^"]*)"', page.stdout)
        assert groups[:2] == ["Loss", "Test"], groups  # the seed's Loss first; TensorBoard opens the first two groups
        for card in ("Loss/Train", "Loss/Test", "Test/Accuracy", "Test/Confusion matrix", "Test/Misclassified"):
            assert f'title="{card}"' in page.stdout, card  # drawn: its group is open
        assert 'title="Train/Accuracy"' not in page.stdout  # a closed group draws no cards: the checks above mean something
        assert "seed_cnn" in page.stdout

        shot = tmp_path / "tensorboard.png"  # for a person to look at: pytest keeps tmp_path
        browser(tmp_path, f"--screenshot={shot}", url=f"{base}/")
        assert shot.stat().st_size > 10_000
    finally:
        server.terminate()
        server.wait(timeout=30)
