"""Optimizer parameter groups and the learning-rate schedule of the paper."""
from __future__ import annotations

import math

from torch import nn

from .config import TrainConfig

ALIGN = 64    # elements: 128 bytes in bf16, a multiple of every GEMM alignment


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: decayed matrices, and undecayed biases, norms and
    scalars (1-D and 0-D tensors, such as the temperature). Momentum weights are not trainable."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    # DeepSpeed's ZeRO-1/2 lay each group out in one flat buffer, in this order, and the module's
    # weights become views into it. A tensor whose size is not a multiple of ALIGN elements (the
    # MLM bias of 30522, the ITM bias of 2, the temperature) would shift every later view off the
    # 16-byte boundary that cuBLAS's fast GEMM kernels require: on an H100, bf16 linear layers with
    # such biases ran 3x slower. So those go last.
    return [{"params": sorted(group, key=lambda p: p.numel() % ALIGN != 0), "weight_decay": wd}
            for group, wd in ((decay, weight_decay), (no_decay, 0.0))]


def lr_at(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Linear warm-up from warmup_lr to lr over warmup_steps iterations, then a cosine per epoch
    from lr down to min_lr at the last epoch."""
    if step < cfg.warmup_steps:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / cfg.warmup_steps
    epoch = step // max(1, steps_per_epoch)
    progress = min(1.0, epoch / max(1, cfg.epochs))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
