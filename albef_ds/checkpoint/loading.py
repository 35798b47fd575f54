"""Weights into models: a task's training model started from a checkpoint (model.init_checkpoint),
and any checkpoint as its task's inference model (what albef_ds.load_model returns)."""
from __future__ import annotations

import warnings
from typing import Optional, Union

import torch
from torch import nn

from .. import distributed
from ..config import Config, ConfigError
from ..tasks import get_task
from ..tasks.base import Task, TrainingModel
from .files import check_trained_head, prepare, read_checkpoint
from .layout import Report, conform, layout_of, model_layout


def build_training_model(task: Task) -> TrainingModel:
    """The task's training model: pretrained encoder weights fetched as the config names them, or,
    with model.init_checkpoint set, the weights of that checkpoint (our file, a released ALBEF file
    or a training folder, of this task or one it starts from, such as pretraining): strict about
    shapes (pos_embed is resized), lenient about what releases lack (momentum weights are copied
    from the online ones; queues, idx_queue, a fine-tuned release's MLM head and the task's new
    heads keep their init); missing and unexpected keys are reported (rank 0). No pretrained
    DeiT/BERT weights are fetched then."""
    cfg = task.cfg
    if not cfg.model.init_checkpoint:
        return task.build_model()
    model = task.build_model(cfg.model.architecture_only())
    init_from_checkpoint(model, cfg, cfg.model.init_checkpoint, trusted=cfg.model.trust_init_checkpoint)
    return model


def load_state(model: nn.Module, state: dict, cfg: Config, source: str = "checkpoint",
               fresh: tuple = ()) -> Report:
    """Loads a state dict in our key names into a training model of `cfg`: strict about shapes
    (after resizing pos_embed to the model's resolution), lenient about what releases lack
    (momentum weights: copied from the online ones; buffers and optional heads: kept). Returns what
    was not loaded one to one."""
    layout = layout_of(model)
    state, report = conform(state, cfg, source, layout, fresh=fresh)
    model.load_state_dict(state, strict=False)
    absent = [k for k in report.missing if layout.is_momentum(k)]
    if absent:
        values = model.state_dict()
        with torch.no_grad():
            for key in absent:
                values[key].copy_(values[layout.online_name(key)])
        report.notes.append(f"{len(absent)} momentum weights absent: copied from the online weights")
        report.missing = [k for k in report.missing if k not in absent]
    return report


def init_from_checkpoint(model: nn.Module, cfg: Config, path: str, trusted: bool = False) -> Report:
    """model.init_checkpoint: our file, a released ALBEF file or a training folder, loaded into a
    freshly built training model of `cfg` (reported on rank 0), but the parameters model.init_fresh
    names, which keep their initialisation."""
    ckpt = read_checkpoint(path, config=cfg, trusted=trusted)
    names = tuple(cfg.model.init_fresh)

    def kept(key: str) -> bool:
        return any(key == n or key.startswith(n + ".") for n in names)

    unknown = [n for n in names if not any(k == n or k.startswith(n + ".") for k, _ in model.named_parameters())]
    if unknown:
        raise ConfigError(f"model.init_fresh: {', '.join(unknown)} names no parameter of the model")
    state = {k: v for k, v in ckpt.state_dict.items() if not kept(k)}
    loaded = load_state(model, state, cfg, ckpt.source, fresh=ckpt.fresh + names)
    if names:
        loaded.missing = [k for k in loaded.missing if not kept(k)]
        loaded.notes.append(f"model.init_fresh: {', '.join(names)} kept at the model's initialisation")
    report = ckpt.report.then(loaded)
    if distributed.rank() == 0:
        print(f"model.init_checkpoint: loaded {ckpt.source} ({ckpt.kind})", flush=True)
        for line in report.lines():
            print(f"  {line}", flush=True)
    return report


def load_inference_model(path: str, config=None, device: Union[str, torch.device] = "cpu",
                         tag: Optional[str] = None, trusted: bool = False,
                         allow_untrained_head: bool = False) -> nn.Module:
    """The inference model (albef_ds.models) of a converted file, a released ALBEF file or a
    training folder, in eval mode on `device`: its task's, with the online weights only.

    config: None for the config stored with the checkpoint (the shipped `base` config for
    released files without one), else a shipped name, yaml path, dict, Config or ModelConfig;
    pos_embed is resized to its resolution. What the file lacks (the MLM head of a fine-tuned
    release, ...) keeps its initialisation and is reported as a warning. A file holding objects
    beyond tensors and plain containers is refused unless `trusted` (loading it could run code). A
    checkpoint of another task whose model lacks this task's trained head (a pretraining file read
    as NLVR2) is refused unless `allow_untrained_head`."""
    ckpt = read_checkpoint(path, tag=tag, config=config, trusted=trusted)
    check_trained_head(ckpt, path, allow_untrained_head, "allow_untrained_head=True (--allow_untrained_head)")
    task = get_task(ckpt.config)
    model = task.build_inference_model(ckpt.config.model.architecture_only())
    state = prepare(ckpt.state_dict, model_layout(ckpt.config), momentum=False)
    inference = layout_of(model)
    result = model.load_state_dict({k: v for k, v in state.items() if k in inference.shapes}, strict=False)
    # a fine-tuned release has no MLM head (ALBEF drops it when fine-tuning): nothing to act on
    report = Report(missing=[k for k in result.missing_keys if k in inference.keys and not inference.is_optional_head(k)],
                    notes=list(ckpt.report.notes), unexpected=list(ckpt.report.unexpected))
    for line in report.lines():
        warnings.warn(f"{ckpt.source}: {line}", stacklevel=3)
    return model.to(device).eval()
