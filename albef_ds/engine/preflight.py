"""Every start-up check, in one place, before anything is built: a run that cannot finish stops
now with one error naming the key, file or numbers, not thousands of steps in.

Checks: the config's ranges; the checkpoint to resume (present, complete, of
this task and model shape; on another number of ranks, the batch it keeps); the task's own
checks; the metric that picks the best checkpoint; the tokenizer against the model's special ids
and the corpora (when the run reads data); the DeepSpeed config against the project config; the
output folder (last: a refused run leaves none behind); and the evaluation data (read now when
evaluations are due).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Optional, Union

from .. import distributed as dist
from ..checkpoint import elastic
from ..checkpoint import training as ckpt
from ..checkpoint.elastic import ResumePlan
from ..cli import check_writable_folder
from ..config import Config, ConfigError, check_config
from ..data.shards import resolve_corpora
from ..fileio import hub_cache_only, hub_cached
from ..models.vit import TIMM_HUB_FILES, timm_hub_repo
from ..tasks import get_task
from ..tasks.base import Task
from ..tokenizer import build_tokenizer
from .ds_config import resolve_ds_config
from .run_folder import RunFolder, claim


@dataclass
class Plan:
    """What the build step builds from: the checked config and task, the resolved ds config, where
    to write, what to resume and the evaluator (its data read)."""
    cfg: Config
    task: Task
    ds_config: dict
    output_dir: str
    ckpt_dir: str
    resume: Optional[ResumePlan]
    evaluator: object = None
    run_folder: Optional[RunFolder] = None      # held for the run's lifetime (Trainer.close releases it)


def preflight(cfg: Config, ds_config: Union[str, dict], output_dir: str, resume: Optional[str] = None,
              reads_data: bool = True, start_over: bool = False) -> Plan:
    """Runs every check (raising ConfigError) and returns the Plan. `resume`: None (fresh), ""
    (latest if there is one, else fresh) or a tag; `start_over`: a fresh run in a folder that holds
    another run's checkpoints moves them aside. A collective: the checkpoint's check is split over
    the ranks, and rank 0 claims the run folder last, once every check has passed (nothing that
    exists is touched before)."""
    check_config(cfg)
    world = dist.world_size()
    ckpt_dir = os.path.join(output_dir, "checkpoints")
    resume_plan, tag = None, _resume_tag(ckpt_dir, resume)
    if tag is not None:
        # first: a resume on another number of ranks changes the batch every later check sees
        resume_plan, cfg = elastic.check_resumable(ckpt_dir, tag, cfg, world)
        if resume_plan.damaged and dist.rank() == 0:
            print(f"resuming {resume_plan.tag}, the newest checkpoint that passes its check: "
                  + "; ".join(f"{t} fails ({p[0]}{f' and {len(p) - 1} more' if len(p) > 1 else ''})"
                              for t, p in resume_plan.damaged.items())
                  + f" (moved to {os.path.join(ckpt_dir, 'damaged')})", flush=True)
        if cfg.model.init_checkpoint:
            # the checkpoint being resumed holds every weight: the init file is not read (or needed)
            cfg = copy.deepcopy(cfg)
            cfg.model.init_checkpoint = None
        if resume_plan.elastic and dist.rank() == 0:
            print(f"resuming {tag}, saved on {resume_plan.saved_world} ranks, on {world}: "
                  + "; ".join(resume_plan.notes), flush=True)
    if cfg.model.init_checkpoint and not os.path.exists(cfg.model.init_checkpoint):
        raise ConfigError(f"model.init_checkpoint {cfg.model.init_checkpoint}: no such file or folder")
    task = get_task(cfg)
    task.check(world)
    task.check_annotations()
    check_select_metric(cfg, task)
    check_hub_weights(cfg)
    if reads_data:
        check_tokenizer(cfg)
        check_corpora(cfg)
    ds = resolve_ds_config(ds_config, cfg, world)
    check_writable_folder(ckpt_dir, "output_dir")      # now, not at the first save thousands of steps in
    if resume_plan is not None and resume_plan.elastic:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    evaluator = task.evaluator(output_dir) if cfg.eval.every_epochs else None
    run_folder = claim(output_dir, resume, start_over, resume_plan.damaged if resume_plan else {},
                       resume_plan.tag if resume_plan else None)
    os.makedirs(ckpt_dir, exist_ok=True)
    return Plan(cfg, task, ds, output_dir, ckpt_dir, resume_plan, evaluator, run_folder)


def check_select_metric(cfg: Config, task: Task) -> None:
    """The metric that picks the best checkpoint is one the task's evaluation reports."""
    name = select_metric(cfg, task)
    if cfg.eval.every_epochs and name not in task.eval_metrics:
        raise ConfigError(f"eval.select_metric '{name}' is not a reported metric "
                          f"({', '.join(task.eval_metrics) or 'task ' + task.name + ' has no evaluation'})")


