"""The optimizer and the learning-rate schedule, from the `optim` section of the config."""

from __future__ import annotations

import math

import torch

from train import config


def make_optimizer(cfg: config.OptimConfig, params) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)


def lr_factor(cfg: config.OptimConfig, epochs: int, steps_per_epoch: int):
    """The schedule as a function of the optimizer step: warm-up, then none / step / cosine / onecycle."""
    total = max(1, epochs * steps_per_epoch)
    warmup = cfg.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1.0, total - warmup))
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if cfg.schedule == "onecycle":
            return max(0.0, 1.0 - progress)
        if cfg.schedule == "step":
            return cfg.gamma ** (step // (cfg.step_epochs * steps_per_epoch))
        return 1.0

    return factor


def make_scheduler(cfg: config.OptimConfig, optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int):
    """Stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, epochs, steps_per_epoch))


def replan(optimizer: torch.optim.Optimizer, scheduler, old_epochs: int, new_epochs: int, schedule: str, step: int) -> str | None:
    """After a resume: set the learning rate the schedule now gives for the next step; a line when the plan changed.

    One-cycle and cosine stretch their decay over train.epochs, so raising it on a resume moves the
    learning rate (a finished one-cycle run goes from 0 back up). The line says so, with the values.
    """
    saved = [group["lr"] for group in optimizer.param_groups]  # what the old plan set for the next step
    now = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    if all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(saved, now)):
        return None
    for group, lr in zip(optimizer.param_groups, now):
        group["lr"] = lr
    why = f"train.epochs {old_epochs} -> {new_epochs} re-plans" if old_epochs != new_epochs else "the config changes"
    return (
        f"{why} the {schedule} learning-rate schedule: at global step {step} the learning rate goes from "
        f"{saved[0]:.4g} to {now[0]:.4g} and follows the new plan from there"
    )
