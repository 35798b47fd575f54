"""What grounding fine-tuning reads: referring expressions with their images. (Its train transform
is every task's, data.transforms: the grounding configs set data.crop_scale null, ALBEF's grounding
transform, the image resized whole so the geometry the expressions describe is kept.)"""
from __future__ import annotations

import random
from typing import Union

import torch

from .codec import CaptionCodec, key_id
from .samples import sample_meta


class ExpressionCodec(CaptionCodec):
    """A referring expression (an ALBEF grounding entry {"image", "text"}; or, from shards, one of
    the sample's captions) and its image: {"image", "input_ids", "attention_mask", "image_id"}.
    The image id is a stable hash of the image's file name (the entry's "image", else the sample
    key): several expressions name objects of one image, and they are positives of each other in
    ITC and never each other's ITM negatives, as in ALBEF's grounding training."""

    def __init__(self, tokenizer, transform, max_words: int, max_tokens: int):
        super().__init__(tokenizer, transform, max_words, max_tokens, image_ids=False)

    def captions(self, raw: dict) -> list[str]:
        text = sample_meta(raw).get("text")
        # a grounding entry: the expression is its caption
        return [text] if isinstance(text, str) else super().captions(raw)

    def decode(self, raw: dict, key: str, rng: random.Random) -> Union[dict, str]:
        sample = super().decode(raw, key, rng)
        if isinstance(sample, dict):            # the json parsed: captions() read it
            sample["image_name"] = str(sample_meta(raw).get("image", key))
        return sample

    def collate(self, samples: list[dict], keys: list[str]) -> dict:
        batch = super().collate(samples, keys)
        batch["image_id"] = torch.tensor([key_id(s["image_name"]) for s in samples])
        return batch
