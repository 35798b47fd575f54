"""One-file checkpoints: ours and the released ALBEF layout; reading any source; conversion.

Sources (detected, never named by the caller):
  * a training checkpoint folder written by the Trainer (any ZeRO stage, any world size), read by
    albef_ds.checkpoint.training;
  * our single file (torch `.pt` or `.safetensors`) holding the state dict and the config;
  * a released ALBEF file of any task: `{"model": state_dict}` or a bare state dict (the task is
    recognised from its keys, albef_ds.checkpoint.released maps the names).
All three become one in-memory form, a `Checkpoint`: a state dict in OUR layout (one key per
tensor, tied copies left out) conformed to a config (position embeddings resized to its
resolution, shapes checked), plus that config. A checkpoint of another task than the config's
(a pretrained model for a downstream task) passes through the target task's `initial_state`.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import Config, ModelConfig, load_config
from ..fileio import ConversionError, atomic_write, check_readable, is_safetensors, torch_load
from ..tasks import get_task, recognise_release
from .layout import Layout, Report, conform, model_layout, with_aliases
from .released import from_released, to_released
from .training import read_training, stored_config

FORMAT = "albef_ds"
FORMAT_VERSION = 1
RELEASED = "albef"
CONFIG_ENTRY = "albef_ds_config"      # our config, carried alongside "model" in released-layout files
BASE_RELEASE_OVERRIDES = ["model.vision.pretrained=null", "model.text.pretrained=null"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Checkpoint:
    state_dict: dict          # OUR layout, conformed to `config`; tied copies left out
    config: Config
    kind: str                 # "training", "albef_ds" or "albef"
    source: str               # what was read (path, tag)
    report: Report = field(default_factory=Report)
    fresh: tuple = ()         # key prefixes the config's task starts afresh (new heads)


def architecture_config(cfg: Config) -> Config:
    """The config written with converted weights: the file holds every weight, so there is
    nothing pretrained to fetch and no checkpoint to start from."""
    cfg = copy.deepcopy(cfg)
    cfg.model = cfg.model.architecture_only()
    return cfg


def released_config(task: str) -> Config:
    """The config for released files that carry none: the paper's base model, for `task`."""
    return load_config("base", BASE_RELEASE_OVERRIDES + [f"task={task}"])


def _target_config(config, stored: Config) -> Config:
    """The config a checkpoint is read into: `config` (a shipped name, yaml path, dict or Config;
    a ModelConfig replaces the stored config's model only), else the stored one."""
    if config is None:
        return stored
    if isinstance(config, ModelConfig):
        out = copy.deepcopy(stored)
        out.model = copy.deepcopy(config)
        return out
    return copy.deepcopy(config) if isinstance(config, Config) else load_config(config)


# ---- reading ----------------------------------------------------------------------------------

