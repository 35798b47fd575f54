"""Optimizer parameter groups and the learning-rate schedule of the paper."""
from __future__ import annotations

import math

from torch import nn

from .config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: decayed matrices, and undecayed biases, norms and
    scalars (1-D and 0-D tensors, such as the temperature). Momentum weights are not trainable."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Linear warm-up from warmup_lr to lr over warmup_steps iterations, then a cosine per epoch
    from lr down to min_lr at the last epoch."""
    if step < cfg.warmup_steps:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / cfg.warmup_steps
    epoch = step // max(1, steps_per_epoch)
    progress = min(1.0, epoch / max(1, cfg.epochs))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
