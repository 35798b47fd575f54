"""Indexing a collection, split over ranks: every rank takes its share of the parts not yet
written, encodes each alone and writes it; rank 0 then joins them into the index (features, rows,
faiss indexes, the manifest last).

Which rank encodes a part changes nothing in it (a part's batches are the same on any number of
ranks), so the index is the same from 1 or N ranks. A rerun after a failure keeps the parts written
before it and deals out only the missing ones; the plan (the model's identity, the data, the
settings) written beside the parts must match, so parts of another run are never mixed in.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from .. import distributed as dist
from ..config import ConfigError
from . import ann, store
from .collection import Collection, part_rows
from .features import Progress, encode_part

# settings that change what an index holds, and so must match for a rerun to go on
PLAN_KEYS = ("identity", "data", "parts", "batch_size", "part_size", "img_size", "max_tokens", "max_words", "kind")


def make_plan(collection: Collection, identity: str, img_size: int, max_tokens: int, max_words: int,
              batch_size: int, part_size: int, kind: str) -> dict:
    return {"format": store.FORMAT, "version": store.VERSION, "identity": identity, "data": collection.spec,
            "parts": len(collection.parts), "batch_size": batch_size,
            "part_size": None if collection.spec["kind"] == "shards" else part_size, "img_size": img_size,
            "max_tokens": max_tokens, "max_words": max_words, "kind": kind}


def _differences(old: dict, new: dict) -> str:
    keys = [k for k in PLAN_KEYS + ("format", "version") if old.get(k) != new.get(k)]
    return ", ".join(f"{k} {old.get(k)!r} (now {new.get(k)!r})" if k != "identity" else "another model"
                     for k in keys)


def check_output(output_dir: str, plan: dict) -> str:
    """What to do in output_dir: "new", "resume" (parts of this plan are there) or "done" (an index
    of this plan is there). ValueError when it holds another index, unfinished work of another
    plan, files of something else, or cannot be written to; nothing is touched."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError("exists and is not a folder")
    manifest = store.read_manifest(output_dir)
    if manifest is not None:
        if manifest.get("plan") != plan:
            raise ValueError(f"holds an index made otherwise: {_differences(manifest.get('plan', {}), plan)}; "
                             "choose another --output_dir, or remove that index")
        return "done"
    old = store.read_plan(output_dir)
    if old is None and os.path.isdir(output_dir) and os.listdir(output_dir):
        raise ValueError("is not empty and holds no index: choose a new or empty folder")
    if old is not None and old != plan:
        raise ValueError(f"holds an unfinished index made otherwise: {_differences(old, plan)}; rerun it with "
                         "its own settings to finish it, or choose another --output_dir")
    parent = output_dir if os.path.isdir(output_dir) else os.path.dirname(os.path.abspath(output_dir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{parent} cannot be written to")
    return "resume" if old is not None else "new"


def build_index(model, collection: Collection, tokenizer, output_dir: str, plan: dict, checkpoint: dict,
                workers: int = 0, progress_every: float = 30.0) -> Optional[dict]:
    """Call on every rank (or in one process). Returns the manifest on rank 0, None elsewhere.
    ConfigError (rank 0) when no image of the collection could be read."""
    rank, world = dist.rank(), dist.world_size()
    done = store.done_parts(output_dir)
    missing = [p for p in collection.parts if p.number not in done]
    if rank == 0:                          # before any part: parts never lie in a folder without their plan
        store.write_plan(output_dir, plan)
    dist.barrier()                         # every rank knows what is missing before a part is written
    if rank == 0:
        if done:
            print(f"index {output_dir}: {len(done)} of {len(collection.parts)} parts already written, "
                  f"{len(missing)} to go", flush=True)
    mine = missing[rank::world]
    progress = Progress(f"rank {rank}" if world > 1 else "index", len(mine), progress_every)
    was_training = model.training
    model.eval()
    try:
        for part in mine:
            rows, problems = part_rows(part)
            features = encode_part(model, rows, tokenizer, plan["img_size"], plan["max_tokens"], plan["max_words"],
                                   plan["batch_size"], workers,
                                   lambda done_: progress.batch(part.label, done_, len(rows)))
            features.unreadable += problems
            store.write_part(output_dir, part.number, features)
            progress.part_done(part.label, len(features.rows), len(features.unreadable))
    finally:
        model.train(was_training)
    dist.barrier()                         # every part is written
    if rank != 0:
        return None
    return _join(output_dir, plan, checkpoint, len(collection.parts), model.cfg.embed_dim)


def _join(output_dir: str, plan: dict, checkpoint: dict, parts: int, dim: int) -> dict:
    counts = store.merge_parts(output_dir, parts, dim)
    if counts["images"] == 0:
        sources = plan["data"]["sources"]
        more = f" (and {len(sources) - 1} more)" if len(sources) > 1 else ""
        raise ConfigError(f"no image of {sources[0]}{more} could be read: {counts['unreadable']} unreadable, "
                          f"listed in {os.path.join(output_dir, store.UNREADABLE)}")
    specs = {}
    for what, features_file, ann_file, count in (("images", store.IMAGE_FEATURES, store.IMAGE_ANN, counts["images"]),
                                                 ("texts", store.TEXT_FEATURES, store.TEXT_ANN, counts["texts"])):
        if count == 0:
            specs[what] = None
            continue
        specs[what] = ann.choose(count, plan["kind"])
        print(f"index {output_dir}: building the {specs[what]['kind']} index of {count} {what}", flush=True)
        features = np.load(os.path.join(output_dir, features_file), mmap_mode="r")
        ann.write(ann.build(features, specs[what]), os.path.join(output_dir, ann_file))
    manifest = {"format": store.FORMAT, "version": store.VERSION, "plan": plan, "checkpoint": checkpoint,
                "dim": dim, "counts": counts, "ann": specs}
    store.finish(output_dir, manifest)
    return manifest
