"""train.cuda_graphs on a machine without a GPU: one line saying why, and the pieces of the graphed step that
run on the CPU. The capture itself, its equality with the eager step and its speed are checked on a GPU by
bench/gpu_check.sh."""

from __future__ import annotations

import torch

from conftest import one_error_line, train
from train import graphs, models
from train.config import ModelConfig, OptimConfig
from train.optimizer import make_optimizer, make_scheduler


def test_cuda_graphs_on_the_cpu_is_one_line(tmp_path, smoke_args):
    line = one_error_line(train(*smoke_args, "train.device=cpu", "train.cuda_graphs=true", cwd=tmp_path))
    assert line == (
        "error: train.cuda_graphs=true needs a CUDA device, and this run is on the cpu (which has no kernel launches "
        "to save); set train.cuda_graphs=false"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


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
