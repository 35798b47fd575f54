"""The features of one part of a collection: its images decoded (threads read ahead of the model)
and encoded in batches exactly as the retrieval evaluator encodes them, its captions encoded as
the evaluator's texts; both L2-normalised, returned in half precision."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ..data.samples import decode_image
from ..data.transforms import EvalTransform
from ..eval.inputs import model_device
from ..tokenizer import clean_caption, tokenize
from .collection import read_image


@dataclass
class PartFeatures:
    """image_features [rows, D] and text_features [texts, D] (float16); rows: the images that were
    read (their "data" dropped); texts: {"row": the image's row in this part, "text": the caption
    as encoded}; unreadable: {"name", "source", "error"} of the images that could not be read."""
    image_features: np.ndarray
    text_features: np.ndarray
    rows: list
    texts: list
    unreadable: list


def _pixels(row: dict, transform: EvalTransform):
    """The image of a row as the evaluator feeds it (albef_ds.eval.inputs.load_images), or the
    error that stopped it."""
    try:
        return transform(decode_image(row["data"] if "data" in row else read_image(row["source"])))
    except Exception as exc:               # PIL raises many types on broken files
        return f"{type(exc).__name__}: {exc}"


def decoded_batches(rows: list, img_size: int, batch_size: int, workers: int):
    """Yields (batch of row indices, [pixels or error string]) in order; with workers > 0 a thread
    pool decodes the next batch while the caller encodes this one (PIL releases the GIL)."""
    transform = EvalTransform(img_size)
    batches = [range(s, min(s + batch_size, len(rows))) for s in range(0, len(rows), batch_size)]
    if workers == 0:
        for batch in batches:
            yield batch, [_pixels(rows[i], transform) for i in batch]
        return
    with ThreadPoolExecutor(workers) as pool:
        ahead = [pool.submit(_pixels, rows[i], transform) for i in batches[0]] if batches else []
        for b, batch in enumerate(batches):
            current = ahead
            if b + 1 < len(batches):
                ahead = [pool.submit(_pixels, rows[i], transform) for i in batches[b + 1]]
            yield batch, [f.result() for f in current]


@torch.no_grad()
def encode_part(model, rows: list, tokenizer, img_size: int, max_tokens: int, max_words: int,
                batch_size: int = 64, workers: int = 0,
                progress: Optional[Callable[[int], None]] = None) -> PartFeatures:
    """Features of `rows` (albef_ds.search.collection). Batches of batch_size images in row order,
    an unreadable image left as zeros in its batch and dropped after (so every other image's batch
    is the evaluator's); progress(images done) after each batch."""
    device = model_device(model)
    features, kept, unreadable = [], [], []
    for batch, pixels in decoded_batches(rows, img_size, batch_size, workers):
        good = [j for j, p in enumerate(pixels) if not isinstance(p, str)]
        for j, p in enumerate(pixels):
            if isinstance(p, str):
                row = rows[batch[j]]
                unreadable.append({"name": row["name"], "source": row["source"], "error": p})
        if good:
            images = torch.stack([torch.zeros(3, img_size, img_size, dtype=torch.uint8) if isinstance(p, str) else p
                                  for p in pixels]).to(device)
            batch_features = model.project_image(model.image_embeds(images)).float()
            features.append(batch_features[good].half().cpu())
            kept += [batch[j] for j in good]
        if progress is not None:
            progress(batch.stop)
    out_rows = [{k: v for k, v in rows[i].items() if k != "data"} for i in kept]
    texts = [{"row": r, "text": t} for r, row in enumerate(out_rows)
             for t in (clean_caption(c, max_words) for c in row["captions"]) if t]
    text_features = []
    for s in range(0, len(texts), batch_size):
        ids, mask = tokenize(tokenizer, [t["text"] for t in texts[s:s + batch_size]], max_tokens)
        text_features.append(model.text_features(ids.to(device), mask.to(device)).float().half().cpu())
    dim = model.cfg.embed_dim

    def stacked(parts):
        return torch.cat(parts).numpy() if parts else np.zeros((0, dim), np.float16)

    return PartFeatures(stacked(features), stacked(text_features), out_rows, texts, unreadable)


class Progress:
    """A line at most every `every` seconds while a rank encodes: its parts, images and speed."""

    def __init__(self, prefix: str, total_parts: int, every: float = 30.0):
        self.prefix, self.total_parts, self.every = prefix, total_parts, every
        self.start = self.last = time.monotonic()
        self.images = 0
        self.parts = 0

    def rate(self) -> float:
        return self.images / max(time.monotonic() - self.start, 1e-9)

    def batch(self, label: str, done: int, count: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            print(f"{self.prefix}: part {self.parts + 1}/{self.total_parts} ({label}) {done}/{count} images, "
                  f"{(self.images + done) / (now - self.start):.1f} images/s", flush=True)

    def part_done(self, label: str, images: int, unreadable: int) -> None:
        self.parts += 1
        self.images += images
        self.last = time.monotonic()
        print(f"{self.prefix}: part {self.parts}/{self.total_parts} ({label}) done: {images} images"
              + (f", {unreadable} unreadable" if unreadable else "") + f"; {self.rate():.1f} images/s", flush=True)
