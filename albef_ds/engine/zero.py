"""What touches DeepSpeed's internals: the fp32 master of a parameter (read, clamp) under any ZeRO
stage, and whole weights for evaluation under ZeRO-3."""
from __future__ import annotations

import torch
from torch import nn

from .. import distributed as dist


def clamp_master_(param: nn.Parameter, low: float, high: float) -> None:
    """Clamps the value the optimizer holds for `param` (its fp32 master) on each rank's slice of it,
    if any (no communication, no wait for the device). DeepSpeed's safe_set_full_fp32_param would
    do it through a collective, and under ZeRO-3 it fails for a parameter smaller than the world
    size (it looks for the padded slice of the last rank past the value's end)."""
    if hasattr(param, "ds_id"):                       # ZeRO-3, as its own setter reaches the slice
        z3 = param._z3_optimizer
        fragment, group = z3._get_fp32_opt_state_partition(param, release_swap_buffers=False)
        with torch.no_grad():      # the fragment is a view of the optimizer's parameter
            fragment.clamp_(low, high)
        if z3._swappable_optimizer_subgroup(group):  # optimizer states offloaded to NVMe
            z3._optimizer_states_and_gradient_swap_out(group)
    elif not hasattr(param, "_hp_mapping"):           # no ZeRO: the module holds the master
        with torch.no_grad():
            param.clamp_(low, high)
    elif param._hp_mapping is not None:               # ZeRO-1/2, on the rank that owns it
        with torch.no_grad():
            param._hp_mapping.get_hp_fragment().clamp_(low, high)


def master_value(param: nn.Parameter) -> torch.Tensor:
    """The whole fp32 value the optimizer holds for `param` (a collective under ZeRO: every rank
    calls it)."""
    master = dist.import_deepspeed().utils.safe_get_full_fp32_param(param)
    return (master if master is not None else param).detach().float()


def inference_model(model, task) -> nn.Module:
    """The model to evaluate: a DeepSpeed engine's module (or a module), which has the task's
    inference API; under ZeRO-3 (partitioned weights) a plain copy of the task's inference model
    with the whole online weights (a collective: every rank must call it)."""
    module = getattr(model, "module", model)
    params = list(module.named_parameters())
    if not any(hasattr(p, "ds_id") for _, p in params):
        return module
    deepspeed = dist.import_deepspeed()
    plain = task.build_inference_model(task.cfg.model.architecture_only())
    wanted = dict(plain.named_parameters())
    state = {}
    for name, p in params:
        if name in wanted:
            with deepspeed.zero.GatheredParameters([p]):
                state[name] = p.detach().clone()
    missing = set(wanted) - set(state)
    if missing:
        raise RuntimeError(f"could not rebuild the model for evaluation: no weights for {sorted(missing)[:5]}")
    first = next(iter(state.values()))
    plain.load_state_dict(state, strict=False)
    return plain.to(first.device, first.dtype).eval()
