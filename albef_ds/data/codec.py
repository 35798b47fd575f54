"""Sample codecs: how a task turns raw samples (albef_ds.data.samples) into its batches.

A codec's decode() runs in the data workers, once per sample, with a random.Random seeded by the
sample's place in the stream (so augmentation and caption choice are a function of the config);
it returns the decoded sample, or the name of the counter under which the sample is skipped.
collate() makes the batch the task's training forward reads.
"""
from __future__ import annotations

import hashlib
import random
from typing import Union

import torch
from torch.utils.data import default_collate

from ..tokenizer import clean_caption, tokenize
from .images import CorruptImage, open_image
from .samples import sample_captions, sample_images

# Why samples are skipped, counted by every stream: a task adds its own in `skip_reasons`.
SKIP_COUNTERS = ("corrupt_image", "missing_image", "empty_caption", "bad_text", "truncated_tar",
                 "shard_error")


def key_id(key: str) -> int:
    """A non-negative int64 id for a sample key, the same in every process and run."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=7).digest(), "big")


class SampleCodec:
    skip_reasons: tuple = ()          # counters beyond SKIP_COUNTERS

    def decode(self, raw: dict, key: str, rng: random.Random) -> Union[dict, str]:
        raise NotImplementedError

    def collate(self, samples: list[dict], keys: list[str]) -> dict:
        raise NotImplementedError


def decode_images(raw: dict, count: int, transform, rng: random.Random) -> Union[list, str]:
    """The sample's `count` images, transformed, or the skip counter's name."""
    data = sample_images(raw, count)
    if data is None:
        return "missing_image"
    try:
        images = [open_image(d) for d in data]
    except Exception:                       # PIL raises many types on broken files
        return "corrupt_image"
    try:
        return [transform(image, rng) for image in images]
    except CorruptImage:                    # a JPEG's data, decoded only now (its header was sound)
        return "corrupt_image"


def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    # default_collate stacks straight into shared memory in a worker process (torch.stack would
    # leave the DataLoader a second copy to make).
    return default_collate(tensors)


class CaptionCodec(SampleCodec):
    """An image and one of its captions (drawn per visit): {"image", "input_ids", "attention_mask"},
    plus "image_id" (a stable hash of the sample key, one sample per image) when `image_ids`:
    captions of one image are then positives of each other."""

    def __init__(self, tokenizer, transform, max_words: int, max_tokens: int, image_ids: bool = False):
        self.tokenizer, self.transform = tokenizer, transform
        self.max_words, self.max_tokens, self.image_ids = max_words, max_tokens, image_ids

    def captions(self, raw: dict) -> list[str]:
        """The sample's captions, before cleaning (a codec of other text overrides this). Raises
        ValueError on text that is not UTF-8 or json that does not parse."""
        return sample_captions(raw)

    def decode(self, raw: dict, key: str, rng: random.Random) -> Union[dict, str]:
        try:
            captions = self.captions(raw)
        except ValueError:                      # UnicodeDecodeError, JSONDecodeError
            return "bad_text"
        captions = [c for c in (clean_caption(c, self.max_words) for c in captions) if c]
        if not captions:
            return "empty_caption"
        caption = rng.choice(captions)
        images = decode_images(raw, 1, self.transform, rng)
        if isinstance(images, str):
            return images
        return {"image": images[0], "caption": caption}

    def collate(self, samples: list[dict], keys: list[str]) -> dict:
        batch = {"image": stack([s["image"] for s in samples])}
        batch["input_ids"], batch["attention_mask"] = tokenize(
            self.tokenizer, [s["caption"] for s in samples], self.max_tokens)
        if self.image_ids:
            batch["image_id"] = torch.tensor([key_id(k) for k in keys])
        return batch
