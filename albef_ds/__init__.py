"""ALBEF-DS: ALBEF vision-language pretraining with DeepSpeed ZeRO."""
from __future__ import annotations

from typing import Union

from .config import Config, ModelConfig, load_config
from .models import ALBEF

__version__ = "0.1.0"


def build_model(config: Union[str, dict, Config, ModelConfig] = "tiny") -> ALBEF:
    """ALBEF from a shipped config name ('base', 'tiny'), a yaml path, a dict or a config object."""
    if isinstance(config, ModelConfig):
        return ALBEF(config)
    return ALBEF(load_config(config).model)


__all__ = ["ALBEF", "Config", "build_model", "load_config", "__version__"]
