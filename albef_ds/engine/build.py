"""The build step: from a checked Plan to the parts the loop calls (the task's model under DeepSpeed,
the momentum EMA, the data stream, the evaluator), in the order that makes a run reproducible."""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from .. import distributed as dist
from ..checkpoint.loading import build_training_model
from ..config import Config
from ..data import ShardStream
from ..models import transformer_layers
from ..optim import param_groups
from ..tasks.base import Task
from ..tasks.momentum import MomentumEMA
from ..tokenizer import build_tokenizer
from .preflight import Plan


@dataclass
class Parts:
    engine: object                  # the DeepSpeed engine around the task's TrainingModel
    momentum: MomentumEMA
    batches: Iterable[dict]
    stream: object                  # the ShardStream behind `batches` (None: batches of the caller's)
    steps_per_epoch: int
    total_steps: int
    cfg: Config                     # the plan's config

    @property
    def model(self):
        return self.engine.module


def build_stream(cfg: Config, task: Task) -> ShardStream:
    codec = task.codec(build_tokenizer(cfg.model.text.tokenizer), train=True)
    return ShardStream(cfg.data, codec, cfg.train.batch_size, dist.rank(), dist.world_size(), cfg.train.seed)


def build(plan: Plan, batches: Optional[Iterable[dict]] = None, steps_per_epoch: Optional[int] = None,
          client_optimizer=None) -> Parts:
    """`batches`: any iterable of batches instead of the configured stream (tests, benchmarks);
    `client_optimizer(param_groups)`: an optimizer of one's own instead of the ds config's."""
    deepspeed = dist.import_deepspeed()
    cfg = plan.cfg
    torch.manual_seed(cfg.train.seed)     # same initial weights and queues on every rank
    stream = None
    if batches is None:
        stream = batches = build_stream(cfg, plan.task)
    accum = cfg.train.grad_accum
    if steps_per_epoch is None:
        steps_per_epoch = stream.steps_per_epoch // accum if stream else 1
    steps_per_epoch = max(1, steps_per_epoch)
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch

    model = build_training_model(plan.task)
    groups = param_groups(model, cfg.train.weight_decay)
    optimizer = client_optimizer(groups) if client_optimizer is not None else None
    ds = dict(plan.ds_config)
    if client_optimizer is not None:
        ds.pop("optimizer", None)
    if dist.rank() == 0 and not torch.cuda.is_available():
        print("running on the CPU (no GPU found): DeepSpeed's CPU accelerator, gloo between ranks", flush=True)
    # DeepSpeed prints the ops it builds on every rank: rank 0 says it once
    with contextlib.redirect_stdout(io.StringIO()) if dist.rank() else contextlib.nullcontext():
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=None if optimizer else groups,
                                               optimizer=optimizer, config=ds)
    module = engine.module
    # DeepSpeed casts every floating tensor of the module to bf16; the checkpoint buffers (feature
    # queues) stay fp32.
    buffers = dict(module.named_buffers())
    for name in module.checkpoint_buffers():
        if buffers[name].is_floating_point():
            buffers[name].data = buffers[name].data.float()
    momentum = MomentumEMA(module, cfg.model.momentum)
    if cfg.train.compile:
        # Layer by layer, in place (state-dict names unchanged); static shapes: a step has a
        # handful of distinct layer input shapes, each compiled once.
        for layer in transformer_layers(module):
            layer.compile(dynamic=False, mode=cfg.train.compile_mode)
    return Parts(engine, momentum, batches, stream, steps_per_epoch, total_steps, cfg)
