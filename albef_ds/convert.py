"""Checkpoint conversion: training checkpoints, our single-file format and the released ALBEF layout.

Sources (detected, never named by the caller):
  * a training checkpoint folder written by the Trainer (any ZeRO stage, any world size):
    the online weights are DeepSpeed's fp32 master weights, consolidated by DeepSpeed's own
    `zero_to_fp32`; the momentum weights come from our `albef_rank<R>.pt` files (fp32, the EMA's
    training precision; ZeRO-3 partitions are merged here); the queues and the config come from
    the client state of the DeepSpeed model-states file;
  * our single file (torch `.pt` or `.safetensors`) holding the state dict and the config;
  * a released ALBEF file: `{"model": state_dict}` or a bare state dict, pretrained (with the
    `bert.` infix and `cls.*`) or fine-tuned (without them, with `idx_queue`).
All three become one in-memory form, a `Checkpoint`: a state dict in OUR layout (one key per
tensor, tied copies left out) conformed to a config (position embeddings resized to its
resolution, shapes checked), plus that config. Targets: our single file or the released layout.

Our layout differs from the released one only in: `temp` has shape [1] (0-d there), there is no
`text_encoder{,_m}.bert.embeddings.position_ids` (a constant arange), and `idx_queue` is always
present (the pretraining release has none; -100 means "no image id").
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import pickle
import re
import struct
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from . import checkpoint
from .config import Config, ConfigError, ModelConfig, load_config
from .models import ALBEF
from .models.vit import resize_pos_embed

FORMAT = "albef_ds"
FORMAT_VERSION = 1
RELEASED = "albef"
CONFIG_ENTRY = "albef_ds_config"      # our config, carried alongside "model" in released-layout files
NO_IMAGE_ID = -100
# Heads that fine-tuned releases drop: missing from a file, they keep the model's initialisation.
OPTIONAL_HEADS = ("cls.",)
TEXT_ENCODERS = ("text_encoder.", "text_encoder_m.")
BASE_RELEASE_OVERRIDES = ["model.vision.pretrained=null", "model.text.pretrained=null"]


class ConversionError(ValueError):
    """A checkpoint that cannot be read or converted; the message names the path, tag or file."""


# ---- the model's layout ------------------------------------------------------------------------

@dataclass
class Layout:
    """Names and shapes of an ALBEF's state dict, and which entries are what."""
    shapes: dict                 # every state-dict key -> torch.Size
    dtypes: dict                 # every state-dict key -> dtype
    aliases: dict                # tied key -> the (earlier) key whose tensor it shares
    momentum_names: list         # momentum parameters, in momentum_parameter_pairs order
    momentum_prefixes: dict      # "visual_encoder_m." -> "visual_encoder." ...
    buffers: list                # queue state: image_queue, text_queue, idx_queue, queue_ptr

    @property
    def keys(self) -> list:
        """The keys that hold a tensor of their own (tied copies left out)."""
        return [k for k in self.shapes if k not in self.aliases]

    def is_momentum(self, key: str) -> bool:
        return key.startswith(tuple(self.momentum_prefixes))

    def online_name(self, key: str) -> str:
        for momentum, online in self.momentum_prefixes.items():
            if key.startswith(momentum):
                return online + key[len(momentum):]
        return key

    def is_optional_head(self, key: str) -> bool:
        key = self.online_name(key)
        return any(key.startswith(t + h) for t in TEXT_ENCODERS for h in OPTIONAL_HEADS)


def layout_of(model: nn.Module) -> Layout:
    from .momentum import momentum_parameter_pairs

    state = model.state_dict(keep_vars=True)
    first, aliases = {}, {}
    for key, tensor in state.items():
        if id(tensor) in first:
            aliases[key] = first[id(tensor)]
        else:
            first[id(tensor)] = key
    names = {id(p): n for n, p in model.named_parameters()}
    children = {id(m): n for n, m in model.named_children()}
    prefixes = {children[id(m)] + ".": children[id(o)] + "." for o, m in model.momentum_pairs()
                if id(m) in children}
    return Layout(shapes={k: v.shape for k, v in state.items()}, dtypes={k: v.dtype for k, v in state.items()},
                  aliases=aliases, momentum_names=[names[id(pm)] for _, pm in momentum_parameter_pairs(model)],
                  momentum_prefixes=prefixes, buffers=[n for n, _ in model.named_buffers()])


