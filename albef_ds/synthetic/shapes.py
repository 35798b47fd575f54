"""A generated corpus of coloured shapes, for the demo and the tests.

Each image shows 1-3 shapes of one colour, one kind and one size, grouped at one position, on a
plain dark background; its captions name all five attributes (count, size, colour, shape, position)
in varied phrasing, using only words of the tiny vocabulary (configs/tiny_vocab.txt). The attributes
are picked to stay unambiguous at 64x64: six far-apart colours, five outlines, sizes a factor two
apart, group centres a quarter of the image apart.

Every sample is a function of (seed, split, index): the train and held-out splits differ, and a
run, a rerun or another rank writes the same files.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import io
import itertools
import json
import math
import os
import random
from pathlib import Path

from PIL import Image, ImageDraw

from albef_ds import distributed
from albef_ds.config import Config, DataConfig, SyntheticConfig, build_section
from albef_ds.data.shards import brace_pattern, write_shard, write_sizes

COLOURS = {"red": (220, 30, 30), "green": (40, 180, 50), "blue": (40, 90, 235),
           "yellow": (245, 220, 30), "purple": (150, 60, 210), "orange": (250, 140, 20)}
SHAPES = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
          "cross": "crosses"}
SIZES = {"small": 0.065, "large": 0.125}          # shape radius as a fraction of the image side
POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
             "center": (0.5, 0.5)}               # group centre (x, y) as fractions of the side
COUNTS = (1, 2, 3)

COUNT_WORDS = {1: ("a", "one"), 2: ("two",), 3: ("three",)}
SIZE_WORDS = {"small": ("small", "tiny"), "large": ("large", "big")}
POSITION_PHRASES = {
    "left": ("on the left", "on the left side", "at the left"),
    "right": ("on the right", "on the right side", "at the right"),
    "top": ("at the top", "near the top", "in the upper side"),
    "bottom": ("at the bottom", "near the bottom", "in the lower side"),
    "center": ("in the center", "in the middle", "at the centre"),
}
TEMPLATES = ("{things} {where}", "{there} {things} {where}", "{where} {there} {things}",
             "a picture of {things} {where}", "an image showing {things} {where}",
             "a photo with {things} {where}", "the image contains {things} {where}",
             "the picture shows {things} {where}")
TRAIN_CAPTIONS = 3                               # phrasings stored per train image, one drawn per visit
SUPERSAMPLE = 4                                  # draw large, then downsample: smooth edges
MANIFEST = "synthetic.json"
VERSION = 1


def caption(attributes: dict, rng: random.Random) -> str:
    count = attributes["count"]
    shape = attributes["shape"] if count == 1 else SHAPES[attributes["shape"]]
    things = " ".join([rng.choice(COUNT_WORDS[count]), rng.choice(SIZE_WORDS[attributes["size"]]),
                       attributes["colour"], shape])
    return rng.choice(TEMPLATES).format(things=things, there="there is" if count == 1 else "there are",
                                        where=rng.choice(POSITION_PHRASES[attributes["position"]]))


def _ring(x: float, y: float, radii: list[float], start_degrees: float) -> list[tuple[float, float]]:
    """Polygon whose corners sit at equal angles around (x, y), at the given distances."""
    angles = [math.radians(start_degrees + 360 * i / len(radii)) for i in range(len(radii))]
    return [(x + d * math.cos(a), y + d * math.sin(a)) for a, d in zip(angles, radii)]


def outline(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    """Polygon of a shape of radius r centred on (x, y); sizes chosen for similar areas."""
    if shape == "circle":
        return _ring(x, y, [r] * 48, 0)
    if shape == "square":
        return _ring(x, y, [1.15 * r] * 4, 45)
    if shape == "triangle":
        return _ring(x, y, [1.25 * r] * 3, -90)
    if shape == "star":
        return _ring(x, y, [1.25 * r, 0.55 * r] * 5, -90)
    w = 0.35 * r                                  # cross: a plus sign
    return [(x - w, y - r), (x + w, y - r), (x + w, y - w), (x + r, y - w), (x + r, y + w), (x + w, y + w),
            (x + w, y + r), (x - w, y + r), (x - w, y + w), (x - r, y + w), (x - r, y - w), (x - w, y - w)]


def render(attributes: dict, size: int, rng: random.Random) -> Image.Image:
    side = size * SUPERSAMPLE
    grey = rng.randint(25, 80)
    image = Image.new("RGB", (side, side), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    r = SIZES[attributes["size"]] * side * rng.uniform(0.92, 1.08)
    cx, cy = POSITIONS[attributes["position"]]
    cx, cy = (cx + rng.uniform(-0.03, 0.03)) * side, (cy + rng.uniform(-0.03, 0.03)) * side
    # Left / right groups stand in a column, the others in a row, 2.5 radii apart.
    step = (0.0, 2.5 * r) if attributes["position"] in ("left", "right") else (2.5 * r, 0.0)
    count = attributes["count"]
    for i in range(count):
        shift = i - (count - 1) / 2
        draw.polygon(outline(attributes["shape"], cx + shift * step[0], cy + shift * step[1], r),
                     fill=COLOURS[attributes["colour"]])
    return image.resize((size, size), Image.BOX)   # box: the mean of each supersampled cell


ALL_ATTRIBUTES = [dict(zip(("colour", "shape", "count", "size", "position"), values))
                  for values in itertools.product(COLOURS, SHAPES, COUNTS, SIZES, POSITIONS)]


@functools.lru_cache
def _heldout_order(seed: int) -> list[int]:
    order = list(range(len(ALL_ATTRIBUTES)))
    random.Random(f"{seed}:heldout-order").shuffle(order)
    return order


def _sample(cfg: SyntheticConfig, split: str, index: int) -> dict:
    rng = random.Random(f"{cfg.seed}:{split}:{index}")
    if split == "heldout":
        # Held-out images take distinct attribute sets (while there are enough), so each caption
        # describes exactly one held-out image and retrieval on them is well posed.
        order = _heldout_order(cfg.seed)
        attributes = ALL_ATTRIBUTES[order[index % len(order)]]
        captions = [caption(attributes, rng)]
    else:
        attributes = rng.choice(ALL_ATTRIBUTES)
        captions = [caption(attributes, rng) for _ in range(TRAIN_CAPTIONS)]
    png = io.BytesIO()
    render(attributes, cfg.image_size, rng).save(png, format="PNG")
    meta = {"caption": captions, "attributes": attributes}
    return {"__key__": f"{index:07d}", "png": png.getvalue(), "json": json.dumps(meta).encode("utf-8")}


def _write_split(out_dir: str, cfg: SyntheticConfig, split: str, samples: int) -> tuple[list, dict]:
    """([corpus], {shard file: samples}) of one split; no corpus for an empty split."""
    if samples == 0:
        return [], {}
    per_shard = cfg.samples_per_shard
    sizes = {}
    for shard, first in enumerate(range(0, samples, per_shard)):
        name = f"{split}-{shard:05d}.tar"
        indices = range(first, min(first + per_shard, samples))
        sizes[name] = write_shard(os.path.join(out_dir, name), (_sample(cfg, split, i) for i in indices))
    return [{"name": f"shapes-{split}", "shards": [brace_pattern(out_dir, split, len(sizes))],
             "samples": samples, "weight": None}], sizes


def shared_synthetic_corpus(out_dir: str, synthetic_cfg: SyntheticConfig) -> dict:
    """write_synthetic_corpus for a process group: rank 0 writes, then every rank reads the
    manifest (call it on every rank)."""
    if distributed.rank() == 0:
        write_synthetic_corpus(out_dir, synthetic_cfg)
    distributed.barrier()
    return write_synthetic_corpus(out_dir, synthetic_cfg)


def write_synthetic_corpus(out_dir: str, synthetic_cfg: SyntheticConfig) -> dict:
    """Writes the shapes corpus to `out_dir` unless the same configuration is already there.

    Returns {"train": [corpus], "heldout": [corpus]}: each a list of CorpusConfig-compatible dicts
    ({"name", "shards": [pattern], "samples", "weight"}) to use as data.corpora. Train samples
    hold three phrasings (json "caption" list; the stream draws one per visit); held-out samples
    one caption, each for a distinct attribute set while heldout_samples <= 900. Read the held-out
    split with `resampled: false, augment: false` for evaluation. Samples also keep their
    attributes in json "attributes"."""
    cfg = synthetic_cfg if isinstance(synthetic_cfg, SyntheticConfig) else SyntheticConfig(**synthetic_cfg)
    out_dir = os.path.abspath(out_dir)
    manifest_path = Path(out_dir, MANIFEST)
    wanted = {"version": VERSION, "config": dataclasses.asdict(cfg)}
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if {k: manifest.get(k) for k in wanted} == wanted and manifest["out_dir"] == out_dir:
            return {"train": manifest["train"], "heldout": manifest["heldout"]}
    os.makedirs(out_dir, exist_ok=True)
    train, train_sizes = _write_split(out_dir, cfg, "train", cfg.train_samples)
    heldout, heldout_sizes = _write_split(out_dir, cfg, "heldout", cfg.heldout_samples)
    write_sizes(out_dir, {**train_sizes, **heldout_sizes})
    corpora = {"train": train, "heldout": heldout}
    # The manifest is written last (atomically): it marks a complete corpus.
    tmp = f"{manifest_path}.{os.getpid()}.tmp"
    Path(tmp).write_text(json.dumps({**wanted, "out_dir": out_dir, **corpora}, indent=1))
    os.replace(tmp, manifest_path)
    return corpora


def with_generated_corpus(cfg: Config, output_dir: str) -> Config:
    """`cfg` training on the shapes corpus of its data.synthetic section (written once, by rank 0,
    into `<output_dir>/synthetic_data`; call it on every rank) when it names no corpora, and
    evaluating on its held-out split when eval.data is empty. Other configs come back as they are."""
    if cfg.data.corpora or cfg.data.synthetic is None:
        return cfg
    corpora = shared_synthetic_corpus(os.path.join(output_dir, "synthetic_data"), cfg.data.synthetic)
    cfg = copy.deepcopy(cfg)
    cfg.data.corpora = build_section(DataConfig, {"corpora": corpora["train"]}, "data").corpora
    if not cfg.eval.data:
        cfg.eval.data = [p for corpus in corpora["heldout"] for p in corpus["shards"]]
    return cfg
