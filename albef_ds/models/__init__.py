"""Plain-PyTorch models: encoders, heads and the inference API (no losses, no collectives)."""
from torch import nn

from .albef import ALBEF, TEMP_RANGE
from .bert import BertLayer


def transformer_layers(module: nn.Module) -> list[nn.Module]:
    """Every ViT block and BERT layer in a module tree: the units worth compiling one by one."""
    from timm.models.vision_transformer import Block

    return [m for m in module.modules() if isinstance(m, (Block, BertLayer))]


__all__ = ["ALBEF", "TEMP_RANGE", "transformer_layers"]