def model_layout(cfg: ModelConfig) -> Layout:
    """The layout of the ALBEF that `cfg` describes, from a model built on the meta device
    (no memory, no initialisation, well under a second for the base model)."""
    with torch.device("meta"):
        return layout_of(ALBEF(cfg.architecture_only()))


def _as_config(config) -> Config:
    if isinstance(config, Config):
        return copy.deepcopy(config)
    if isinstance(config, ModelConfig):
        return Config(model=copy.deepcopy(config))
    return load_config(config)


def _stored_config(cfg: Config) -> Config:
    """The config written with converted weights: the file holds every weight, so there is
    nothing pretrained to fetch and no checkpoint to start from."""
    cfg = copy.deepcopy(cfg)
    cfg.model = cfg.model.architecture_only()
    return cfg


def base_config() -> Config:
    """The config for released files that carry none: the paper's base model."""
    return load_config("base", BASE_RELEASE_OVERRIDES)


# ---- the in-memory form ------------------------------------------------------------------------

@dataclass
class Report:
    """What a conversion or a load did not take over one to one."""
    missing: list = field(default_factory=list)       # model keys the checkpoint lacks
    unexpected: list = field(default_factory=list)    # checkpoint keys the model lacks (dropped)
    notes: list = field(default_factory=list)         # resized, filled, skipped ...

    def lines(self) -> list:
        out = list(self.notes)
        if self.missing:
            out.append(f"{len(self.missing)} keys absent from the checkpoint (a model loading it keeps "
                       f"its own): {_some(self.missing)}")
        if self.unexpected:
            out.append(f"{len(self.unexpected)} keys of the checkpoint unknown to the model, ignored: "
                       + _some(self.unexpected))
        return out

    def then(self, later: "Report") -> "Report":
        """This report (of reading) followed by a later one (of loading, which recomputes missing)."""
        return Report(missing=later.missing, unexpected=self.unexpected + later.unexpected,
                      notes=self.notes + later.notes)


def _some(keys, n: int = 6) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n})" if len(keys) > n else "")


@dataclass
class Checkpoint:
    state_dict: dict          # OUR layout, conformed to `config`; tied copies left out
    config: Config
    kind: str                 # "training", "albef_ds" or "albef"
    source: str               # what was read (path, tag)
    report: Report = field(default_factory=Report)


