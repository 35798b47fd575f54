"""Checkpoints: the training checkpoint's writer and readers (training.py), one-file formats and
conversion (files.py), the state-dict layout (layout.py) and the released ALBEF layouts (released.py)."""
from ..fileio import ConversionError
from .files import FORMAT, RELEASED, Checkpoint, convert, read_checkpoint
from .layout import Layout, Report, layout_of, model_layout

__all__ = ["ConversionError", "Checkpoint", "FORMAT", "RELEASED", "Layout", "Report", "convert",
           "layout_of", "model_layout", "read_checkpoint"]
