"""Small builders shared by the tests (not fixtures, so subprocess workers can import them too)."""
from __future__ import annotations

import torch

from albef_ds.config import load_config

TINY_CAPTIONS = ["a large red circle on the left", "two small blue squares at the top",
                 "a yellow triangle in the center", "three green stars on the right",
                 "a small purple cross at the bottom", "one large orange diamond",
                 "two white rings near the top", "a big black square on the left side"]


def tiny_model_config(**overrides):
    """The shipped tiny config with small queue and test-friendly extras."""
    items = [f"{k}={v}" for k, v in overrides.items()]
    return load_config("tiny", items).model


def tiny_batch(cfg, batch_size: int = 8, seed: int = 0):
    from albef_ds.tokenizer import build_tokenizer, tokenize

    g = torch.Generator().manual_seed(seed)
    tok = build_tokenizer(cfg.text.tokenizer)
    captions = [TINY_CAPTIONS[i % len(TINY_CAPTIONS)] for i in range(batch_size)]
    ids, mask = tokenize(tok, captions, 16)
    images = torch.randn(batch_size, 3, cfg.vision.img_size, cfg.vision.img_size, generator=g)
    return images, ids, mask