def read_checkpoint(path: str, tag: Optional[str] = None, config=None, trusted: bool = False) -> Checkpoint:
    """Any source (training folder, our file, released file) as a Checkpoint conformed to
    `config` (see _target_config); by default the config stored with the checkpoint, or the base
    config of the recognised task for released files that carry none. Files are unpickled
    weights-only: one that holds other objects is refused unless `trusted` (io.torch_load)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConversionError(f"'{path}': no such file or folder")
    if os.path.isdir(path):
        state, stored, source = read_training(path, tag, trusted)
        kind = "training"
    else:
        if tag is not None:
            raise ConversionError(f"--tag names a checkpoint of a training folder; '{path}' is a file")
        state, stored, kind, source = _read_file(path, trusted)
    cfg = _target_config(config, stored)
    fresh: tuple = ()
    if cfg.task != stored.task:
        task = get_task(cfg)
        state, fresh = task.initial_state(state, stored.task), task.fresh_parts
    state, report = conform(state, cfg, source, fresh=fresh)
    return Checkpoint(state_dict=state, config=architecture_config(cfg), kind=kind, source=source, report=report,
                      fresh=fresh)


def _read_file(path: str, trusted: bool):
    check_readable(path)
    if is_safetensors(path):
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise ConversionError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
        if meta.get("format") == FORMAT:
            cfg = stored_config(json.loads(meta.get("config", "null")), path)
            for alias, target in json.loads(meta.get("aliases", "{}")).items():
                if target in tensors:
                    tensors[alias] = tensors[target]
            return tensors, cfg, FORMAT, path
        return _released(tensors, None, path)
    obj = torch_load(path, trusted)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if not isinstance(obj.get("state_dict"), dict):
            raise ConversionError(f"{path}: an {FORMAT} file without its state_dict")
        return dict(obj["state_dict"]), stored_config(obj.get("config"), path), FORMAT, path
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return _released(obj["model"], obj.get(CONFIG_ENTRY), path)
    return _released(obj, None, path)


def _released(state, config_values, path: str):
    tensors = (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())
               and all(isinstance(k, str) for k in state))
    task = recognise_release(set(state)) if tensors else None
    if task is None:
        shown = list(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise ConversionError(f"{path} is neither an {FORMAT} file nor an ALBEF checkpoint (a state dict, "
                              f"or {{'model': state dict}}, with visual_encoder.* and text_encoder.* "
                              f"weights); found {shown}")
    cfg = stored_config(config_values, path) if config_values is not None else released_config(task.name)
    return from_released(state, task.released_text_parts), cfg, RELEASED, path


# ---- writing ----------------------------------------------------------------------------------

def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ConversionError(f"dtype '{dtype}': choose one of {', '.join(DTYPES)}")


def _check_released_name(path: str) -> None:
    if os.fspath(path).endswith(".safetensors"):
        raise ConversionError(f"'{path}': the released ALBEF layout is a torch file (ALBEF reads it with "
                              "torch.load); name the output .pt or .pth")


def prepare(state: dict, layout: Layout, momentum: bool = True, dtype: str = "fp32") -> dict:
    """Drops the momentum model and buffers (momentum=False), then casts. bf16 casts the online
    floating weights only: the momentum weights and the feature queues stay fp32, the precision
    the trainer keeps them in (a 0.005-sized EMA step rounds away in bf16)."""
    _check_dtype(dtype)
    if not momentum:
        state = {k: v for k, v in state.items() if not (layout.is_momentum(k) or k in layout.buffers)}
    target = DTYPES[dtype]
    return {k: v.to(target) if v.is_floating_point() and not (layout.is_momentum(k) or k in layout.buffers)
            else v for k, v in state.items()}


def save_albef_ds(path: str, state: dict, config: Config, layout: Layout) -> None:
    """Our single file: torch.save({"format", "format_version", "config", "state_dict"}), or, for a
    .safetensors name, the tensors with metadata {"format", "format_version", "config" (JSON),
    "aliases" (JSON: tied key -> key stored)}. The torch file's state_dict has every key of the
    model's state_dict() present in the file (tied copies share their tensor), so it also loads with
    plain load_state_dict."""
    config_dict = architecture_config(config).to_dict()
    if path.endswith(".safetensors"):
        tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
        aliases = {a: t for a, t in layout.aliases.items() if t in tensors}
        meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": json.dumps(config_dict),
                "aliases": json.dumps(aliases)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    else:
        obj = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config_dict,
               "state_dict": with_aliases(state, layout)}
        atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_released(path: str, state: dict, config: Config, layout: Layout) -> None:
    """The released ALBEF layout of the config's task, {"model": state_dict}; our config rides
    along under "albef_ds_config" (ALBEF's loaders read only "model")."""
    _check_released_name(path)
    obj = {"model": to_released(state, layout, get_task(config).released_text_parts),
           CONFIG_ENTRY: architecture_config(config).to_dict()}
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def convert(input: str, output: str, to: str = FORMAT, tag: Optional[str] = None, momentum: bool = True,
            dtype: str = "fp32", config=None, trusted: bool = False) -> Checkpoint:
    """Reads any source and writes `output` in our format (to="albef_ds") or the released layout
    (to="albef"). Every check runs before anything is written; the output appears whole or not at
    all. Returns the Checkpoint that was written (its state dict before dropping and casting)."""
    if to not in (FORMAT, RELEASED):
        raise ConversionError(f"--to '{to}': choose {FORMAT} or {RELEASED}")
    _check_dtype(dtype)             # the output's checks first: reading a checkpoint takes long
    if to == RELEASED:
        _check_released_name(output)
    ckpt = read_checkpoint(input, tag=tag, config=config, trusted=trusted)
    layout = model_layout(ckpt.config)
    state = prepare(ckpt.state_dict, layout, momentum=momentum, dtype=dtype)
    (save_released if to == RELEASED else save_albef_ds)(os.fspath(output), state, ckpt.config, layout)
    return ckpt
