"""A checkpoint that verifies itself: every file of a tag listed with its size and CRC-32 in
`<tag>/manifest.json`, written last (after every rank finished writing; `latest` moves after it).

CRC-32 (zlib) finds what breaks checkpoints in practice: a file cut short (a node died while
writing, a full disk), a block of zeros or garbage (a bad copy), a file of another save. It is no
defence against a forgery and does not need to be; it reads at memory speed (about 1 GB/s per core
here), and the work is split over the ranks: each hashes its share of the tag's files while they
are still in the page cache (docs/benchmarks.md gives the cost measured on a save).
"""
from __future__ import annotations

import json
import os
import zlib

from .. import distributed
from ..fileio import atomic_write

MANIFEST = "manifest.json"
FORMAT = 1
CHUNK = 1 << 24


def checksum(path: str) -> str:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def tag_files(folder: str) -> list[str]:
    """The files of a tag, relative to it: everything but the manifest and the universal checkpoint
    a resume on another number of ranks derives from it (albef_ds.checkpoint.elastic)."""
    out = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d != "universal" and not d.startswith("."))
        out += [os.path.relpath(os.path.join(root, n), folder) for n in names
                if n not in (MANIFEST, "evaluation.json") and not n.startswith(".")]
    return sorted(out)


def _describe(folder: str, names: list[str]) -> dict:
    return {n: {"bytes": os.path.getsize(os.path.join(folder, n)), "crc32": checksum(os.path.join(folder, n))}
            for n in names}


def write_manifest(folder: str) -> None:
    """Called by every rank once all have written the tag: each describes its share of the files,
    rank 0 writes the manifest (atomically)."""
    names = tag_files(folder) if distributed.rank() == 0 else None
    names = distributed.gather_objects(names)[0]
    share = names[distributed.rank()::distributed.world_size()]
    files = {}
    for part in distributed.gather_objects(_describe(folder, share)):
        files.update(part)
    if distributed.rank() == 0:
        text = json.dumps({"format": FORMAT, "files": files}, indent=1, sort_keys=True)
        atomic_write(os.path.join(folder, MANIFEST), lambda tmp: open(tmp, "w").write(text))


def has_manifest(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MANIFEST))


def verify(folder: str, split: bool = True) -> list[str]:
    """What is wrong with a tag against its manifest (empty: nothing): each problem names the file.
    With `split` (in a process group) every rank checks a share and all get every problem."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as f:
            files = json.load(f)["files"]
        names = sorted(files)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return [f"{path}: unreadable manifest ({type(exc).__name__}: {exc})"]
    rank, world = (distributed.rank(), distributed.world_size()) if split else (0, 1)
    problems = []
    for name in names[rank::world]:
        file, want = os.path.join(folder, name), files[name]
        if not os.path.isfile(file):
            problems.append(f"{file}: missing")
        elif os.path.getsize(file) != want.get("bytes"):
            problems.append(f"{file}: {os.path.getsize(file)} bytes, the save wrote {want.get('bytes')}")
        elif checksum(file) != want.get("crc32"):
            problems.append(f"{file}: its content changed since the save (CRC-32 {checksum(file)}, was {want.get('crc32')})")
    if split and world > 1:
        problems = [p for part in distributed.gather_objects(problems) for p in part]
    return sorted(problems)
