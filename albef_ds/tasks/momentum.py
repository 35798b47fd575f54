"""Momentum distillation state: frozen EMA copies of online parts, their update, feature queues.

The EMA runs on whatever part of each weight this rank holds.

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
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

NO_IMAGE_ID = -100          # idx_queue entry of a feature without an image id: never a positive
QUEUE_BUFFERS = ("image_queue", "text_queue", "idx_queue", "queue_ptr")


def add_momentum_copies(model: nn.Module, builders: dict[str, Callable[[], nn.Module]]) -> None:
    """For each online part `name` of `model`, a frozen copy `name_m`: every copy is built first by
    its builder (fresh weights, no pretrained files), then all are filled from the online parts."""
    copies = {name: build() for name, build in builders.items()}
    for name, copy in copies.items():
        copy.requires_grad_(False)
        setattr(model, f"{name}_m", copy)
    copy_to_momentum(model, list(builders))


@torch.no_grad()
def copy_to_momentum(model: nn.Module, names: list[str]) -> None:
    for name in names:
        getattr(model, f"{name}_m").load_state_dict(getattr(model, name).state_dict())


def register_queues(model: nn.Module, dim: int, size: int) -> None:
    """Queues of momentum features, [dim, size] as in the released checkpoints, randomly initialised
    and L2-normalised; idx_queue holds the image id of each entry (retrieval-style positives)."""
    model.register_buffer("image_queue", F.normalize(torch.randn(dim, size), dim=0))
    model.register_buffer("text_queue", F.normalize(torch.randn(dim, size), dim=0))
    model.register_buffer("idx_queue", torch.full((1, size), NO_IMAGE_ID, dtype=torch.long))
    model.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))


@torch.no_grad()
def enqueue(model: nn.Module, image_feat: torch.Tensor, text_feat: torch.Tensor,
            image_ids: Optional[torch.Tensor] = None) -> None:
    """Writes the global batch's momentum features at the pointer, wrapping around, so any global
    batch size up to the queue size works (the batch need not divide the queue). A batch with
    non-finite features (a corrupt input) is not written: it would poison every later step. Runs
    without a host sync."""
    n, size = image_feat.shape[0], model.image_queue.shape[1]
    if n > size:
        raise ValueError(f"global batch {n} is larger than the queue ({size})")
    ok = torch.isfinite(image_feat).all() & torch.isfinite(text_feat).all()
    slots = (model.queue_ptr + torch.arange(n, device=model.queue_ptr.device)) % size
    for queue, new in ((model.image_queue, image_feat.t()), (model.text_queue, text_feat.t())):
        queue[:, slots] = torch.where(ok, new.to(queue.dtype), queue[:, slots])
    if image_ids is not None:
        model.idx_queue[0, slots] = torch.where(ok, image_ids, model.idx_queue[0, slots])
    model.queue_ptr.copy_(torch.where(ok, (model.queue_ptr + n) % size, model.queue_ptr))


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
        if not self.pairs:            # a task without momentum distillation
            return
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
    def load_whole(self, values: list[torch.Tensor]) -> None:
        """Sets the momentum weights from whole tensors (in pair order): this rank takes its ZeRO-3
        partition of each (ceil(numel / world) elements, the last padded), or the whole tensor."""
        rank = tdist.get_rank() if tdist.is_initialized() else 0
        local = []
        for (_, pm), value in zip(self.pairs, values):
            size = local_data(pm).numel()
            flat = value.detach().reshape(-1).float()
            part = flat[rank * size:(rank + 1) * size] if hasattr(pm, "ds_tensor") else flat
            local.append(torch.nn.functional.pad(part, (0, size - part.numel())).view_as(local_data(pm)))
        self.load_local_state(local)

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
