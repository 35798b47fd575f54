"""Raw samples: what a shard (or an annotation file read directly) yields before a task decodes it.

A raw sample is webdataset's dict: {"__key__": str, "<extension>": bytes, ...}: an image member
("jpg", "png", ...; several images as "0.jpg", "1.jpg", ...), "json" (the sample's annotation) and
"txt" (img2dataset's caption). An annotation file read directly gives the same dicts: the entry as
"json" and its images read from the image root. Tasks decode them with the helpers below.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Iterator, Optional, Union

from PIL import Image
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
ERROR_KEY = "__error__"
IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


class _EndCheckingReader:
    """A file wrapper noting whether the tar reader asked for bytes past the end of the file: a
    complete tar ends with zero blocks that the reader stops at, so only a truncated one does
    (also one cut between two members, which the tar reader alone takes for a complete file)."""

    def __init__(self, stream):
        self.stream = stream
        self.read_past_end = False

    def read(self, size=-1):
        data = self.stream.read(size)
        self.read_past_end |= size != 0 and not data
        return data


def read_shard(url: str) -> Iterator[dict]:
    """Raw samples of one tar shard through webdataset's tar reader; a shard that cannot be opened
    or read to its end yields what it could, then one {ERROR_KEY: counter name} item."""
    errors = []

    def keep_going(exn):
        errors.append(exn)
        return True

    try:
        stream = _EndCheckingReader(gopen(url))
    except OSError:                             # a missing file; failing commands fail on read
        yield {ERROR_KEY: "shard_error"}
        return
    yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}], handler=keep_going),
                             handler=keep_going)
    if stream.read_past_end or any(isinstance(e, tarfile.TarError) for e in errors):
        yield {ERROR_KEY: "truncated_tar"}
    elif errors:
        yield {ERROR_KEY: "shard_error"}


def entry_images(entry: dict) -> list[str]:
    """The image paths of an annotation entry: "images" (a list, NLVR2) or "image". A path without
    an extension is SNLI-VE's Flickr30K id: '<id>.jpg'."""
    paths = entry.get("images")
    if not isinstance(paths, list):
        paths = [entry["image"]] if isinstance(entry.get("image"), (str, int)) else []
    return [p if os.path.splitext(str(p))[1] else f"{p}.jpg" for p in map(str, paths)]


def annotation_sample(key: str, entry: dict, image_root: Optional[str]) -> dict:
    """The raw sample of an annotation entry: its json, its images read from `image_root` (an image
    that is missing or of an unknown type is left out: the task's decoding counts it)."""
    raw = {"__key__": key, "json": json.dumps(entry).encode("utf-8")}
    paths = entry_images(entry)
    for i, path in enumerate(paths):
        ext = IMAGE_EXTENSIONS.get(os.path.splitext(path)[1].lower())
        file = os.path.join(image_root, path) if image_root else path
        if ext is None or not os.path.isfile(file):
            continue
        with open(file, "rb") as f:
            raw[ext if len(paths) == 1 else f"{i}.{ext}"] = f.read()
    return raw


def decode_image(source: Union[bytes, str]) -> Image.Image:
    """An RGB image from encoded bytes (a shard member) or a file path (an annotation's image)."""
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    image.load()                    # the full decode: a truncated file fails here
    # convert() would copy an image that is RGB already (most JPEGs)
    return image if image.mode == "RGB" else image.convert("RGB")


def sample_meta(sample: dict) -> dict:
    """The sample's json as a dict ({} without one). Raises ValueError on text that is not UTF-8 or
    json that does not parse."""
    if "json" not in sample:
        return {}
    meta = json.loads(sample["json"].decode("utf-8"))
    return meta if isinstance(meta, dict) else {}


def meta_text(sample: dict, key: str, clean, max_words: int, empty_reason: str) -> Union[tuple[dict, str], str]:
    """(the sample's json, its `key` text cleaned by clean(text, max_words)), or why the sample is
    skipped: "bad_text" (text that is not UTF-8, json that does not parse) or `empty_reason` (the
    text missing, or empty once cleaned)."""
    try:
        meta = sample_meta(sample)
    except ValueError:                      # UnicodeDecodeError, JSONDecodeError
        return "bad_text"
    text = meta.get(key)
    text = clean(text, max_words) if isinstance(text, str) else ""
    return (meta, text) if text else empty_reason


def sample_captions(sample: dict) -> list[str]:
    """json's "caption" (a string or a list) when present, else txt (the whole file, one caption).
    Raises ValueError on text that is not UTF-8 or json that does not parse."""
    caption = sample_meta(sample).get("caption")
    if isinstance(caption, str):
        return [caption]
    if isinstance(caption, list):
        return [c for c in caption if isinstance(c, str)]
    if "txt" in sample:
        return [sample["txt"].decode("utf-8")]
    return []


def sample_images(sample: dict, count: int = 1) -> Optional[list[bytes]]:
    """The encoded bytes of the sample's `count` images (one: "jpg"..., several: "0.jpg", "1.jpg"
    ...), or None when one is missing."""
    if count == 1:
        data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        return None if data is None else [data]
    out = [next((sample[f"{i}.{k}"] for k in IMAGE_KEYS if f"{i}.{k}" in sample), None) for i in range(count)]
    return None if any(d is None for d in out) else out