def conform(state: dict, cfg: ModelConfig, source: str, layout: Optional[Layout] = None) -> tuple[dict, Report]:
    """`state` (our key names) made to fit the model of `cfg`.

    Position embeddings are resized to the configured resolution; queues of another size are
    dropped (they start afresh); a missing `idx_queue` is filled with -100 ("no image id", what a
    pretraining release implies); tied copies are folded into the key they share. Any other
    shape difference is an error naming the key. Keys the model lacks are dropped and reported."""
    layout = layout or model_layout(cfg)
    report = Report()
    state = from_released(state)
    for alias, target in layout.aliases.items():
        if alias in state:
            value = state.pop(alias)
            if target not in state:
                state[target] = value
            elif value.shape != state[target].shape or not torch.equal(value, state[target]):
                report.notes.append(f"{alias} differs from {target}, which the model ties it to: using {target}")
    report.unexpected = [k for k in state if k not in layout.shapes]
    for key in report.unexpected:
        del state[key]
    grid = (cfg.vision.img_size // cfg.vision.patch_size) ** 2 + 1
    for key in [k for k in state if k.endswith("pos_embed")]:
        value, want = state[key], layout.shapes[key]
        if value.shape != want and value.dim() == 3 and value.shape[-1] == want[-1]:
            state[key] = resize_pos_embed(value.float(), cfg.vision.img_size, cfg.vision.patch_size).to(value.dtype)
            report.notes.append(f"{key} resized from {value.shape[1]} to {grid} positions "
                                f"(img_size {cfg.vision.img_size})")
    wrong_queues = [k for k in layout.buffers if k in state and state[k].shape != layout.shapes[k]]
    if wrong_queues:
        report.notes.append(f"queues of another size ({tuple(state[wrong_queues[0]].shape)}, the model has "
                            f"{tuple(layout.shapes[wrong_queues[0]])}) dropped: they start afresh")
        for key in layout.buffers:
            state.pop(key, None)
    wrong = [(k, tuple(v.shape), tuple(layout.shapes[k])) for k, v in state.items() if v.shape != layout.shapes[k]]
    if wrong:
        raise ConversionError(f"{source}: shapes differ from the model's config: "
                              + "; ".join(f"{k} is {a} in the checkpoint, {b} in the model" for k, a, b in wrong[:5])
                              + (f" (+{len(wrong) - 5} more)" if len(wrong) > 5 else ""))
    if "idx_queue" in layout.shapes and "idx_queue" not in state and "image_queue" in state:
        state["idx_queue"] = torch.full(layout.shapes["idx_queue"], NO_IMAGE_ID, dtype=layout.dtypes["idx_queue"])
    for key, value in state.items():
        # a temp of dtype long, say, would load silently rounded; the checkpoint must agree in kind
        if value.is_floating_point() != layout.dtypes[key].is_floating_point:
            raise ConversionError(f"{source}: {key} has dtype {value.dtype}, the model {layout.dtypes[key]}")
    report.missing = [k for k in layout.keys if k not in state]
    core = [k for k in report.missing
            if not (layout.is_momentum(k) or k in layout.buffers or layout.is_optional_head(k))]
    if core:
        raise ConversionError(f"{source} lacks {len(core)} weights of the model: {_some(core)}")
    return state, report


def with_aliases(state: dict, layout: Layout) -> dict:
    """`state` plus every tied copy, as the model's own state_dict() has them."""
    out = {}
    for key in layout.shapes:
        source = layout.aliases.get(key, key)
        if source in state:
            out[key] = state[source]
    out.update({k: v for k, v in state.items() if k not in out})
    return out


# ---- reading ----------------------------------------------------------------------------------

def read_checkpoint(path: str, tag: Optional[str] = None, config=None) -> Checkpoint:
    """Any source (training folder, our file, released file) as a Checkpoint conformed to
    `config` (a shipped name, yaml path, dict, Config or ModelConfig); by default the config
    stored with the checkpoint, or the base config for released files that carry none."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConversionError(f"'{path}': no such file or folder")
    if os.path.isdir(path):
        state, stored, kind, source = _read_training(path, tag)
    else:
        if tag is not None:
            raise ConversionError(f"--tag names a checkpoint of a training folder; '{path}' is a file")
        state, stored, kind, source = _read_file(path)
    cfg = _as_config(config) if config is not None else stored
    state, report = conform(state, cfg.model, source)
    return Checkpoint(state_dict=state, config=_stored_config(cfg), kind=kind, source=source, report=report)


def _check_readable(path: str) -> None:
    """Missing or truncated files stop here, named, before DeepSpeed or torch.load get to them."""
    if not os.path.isfile(path):
        raise ConversionError(f"missing file: {path}")
    if os.path.getsize(path) == 0:
        raise ConversionError(f"empty file: {path}")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.infolist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise ConversionError(f"unreadable (truncated?) file: {path}: {exc}") from None
    elif _looks_like_torch_zip(path):
        raise ConversionError(f"truncated file: {path} (a torch archive without its end)")


def _starts_with(path: str, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def _looks_like_torch_zip(path: str) -> bool:
    return _starts_with(path, b"PK\x03\x04")


def _torch_load(path: str, trusted: bool = False):
    _check_readable(path)
    mmap = zipfile.is_zipfile(path)
    if not mmap and not _starts_with(path, b"\x80"):      # neither torch's zip nor its legacy pickle
        raise ConversionError(f"cannot read {path}: neither a torch file nor a safetensors file")
    try:
        if trusted:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as exc:
            if "weights only" not in str(exc).lower():
                raise
            warnings.warn(f"{path} holds objects other than tensors and plain containers: loading it "
                          "with weights_only=False (convert only files you trust)", stacklevel=3)
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except ConversionError:
        raise
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError ... on bad files
        raise ConversionError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None


# ---- single files: ours or the released layout --------------------------------------------------

def _is_safetensors(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < n <= os.path.getsize(path) - 8


def _read_file(path: str):
    _check_readable(path)
    if _is_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise ConversionError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
        if meta.get("format") == FORMAT:
            cfg = _config_from(json.loads(meta.get("config", "null")), path)
            for alias, target in json.loads(meta.get("aliases", "{}")).items():
                if target in tensors:
                    tensors[alias] = tensors[target]
            return tensors, cfg, FORMAT, path
        return _released(tensors, None, path)
    obj = _torch_load(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if not isinstance(obj.get("state_dict"), dict):
            raise ConversionError(f"{path}: an {FORMAT} file without its state_dict")
        return dict(obj["state_dict"]), _config_from(obj.get("config"), path), FORMAT, path
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return _released(obj["model"], obj.get(CONFIG_ENTRY), path)
    return _released(obj, None, path)


def _config_from(values, path: str) -> Config:
    if values is None:
        raise ConversionError(f"{path}: an {FORMAT} file without its config")
    try:
        return load_config(values)
    except ConfigError as exc:
        raise ConversionError(f"{path}: its stored config is invalid: {exc}") from None


def _released(state, config_values, path: str):
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())
            and all(isinstance(k, str) for k in state)
            and any(k.startswith("visual_encoder.") for k in state)
            and any(k.startswith("text_encoder.") for k in state)):
        shown = list(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise ConversionError(f"{path} is neither an {FORMAT} file nor an ALBEF checkpoint (a state dict, "
                              f"or {{'model': state dict}}, with visual_encoder.* and text_encoder.* "
                              f"weights); found {shown}")
    cfg = _config_from(config_values, path) if config_values is not None else base_config()
    return state, cfg, RELEASED, path          # conform() maps the released names


def from_released(state: dict) -> dict:
    """Released ALBEF key names -> ours: `bert.` infix restored where a fine-tuned release dropped
    it, position_ids (a constant) dropped, temp reshaped to [1]. Values are not copied."""
    out = {}
    for key, value in state.items():
        for prefix in TEXT_ENCODERS:
            if key.startswith(prefix) and not key.startswith((prefix + "bert.", prefix + "cls.")):
                key = prefix + "bert." + key[len(prefix):]
        if key.endswith("embeddings.position_ids"):
            continue
        if key == "temp":
            value = value.reshape(1)
        out[key] = value
    return out


def to_released(state: dict, layout: Layout) -> dict:
    """Our state dict -> the released layout: tied copies present, 0-d temp, position_ids added,
    idx_queue left out when it holds no image ids (as in the pretraining release)."""
    out = {}
    for key, value in with_aliases(state, layout).items():
        if key == "temp":
            value = value.reshape(())
        if key == "idx_queue" and bool((value == NO_IMAGE_ID).all()):
            continue
        out[key] = value
        if key.endswith("bert.embeddings.word_embeddings.weight"):
            positions = layout.shapes[key.replace("word_embeddings", "position_embeddings")][0]
            out[key.replace("word_embeddings.weight", "position_ids")] = torch.arange(positions).unsqueeze(0)
    return out


# ---- training checkpoint folders -----------------------------------------------------------------

OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def locate_training_checkpoint(path: str, tag: Optional[str] = None) -> tuple[str, str]:
    """(checkpoints folder, tag) for DIR, DIR/checkpoints or DIR/checkpoints/<tag>."""
    path = os.path.abspath(path)
    if any(n.endswith("_model_states.pt") for n in os.listdir(path)):      # a tag folder itself
        ckpt_dir, own = os.path.split(path)
        if tag is not None and tag != own:
            raise ConversionError(f"'{path}' is checkpoint '{own}', but --tag says '{tag}'")
        return ckpt_dir, own
    ckpt_dir = os.path.join(path, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        ckpt_dir = path
    tags = _tags(ckpt_dir)
    latest = os.path.join(ckpt_dir, checkpoint.LATEST)
    if tag is None:
        tag = checkpoint.latest_tag(ckpt_dir)
        if tag is None:
            if not tags:
                raise ConversionError(f"no training checkpoint in '{path}': no 'latest' file and no checkpoint "
                                      f"folders in '{ckpt_dir}'")
            raise ConversionError(f"'{ckpt_dir}' has no 'latest' file: name a checkpoint with --tag "
                                  f"(there: {', '.join(tags)})")
        if not os.path.isdir(os.path.join(ckpt_dir, tag)):
            raise ConversionError(f"'{latest}' names checkpoint '{tag}', which is not in '{ckpt_dir}'")
    elif not tag or os.sep in tag or tag in (".", "..") or not os.path.isdir(os.path.join(ckpt_dir, tag)):
        raise ConversionError(f"no checkpoint tag '{tag}' in '{ckpt_dir}' (there: {', '.join(tags) or 'none'})")
    return ckpt_dir, tag


def _tags(ckpt_dir: str) -> list:
    """Sub-folders that hold a DeepSpeed checkpoint."""
    return sorted(n for n in os.listdir(ckpt_dir) if os.path.isdir(os.path.join(ckpt_dir, n))
                  and any(f.endswith("_model_states.pt") for f in os.listdir(os.path.join(ckpt_dir, n))))


def _read_training(path: str, tag: Optional[str]):
    ckpt_dir, tag = locate_training_checkpoint(path, tag)
    folder = os.path.join(ckpt_dir, tag)
    source = f"checkpoint '{tag}' in {ckpt_dir}"
    candidates = [os.path.join(folder, n) for n in ("mp_rank_00_model_states.pt",
                                                   "zero_pp_rank_0_mp_rank_00_model_states.pt")]
    states_file = next((p for p in candidates if os.path.isfile(p)), None)
    if states_file is None:
        raise ConversionError(f"{source}: missing file: no DeepSpeed model states "
                              f"({' or '.join(candidates)})")
    states = _torch_load(states_file, trusted=True)
    if not isinstance(states, dict) or "config" not in states:
        raise ConversionError(f"{states_file} holds no 'config' in its client state: not written by the "
                              "ALBEF-DS trainer")
    cfg = _config_from(states["config"], states_file)
    stage = int(((states.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0))
    world = int(states.get("dp_world_size") or 1)
    layout = model_layout(cfg.model)

    present = os.listdir(folder)
    optim = {int(m.group(1)): os.path.join(folder, n) for n in present if (m := OPTIM_FILE.match(n))}
    needed = [checkpoint.rank_file(folder, 0)]
    if stage >= 1:
        needed += [optim.get(r, os.path.join(folder, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
                   for r in range(world)]
    if stage == 3:
        needed += [os.path.join(folder, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt") for r in range(world)]
        needed += [checkpoint.rank_file(folder, r) for r in range(1, world)]
    missing = [p for p in needed if not os.path.isfile(p)]
    if missing:
        raise ConversionError(f"{source} is incomplete (written by {world} ranks, ZeRO stage {stage}): "
                              f"missing file{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    for p in needed:
        _check_readable(p)

    queues = states.get("queues") or {}
    if stage == 0:
        online = dict(states["module"])       # no ZeRO: DeepSpeed saved the module as trained
    else:
        online = _deepspeed_fp32_weights(ckpt_dir, tag, source)
    del states
    momentum = _merge_momentum(folder, world, stage == 3, layout)

    state = {}
    for key in layout.keys:
        if key in layout.buffers:
            if key not in queues:
                raise ConversionError(f"{source}: the client state lacks the queue '{key}'")
            state[key] = queues[key]
        elif key in momentum:
            state[key] = momentum[key]
        elif key in online:
            state[key] = online[key]
        else:
            raise ConversionError(f"{source}: the consolidated weights lack '{key}'")
    extra = [k for k in online if k not in layout.shapes]
    if extra:
        raise ConversionError(f"{source}: weights the saved config's model lacks: {_some(extra)}")
    return state, cfg, "training", source


def _deepspeed_fp32_weights(ckpt_dir: str, tag: str, source: str) -> dict:
    """The fp32 master weights (and buffers), by DeepSpeed's own consolidation."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    except Exception as exc:
        raise ConversionError(f"{source}: DeepSpeed could not consolidate the weights: "
                              f"{type(exc).__name__}: {exc}") from None


def _merge_momentum(folder: str, world: int, partitioned: bool, layout: Layout) -> dict:
    """The fp32 momentum weights by name. Whole tensors from rank 0's file, or (ZeRO-3) every
    rank's flat partition of each parameter, ceil(numel / world) elements padded at the end."""
    names = layout.momentum_names
    ranks = range(world) if partitioned else range(1)
    values = []
    for r in ranks:
        path = checkpoint.rank_file(folder, r)
        rank_state = _torch_load(path, trusted=True)
        tensors = rank_state.get("momentum") if isinstance(rank_state, dict) else None
        if tensors is None:
            raise ConversionError(f"{path} holds no momentum weights")
        if len(tensors) != len(names):
            raise ConversionError(f"{path} holds {len(tensors)} momentum tensors, the model {len(names)}")
        values.append(tensors)
    merged = {}
    for i, name in enumerate(names):
        shape = layout.shapes[name]
        numel = shape.numel()
        if not partitioned:
            value = values[0][i]
            if value.numel() != numel:
                raise ConversionError(f"{checkpoint.rank_file(folder, 0)}: momentum tensor {i} ({name}) has "
                                      f"{value.numel()} elements, the model {numel}")
            merged[name] = value.float().reshape(shape)
            continue
        part = math.ceil(numel / world)
        for r in ranks:
            if values[r][i].numel() != part:
                raise ConversionError(f"{checkpoint.rank_file(folder, r)}: momentum partition of {name} has "
                                      f"{values[r][i].numel()} elements, expected {part} ({numel} over "
                                      f"{world} ranks)")
        merged[name] = torch.cat([v[i].reshape(-1) for v in values]).float()[:numel].reshape(shape)
    return merged


# ---- writing ----------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ConversionError(f"dtype '{dtype}': choose one of {', '.join(DTYPES)}")


def _check_released_name(path: str) -> None:
    if os.fspath(path).endswith(".safetensors"):
        raise ConversionError(f"'{path}': the released ALBEF layout is a torch file (ALBEF reads it with "
                              "torch.load); name the output .pt or .pth")


def prepare(state: dict, layout: Layout, momentum: bool = True, dtype: str = "fp32") -> dict:
    """Drops the momentum model and queues (momentum=False), then casts. bf16 casts the online
    floating weights only: the momentum weights and the feature queues stay fp32, the precision
    the trainer keeps them in (a 0.005-sized EMA step rounds away in bf16)."""
    _check_dtype(dtype)
    if not momentum:
        state = {k: v for k, v in state.items() if not (layout.is_momentum(k) or k in layout.buffers)}
    target = DTYPES[dtype]
    return {k: v.to(target) if v.is_floating_point() and not (layout.is_momentum(k) or k in layout.buffers)
            else v for k, v in state.items()}


def _atomic_write(path: str, write) -> None:
    """write(tmp) to a temporary name next to `path`, then rename: no partial file on failure."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_albef_ds(path: str, state: dict, config: Config, layout: Layout) -> None:
    """Our single file: torch.save({"format", "format_version", "config", "state_dict"}), or, for a
    .safetensors name, the tensors with metadata {"format", "format_version", "config" (JSON),
    "aliases" (JSON: tied key -> key stored)}. The torch file's state_dict has every key of the
    model's state_dict() present in the file (tied copies share their tensor), so it also loads with
    plain load_state_dict."""
    config_dict = _stored_config(config).to_dict()
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
        aliases = {a: t for a, t in layout.aliases.items() if t in tensors}
        meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "config": json.dumps(config_dict),
                "aliases": json.dumps(aliases)}
        _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    else:
        obj = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config_dict,
               "state_dict": with_aliases(state, layout)}
        _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_released(path: str, state: dict, config: Config, layout: Layout) -> None:
    """The released ALBEF layout, {"model": state_dict}; our config rides along under
    "albef_ds_config" (ALBEF's loaders read only "model")."""
    _check_released_name(path)
    obj = {"model": to_released(state, layout), CONFIG_ENTRY: _stored_config(config).to_dict()}
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def convert(input: str, output: str, to: str = FORMAT, tag: Optional[str] = None, momentum: bool = True,
            dtype: str = "fp32", config=None) -> Checkpoint:
    """Reads any source and writes `output` in our format (to="albef_ds") or the released layout
    (to="albef"). Every check runs before anything is written; the output appears whole or not at
    all. Returns the Checkpoint that was written (its state dict before dropping and casting)."""
    if to not in (FORMAT, RELEASED):
        raise ConversionError(f"--to '{to}': choose {FORMAT} or {RELEASED}")
    _check_dtype(dtype)             # the output's checks first: reading a checkpoint takes long
    if to == RELEASED:
        _check_released_name(output)
    ckpt = read_checkpoint(input, tag=tag, config=config)
    layout = model_layout(ckpt.config.model)
    state = prepare(ckpt.state_dict, layout, momentum=momentum, dtype=dtype)
    (save_released if to == RELEASED else save_albef_ds)(os.fspath(output), state, ckpt.config, layout)
    return ckpt


# ---- loading into a model -------------------------------------------------------------------------

def load_state(model: ALBEF, state: dict, source: str = "checkpoint", fill_momentum: bool = True) -> Report:
    """Loads a state dict in our or the released key names into `model`: strict about shapes (after
    resizing pos_embed to the model's resolution), lenient about what releases lack (momentum
    weights: copied from the online ones; queues: kept; idx_queue; the MLM head of fine-tuned
    releases: kept). Returns what was not loaded one to one."""
    layout = layout_of(model)
    state, report = conform(state, model.cfg, source, layout)
    model.load_state_dict(state, strict=False)
    absent = [k for k in report.missing if layout.is_momentum(k)]
    if absent and fill_momentum:
        values = model.state_dict()
        with torch.no_grad():
            for key in absent:
                values[key].copy_(values[layout.online_name(key)])
        report.notes.append(f"{len(absent)} momentum weights absent: copied from the online weights")
        report.missing = [k for k in report.missing if k not in absent]
    return report


def init_from_checkpoint(model: ALBEF, path: str) -> Report:
    """model.init_checkpoint: our file, a released ALBEF file or a training folder, loaded into a
    freshly built model (reported on rank 0)."""
    from . import distributed

    ckpt = read_checkpoint(path, config=model.cfg)
    report = ckpt.report.then(load_state(model, ckpt.state_dict, ckpt.source))
    if distributed.rank() == 0:
        print(f"model.init_checkpoint: loaded {ckpt.source} ({ckpt.kind})", flush=True)
        for line in report.lines():
            print(f"  {line}", flush=True)
    return report


def strip_momentum(model: ALBEF) -> ALBEF:
    """Removes the momentum encoders and the queues (inference only: forward() needs them)."""
    layout = layout_of(model)
    for prefix in layout.momentum_prefixes:
        delattr(model, prefix.rstrip("."))
    for name in layout.buffers:
        delattr(model, name)
    return model


def load_model(path: str, config=None, device: Union[str, torch.device] = "cpu", momentum: bool = True,
               tag: Optional[str] = None) -> ALBEF:
    """The plain-PyTorch ALBEF of a converted file, a released ALBEF file or a training folder,
    in eval mode on `device`.

    config: None for the config stored with the checkpoint (the shipped `base` config for
    released files without one), else a shipped name, yaml path, dict, Config or ModelConfig;
    pos_embed is resized to its resolution. momentum=False drops the momentum encoders and queues
    (half the memory; the inference API does not use them). What the file lacks (the MLM head of a
    fine-tuned release, ...) keeps its initialisation and is reported as a warning."""
    ckpt = read_checkpoint(path, tag=tag, config=config)
    model = ALBEF(ckpt.config.model.architecture_only())
    layout = layout_of(model)
    state = ckpt.state_dict if momentum else prepare(ckpt.state_dict, layout, momentum=False)
    report = ckpt.report.then(load_state(model, state, ckpt.source, fill_momentum=momentum))
    if not momentum:
        strip_momentum(model)
        report.missing = [k for k in report.missing if not (layout.is_momentum(k) or k in layout.buffers)]
    for line in report.lines():
        warnings.warn(f"{ckpt.source}: {line}", stacklevel=2)
    return model.to(device).eval()
