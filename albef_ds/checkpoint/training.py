"""Training checkpoints: the writer (every rank at a save), the reader that resumes a run, and the
reader that consolidates a run into one state dict, side by side.

Layout under `checkpoints/`:
    <tag>/                   DeepSpeed's files (model states, ZeRO optimizer shards)
    <tag>/albef_rank<R>.pt   per-rank state: data-stream position, RNG states, momentum partition
                             (ZeRO-3; with whole weights only rank 0 writes the momentum model)
    <tag>/run.json           what a resume checks first: the ranks, batch and config that saved it
    <tag>/universal/         the tag as DeepSpeed's universal checkpoint, made when a run on another
                             number of ranks resumes it (albef_ds.checkpoint.elastic)
    latest                   the newest complete tag; moved only after every rank finished writing
    best.json                {"tag", "metric", "value"} of the best evaluation

The client state of DeepSpeed's model-states file holds the shared stateful parts (the trainer's
counters, the task's checkpoint buffers: albef_ds.engine.state), each rank's file its per-rank
parts (RNG, data position) and the momentum model (the momentum model is saved here, beside
DeepSpeed's engine, because it is sharded like the online weights). A save that dies half-way
leaves `latest` on the previous tag, which stays loadable. The newest `keep_last` tags are kept.

Consolidation: the online weights are DeepSpeed's fp32 master weights, consolidated by DeepSpeed's
own `zero_to_fp32`; the momentum weights come from our rank files (fp32, the EMA's training
precision; ZeRO-3 partitions are merged here); the buffers and the config from the client state.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
import os
import re
import shutil
from typing import Mapping, Optional

import torch

from .. import distributed
from ..config import Config, ConfigError, load_config
from ..fileio import ConversionError, atomic_torch_save, atomic_write, check_readable, torch_load
from .layout import Layout, model_layout, some
from .manifest import has_manifest, verify, write_manifest

LATEST = "latest"
BEST = "best.json"
RUN_INFO = "run.json"
RUN_FORMAT = 2              # run.json's "format" from when a tag has a manifest (albef_ds.checkpoint.manifest)
EVALUATION = "evaluation.json"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rank_file(folder: str, rank: int) -> str:
    """A tag folder's per-rank state file of `rank`."""
    return os.path.join(folder, f"albef_rank{rank}.pt")


RANK_FILE = re.compile(r"albef_rank\d+\.pt")      # every name rank_file() gives


# What DeepSpeed's own checkpoint files hold beyond tensors and plain containers: its loss scaler,
# the ZeRO stage (an enum) and partition addresses (numbers), no code. Reading a training folder
# allows these and nothing else.
DEEPSPEED_STATE_CLASSES = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                           "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                           "deepspeed.runtime.zero.config.ZeroStageEnum",
                           "deepspeed.utils.tensor_fragment.fragment_address")


def deepspeed_state_classes() -> tuple:
    distributed.import_deepspeed()
    return tuple(getattr(importlib.import_module(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1])
                 for name in DEEPSPEED_STATE_CLASSES)


def save(engine, ckpt_dir: str, step: int, shared: Mapping, per_rank: Mapping, momentum, keep_last: int,
         run_info: dict) -> str:
    """Saves on every rank (a collective); returns the tag. `shared` / `per_rank`: the stateful
    parts by name (albef_ds.engine.state); the shared parts' states together form DeepSpeed's
    client state, the per-rank ones this rank's file. `run_info`: {"world_size", "batch_size",
    "grad_accum", "config"}, written by rank 0 as run.json."""
    tag = tag_for(step)
    client_state = {}
    for part in shared.values():
        client_state.update(part.state_dict())
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    rank = distributed.rank()
    rank_state = {name: part.state_dict() for name, part in per_rank.items()}
    if momentum.partitioned() or rank == 0:
        rank_state["momentum"] = momentum.local_state()
    atomic_torch_save(rank_state, rank_file(os.path.join(ckpt_dir, tag), rank))
    if rank == 0:
        text = json.dumps({**run_info, "format": RUN_FORMAT})
        atomic_write(os.path.join(ckpt_dir, tag, RUN_INFO), lambda tmp: open(tmp, "w").write(text))
    distributed.barrier()
    write_manifest(os.path.join(ckpt_dir, tag))         # last: a tag with its manifest is complete
    if rank == 0:
        tmp = os.path.join(ckpt_dir, f"{LATEST}.tmp")
        with open(tmp, "w") as f:
            f.write(tag)
        os.replace(tmp, os.path.join(ckpt_dir, LATEST))
        _prune(ckpt_dir, keep_last, keep=tag)
    distributed.barrier()
    return tag


