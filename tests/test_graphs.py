"""train.cuda_graphs on a machine without a GPU: what a user is told, and the piece of the graphed step that
runs on the CPU. The capture itself, its equality with the eager step and its speed are checked on a GPU by
bench/gpu_check.sh."""

from __future__ import annotations

import torch

from conftest import ok, one_error_line, train
from train import graphs, models
from train.config import ModelConfig, OptimConfig
from train.optimizer import make_optimizer, make_scheduler


def test_cuda_graphs_where_they_cannot_run(tmp_path, smoke_args):
    """On the CPU a config with train.cuda_graphs=true still trains (configs travel), eagerly, with one warning; a
    combination that cannot work anywhere (adamw's step) is refused in one line before anything is written."""
    small = [*smoke_args, "train.cuda_graphs=true", "data.synthetic_train=256", "train.epochs=1"]
    proc = ok(train(*small, cwd=tmp_path))
    warning = "warning: train.cuda_graphs=true needs a CUDA device and this run is on the cpu: steps run eagerly"
    assert [line for line in proc.stdout.splitlines() if line.startswith("warning:")] == [warning]
    assert "done: test_acc" in proc.stdout
    line = one_error_line(
        train(*smoke_args, "train.cuda_graphs=true", "optim.name=adamw", f"log.run_dir={tmp_path / 'b'}", cwd=tmp_path)
    )
    assert line == (
        "error: train.cuda_graphs=true needs optim.name=sgd (its fused step reads the learning rate on the device), "
        "not adamw; or set train.cuda_graphs=false"
    )
    assert not (tmp_path / "b").exists()


def test_the_learning_rate_on_the_device_steps_like_the_float_one():
    """What a replay does: the scheduler writes a float, the step reads it from a tensor refilled before each step,
    through SGD's fused kernel. 20 steps of the seed's CNN at the default settings (lr 0.01, Nesterov, weight decay,
    one-cycle): the weights stay within float rounding of the plain optimizer's (7.5e-9 here), and outside the capture
    the optimizer is as it was (float lr, not fused)."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    runs = []
    for on_device in (False, True):
        torch.manual_seed(1)
        model = models.build(ModelConfig(name="cnn"), 10)
        cfg = OptimConfig(warmup_epochs=0.5)
        opt = make_optimizer(cfg, model.parameters())
        schedule = make_scheduler(cfg, opt, 2, 10)
        rates = [torch.zeros((), dtype=torch.float32) for _ in opt.param_groups]
        for _ in range(20):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if on_device:
                for rate, group in zip(rates, opt.param_groups):
                    rate.fill_(group["lr"])
                with graphs.device_learning_rate(opt, rates):
                    opt.step()
            else:
                opt.step()
            schedule.step()
        assert all(isinstance(g["lr"], float) and not g["fused"] for g in opt.param_groups)
        runs.append(model.state_dict())
    plain, fused = runs
    for k in plain:
        assert torch.allclose(plain[k], fused[k], rtol=1e-5, atol=1e-7), (k, (plain[k] - fused[k]).abs().max())
