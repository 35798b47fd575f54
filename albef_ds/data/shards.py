"""Shard lists: pattern expansion and checks, sample counts (sizes.json), shard writing.

A corpus in the config is a list of shard patterns: local paths, brace patterns such as
`/data/cc12m/cc12m-{00000..01242}.tar`, or `pipe:` commands whose output is a tar stream (for
object stores: `pipe:aws s3 cp s3://bucket/cc12m-{00000..01242}.tar -`). Its sample count comes from
the config or, when that is 0, from the `sizes.json` files next to local shards
(`{"<shard file name>": <samples>}`, as written by tools/make_shards.py) or img2dataset's
per-shard `<shard>_stats.json`.

A corpus can instead name ALBEF annotation files (`annotations: [vqa_train.json]`, with
`image_root`): they are read directly, one sample per entry, in runs of ANNOTATION_SHARD entries
that the stream treats as shards (the images are read from the image root as the entry is used).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import braceexpand
import webdataset as wds

from albef_ds.config import ConfigError, CorpusConfig
from albef_ds.data.samples import IMAGE_EXTENSIONS, annotation_sample, read_shard

SIZES_FILE = "sizes.json"
ANNOTATION_SHARD = 1000      # entries of an annotation file read as one shard


@dataclass(frozen=True)
class Shard:
    url: str       # what webdataset opens: a path or a `pipe:` command; or an annotation file
    name: str      # key prefix "<corpus>/<shard stem>", unique over the whole stream
    weight: float  # relative probability of drawing this shard in resampled mode
    entries: Optional[tuple[int, int]] = None    # annotation file: the entries [start, end)
    image_root: Optional[str] = None             # annotation file: where its image paths start


def open_shard(shard: Shard) -> Iterator[dict]:
    """The raw samples of a shard, in order (albef_ds.data.samples)."""
    if shard.entries is None:
        yield from read_shard(shard.url)
        return
    start, end = shard.entries
    entries = cached_annotations(shard.url)
    for index in range(start, min(end, len(entries))):
        yield annotation_sample(f"{index:09d}", entries[index], shard.image_root)


def read_annotations(path: str) -> list:
    """An ALBEF annotation file: a JSON list of entries."""
    with open(path) as f:
        entries = json.load(f)
    if not isinstance(entries, list):
        raise ValueError(f"annotation file {path} holds a {type(entries).__name__}, not a list of entries")
    return entries


# the stream reads an annotation file's entries in runs of 1000: the file is parsed once per worker
cached_annotations = functools.lru_cache(maxsize=4)(read_annotations)


def check_corpus_annotations(corpora: list, check: Callable[[list, str], None]) -> None:
    """check(entries, path) on every annotation file that data.corpora (CorpusConfig or its dict)
    read directly, before anything is built: a bad entry would otherwise stop the run where the
    stream reaches it. A ValueError of `check` becomes a ConfigError "data.corpora: ...". A file
    that cannot be read is left to the corpora's own check (resolve_corpora), which names it."""
    for corpus in corpora:
        annotations = corpus.get("annotations", []) if isinstance(corpus, dict) else corpus.annotations
        for path in map(os.path.expandvars, annotations):
            try:
                entries = cached_annotations(path)
            except (OSError, ValueError):
                continue
            try:
                check(entries, path)
            except ValueError as exc:
                raise ConfigError(f"data.corpora: {exc}") from None


def is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def expand_pattern(pattern: str) -> list[str]:
    """The shards of one pattern. Environment variables are expanded (`${ALBEF_DATA_ROOT}/cc3m/...`,
    set per cluster by slurm/common.sh). Local files that do not exist are dropped (img2dataset
    leaves gaps where downloads failed); a pattern that leaves nothing is an error naming it."""
    urls = list(braceexpand.braceexpand(os.path.expandvars(pattern)))
    urls = [u for u in urls if not is_local(u) or os.path.isfile(u)]
    if not urls:
        raise ValueError(f"shard pattern '{pattern}' matches no file")
    return urls


