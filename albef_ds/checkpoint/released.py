"""The released ALBEF checkpoint layouts (salesforce/ALBEF's files of every task) <-> our names.

Our models hold every BERT under transformers' BertForMaskedLM names (`<part>.bert.encoder...`,
`<part>.cls.predictions...`). The released files differ per task in which of their BERTs were
BertModels (no `bert.` infix, no MLM head: the fine-tuned text encoders) and which were
BertForMaskedLM / BertLMHeadModel (with both: the pretraining text encoder, VQA's answer decoder);
each task says so in `Task.released_text_parts`. Everywhere else the names agree, except: `temp`
is 0-d there ([1] here) and `<bert>.embeddings.position_ids` (a constant arange) exists only there.
"""
from __future__ import annotations

import torch

from ..tasks.momentum import NO_IMAGE_ID
from .layout import Layout, with_aliases

POSITION_IDS = "embeddings.position_ids"


def from_released(state: dict, text_parts: dict) -> dict:
    """Released names -> ours: `bert.` restored for the parts released without it, position_ids
    dropped, temp reshaped to [1]. Our own names pass unchanged. Values are not copied."""
    out = {}
    for key, value in state.items():
        for prefix, infix in text_parts.items():
            if not infix and key.startswith(prefix) and not key.startswith((prefix + "bert.", prefix + "cls.")):
                key = prefix + "bert." + key[len(prefix):]
        if key.endswith(POSITION_IDS):
            continue
        if key == "temp":
            value = value.reshape(1)
        out[key] = value
    return out


def to_released(state: dict, layout: Layout, text_parts: dict, keep_empty_idx_queue: bool = False) -> dict:
    """Our state dict -> the released layout: tied copies present, 0-d temp, position_ids added,
    `bert.` and the unused MLM head dropped from the parts released as BertModels, and idx_queue
    left out when it holds no image ids (as in the pretraining release)."""
    out = {}
    for key, value in with_aliases(state, layout).items():
        prefix = next((p for p in text_parts if key.startswith(p)), None)
        bare = prefix is not None and not text_parts[prefix]
        if bare and key.startswith(prefix + "cls."):
            continue
        if key == "temp":
            value = value.reshape(())
        if key == "idx_queue" and not keep_empty_idx_queue and bool((value == NO_IMAGE_ID).all()):
            continue
        name = prefix + key[len(prefix) + len("bert."):] if bare and key.startswith(prefix + "bert.") else key
        out[name] = value
        if key.endswith("embeddings.word_embeddings.weight"):
            positions = layout.shapes[key.replace("word_embeddings", "position_embeddings")][0]
            out[name.replace("word_embeddings.weight", "position_ids")] = torch.arange(positions).unsqueeze(0)
    return out
