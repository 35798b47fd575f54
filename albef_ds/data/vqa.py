"""VQA samples: ALBEF's annotation files (questions, annotators' answers, images), the answer weights
of the training loss, answer tokens, the training codec, and shards of one sample per question.

ALBEF's files are JSON lists of entries: {"question_id", "question", "answer", "image", "dataset"}.
"answer" is the list of the annotators' answers for VQA v2 ("dataset": "vqa", ten per question)
and a single string for Visual Genome ("vg"); test files have no answer. "image" is relative to
the image root of its dataset: one corpus per image root (data.corpora[].image_root).
"""
from __future__ import annotations

import os
import random
from typing import Union

import torch

# ALBEF deletes the same characters from questions as from captions
from ..tokenizer import DELETED_CHARACTERS, tokenize
from .codec import SampleCodec, decode_images, stack
from .samples import annotation_sample, meta_text, sample_images
from .shards import brace_pattern, write_shard, write_sizes

VG_WEIGHT = 0.5                       # the weight of a Visual Genome answer in the loss


def clean_question(question: str, max_words: int) -> str:
    """ALBEF's question normalisation: lower-case; `,.'!?"()*#:;~` deleted; `-` and `/` become
    spaces; trailing spaces stripped; at most `max_words` words (split on single spaces)."""
    text = DELETED_CHARACTERS.sub("", question.lower()).replace("-", " ").replace("/", " ").rstrip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def answer_weights(entry: dict) -> tuple[list[str], list[float]]:
    """The distinct answers of a training entry and their loss weights: for VQA the share of the
    annotators who gave each (in order of first appearance, summing to 1), for Visual Genome its
    one answer with weight VG_WEIGHT. Raises TypeError / KeyError for an entry without answers."""
    answer = entry["answer"]
    if entry.get("dataset") == "vg":
        if not isinstance(answer, str):
            raise TypeError(f"a Visual Genome answer is a string, not {type(answer).__name__}")
        return [answer], [VG_WEIGHT]
    answers = [answer] if isinstance(answer, str) else list(answer)
    if not answers or not all(isinstance(a, str) for a in answers):
        raise TypeError("the answers are not a non-empty list of strings")
    weights: dict[str, float] = {}
    for a in answers:
        weights[a] = weights.get(a, 0.0) + 1.0 / len(answers)
    return list(weights), list(weights.values())


def answer_tokens(tokenizer, answers: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) [N, longest]: `[CLS] answer [SEP]` per answer, padded to the longest (the
    decoder learns to end an answer with [SEP]); at most `max_length` tokens."""
    pieces = tokenizer.encode(answers, max_length - 2)
    rows = [[tokenizer.cls_token_id, *p.ids, tokenizer.sep_token_id] for p in pieces]
    longest = max(map(len, rows))
    ids = torch.full((len(rows), longest), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask


class VQACodec(SampleCodec):
    """A question with its image and weighted answers. The batch: image [B, 3, H, W], input_ids and
    attention_mask [B, max_tokens] (the question, `[CLS] words`), and the answers of all
    questions flattened: answer_ids and answer_mask [N, La] (`[CLS] answer [SEP]`, padded to the
    longest), answer_weight [N], answer_question [N] (the question each belongs to)."""
    skip_reasons = ("empty_question", "no_answer")

    def __init__(self, tokenizer, transform, max_words: int, max_tokens: int, max_answer_tokens: int):
        self.tokenizer, self.transform = tokenizer, transform
        self.max_words, self.max_tokens, self.max_answer_tokens = max_words, max_tokens, max_answer_tokens

    def decode(self, raw: dict, key: str, rng: random.Random) -> Union[dict, str]:
        got = meta_text(raw, "question", clean_question, self.max_words, "empty_question")
        if isinstance(got, str):
            return got
        meta, question = got
        try:
            answers, weights = answer_weights(meta)
        except (KeyError, TypeError):
            return "no_answer"
        images = decode_images(raw, 1, self.transform, rng)
        if isinstance(images, str):
            return images
        return {"image": images[0], "question": question, "answers": answers, "weights": weights}

    def collate(self, samples: list[dict], keys: list[str]) -> dict:
        batch = {"image": stack([s["image"] for s in samples])}
        batch["input_ids"], batch["attention_mask"] = tokenize(
            self.tokenizer, [s["question"] for s in samples], self.max_tokens)
        batch["answer_ids"], batch["answer_mask"] = answer_tokens(
            self.tokenizer, [a for s in samples for a in s["answers"]], self.max_answer_tokens)
        batch["answer_weight"] = torch.tensor([w for s in samples for w in s["weights"]])
        batch["answer_question"] = torch.tensor([i for i, s in enumerate(samples) for _ in s["answers"]])
        return batch


def make_question_shards(entries: list[dict], image_root: str, out_dir: str, prefix: str,
                         max_samples: int = 10000) -> dict:
    """Writes `<out_dir>/<prefix>-NNNNN.tar` shards of one sample per question
    (data.samples.annotation_sample: the entry as json, its image as stored) and sizes.json.
    Returns {"pattern", "samples", "shards", "skipped"} (skipped: an image missing or not
    jpg/png/webp)."""
    if not entries:
        raise ValueError("the annotation files list no questions")
    os.makedirs(out_dir, exist_ok=True)
    sizes, skipped = {}, 0

    def samples(first: int):
        nonlocal skipped
        for index, entry in enumerate(entries[first:first + max_samples], first):
            raw = annotation_sample(f"{index:09d}", entry, image_root)
            if sample_images(raw) is None:
                skipped += 1
                continue
            yield raw

    for shard, first in enumerate(range(0, len(entries), max_samples)):
        name = f"{prefix}-{shard:05d}.tar"
        sizes[name] = write_shard(os.path.join(out_dir, name), samples(first))
    write_sizes(out_dir, sizes)
    return {"pattern": brace_pattern(out_dir, prefix, len(sizes)), "samples": sum(sizes.values()),
            "shards": len(sizes), "skipped": skipped}
