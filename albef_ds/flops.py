"""Model FLOPs of one ALBEF training step, counted from the architecture (matmuls, 2 FLOPs per
multiply-add; the backward pass of a trained matmul costs twice its forward).

Used by the benchmark for samples/s -> MFU. Counts what the model computes: the online and the
momentum encoders, the batched [masked | positive | negative | negative] fusion pass, the MLM head
on the masked tokens only, and the ITC similarities against batch + queue. Without MLM
(retrieval fine-tuning) there is no masked text: no masked rows, no MLM head, no momentum fusion.
"""
from __future__ import annotations

from .config import ModelConfig


def _encoder_layer(tokens: int, width: int, mlp: int) -> float:
    """Self-attention layer on `tokens` tokens: qkv + output projections, scores, weighted sum, MLP."""
    return 2 * tokens * width * 4 * width + 4 * tokens * tokens * width + 4 * tokens * width * mlp


def _cross_attention(text_tokens: int, image_tokens: int, width: int) -> float:
    """Cross-attention without the key/value projections (counted once per image group)."""
    return 2 * text_tokens * width * 2 * width + 4 * text_tokens * image_tokens * width


def train_flops_per_sample(cfg: ModelConfig, text_len: int, global_batch: int,
                           masked_tokens: float, mlm: bool = True) -> float:
    """FLOPs per sample of one training step (forward + backward + momentum forwards).

    text_len: padded text length; masked_tokens: predicted tokens per caption (~15% of its words);
    global_batch: the batch the ITC similarities contrast against (plus the queue).
    """
    v, t = cfg.vision, cfg.text
    patches = (v.img_size // v.patch_size) ** 2
    n_img = patches + 1
    vit = (2 * patches * 3 * v.patch_size ** 2 * v.width
           + v.depth * _encoder_layer(n_img, v.width, int(v.width * v.mlp_ratio)))
    text_layer = _encoder_layer(text_len, t.hidden, t.intermediate)
    text = t.fusion_start * text_layer
    fusion_layers = t.layers - t.fusion_start
    fusion_row = fusion_layers * (text_layer + _cross_attention(text_len, n_img, t.hidden))
    image_kv = fusion_layers * 2 * n_img * v.width * 2 * t.hidden          # per image group row
    mlm_head = masked_tokens * (2 * t.hidden * t.hidden + 2 * t.hidden * t.vocab_size)
    itc = 2 * 2 * (global_batch + cfg.queue_size) * cfg.embed_dim        # i2t and t2i rows

    mlm = int(mlm)
    online = vit + (1 + mlm) * text + (3 + mlm) * fusion_row + 2 * image_kv + mlm * mlm_head + itc
    momentum = vit + (1 + mlm) * text + mlm * (fusion_row + image_kv + mlm_head) + itc
    return 3 * online + momentum
