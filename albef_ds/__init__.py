"""ALBEF-DS: ALBEF vision-language pretraining and its downstream tasks with DeepSpeed ZeRO."""
from .config import Config, ModelConfig, load_config
from .hub import build_model, load_model
from .models import ALBEF

__version__ = "0.1.0"

__all__ = ["ALBEF", "Config", "ModelConfig", "build_model", "load_config", "load_model", "__version__"]
