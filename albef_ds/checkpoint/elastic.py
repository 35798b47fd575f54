"""Resuming a training checkpoint: the checks before anything is built, and taking over a checkpoint
saved on another number of ranks.

What a checkpoint saved on N ranks holds per rank, and how a run on N' ranks takes it over:
- DeepSpeed's weights, fp32 masters and Adam moments (partitioned over the N ranks under ZeRO):
  the tag is converted once into DeepSpeed's universal checkpoint (a folder per parameter: fp32
  value, exp_avg, exp_avg_sq, step) by DeepSpeed's own converter, into `<tag>/universal`, by rank
  0, atomically (written under a temporary name, then renamed: a conversion cut off halfway is
  redone by the next resume); DeepSpeed's universal loader partitions it for N' ranks.
- The momentum model (our fp32 values: whole on rank 0, or N ZeRO-3 partitions): merged into whole
  tensors and re-split for the N' ranks.
- Each rank's data position: the N positions become N' (ShardStream.resume_from).
- Each rank's RNG states: rank r' takes those of saved rank r' mod N.
- The counters, the best evaluation, the task's buffers (queues): rank-independent, as saved.
The global batch (what ITC and the hard negatives see) is kept by default: see `plan_batch`.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
from dataclasses import dataclass, field
from typing import Mapping

from .. import distributed
from ..config import Config, ConfigError, load_config
from ..fileio import torch_load
from .layout import model_layout
from .manifest import has_manifest, verify
from .training import RUN_FORMAT, merge_momentum, rank_file, read_run_info, tags

UNIVERSAL = "universal"


@dataclass
class ResumePlan:
    """A checked resume: the tag, the number of ranks that saved it, and what changed; `damaged`:
    the newer tags that failed their check, {tag: what is wrong}."""
    tag: str
    saved_world: int
    elastic: bool
    notes: list = field(default_factory=list)
    damaged: dict = field(default_factory=dict)


def tag_problems(ckpt_dir: str, tag: str) -> list[str]:
    """What keeps a tag from being resumed (empty: nothing): a missing run.json, rank file or model
    states, and every file that does not match the manifest (a tag saved before manifests existed
    is checked for completeness only). Each problem names the file. A collective: the checksums
    are split over the ranks."""
    folder = os.path.join(ckpt_dir, tag)
    try:
        info = read_run_info(ckpt_dir, tag)
        saved_world = int(info["world_size"])
    except (ConfigError, KeyError, TypeError, ValueError) as exc:
        return [str(exc)]
    problems = [f"{rank_file(folder, r)}: missing" for r in range(saved_world)
                if not os.path.isfile(rank_file(folder, r))]
    states = [os.path.join(folder, n) for n in ("mp_rank_00_model_states.pt",
                                               "zero_pp_rank_0_mp_rank_00_model_states.pt")]
    if not any(os.path.isfile(p) for p in states):
        problems.append(f"{' or '.join(states)}: missing")
    if has_manifest(folder):
        problems += verify(folder)
    elif info.get("format", 1) >= RUN_FORMAT:
        problems.append(f"{os.path.join(folder, 'manifest.json')}: missing (the save did not finish)")
    return problems


def choose_tag(ckpt_dir: str, tag: str) -> tuple[str, dict]:
    """The tag to resume: `tag` if it passes its check, else the newest older tag that does, with
    {tag: problems} of those that failed. ConfigError naming the files when none passes."""
    folder = os.path.join(ckpt_dir, tag)
    if not os.path.isdir(folder):
        raise ConfigError(f"no checkpoint '{tag}' to resume in {ckpt_dir} (there: {', '.join(tags(ckpt_dir)) or 'none'})")
    damaged = {}
    for candidate in [tag] + sorted((t for t in tags(ckpt_dir) if t < tag), reverse=True):
        problems = tag_problems(ckpt_dir, candidate)
        if not problems:
            return candidate, damaged
        damaged[candidate] = problems
    raise ConfigError(f"no checkpoint in {ckpt_dir} passes its check: "
                      + "; ".join(f"{t}: {', '.join(p[:2])}" for t, p in damaged.items()))


def check_resumable(ckpt_dir: str, tag: str, cfg: Config, world: int) -> tuple[ResumePlan, Config]:
    """Before anything is built: the tag (or, if it fails its check, the newest older tag that
    passes) is complete, matches its manifest and holds this task's model of this shape; on another
    number of ranks than saved it, the batch is planned (plan_batch). Returns the plan and the
    config to run with."""
    tag, damaged = choose_tag(ckpt_dir, tag)
    folder = os.path.join(ckpt_dir, tag)
    info = read_run_info(ckpt_dir, tag)
    saved_world = int(info["world_size"])
    saved = load_config(info["config"])
    if saved.task != cfg.task:
        raise ConfigError(f"checkpoint {folder} is of task '{saved.task}', this run trains '{cfg.task}'")
    theirs, ours = model_layout(saved).shapes, model_layout(cfg).shapes
    differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if differ:
        raise ConfigError(f"checkpoint {folder} holds another model: {differ[0]} is "
                          f"{tuple(theirs[differ[0]]) if differ[0] in theirs else 'absent'} there and "
                          f"{tuple(ours[differ[0]]) if differ[0] in ours else 'absent'} in this config")
    plan = ResumePlan(tag, saved_world, saved_world != world, damaged=damaged)
    if plan.elastic:
        micro, accum, plan.notes = plan_batch(cfg, info, world)
        if (micro, accum) != (cfg.train.batch_size, cfg.train.grad_accum):
            cfg = load_config(cfg, [f"train.batch_size={micro}", f"train.grad_accum={accum}"])
    return plan, cfg


def plan_batch(cfg: Config, saved: dict, world: int) -> tuple[int, int, list]:
    """(micro batch per rank, accumulation, what changed) for resuming on `world` ranks a run saved
    with saved = {"world_size", "batch_size", "grad_accum"}.

    train.elastic_batch "keep" (default): the global batch is kept, and with it the global
    micro-batch that ITC and the hard negatives see: the per-rank micro batch takes the change.
    Only where it would exceed train.max_micro_batch (the most one rank's memory holds; 0: no
    limit) is it split further with gradient accumulation, which keeps the global batch but
    shrinks the global micro-batch (the contrastive losses then differ from the old run's: the
    notes say so). "per_rank": the per-rank micro batch and accumulation stay; the global batch
    changes with the number of ranks."""
    t = cfg.train
    old_world, micro, accum = int(saved["world_size"]), int(saved["batch_size"]), int(saved["grad_accum"])
    if t.elastic_batch == "per_rank":
        return micro, accum, [f"train.elastic_batch=per_rank: global batch {micro * accum * old_world} -> "
                              f"{micro * accum * world} ({micro} x {accum} per rank on {world} ranks)"]
    global_micro = micro * old_world
    for split in range(1, global_micro + 1):
        new_micro, rest = divmod(global_micro, world * split)
        if not rest and (not t.max_micro_batch or new_micro <= t.max_micro_batch):
            notes = [f"{old_world} -> {world} ranks: micro batch per rank {micro} -> {new_micro}, global batch "
                     f"{global_micro * accum} kept"]
            if split > 1:
                notes.append(f"gradient accumulation {accum} -> {accum * split} (train.max_micro_batch "
                             f"{t.max_micro_batch}): the global micro-batch that ITC and the hard negatives see "
                             f"shrinks from {global_micro} to {global_micro // split}, so the contrastive losses "
                             f"differ from the old run's")
            return new_micro, accum * split, notes
    fits = [n for n in range(1, global_micro + 1) if global_micro % n == 0]
    raise ConfigError(f"cannot keep the global micro-batch of {global_micro} ({micro} x {old_world} ranks) on "
                      f"{world} ranks" + (f" with at most {t.max_micro_batch} per rank" if t.max_micro_batch else "")
                      + f": resume on a number of ranks that divides it ({', '.join(map(str, fits))}), raise "
                      f"train.max_micro_batch, or change the global batch on purpose with "
                      f"train.elastic_batch=per_rank")


def universal_folder(ckpt_dir: str, tag: str) -> str:
    """The tag as DeepSpeed's universal checkpoint, `<tag>/universal`, converted by rank 0 if it is
    not there yet (a collective). Returns the tag folder (the load_dir of tag "universal")."""
    folder = os.path.join(ckpt_dir, tag)
    target = os.path.join(folder, UNIVERSAL)
    if distributed.rank() == 0 and not os.path.isdir(target):
        distributed.import_deepspeed()
        from deepspeed.checkpoint import ds_to_universal

        tmp = os.path.join(folder, f".{UNIVERSAL}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)              # what a conversion cut off left
        args = argparse.Namespace(input_folder=folder, output_folder=tmp, num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal.main(args)
        os.replace(tmp, target)
        print(f"converted {folder} to a universal checkpoint ({target}) to resume on "
              f"{distributed.world_size()} ranks", flush=True)
    distributed.barrier()
    return folder


def load(engine, ckpt_dir: str, plan: ResumePlan, momentum, layout, shared: Mapping, per_rank: Mapping) -> None:
    """Loads a checkpoint saved on plan.saved_world ranks into this run (every rank calls it): the
    shared stateful parts as saved, the per-rank ones taken over from every saved rank's states
    (`take_over`)."""
    folder = universal_folder(ckpt_dir, plan.tag)
    path, client_state = engine.load_checkpoint(folder, tag=UNIVERSAL)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {os.path.join(folder, UNIVERSAL)}")
    states = [torch_load(rank_file(folder, r)) for r in range(plan.saved_world)]
    partitioned = "momentum" in states[-1] and plan.saved_world > 1
    whole = merge_momentum(folder, plan.saved_world, partitioned, layout, trusted=True)
    momentum.load_whole([whole[name] for name in layout.momentum_names])
    for part in shared.values():
        part.load_state_dict(client_state)
    for name, part in per_rank.items():
        part.take_over([s[name] for s in states])
