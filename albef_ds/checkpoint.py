"""Training checkpoints: DeepSpeed's own save/load, plus what DeepSpeed does not keep.

Layout under `checkpoints/`:
    <tag>/                   DeepSpeed's files (model states, ZeRO optimizer shards)
    <tag>/albef_rank<R>.pt   per-rank state: data-stream position, RNG states, momentum partition
                             (ZeRO-3; with whole weights only rank 0 writes the momentum model)
    latest                   the newest complete tag; moved only after every rank finished writing
    best.json                {"tag", "metric", "value"} of the best evaluation (retrieval fine-tuning)

A save that dies half-way leaves `latest` on the previous tag, which stays loadable. The newest
`keep_last` tags are kept.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch

from . import distributed
from .config import ConfigError

LATEST = "latest"
BEST = "best.json"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rank_file(folder: str, rank: int) -> str:
    """A tag folder's per-rank state file of `rank`."""
    return os.path.join(folder, f"albef_rank{rank}.pt")


RANK_FILE = re.compile(r"albef_rank\d+\.pt")      # every name rank_file() gives


def _atomic_torch_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, ckpt_dir: str, step: int, client_state: dict, rank_state: dict, momentum, keep_last: int) -> str:
    """Saves on every rank (a collective); returns the tag."""
    tag = tag_for(step)
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    rank = distributed.rank()
    if momentum.partitioned() or rank == 0:
        rank_state = {**rank_state, "momentum": momentum.local_state()}
    _atomic_torch_save(rank_state, rank_file(os.path.join(ckpt_dir, tag), rank))
    distributed.barrier()
    if rank == 0:
        tmp = os.path.join(ckpt_dir, f"{LATEST}.tmp")
        with open(tmp, "w") as f:
            f.write(tag)
        os.replace(tmp, os.path.join(ckpt_dir, LATEST))
        _prune(ckpt_dir, keep_last, keep=tag)
    distributed.barrier()
    return tag


def _prune(ckpt_dir: str, keep_last: int, keep: str) -> None:
    """Removes all but the newest keep_last tags; the best evaluated tag is always kept."""
    tags = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step") and os.path.isdir(os.path.join(ckpt_dir, d)))
    best = best_tag(ckpt_dir)
    for old in tags[:-keep_last] if keep_last > 0 else []:
        if old not in (keep, best):
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)


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


def check_resumable(ckpt_dir: str, tag: str) -> None:
    """Before anything is built: the tag exists and was written by as many ranks as this run has."""
    folder = os.path.join(ckpt_dir, tag)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no checkpoint '{tag}' in {ckpt_dir}")
    world = distributed.world_size()
    written = sum(1 for name in os.listdir(folder) if RANK_FILE.fullmatch(name))
    if written != world:
        # The data streams' positions, and under ZeRO-3 the momentum partitions, are per rank.
        raise ConfigError(f"checkpoint {folder} was written by {written} ranks and this run has {world}: "
                          f"resume with {written} ranks, or convert it (tools/convert_checkpoint.py) "
                          f"and start a new run from it with model.init_checkpoint")


def load(engine, ckpt_dir: str, tag: str, momentum) -> tuple[dict, dict]:
    """Loads a tag (checked by check_resumable) on every rank; returns (client_state, this rank's state)."""
    folder = os.path.join(ckpt_dir, tag)
    own_file = rank_file(folder, distributed.rank())
    if not os.path.isfile(own_file):
        raise FileNotFoundError(f"{own_file} is missing: checkpoint '{tag}' is incomplete")
    path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint '{tag}' from {ckpt_dir}")
    rank_state = torch.load(own_file, weights_only=False)
    momentum_file = own_file if momentum.partitioned() else rank_file(folder, 0)
    values = rank_state["momentum"] if "momentum" in rank_state else torch.load(
        momentum_file, weights_only=False)["momentum"]
    momentum.load_local_state(values)
    return client_state, rank_state
