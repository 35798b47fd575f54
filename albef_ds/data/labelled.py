"""Labelled samples: a sentence about one or more images and a class, as in ALBEF's NLVR2 and SNLI-VE
annotation files.

    NLVR2  (nlvr_train.json):  {"images": [path0, path1], "sentence": str, "label": "True" | "False"}
    SNLI-VE (ve_train.json):   {"image": flickr id, "sentence": hypothesis, "label": word}

read directly (a corpus with `annotations` and `image_root`, albef_ds.data.shards) or from shards
holding the entry as json and its images ("0.jpg", "1.jpg", ... for several). A sample with an
image missing or undecodable is skipped and counted; a label outside the task's words is an error
naming the sample and the word (a mislabelled file is not data to skip).
"""
from __future__ import annotations

import random
from typing import Union

import torch

from ..tokenizer import clean_caption, tokenize
from .codec import SampleCodec, decode_images, stack
from .samples import meta_text

# ALBEF's label ids: NLVR2's "True" is 1 (anything else 0 there; here only "False" is); SNLI-VE's words.
NLVR_LABELS = {"False": 0, "True": 1}
VE_LABELS = {"contradiction": 0, "neutral": 1, "entailment": 2}


class LabelError(ValueError):
    """An annotation's label is not one of the task's label words."""


def label_id(label, labels: dict, where: str) -> int:
    """The class of a label word (NLVR2 files also hold JSON booleans: true is "True")."""
    word = str(label) if isinstance(label, bool) else label
    if not isinstance(word, str) or word not in labels:
        raise LabelError(f"{where}: label {label!r} is not one of {', '.join(labels)}")
    return labels[word]


def check_labels(entries: list, labels: dict, source: str) -> None:
    """Every entry of an annotation file has a known label (raises LabelError naming the first
    that does not)."""
    for i, entry in enumerate(entries):
        label_id(entry.get("label") if isinstance(entry, dict) else None, labels, f"{source} entry {i}")


class LabelledCodec(SampleCodec):
    """A sentence, its `images` images and its label: {"images": [B, images, 3, H, W],
    "input_ids", "attention_mask", "label": [B]}."""

    def __init__(self, tokenizer, transform, max_words: int, max_tokens: int, images: int, labels: dict):
        self.tokenizer, self.transform = tokenizer, transform
        self.max_words, self.max_tokens, self.images, self.labels = max_words, max_tokens, images, labels

    def decode(self, raw: dict, key: str, rng: random.Random) -> Union[dict, str]:
        got = meta_text(raw, "sentence", clean_caption, self.max_words, "empty_caption")
        if isinstance(got, str):
            return got
        meta, sentence = got
        label = label_id(meta.get("label"), self.labels, f"sample {key}")
        images = decode_images(raw, self.images, self.transform, rng)
        if isinstance(images, str):
            return images
        return {"images": torch.stack(images), "sentence": sentence, "label": label}

    def collate(self, samples: list[dict], keys: list[str]) -> dict:
        batch = {"images": stack([s["images"] for s in samples]),
                 "label": torch.tensor([s["label"] for s in samples])}
        batch["input_ids"], batch["attention_mask"] = tokenize(
            self.tokenizer, [s["sentence"] for s in samples], self.max_tokens)
        return batch
