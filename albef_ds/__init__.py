"""ALBEF-DS: ALBEF vision-language pretraining with DeepSpeed ZeRO."""
from __future__ import annotations

from typing import Union

from .config import Config, ModelConfig, load_config
from .models import ALBEF
from .convert import load_model  # plain PyTorch; DeepSpeed is imported only to read ZeRO folders

__version__ = "0.1.0"


def build_model(config: Union[str, dict, Config, ModelConfig] = "tiny") -> ALBEF:
    """ALBEF from a shipped config name ('base', 'tiny'), a yaml path, a dict or a config object.

    With `model.init_checkpoint` set, the weights come from that checkpoint (our file, a released
    ALBEF file or a training folder; see albef_ds.convert.init_from_checkpoint): strict about
    shapes (pos_embed is resized), lenient about what releases lack (momentum weights are copied
    from the online ones, queues, idx_queue, a fine-tuned release's MLM head keep their init);
    missing and unexpected keys are reported. No pretrained DeiT/BERT weights are fetched then."""
    cfg = config if isinstance(config, ModelConfig) else load_config(config).model
    if not cfg.init_checkpoint:
        return ALBEF(cfg)
    from .convert import init_from_checkpoint

    model = ALBEF(cfg.architecture_only())
    init_from_checkpoint(model, cfg.init_checkpoint)
    return model


__all__ = ["ALBEF", "Config", "build_model", "load_config", "load_model", "__version__"]