def select_metric(cfg: Config, task: Task) -> str:
    return cfg.eval.select_metric or task.select_metric


def check_hub_weights(cfg: Config) -> None:
    """The encoder weights the config names on the Hugging Face hub can be had: where the hub
    cannot be reached, from the local cache (else the build would fail after the work began)."""
    if cfg.model.init_checkpoint:
        return                  # the checkpoint holds every weight: none is fetched
    t, v = cfg.model.text, cfg.model.vision
    wanted = []                 # (key, what, hub repo, the files any of which will do)
    if isinstance(t.pretrained, str) and not os.path.isdir(t.pretrained):
        wanted.append(("model.text.pretrained", f"'{t.pretrained}'", t.pretrained, ("config.json",)))
    vision_repo = timm_hub_repo(v.timm_name) if v.pretrained is True else None
    if vision_repo:
        wanted.append(("model.vision.pretrained", f"timm's weights of {v.timm_name}", vision_repo, TIMM_HUB_FILES))
    if not wanted:
        return
    unreachable = hub_cache_only()
    if unreachable is None:
        return                  # the hub fetches what is not cached
    for key, what, repo, files in wanted:
        if not any(hub_cached(repo, name) for name in files):
            raise ConfigError(f"{key}: {what} (hub repo {repo}) is not in the Hugging Face cache, and the hub "
                              f"cannot be reached ({unreachable}): download it where it can be "
                              f"(huggingface-cli download {repo}) or name local weights")


def check_tokenizer(cfg: Config) -> None:
    """The tokenizer's special ids and vocabulary agree with model.text."""
    t = cfg.model.text
    tokenizer = build_tokenizer(t.tokenizer)
    ids = {"pad_token_id": tokenizer.pad_token_id, "cls_token_id": tokenizer.cls_token_id,
           "mask_token_id": tokenizer.mask_token_id, "sep_token_id": tokenizer.sep_token_id}
    wrong = {k: (v, getattr(t, k)) for k, v in ids.items() if v != getattr(t, k)}
    if wrong or len(tokenizer) > t.vocab_size:
        raise ConfigError(f"tokenizer '{t.tokenizer}' disagrees with model.text: "
                          + ", ".join(f"{k} is {a}, config says {b}" for k, (a, b) in wrong.items())
                          + (f" vocabulary {len(tokenizer)} > vocab_size {t.vocab_size}" if len(tokenizer) > t.vocab_size else ""))


def check_corpora(cfg: Config) -> None:
    """Every configured corpus resolves to shards (or annotation files) with a sample count."""
    if not cfg.data.corpora:
        generated = (": data.synthetic describes a generated corpus, which albef_ds/demo.py writes and trains on"
                     if cfg.data.synthetic is not None else "")
        raise ConfigError(f"data.corpora is empty: name the training shards or annotation files{generated}")
    try:
        resolve_corpora(cfg.data.corpora)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data.corpora: {exc}") from None


def _resume_tag(ckpt_dir: str, resume: Optional[str]) -> Optional[str]:
    if resume is None or resume:
        return resume
    tag = ckpt.latest_tag(ckpt_dir)
    if tag is None and dist.rank() == 0:
        print(f"no checkpoint in {ckpt_dir}: starting fresh", flush=True)
    return tag
