"""The images of a collection to index, cut into parts: webdataset shards (img2dataset's layout),
an ALBEF annotation file, or a folder of images.

A part is the unit of work that one rank does alone, writes alone and a rerun skips once written:
one shard file, or `part_size` consecutive images of an annotation file or a folder. Each image is
a row: its name (`<shard file>/<key>` as the retrieval evaluator names shard samples, the
annotation's image path, the path under the folder), where its bytes are (a file, or an offset and
size inside an uncompressed tar: search re-reads the images it re-ranks), its captions (json
"caption", else txt; the annotation's captions; a `<stem>.txt` beside a photo) and img2dataset's
"url" when the sample has one.
"""
from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Optional, Union

from ..data.samples import IMAGE_EXTENSIONS, IMAGE_KEYS, sample_captions
from ..data.shards import expand_pattern, is_local

# webdataset's split of a member name into the sample key and its extension (tariterators.base_plus_ext)
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")          # webdataset's metadata members, skipped as it does


@dataclass
class Part:
    """One unit of work: a shard file (`shard`), or rows known up front (`rows`)."""
    number: int
    label: str
    shard: Optional[str] = None
    rows: list = field(default_factory=list)


@dataclass
class Collection:
    """`spec`: what the index records about its data (kind, sources, image root)."""
    spec: dict
    parts: list


def read_collection(data: str, image_root: Optional[str] = None, part_size: int = 8192) -> Collection:
    """The collection at `data`: a folder of images, an annotation file (.json), or shard patterns. ValueError naming what cannot be used; the shards themselves are
    read only when their part is encoded."""
    if os.path.isdir(data):
        return _chunked({"kind": "folder", "sources": [os.path.abspath(data)]}, _folder_rows(data), part_size)
    if data.endswith(".json"):
        if not os.path.isfile(data):
            raise ValueError("no such file")
        with open(data) as f:
            try:
                content = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON file: {exc}") from None
        root = os.path.abspath(image_root) if image_root else None
        return _chunked({"kind": "annotations", "sources": [os.path.abspath(data)], "image_root": root},
                        _annotation_rows(content, root), part_size)
    return _shards([data])


def _shards(patterns: list) -> Collection:
    urls = [u for p in patterns for u in expand_pattern(p)]
    remote = [u for u in urls if not is_local(u)]
    if remote:
        raise ValueError(f"{remote[0]} is not a local file: the index records where each image sits in its "
                         "shard, for search to read it again; copy the shards to a local or mounted disk")
    urls = [os.path.abspath(u) for u in urls]
    parts = [Part(i, os.path.basename(u), shard=u) for i, u in enumerate(urls)]
    return Collection({"kind": "shards", "sources": urls}, parts)


def _chunked(spec: dict, rows: list, part_size: int) -> Collection:
    parts = [Part(i // part_size, f"images {i}..{min(i + part_size, len(rows)) - 1}", rows=rows[i:i + part_size])
             for i in range(0, len(rows), part_size)]
    return Collection(spec, parts)


def _folder_rows(folder: str) -> list[dict]:
    """Every image under `folder` (recursively, in sorted order), with the text of a `<stem>.txt`
    beside it as its caption (clip-retrieval's convention)."""
    rows = []
    for top, dirs, files in os.walk(os.path.abspath(folder)):
        dirs.sort()
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS or name.startswith("."):
                continue
            path = os.path.join(top, name)
            caption_file = os.path.join(top, f"{stem}.txt")
            captions = []
            if os.path.isfile(caption_file):
                with open(caption_file, encoding="utf-8", errors="replace") as f:
                    captions = [f.read().strip()] if os.path.getsize(caption_file) else []
            rows.append({"name": os.path.relpath(path, folder), "source": {"path": path}, "captions": captions})
    if not rows:
        raise ValueError(f"no image ({', '.join(sorted(IMAGE_EXTENSIONS))}) in this folder")
    return rows


def _annotation_rows(entries, image_root: Optional[str]) -> list[dict]:
    """ALBEF's annotation files: [{"image": path, "caption": text or [texts]}, ...]; an image listed
    once per caption is one row with all its captions, in order of first appearance."""
    if not isinstance(entries, list) or not entries:
        raise ValueError("not a non-empty JSON list of {\"image\": ..., \"caption\": ...} entries")
    rows: dict[str, dict] = {}
    for i, entry in enumerate(entries):
        image = entry.get("image") if isinstance(entry, dict) else None
        if not isinstance(image, str) or not image:
            raise ValueError(f"entry {i} has no \"image\" path")
        caption = entry.get("caption", [])
        captions = [caption] if isinstance(caption, str) else [c for c in caption if isinstance(c, str)]
        path = os.path.abspath(os.path.join(image_root, image) if image_root else image)
        rows.setdefault(image, {"name": image, "source": {"path": path}, "captions": []})["captions"] += captions
    if not any(os.path.isfile(r["source"]["path"]) for r in rows.values()):
        first = next(iter(rows.values()))["source"]["path"]
        raise ValueError(f"none of its {len(rows)} images exists (the first would be {first}; --image_root?)")
    return list(rows.values())


def part_rows(part: Part) -> tuple[list[dict], list[dict]]:
    """(rows, problems) of a part. Rows of a shard also carry their image's bytes ("data"); a
    sample without an image member, or a shard that cannot be read to its end, is a problem
    ({"name", "error"}): what could be read is kept."""
    if part.shard is None:
        return part.rows, []
    rows, problems = [], []
    sample: dict = {}

    def close(sample):
        if not sample:
            return
        name = f"{os.path.basename(part.shard)}/{sample['__key__']}"
        image = next((k for k in IMAGE_KEYS if k in sample), None)
        if image is None:
            problems.append({"name": name, "error": "no image member (jpg, jpeg, png, webp)"})
            return
        data, offset = sample[image]
        try:
            captions = sample_captions(sample)
            meta = json.loads(sample["json"].decode("utf-8")) if "json" in sample else {}
        except ValueError:                  # text that is not UTF-8, json that does not parse
            captions, meta = [], {}
        row = {"name": name, "source": {"shard": part.shard, "offset": offset, "size": len(data)},
               "captions": captions, "data": data}
        if isinstance(meta, dict) and isinstance(meta.get("url"), str):
            row["url"] = meta["url"]
        rows.append(row)

    try:
        with tarfile.open(part.shard, mode="r:") as tar:
            for info in tar:
                match = _MEMBER.match(info.name)
                if not info.isreg() or match is None or _META.match(info.name):
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if sample and key != sample["__key__"]:
                    close(sample)
                    sample = {}
                sample["__key__"] = key
                data = tar.extractfile(info).read()
                sample[ext] = (data, info.offset_data) if ext in IMAGE_KEYS else data
                tar.members = []            # a shard of 10,000 samples need not keep its headers
            # a whole tar ends in two zero blocks; tarfile takes a cut-off header for the end
            if os.path.getsize(part.shard) < tar.offset + 2 * tarfile.BLOCKSIZE:
                raise tarfile.ReadError("the file ends inside a member (truncated?)")
    except (tarfile.TarError, OSError, EOFError) as exc:
        problems.append({"name": os.path.basename(part.shard), "error": f"shard read to sample {len(rows)} "
                         f"only: {type(exc).__name__}: {exc}"})
    close(sample)
    return rows, problems


def read_image(source: dict) -> Union[bytes, str]:
    """What albef_ds.data.samples.decode_image takes for a row's image: its file, or its bytes
    read from the shard."""
    if "path" in source:
        return source["path"]
    with open(source["shard"], "rb") as f:
        f.seek(source["offset"])
        return f.read(source["size"])
