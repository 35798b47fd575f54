"""Accuracy of a classifier on labelled samples (NLVR2, SNLI-VE), split over ranks.

Data: ALBEF's annotation JSON (albef_ds.data.labelled: NLVR2's `images: [a, b]`, SNLI-VE's `image`
id; paths under image_root) or shards holding each entry as json with its images. A sample whose
image is missing (absent file or shard member) or whose sentence is empty is left out when the set
is read; one whose image cannot be decoded is left out when it is evaluated; both are counted
(`skipped_*`) and accuracy is over the samples evaluated. Samples go in batches of batch_size in
file order, batch b on rank b % world; the predictions are gathered, so every rank returns what one
process computes.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .. import distributed as dist
from ..config import ConfigError
from ..data.annotations import LABELLED, check_entries
from ..data.labelled import label_id
from ..data.samples import ERROR_KEY, entry_images, read_shard, sample_images, sample_meta
from ..data.shards import expand_pattern, read_annotations
from ..tokenizer import build_tokenizer, clean_caption, tokenize
from .inputs import model_device, predict_split, skip_summary

CORRUPT = -1                      # the prediction of a sample whose image could not be decoded
SKIP_KEYS = ("missing_image", "corrupt_image", "empty_caption")


@dataclass
class LabelledSet:
    """images[i]: sample i's image sources (paths or encoded bytes; None: not kept by this rank)."""
    images: list
    sentences: list
    labels: list
    names: list
    skipped: Counter = field(default_factory=Counter)      # samples left out when reading, by reason
    skipped_items: list = field(default_factory=list)      # ... each named, with its reason


def read_labelled_set(data: str, labels: dict, images: int, image_root: Optional[str] = None,
                      max_words: int = 30, keep: Optional[Callable[[int], bool]] = None) -> LabelledSet:
    """An annotation JSON file (paths under image_root) or shard patterns. `keep(i)`: whether to
    keep sample i's image bytes (shards; a rank keeps those it evaluates). Raises LabelError
    (a ValueError) for a label outside `labels`, naming the file and entry."""
    out = LabelledSet([], [], [], [])

    def add(name: str, meta: dict, sources: Optional[list], where: str) -> None:
        label = label_id(meta.get("label"), labels, where)
        sentence = meta.get("sentence")
        sentence = clean_caption(sentence, max_words) if isinstance(sentence, str) else ""
        if not sentence or sources is None:
            reason = "empty_caption" if not sentence else "missing_image"
            out.skipped[reason] += 1
            out.skipped_items.append(f"{name}: {reason.replace('_', ' ')}")
        else:
            if keep is not None and not keep(len(out.images)):
                sources = [None] * len(sources)
            out.images.append(sources)
            out.sentences.append(sentence)
            out.labels.append(label)
            out.names.append(name)

    if data.endswith(".json"):
        entries = read_annotations(data)
        check_entries(entries, data, LABELLED, images)
        for i, entry in enumerate(entries):
            paths = [os.path.join(image_root, p) if image_root else p for p in entry_images(entry)]
            ok = len(paths) == images and all(os.path.isfile(p) for p in paths)
            add(f"{os.path.basename(data)}[{i}]", entry, paths if ok else None, f"{data} entry {i}")
    else:
        for url in expand_pattern(data):
            for raw in read_shard(url):
                if ERROR_KEY in raw:
                    raise ValueError(f"shard {url} could not be read to its end ({raw[ERROR_KEY]})")
                name = f"{os.path.basename(url)}/{raw['__key__']}"
                add(name, sample_meta(raw), sample_images(raw, images), f"sample {name}")
    if not out.images:
        raise ValueError(f"no usable sample in {data} (skipped: {dict(out.skipped)})")
    return out


def samples_of_this_rank(batch_size: int) -> Callable[[int], bool]:
    """`keep` for read_labelled_set: whether this rank evaluates sample i."""
    rank, world = dist.work_split(None)
    return lambda i: dist.owner_of(i, batch_size, world) == rank


def predict(model, data: LabelledSet, tokenizer, img_size: int, max_tokens: int, batch_size: int = 64,
            split_ranks: Optional[bool] = None) -> torch.Tensor:
    """[n] predicted classes of every sample (CORRUPT where an image could not be decoded), the
    same on every rank of the split."""
    device = model_device(model)
    ids, mask = tokenize(tokenizer, data.sentences, max_tokens)

    def classify(slots: list, items: list) -> torch.Tensor:
        take = torch.tensor(items)
        return model.logits(*slots, ids[take].to(device), mask[take].to(device)).argmax(-1)

    return predict_split(model, data.images, img_size, batch_size, classify, CORRUPT, split_ranks)


def accuracy(predictions: torch.Tensor, data: LabelledSet) -> dict:
    """acc (percent of the samples evaluated), samples (in the file), evaluated, skipped_* counts."""
    labels = torch.tensor(data.labels)
    evaluated = predictions != CORRUPT
    skipped = Counter(data.skipped)
    skipped["corrupt_image"] += int((~evaluated).sum())
    count = int(evaluated.sum())
    correct = int((predictions[evaluated] == labels[evaluated]).sum())
    unread = [f"{data.names[i]}: corrupt image" for i in (~evaluated).nonzero().flatten().tolist()]
    samples = len(data.images) + sum(data.skipped.values())
    return {"acc": 100.0 * correct / max(1, count), "samples": samples, "evaluated": count,
            **{f"skipped_{k}": skipped[k] for k in SKIP_KEYS},
            **skip_summary(samples, data.skipped_items + unread)}


def evaluate_classification(model, data: LabelledSet, tokenizer, img_size: int, max_tokens: int,
                            batch_size: int = 64, split_ranks: Optional[bool] = None) -> dict:
    return accuracy(predict(model, data, tokenizer, img_size, max_tokens, batch_size, split_ranks), data)


class ClassificationEvaluator:
    """The accuracy of a training run on each set of eval.data (an annotation file or shard
    pattern each): `acc` and the counts of the first (which selects the best checkpoint), then
    `<file stem>_acc` ... of the others (ALBEF reports val and test after every epoch). The sets
    are read when the run starts: a missing set or an unknown label is a ConfigError then."""
    metrics = ("acc",)

    def __init__(self, cfg, labels: dict, images: int):
        e = cfg.eval
        if not e.data:
            raise ConfigError(f"task {cfg.task}'s evaluation needs eval.data (annotation files or shard patterns)")
        self.cfg, self.sets = cfg, []
        for i, source in enumerate(e.data):
            try:
                data = read_labelled_set(source, labels, images, e.image_root or None, cfg.data.max_words,
                                         samples_of_this_rank(e.batch_size))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"eval.data {source}: {exc}") from None
            stem = os.path.splitext(os.path.basename(source))[0]
            self.sets.append(("" if i == 0 else f"{stem}_", data))
        self.tokenizer = build_tokenizer(cfg.model.text.tokenizer)

    def __call__(self, model) -> dict:
        out = {}
        for prefix, data in self.sets:
            metrics = evaluate_classification(model, data, self.tokenizer, self.cfg.model.vision.img_size,
                                              self.cfg.data.max_tokens, self.cfg.eval.batch_size)
            out.update({prefix + k: v for k, v in metrics.items()})
        return out
