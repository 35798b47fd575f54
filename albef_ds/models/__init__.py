"""Plain-PyTorch models: encoders, heads and the inference API (no losses, no collectives)."""
import contextlib
from typing import Iterator

from timm.models.vision_transformer import Block
from torch import nn

from .albef import ALBEF, TEMP_RANGE
from .bert import BertLayer


def transformer_layers(module: nn.Module) -> list[nn.Module]:
    """Every ViT block and BERT layer in a module tree: the units worth compiling one by one."""
    return [m for m in module.modules() if isinstance(m, (Block, BertLayer))]


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode (no dropout) for the block, then back in the mode it was in: a
    training run's evaluation hands its own model over."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


__all__ = ["ALBEF", "TEMP_RANGE", "evaluating", "transformer_layers"]
