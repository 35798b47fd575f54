"""The index folder: what `python -m albef_ds.index` writes and search reads.

    index.json            the manifest, written last: a folder without it is not (yet) an index
    image_features.npy    [images, D] float16, L2-normalised (the evaluator's, rounded to half)
    images.jsonl          a row per image: name, source (file, or shard + offset + size), captions[, url]
    text_features.npy     [texts, D] float16: every caption of the indexed images, as the evaluator encodes it
    texts.jsonl           a row per caption: the image's row, the text as encoded
    images.faiss, texts.faiss   the nearest-neighbour indexes (albef_ds.search.ann)
    unreadable.jsonl      the images that could not be read (name, source, error), and problems of shards
    parts/                work in progress: one rank's part at a time, removed once the index is whole

Every file is written atomically and depends only on the collection, the model and the settings:
the same bytes from 1 or N ranks, from one run or a resumed one.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..fileio import atomic_write
from . import ann

FORMAT, VERSION = "albef_ds.index", 1
MANIFEST = "index.json"
IMAGE_FEATURES, TEXT_FEATURES = "image_features.npy", "text_features.npy"
IMAGE_ROWS, TEXT_ROWS = "images.jsonl", "texts.jsonl"
IMAGE_ANN, TEXT_ANN = "images.faiss", "texts.faiss"
UNREADABLE = "unreadable.jsonl"
PARTS, PLAN = "parts", "plan.json"


def model_identity(model) -> str:
    """sha256 of the model's architecture config and every tensor of its state dict (name, dtype,
    shape, bytes): the same weights give the same identity whichever file or format held them."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(model.cfg), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _write_json(path: str, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1, sort_keys=True)))


# ---- parts: the work in progress ---------------------------------------------------------------

def part_paths(output_dir: str, number: int) -> tuple[str, str]:
    stem = os.path.join(output_dir, PARTS, f"{number:06d}")
    return f"{stem}.npz", f"{stem}.json"


def done_parts(output_dir: str) -> set[int]:
    """The parts written whole (their .json, written after their .npz)."""
    folder = os.path.join(output_dir, PARTS)
    if not os.path.isdir(folder):
        return set()
    return {int(n[:-5]) for n in os.listdir(folder) if n.endswith(".json") and n[:-5].isdigit()
            and os.path.isfile(part_paths(output_dir, int(n[:-5]))[0])}


def write_part(output_dir: str, number: int, part) -> None:
    """A part's features (npz) then its rows (json): the json marks it whole."""
    features, rows = part_paths(output_dir, number)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, image_features=part.image_features, text_features=part.text_features)

    atomic_write(features, write)
    _write_json(rows, {"rows": part.rows, "texts": part.texts, "unreadable": part.unreadable})


def read_plan(output_dir: str) -> Optional[dict]:
    path = os.path.join(output_dir, PARTS, PLAN)
    return json.loads(Path(path).read_text()) if os.path.isfile(path) else None


def write_plan(output_dir: str, plan: dict) -> None:
    _write_json(os.path.join(output_dir, PARTS, PLAN), plan)


def read_manifest(output_dir: str) -> Optional[dict]:
    path = os.path.join(output_dir, MANIFEST)
    return json.loads(Path(path).read_text()) if os.path.isfile(path) else None


# ---- the whole index ---------------------------------------------------------------------------

def _json_line(record) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n"


def merge_parts(output_dir: str, count: int, dim: int) -> dict:
    """The parts 0..count-1 joined into the index's feature and row files, in part order, one part
    in memory at a time; returns the counts {"images", "texts", "unreadable"}."""
    def part(n: int) -> dict:
        return json.loads(Path(part_paths(output_dir, n)[1]).read_text())

    sizes = [(len(m["rows"]), len(m["texts"])) for m in map(part, range(count))]
    images, texts = (sum(s[0] for s in sizes), sum(s[1] for s in sizes))
    for name, key, total in ((IMAGE_FEATURES, "image_features", images), (TEXT_FEATURES, "text_features", texts)):
        def write(tmp, key=key, total=total):
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(total, dim))
            start = 0
            for n in range(count):
                with np.load(part_paths(output_dir, n)[0]) as arrays:
                    block = arrays[key]
                out[start:start + len(block)] = block
                start += len(block)
            out.flush()
            del out

        atomic_write(os.path.join(output_dir, name), write)
    unreadable = 0

    def write_rows(rows_tmp, texts_tmp, unreadable_tmp):
        nonlocal unreadable
        with open(rows_tmp, "w", encoding="utf-8") as rows, open(texts_tmp, "w", encoding="utf-8") as text_rows, \
                open(unreadable_tmp, "w", encoding="utf-8") as failures:
            first = 0
            for n in range(count):
                meta = part(n)
                rows.writelines(map(_json_line, meta["rows"]))
                text_rows.writelines(_json_line({"row": first + t["row"], "text": t["text"]}) for t in meta["texts"])
                failures.writelines(map(_json_line, meta["unreadable"]))
                first += len(meta["rows"])
                unreadable += len(meta["unreadable"])

    path = functools.partial(os.path.join, output_dir)
    atomic_write(path(IMAGE_ROWS), lambda r: atomic_write(path(TEXT_ROWS), lambda t: atomic_write(
        path(UNREADABLE), lambda u: write_rows(r, t, u))))
    return {"images": images, "texts": texts, "unreadable": unreadable}


