"""The momentum (EMA) model update, on whatever part of each weight this rank holds.

Under ZeRO-3 every parameter, online and momentum alike, is split into equal partitions per rank
(`param.ds_tensor`); an online weight and its momentum copy have the same size, so their
partitions line up element for element and the EMA runs shard by shard with no communication.
Under ZeRO-0/1/2 (or one process) the weights are whole on every rank and the same code runs on
them whole. When the weights are stored in bf16/fp16, the EMA accumulates in an fp32 shadow of
the local partition: a 0.005-sized step would otherwise round away.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn


def local_data(param: nn.Parameter) -> torch.Tensor:
    """The part of `param` this rank stores: its ZeRO-3 partition, or the whole tensor."""
    return param.ds_tensor.data if hasattr(param, "ds_tensor") else param.data


def momentum_parameter_pairs(model) -> list[tuple[nn.Parameter, nn.Parameter]]:
    pairs = []
    for online, momentum in model.momentum_pairs():
        on, mo = dict(online.named_parameters()), dict(momentum.named_parameters())
        if on.keys() != mo.keys():
            raise ValueError(f"momentum copy of {type(online).__name__} has other parameters")
        pairs.extend((on[name], mo[name]) for name in on)
    return pairs


class MomentumEMA:
    """momentum = m * momentum + (1 - m) * online, applied once per optimizer step.

    `online_source(param)` may return a higher-precision local copy of an online weight (the
    optimizer's fp32 master partition); by default the stored weight is used.
    """

    def __init__(self, model, momentum: float,
                 online_source: Optional[Callable[[nn.Parameter], torch.Tensor]] = None):
        self.momentum = momentum
        self.pairs = momentum_parameter_pairs(model)
        self.online_source = online_source or local_data
        self.fp32 = [None if local_data(pm).dtype == torch.float32 else local_data(pm).float().clone()
                     for _, pm in self.pairs]

    @torch.no_grad()
    def update(self) -> None:
        m = self.momentum
        for (p, pm), acc in zip(self.pairs, self.fp32):
            dst = local_data(pm)
            target = dst if acc is None else acc
            target.mul_(m).add_(self.online_source(p).to(target.dtype), alpha=1.0 - m)
            if acc is not None:
                dst.copy_(acc)

    def local_elements(self) -> int:
        """Momentum elements held by this rank (for the memory report)."""
        return sum(local_data(pm).numel() for _, pm in self.pairs)

    def state_dict(self) -> dict:
        return {"momentum": self.momentum,
                "fp32": [acc for acc in self.fp32] if any(a is not None for a in self.fp32) else None}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fp32") is None:
            return
        for i, acc in enumerate(state["fp32"]):
            if acc is not None:
                self.fp32[i] = acc.to(local_data(self.pairs[i][1]).device).float()
                local_data(self.pairs[i][1]).copy_(self.fp32[i])
