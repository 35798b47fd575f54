"""Models for users: build a task's training model, or load any checkpoint as an inference model
(the facade over albef_ds.tasks and albef_ds.checkpoint.loading)."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from .checkpoint.loading import build_training_model, load_inference_model
from .config import Config, ModelConfig, load_config
from .tasks import get_task


def build_model(config: Union[str, dict, Config, ModelConfig] = "tiny") -> nn.Module:
    """The training model of the config's task (a ModelConfig alone: pretraining), from a shipped
    config name ('base', 'tiny'), a yaml path, a dict or a config object; with
    `model.init_checkpoint` set, started from that checkpoint's weights (see
    albef_ds.checkpoint.loading.build_training_model)."""
    if isinstance(config, ModelConfig):
        config = Config(model=config)
    cfg = config if isinstance(config, Config) else load_config(config)
    return build_training_model(get_task(cfg))


def load_model(path: str, config=None, device: Union[str, torch.device] = "cpu",
               tag: Optional[str] = None, trusted: bool = False) -> nn.Module:
    """The inference model (albef_ds.models) of a converted file, a released ALBEF file or a
    training folder, in eval mode on `device` (see albef_ds.checkpoint.loading.load_inference_model)."""
    return load_inference_model(path, config=config, device=device, tag=tag, trusted=trusted)
