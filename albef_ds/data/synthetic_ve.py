"""VE-shapes: a generated corpus in ALBEF's SNLI-VE format, for tests and the demo of SNLI-VE.

An image has two halves, left and right; each half shows a group of 1-3 shapes of one colour and
kind (the shapes renderer's outlines), shows nothing (plain background), or is hidden behind a
light grey cover. A hypothesis names a colour, a kind and a half:

    there are red circles on the left

    entailment     that half is visible and shows red circles
    contradiction  that half is visible and shows no red circles (other shapes, or nothing)
    neutral        that half is covered: the picture can neither confirm nor refute it

So the three classes are well posed: neutral is not a weaker entailment but what the image leaves
unknown, as SNLI-VE's neutral hypotheses speak of what the premise does not say. The label is drawn
first (each with probability 1/3, whatever the hypothesis), then the image to make it so. Every
image covers exactly one half and shows the other (a group or nothing), so the cover tells nothing
by itself: what decides neutral is whether it hides the half the hypothesis speaks of. Half of the
contradicting halves show a group of the hypothesis' colour or of its kind (not both), so both
words must be checked.
Entries: {"image": "images/<split><i>" (a Flickr-style id: the file is <id>.jpg), "sentence",
"label": "entailment" | "neutral" | "contradiction"}.
"""
from __future__ import annotations

import random

from PIL import Image, ImageDraw

from .synthetic import COLOURS, SHAPES, SIZES, SUPERSAMPLE, _outline
from .synthetic_labelled import image_path, write_labelled_corpus

PREFIX = "ve"
SIDES = {"left": 0.25, "right": 0.75}             # centre of each half, as a fraction of the side
COVER = (200, 200, 200)                          # far from every shape colour and the dark background
HYPOTHESES = ("there are {colour} {shapes} on the {side}", "the {side} side shows {colour} {shapes}",
              "{colour} {shapes} are on the {side}")
LABELS = ("entailment", "neutral", "contradiction")
VERSION = 1


def render_halves(halves: dict, size: int, rng: random.Random) -> Image.Image:
    """halves: {"left": content, "right": content}; content is None (nothing), "cover", or a group
    {"colour", "shape", "count", "size"} drawn in a column at the half's centre."""
    side = size * SUPERSAMPLE
    grey = rng.randint(25, 80)
    image = Image.new("RGB", (side, side), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    for name, content in halves.items():
        left = 0 if name == "left" else side // 2
        if content == "cover":
            draw.rectangle([left, 0, left + side // 2 - 1, side - 1], fill=COVER)
        elif content is not None:
            r = SIZES[content["size"]] * side * rng.uniform(0.92, 1.08)
            cx = (SIDES[name] + rng.uniform(-0.03, 0.03)) * side
            cy = (0.5 + rng.uniform(-0.03, 0.03)) * side
            for i in range(content["count"]):
                shift = (i - (content["count"] - 1) / 2) * 2.5 * r
                draw.polygon(_outline(content["shape"], cx, cy + shift, r), fill=COLOURS[content["colour"]])
    return image.resize((size, size), Image.BOX)


def _group(rng: random.Random, colour=None, shape=None) -> dict:
    return {"colour": colour or rng.choice(list(COLOURS)), "shape": shape or rng.choice(list(SHAPES)),
            "count": rng.choice((1, 2, 3)), "size": rng.choice(list(SIZES))}


def _contradicting(colour: str, shape: str, rng: random.Random):
    """What a visible half shows when it refutes `colour shape`s there."""
    kind = rng.choice(("nothing", "other", "same_colour", "same_shape"))
    if kind == "nothing":
        return None
    if kind == "same_colour":
        return _group(rng, colour, rng.choice([s for s in SHAPES if s != shape]))
    if kind == "same_shape":
        return _group(rng, rng.choice([c for c in COLOURS if c != colour]), shape)
    return _group(rng, rng.choice([c for c in COLOURS if c != colour]), rng.choice([s for s in SHAPES if s != shape]))


def make_sample(split: str, index: int, rng: random.Random, image_size: int = 64) -> tuple[dict, dict]:
    """One entry of VE-shapes and its image."""
    side, other = rng.sample(list(SIDES), 2)
    colour, shape = rng.choice(list(COLOURS)), rng.choice(list(SHAPES))
    label = rng.choice(LABELS)
    if label == "neutral":
        halves = {side: "cover", other: rng.choice((None, _group(rng)))}
    else:
        shown = _group(rng, colour, shape) if label == "entailment" else _contradicting(colour, shape, rng)
        halves = {side: shown, other: "cover"}
    name = f"{split}{index:06d}"
    sentence = rng.choice(HYPOTHESES).format(colour=colour, shapes=SHAPES[shape], side=side)
    image = render_halves(dict(sorted(halves.items())), image_size, rng)
    return {"image": image_path(name), "sentence": sentence, "label": label}, {f"{name}.jpg": image}


def write_ve_shapes(out_dir: str, train: int = 4000, dev: int = 400, test: int = 400, image_size: int = 64,
                    seed: int = 0) -> dict:
    """Writes ve_train/dev/test.json and their images to `out_dir` (once per configuration).
    Returns {"image_root": out_dir, "train": path, "dev": path, "test": path}."""
    config = {"version": VERSION, "image_size": image_size, "seed": seed}
    return write_labelled_corpus(out_dir, PREFIX, {"train": train, "dev": dev, "test": test}, config,
                                 lambda split, i, rng: make_sample(split, i, rng, image_size))
