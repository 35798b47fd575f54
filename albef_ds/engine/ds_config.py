"""DeepSpeed config resolution: the ds config's "auto" entries filled from the project config,
and the two cross-checked before anything is built."""
from __future__ import annotations

import copy
import json
from typing import Union

import torch

from ..config import Config, ConfigError


def resolve_ds_config(ds: Union[str, dict], cfg: Config, world_size: int) -> dict:
    """Fills the ds config's "auto" entries from the project config and checks the two agree.

    Raises ConfigError naming the numbers before anything is built."""
    if isinstance(ds, str):
        try:
            with open(ds) as f:
                ds = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read DeepSpeed config {ds}: {exc}") from None
    ds = copy.deepcopy(ds)
    t = cfg.train

    def fill(key, value, section=ds):
        if section.get(key, "auto") == "auto":
            section[key] = value
        elif section[key] != value:
            raise ConfigError(f"ds config {key}={section[key]} disagrees with the project config ({value})")

    fill("train_micro_batch_size_per_gpu", t.batch_size)
    fill("gradient_accumulation_steps", t.grad_accum)
    expected = t.batch_size * t.grad_accum * world_size
    if ds.get("train_batch_size", "auto") == "auto":
        ds["train_batch_size"] = expected
    elif ds["train_batch_size"] != expected:
        raise ConfigError(f"ds config train_batch_size={ds['train_batch_size']} but micro batch "
                          f"{t.batch_size} x accumulation {t.grad_accum} x world size {world_size} = {expected}")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if t.compile and stage == 3:
        raise ConfigError("train.compile is not supported with ZeRO stage 3 (its parameter hooks "
                          "gather weights inside the layers): use stage 0-2 or train.compile=false")
    zero = ds.get("zero_optimization", {})
    for key in ("overlap_comm", "contiguous_gradients"):
        if zero.get(key) == "auto":
            # One rank reduces nothing: no communication to overlap (and overlap_comm makes ZeRO
            # wait for the device at the end of every backward pass), no partition for the
            # contiguous buffer to feed (it costs a copy per gradient in a Python hook: half of
            # ZeRO-2's extra step time over ZeRO-1 on one H100, docs/benchmarks.md). Several
            # ranks: DeepSpeed's recommended setting (the contiguous path reduces each gradient to
            # its owner only).
            zero[key] = world_size > 1
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = t.grad_clip
    bf16 = ds.setdefault("bf16", {"enabled": "auto"})
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = torch.cuda.is_available()
    params = ds.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})
    fill("lr", t.warmup_lr if t.warmup_steps else t.lr, params)
    if params.get("weight_decay", "auto") == "auto":
        params["weight_decay"] = t.weight_decay
    left = [k for k, v in _flatten(ds) if v == "auto"]
    if left:
        raise ConfigError(f"ds config entries left at 'auto' that ALBEF-DS does not fill: {left}")
    return ds


def _flatten(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v