def finish(output_dir: str, manifest: dict) -> None:
    """The manifest last (the index is whole from then on), then the parts go."""
    _write_json(os.path.join(output_dir, MANIFEST), manifest)
    shutil.rmtree(os.path.join(output_dir, PARTS), ignore_errors=True)


class Rows:
    """Random access to the lines of a .jsonl file: the byte offset of each line, found once by
    reading the file in blocks."""

    BLOCK = 1 << 26

    def __init__(self, path: str):
        self.path = path
        starts, position = [np.zeros(1, np.int64)], 0
        with open(path, "rb") as f:
            while block := f.read(self.BLOCK):
                starts.append(np.flatnonzero(np.frombuffer(block, np.uint8) == 10).astype(np.int64) + position + 1)
                position += len(block)
        self.starts = np.concatenate(starts)[:-1]         # the last newline starts no line

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict:
        with open(self.path, "rb") as f:
            f.seek(int(self.starts[i]))
            return json.loads(f.readline())


class StoredIndex:
    """An index folder opened for search: the manifest, the features (memory-mapped), the rows and
    the nearest-neighbour indexes of the images and, when the collection has captions, the texts."""

    def __init__(self, folder: str, manifest: dict):
        self.folder, self.manifest = folder, manifest
        self.plan, self.specs = manifest["plan"], manifest["ann"]
        self.image_features = np.load(os.path.join(folder, IMAGE_FEATURES), mmap_mode="r")
        self.images = Rows(os.path.join(folder, IMAGE_ROWS))
        self.image_ann = ann.read(os.path.join(folder, IMAGE_ANN))
        self.has_texts = self.specs.get("texts") is not None
        if self.has_texts:
            self.text_features = np.load(os.path.join(folder, TEXT_FEATURES), mmap_mode="r")
            self.texts = Rows(os.path.join(folder, TEXT_ROWS))
            self.text_ann = ann.read(os.path.join(folder, TEXT_ANN))

    @property
    def identity(self) -> str:
        return self.plan["identity"]


def open_index(folder: str) -> StoredIndex:
    """ValueError naming what is wrong: no such folder, an unfinished index, not an index, a file
    missing or unreadable."""
    if not os.path.isdir(folder):
        raise ValueError("no such folder")
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest_path):
        if read_plan(folder) is not None:
            raise ValueError("an unfinished index: run the same `python -m albef_ds.index` command again to finish it")
        raise ValueError(f"not an index (no {MANIFEST}): make one with `python -m albef_ds.index`")
    try:
        manifest = json.loads(Path(manifest_path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{MANIFEST} is not JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{MANIFEST} is not the manifest of an {FORMAT} folder")
    if manifest.get("version") != VERSION:
        raise ValueError(f"an index of version {manifest.get('version')}; this albef_ds reads version {VERSION}: "
                         "index the collection again")
    needed = [IMAGE_FEATURES, IMAGE_ROWS, IMAGE_ANN] + ([TEXT_FEATURES, TEXT_ROWS, TEXT_ANN]
                                                      if manifest["ann"].get("texts") else [])
    missing = [n for n in needed if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise ValueError(f"{', '.join(missing)} missing: index the collection again")
    try:
        return StoredIndex(folder, manifest)
    except (OSError, RuntimeError) as exc:            # faiss raises RuntimeError on a damaged file
        raise ValueError(f"cannot be read: {type(exc).__name__}: {exc}") from None