def _stem(url: str) -> str:
    """The shard file name without `.tar`, also inside a `pipe:` command."""
    found = re.findall(r"([^/\s]+)\.tar", url)
    return found[-1] if found else url


def read_sizes(urls: Iterable[str]) -> int:
    """Samples in local shards according to the sizes.json next to them or, for img2dataset
    output, its per-shard `<shard>_stats.json` ("successes")."""
    total, tables = 0, {}
    for url in urls:
        folder = os.path.dirname(url) if is_local(url) else None
        if folder not in tables:
            path = os.path.join(folder, SIZES_FILE) if folder is not None else None
            tables[folder] = json.loads(Path(path).read_text()) if path and os.path.isfile(path) else {}
        name = os.path.basename(url)
        stats = os.path.join(folder, f"{_stem(url)}_stats.json") if folder is not None else None
        if name in tables[folder]:
            total += int(tables[folder][name])
        elif stats and os.path.isfile(stats):
            total += int(json.loads(Path(stats).read_text())["successes"])
        else:
            raise ValueError(f"no sample count for shard '{url}': set the corpus' samples in the "
                             f"config or put a {SIZES_FILE} next to the shards")
    return total


def resolve_corpora(corpora: list) -> tuple[list[Shard], int]:
    """All shards of all corpora, each weighted so that in resampled mode a corpus contributes
    samples in proportion to its `weight`, or to its size when no corpus sets a weight; and the
    total sample count of the corpora."""
    corpora = [c if isinstance(c, CorpusConfig) else CorpusConfig(**c) for c in corpora]
    if not corpora:
        raise ValueError("data.corpora is empty: list at least one corpus of shards")
    weighted = [c.weight is not None for c in corpora]
    if any(weighted) and not all(weighted):
        raise ValueError("set `weight` on every corpus or on none: "
                         + ", ".join(f"{c.name or i}={c.weight}" for i, c in enumerate(corpora)))
    shards, total = [], 0
    for i, corpus in enumerate(corpora):
        name = corpus.name or f"corpus{i}"
        if corpus.annotations:
            if corpus.shards:
                raise ValueError(f"corpus '{name}' names both shards and annotation files: make two corpora")
            found, samples = _annotation_shards(corpus, name)
            share = corpus.weight if corpus.weight is not None else samples
            shards += [dataclasses.replace(s, weight=share / samples) for s in found]
            total += samples
            continue
        urls = [u for pattern in corpus.shards for u in expand_pattern(pattern)]
        if not urls:
            raise ValueError(f"corpus '{name}' lists no shard patterns")
        samples = corpus.samples or read_sizes(urls)
        if samples <= 0 or (corpus.weight is not None and corpus.weight <= 0):
            raise ValueError(f"corpus '{name}' needs positive samples and weight, "
                             f"has {samples} and {corpus.weight}")
        stems = [_stem(u) for u in urls]
        if len(set(stems)) != len(stems):
            raise ValueError(f"corpus '{name}' has two shards with one file name; sample keys would "
                             "collide: make each folder a corpus of its own")
        # A draw reads a whole shard; drawing every shard of a corpus with probability q/N (q the
        # corpus' share, N its samples) makes the corpus' expected share of samples q.
        share = corpus.weight if corpus.weight is not None else samples
        shards += [Shard(u, f"{name}/{s}", share / samples) for u, s in zip(urls, stems)]
        total += samples
    return shards, total


def _annotation_shards(corpus: CorpusConfig, name: str) -> tuple[list[Shard], int]:
    """Runs of ANNOTATION_SHARD entries of each annotation file, and the number of entries."""
    image_root = os.path.expandvars(corpus.image_root)
    if image_root and not os.path.isdir(image_root):
        raise ValueError(f"corpus '{name}': image_root {image_root} is not a folder")
    shards, samples = [], 0
    for path in corpus.annotations:
        path = os.path.expandvars(path)
        try:
            entries = cached_annotations(path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"corpus '{name}': cannot read annotation file {path}: {exc}") from None
        stem = Path(path).stem
        shards += [Shard(path, f"{name}/{stem}-{i // ANNOTATION_SHARD:05d}", 1.0, (i, i + ANNOTATION_SHARD),
                         image_root or None)
                   for i in range(0, len(entries), ANNOTATION_SHARD)]
        samples += len(entries)
    if samples == 0:
        raise ValueError(f"corpus '{name}': its annotation files list no entry")
    return shards, corpus.samples or samples