def tags(ckpt_dir: str) -> list[str]:
    """The checkpoint tags (step folders) in a checkpoints folder, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(d for d in os.listdir(ckpt_dir) if re.fullmatch(r"step\d+", d)
                  and os.path.isdir(os.path.join(ckpt_dir, d)))


def _prune(ckpt_dir: str, keep_last: int, keep: str) -> None:
    """Removes all but the newest keep_last tags; the best evaluated tag is always kept."""
    saved = tags(ckpt_dir)
    best = best_tag(ckpt_dir)
    for old in saved[:-keep_last] if keep_last > 0 else []:
        if old not in (keep, best):
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)


def record_evaluation(ckpt_dir: str, tag: str, metrics: dict) -> None:
    """The evaluation of a saved tag's weights, kept with it as `<tag>/evaluation.json` (rank 0
    writes, atomically): the tag is saved before it is evaluated, so a resume knows whether that
    evaluation finished."""
    if distributed.rank() == 0:
        text = json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
        atomic_write(os.path.join(ckpt_dir, tag, EVALUATION), lambda tmp: open(tmp, "w").write(text))
    distributed.barrier()


def read_evaluation(ckpt_dir: str, tag: str) -> Optional[dict]:
    """A tag's recorded evaluation, or None (not evaluated, or its evaluation did not finish)."""
    try:
        with open(os.path.join(ckpt_dir, tag, EVALUATION)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def mark_best(ckpt_dir: str, tag: str, metric: str, value: float) -> None:
    """Records `tag` as the best checkpoint by `metric` (rank 0 writes, atomically)."""
    if distributed.rank() == 0:
        tmp = os.path.join(ckpt_dir, f"{BEST}.tmp")
        with open(tmp, "w") as f:
            json.dump({"tag": tag, "metric": metric, "value": value}, f)
        os.replace(tmp, os.path.join(ckpt_dir, BEST))
    distributed.barrier()


def best_tag(ckpt_dir: str):
    path = os.path.join(ckpt_dir, BEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)["tag"]


def latest_tag(ckpt_dir: str):
    path = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip()


def read_run_info(ckpt_dir: str, tag: str) -> dict:
    path = os.path.join(ckpt_dir, tag, RUN_INFO)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"checkpoint {os.path.join(ckpt_dir, tag)} is incomplete: cannot read {path}: "
                          f"{exc}") from None


def load(engine, ckpt_dir: str, tag: str, momentum, shared: Mapping, per_rank: Mapping) -> None:
    """Loads a tag saved by as many ranks as this run has (checked by
    albef_ds.checkpoint.elastic.check_resumable) on every rank, the stateful parts too."""
    folder = os.path.join(ckpt_dir, tag)
    own_file = rank_file(folder, distributed.rank())
    if not os.path.isfile(own_file):
        raise FileNotFoundError(f"{own_file} is missing: checkpoint '{tag}' is incomplete")
    path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint '{tag}' from {ckpt_dir}")
    rank_state = torch_load(own_file)
    momentum_file = own_file if momentum.partitioned() else rank_file(folder, 0)
    values = rank_state["momentum"] if "momentum" in rank_state else torch_load(momentum_file)["momentum"]
    momentum.load_local_state(values)
    for part in shared.values():
        part.load_state_dict(client_state)
    for name, part in per_rank.items():
        part.load_state_dict(rank_state[name])


# ---- consolidation: a training folder as one state dict --------------------------------------------

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
    there = _deepspeed_tags(ckpt_dir)
    latest = os.path.join(ckpt_dir, LATEST)
    if tag is None:
        tag = latest_tag(ckpt_dir)
        if tag is None:
            if not there:
                raise ConversionError(f"no training checkpoint in '{path}': no 'latest' file and no checkpoint "
                                      f"folders in '{ckpt_dir}'")
            raise ConversionError(f"'{ckpt_dir}' has no 'latest' file: name a checkpoint with --tag "
                                  f"(there: {', '.join(there)})")
        if not os.path.isdir(os.path.join(ckpt_dir, tag)):
            raise ConversionError(f"'{latest}' names checkpoint '{tag}', which is not in '{ckpt_dir}'")
    elif not tag or os.sep in tag or tag in (".", "..") or not os.path.isdir(os.path.join(ckpt_dir, tag)):
        raise ConversionError(f"no checkpoint tag '{tag}' in '{ckpt_dir}' (there: {', '.join(there) or 'none'})")
    return ckpt_dir, tag


def _deepspeed_tags(ckpt_dir: str) -> list:
    """Sub-folders that hold a DeepSpeed checkpoint."""
    return sorted(n for n in os.listdir(ckpt_dir) if os.path.isdir(os.path.join(ckpt_dir, n))
                  and any(f.endswith("_model_states.pt") for f in os.listdir(os.path.join(ckpt_dir, n))))


