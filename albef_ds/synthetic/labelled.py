"""What the generated labelled corpora (NLVR-shapes, VE-shapes) share: writing splits in ALBEF's
annotation formats with their images, once per configuration, and the images-shuffled baseline.

A corpus folder holds `<prefix>_<split>.json` per split, the images under `images/` (the JSON's
paths are relative to the folder: it is the image root) and `manifest.json`, written last, which
marks a complete corpus of one configuration. Every sample is a function of (seed, split, index).
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Callable

from PIL import Image

from ..fileio import atomic_write

MANIFEST = "manifest.json"
IMAGE_DIR = "images"


def _write_json(path: str, value) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=0)))


def write_labelled_corpus(out_dir: str, prefix: str, version: int,
                          make_sample: Callable[[str, int, random.Random, int], tuple[dict, dict]],
                          train: int = 4000, dev: int = 400, test: int = 400, image_size: int = 64,
                          seed: int = 0) -> dict:
    """Writes <prefix>_train/dev/test.json of that many samples and their images, unless the
    folder already holds this corpus. make_sample(split, index, rng, image_size) -> (annotation
    entry, {path under images/: PIL image}); a path ending .jpg is written as JPEG (quality 95, no
    chroma subsampling: the colours stay exact enough to name), any other as PNG. Returns
    {"image_root": folder, "train": json path, "dev": ..., "test": ...}."""
    out_dir = os.path.abspath(out_dir)
    manifest_path = os.path.join(out_dir, MANIFEST)
    sizes = {"train": train, "dev": dev, "test": test}
    wanted = {"prefix": prefix, "version": version, "sizes": sizes, "image_size": image_size, "seed": seed}
    result = {"image_root": out_dir, **{split: os.path.join(out_dir, f"{prefix}_{split}.json") for split in sizes}}
    if os.path.isfile(manifest_path) and json.loads(Path(manifest_path).read_text()) == wanted:
        return result
    os.makedirs(os.path.join(out_dir, IMAGE_DIR), exist_ok=True)
    for split, count in sizes.items():
        entries = []
        for index in range(count):
            entry, images = make_sample(split, index, random.Random(f"{seed}:{split}:{index}"), image_size)
            for name, image in images.items():
                _save(image, os.path.join(out_dir, IMAGE_DIR, name))
            entries.append(entry)
        _write_json(result[split], entries)
    _write_json(manifest_path, wanted)
    return result


def _save(image: Image.Image, path: str) -> None:
    if path.endswith(".jpg"):
        image.save(path, format="JPEG", quality=95, subsampling=0)
    else:
        image.save(path, format="PNG")


def image_path(name: str) -> str:
    """The annotation's path of an image written under images/."""
    return f"{IMAGE_DIR}/{name}"


def write_shuffled_images(path: str, out_path: str, seed: int = 0) -> str:
    """The annotation file at `path` with every entry's images ("images" or "image") taken from
    another entry, sentences and labels kept: the baseline that shows what a model learns from
    the text alone. Returns out_path."""
    with open(path) as f:
        entries = json.load(f)
    key = "images" if entries and "images" in entries[0] else "image"
    order = list(range(len(entries)))
    random.Random(seed).shuffle(order)
    # each entry gets the images of the entry after it in a random cycle: never its own
    donors = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
    shuffled = [{**entry, key: entries[donors[i]][key]} for i, entry in enumerate(entries)]
    _write_json(out_path, shuffled)
    return out_path