def write_shard(path: str, samples: Iterable[dict]) -> int:
    """Writes samples ({"__key__": str, "<ext>": bytes, ...}) to a tar, atomically (a concurrent
    reader sees the old file or the complete new one); returns the number written."""
    tmp = f"{path}.{os.getpid()}.tmp"
    count = 0
    # mtime fixed: the same samples give the same bytes.
    with wds.TarWriter(tmp, encoder=False, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)
            count += 1
    os.replace(tmp, path)
    return count


def write_sizes(out_dir: str, sizes: dict[str, int]) -> None:
    path = os.path.join(out_dir, SIZES_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    Path(tmp).write_text(json.dumps(sizes, indent=1, sort_keys=True))
    os.replace(tmp, path)


def brace_pattern(out_dir: str, prefix: str, count: int) -> str:
    """The pattern naming shards `<prefix>-00000.tar` .. of one folder."""
    if count == 1:
        return os.path.join(out_dir, f"{prefix}-00000.tar")
    return os.path.join(out_dir, f"{prefix}-{{00000..{count - 1:05d}}}.tar")


# ---- ALBEF annotation JSON -> shards ---------------------------------------------------------

def group_annotations(annotations: list[dict]) -> list[tuple[str, list[str]]]:
    """(image path, captions) per image in order of first appearance; ALBEF's files repeat an
    image once per caption, or give `caption` as a list."""
    captions: dict[str, list[str]] = {}
    for ann in annotations:
        caption = ann["caption"]
        captions.setdefault(ann["image"], []).extend([caption] if isinstance(caption, str) else caption)
    return list(captions.items())


def _write_annotation_shard(job) -> tuple[str, int, int]:
    path, image_root, first_index, items = job

    def samples():
        nonlocal skipped
        for index, (image, captions) in enumerate(items, first_index):
            ext = IMAGE_EXTENSIONS.get(Path(image).suffix.lower())
            file = os.path.join(image_root, image)
            if ext is None or not captions or not os.path.isfile(file):
                skipped += 1
                continue
            # json keeps every caption (the stream draws one per visit); txt the first, for tools
            # that only read img2dataset's txt.
            meta = {"image": image, "caption": captions}
            yield {"__key__": f"{index:09d}", ext: Path(file).read_bytes(),
                   "txt": captions[0].encode("utf-8"), "json": json.dumps(meta).encode("utf-8")}

    skipped = 0
    count = write_shard(path, samples())
    return os.path.basename(path), count, skipped


def make_shards(annotations: list[dict], image_root: str, out_dir: str, prefix: str,
                max_samples: int = 10000, workers: int = 1) -> dict:
    """Writes `<out_dir>/<prefix>-NNNNN.tar` shards of at most `max_samples` images (one sample per
    image with all its captions) and sizes.json; images are stored as they are, not re-encoded.
    Returns {"pattern", "samples", "shards", "skipped"} (skipped: missing or non jpg/png/webp)."""
    items = group_annotations(annotations)
    if not items:
        raise ValueError("the annotation files list no images")
    os.makedirs(out_dir, exist_ok=True)
    jobs = [(os.path.join(out_dir, f"{prefix}-{i // max_samples:05d}.tar"), image_root, i,
             items[i:i + max_samples]) for i in range(0, len(items), max_samples)]
    if workers > 1:
        with Pool(workers) as pool:
            results = pool.map(_write_annotation_shard, jobs, chunksize=1)
    else:
        results = [_write_annotation_shard(job) for job in jobs]
    sizes = {name: count for name, count, _ in results}
    write_sizes(out_dir, sizes)
    return {"pattern": brace_pattern(out_dir, prefix, len(jobs)), "samples": sum(sizes.values()),
            "shards": len(jobs), "skipped": sum(skipped for _, _, skipped in results)}