def read_training(path: str, tag: Optional[str] = None, trusted: bool = False) -> tuple[dict, Config, str]:
    """(state dict in our layout, the run's config, a description of the source) of a training
    checkpoint: DIR, DIR/checkpoints or DIR/checkpoints/<tag>; the tag `latest` names by default.
    Every file is unpickled weights-only first (DEEPSPEED_STATE_CLASSES allowed), unless `trusted`:
    DeepSpeed's consolidation, which reads them again without that check, then meets no surprise."""
    ckpt_dir, tag = locate_training_checkpoint(path, tag)
    folder = os.path.join(ckpt_dir, tag)
    source = f"checkpoint '{tag}' in {ckpt_dir}"
    problems = verify(folder, split=False) if has_manifest(folder) else []
    if problems:
        older = [t for t in tags(ckpt_dir) if t < tag and has_manifest(os.path.join(ckpt_dir, t))]
        raise ConversionError(f"{source} fails its check: {problems[0]}"
                              + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                              + (f"; an older checkpoint: --tag {older[-1]}" if older else ""))
    candidates = [os.path.join(folder, n) for n in ("mp_rank_00_model_states.pt",
                                                   "zero_pp_rank_0_mp_rank_00_model_states.pt")]
    states_file = next((p for p in candidates if os.path.isfile(p)), None)
    if states_file is None:
        raise ConversionError(f"{source}: missing file: no DeepSpeed model states "
                              f"({' or '.join(candidates)})")
    allowed = deepspeed_state_classes()
    states = torch_load(states_file, trusted, allowed)
    if not isinstance(states, dict) or "step" not in states:
        raise ConversionError(f"{states_file} holds no trainer state in its client state: not written by the "
                              "ALBEF-DS trainer")
    run_info = os.path.join(folder, RUN_INFO)
    if os.path.isfile(run_info):
        try:
            with open(run_info) as f:
                cfg = stored_config(json.load(f).get("config"), run_info)
        except (OSError, ValueError) as exc:
            raise ConversionError(f"cannot read {run_info}: {exc}") from None
    else:      # written before run.json existed: the config was in the client state
        cfg = stored_config(states.get("config"), states_file)
    stage = int(((states.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0))
    world = int(states.get("dp_world_size") or 1)
    layout = model_layout(cfg)

    present = os.listdir(folder)
    optim = {int(m.group(1)): os.path.join(folder, n) for n in present if (m := OPTIM_FILE.match(n))}
    needed = [rank_file(folder, 0)]
    if stage >= 1:
        needed += [optim.get(r, os.path.join(folder, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
                   for r in range(world)]
    if stage == 3:
        needed += [os.path.join(folder, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt") for r in range(world)]
        needed += [rank_file(folder, r) for r in range(1, world)]
    missing = [p for p in needed if not os.path.isfile(p)]
    if missing:
        raise ConversionError(f"{source} is incomplete (written by {world} ranks, ZeRO stage {stage}): "
                              f"missing file{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    for p in needed:
        check_readable(p)
    if not trusted:
        for p in needed:
            torch_load(p, allowed=allowed)

    buffers = states.get("buffers") or {}
    if stage == 0:
        online = dict(states["module"])       # no ZeRO: DeepSpeed saved the module as trained
    else:
        online = _deepspeed_fp32_weights(ckpt_dir, tag, source)
    del states
    momentum = merge_momentum(folder, world, stage == 3, layout, trusted)

    state = {}
    for key in layout.keys:
        if key in layout.buffers:
            if key not in buffers:
                raise ConversionError(f"{source}: the client state lacks the buffer '{key}'")
            state[key] = buffers[key]
        elif key in momentum:
            state[key] = momentum[key]
        elif key in online:
            state[key] = online[key]
        else:
            raise ConversionError(f"{source}: the consolidated weights lack '{key}'")
    extra = [k for k in online if k not in layout.shapes]
    if extra:
        raise ConversionError(f"{source}: weights the saved config's model lacks: {some(extra)}")
    return state, cfg, source


def _deepspeed_fp32_weights(ckpt_dir: str, tag: str, source: str) -> dict:
    """The fp32 master weights (and buffers), by DeepSpeed's own consolidation."""
    distributed.import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    except Exception as exc:
        raise ConversionError(f"{source}: DeepSpeed could not consolidate the weights: "
                              f"{type(exc).__name__}: {exc}") from None


def merge_momentum(folder: str, world: int, partitioned: bool, layout: Layout, trusted: bool) -> dict:
    """The fp32 momentum weights by name. Whole tensors from rank 0's file, or (ZeRO-3) every
    rank's flat partition of each parameter, ceil(numel / world) elements padded at the end."""
    names = layout.momentum_names
    ranks = range(world) if partitioned else range(1)
    values = []
    for r in ranks:
        path = rank_file(folder, r)
        rank_state = torch_load(path, trusted)
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
                raise ConversionError(f"{rank_file(folder, 0)}: momentum tensor {i} ({name}) has "
                                      f"{value.numel()} elements, the model {numel}")
            merged[name] = value.float().reshape(shape)
            continue
        part = math.ceil(numel / world)
        for r in ranks:
            if values[r][i].numel() != part:
                raise ConversionError(f"{rank_file(folder, r)}: momentum partition of {name} has "
                                      f"{values[r][i].numel()} elements, expected {part} ({numel} over "
                                      f"{world} ranks)")
        merged[name] = torch.cat([v[i].reshape(-1) for v in values]).float()[:numel].reshape(shape)
    return merged




def stored_config(values, path: str) -> Config:
    """The config stored with a checkpoint (ConversionError naming the file if absent or invalid)."""
    if values is None:
        raise ConversionError(f"{path}: the file stores no config")
    try:
        return load_config(values)
    except ConfigError as exc:
        raise ConversionError(f"{path}: its stored config is invalid: {exc}") from None
