"""The momentum (EMA) model update, on whatever part of each weight this rank holds.

Under ZeRO-3 every parameter, online and momentum alike, is split into equal partitions per rank
(`param.ds_tensor`); an online weight and its momentum copy have the same size, so their
partitions line up element for element and the EMA runs shard by shard with no communication.
Under ZeRO-0/1/2 (or one process) the weights are whole on every rank and the same code runs on
them whole. When the weights are stored in bf16/fp16, the EMA accumulates in an fp32 shadow of
the local partition: a 0.005-sized step would otherwise round away.
"""
from __future__ import annotations

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

    The online side is read as stored (bf16 under mixed precision): its rounding is unbiased and
    far below the 0.005 step, whereas accumulating the momentum itself in bf16 is not.
    """

    def __init__(self, model, momentum: float):
        self.momentum = momentum
        self.pairs = momentum_parameter_pairs(model)
        self.fp32 = [None if local_data(pm).dtype == torch.float32 else local_data(pm).float().clone()
                     for _, pm in self.pairs]

    @torch.no_grad()
    def update(self) -> None:
        # Multi-tensor (foreach) kernels: a few launches for the ~400 tensors instead of two each.
        targets = [local_data(pm) if acc is None else acc for (_, pm), acc in zip(self.pairs, self.fp32)]
        torch._foreach_mul_(targets, self.momentum)
        torch._foreach_add_(targets, [local_data(p) for p, _ in self.pairs], alpha=1.0 - self.momentum)
        shadowed = [(local_data(pm), acc) for (_, pm), acc in zip(self.pairs, self.fp32) if acc is not None]
        if shadowed:
            torch._foreach_copy_(*map(list, zip(*shadowed)))

    def local_elements(self) -> int:
        """Momentum elements held by this rank (for the memory report)."""
        return sum(local_data(pm).numel() for _, pm in self.pairs)

    def partitioned(self) -> bool:
        return any(hasattr(pm, "ds_tensor") for _, pm in self.pairs)

    def local_state(self) -> list[torch.Tensor]:
        """This rank's momentum values at training precision (fp32 shadow where there is one)."""
        return [(acc if acc is not None else local_data(pm)).detach().cpu().clone()
                for (_, pm), acc in zip(self.pairs, self.fp32)]

    @torch.no_grad()
    def load_local_state(self, values: list[torch.Tensor]) -> None:
        if len(values) != len(self.pairs):
            raise ValueError(f"momentum state has {len(values)} tensors, the model {len(self.pairs)}")
        for i, ((_, pm), value) in enumerate(zip(self.pairs, values)):
            dst = local_data(pm)
            if value.shape != dst.shape:
                raise ValueError(f"momentum tensor {i} has shape {tuple(value.shape)}, this rank holds "
                                 f"{tuple(dst.shape)} (resume with the same ZeRO stage and world size)")
            if self.fp32[i] is not None:
                self.fp32[i].copy_(value)
            dst.copy_(value)
