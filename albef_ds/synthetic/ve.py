"""VE-shapes: a generated corpus in ALBEF's SNLI-VE format, for tests and the demo of SNLI-VE.

An image has two halves: one shows a group of 1-3 shapes of one colour and kind (the shapes
renderer's outlines) or nothing, the other shows nothing or is hidden behind a light grey cover.
A hypothesis names a colour:

    there are red shapes in the picture

    entailment     red shapes are visible
    contradiction  no red shapes are visible and nothing is covered: the whole scene is in view
    neutral        no red shapes are visible but half the scene is covered: they may be behind it

So the three classes are well posed: neutral is not a weaker entailment but what the image leaves
unknown, as SNLI-VE's neutral hypotheses speak of what the premise does not say, and absence of
evidence refutes only where everything is in view. The label is drawn first (each with probability
1/3, whatever the hypothesis), then the image to make it so: an entailing image is covered half of
the time, a neutral one always, a contradicting one never, and what the visible half shows is drawn
alike for neutral and contradicting images. Neither cue decides alone: the colour tells entailment
from the rest, the cover neutral from contradiction. Hypotheses speak of colours, which the tiny
pretrained model names reliably (its masked colour word: 100%), not of kinds of shapes (31%,
chance 20%). Entries: {"image": "images/<split><i>" (a Flickr-style id: the file is <id>.jpg),
"sentence", "label": "entailment" | "neutral" | "contradiction"}.
"""
from __future__ import annotations

import random

from PIL import Image, ImageDraw

from .labelled import image_path, write_labelled_corpus
from .shapes import COLOURS, SHAPES, SIZES, SUPERSAMPLE, outline

PREFIX = "ve"
SIDES = {"left": 0.25, "right": 0.75}             # centre of each half, as a fraction of the side
COVER = (200, 200, 200)                          # far from every shape colour and the dark background
HYPOTHESES = ("there are {colour} shapes in the picture", "the image shows {colour} shapes",
              "{colour} shapes are in the picture")
LABELS = ("entailment", "neutral", "contradiction")
VERSION = 2


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
                draw.polygon(outline(content["shape"], cx, cy + shift, r), fill=COLOURS[content["colour"]])
    return image.resize((size, size), Image.BOX)


def _group(rng: random.Random, colour: str) -> dict:
    return {"colour": colour, "shape": rng.choice(list(SHAPES)), "count": rng.choice((1, 2, 3)),
            "size": rng.choice(list(SIZES))}


def make_sample(split: str, index: int, rng: random.Random, image_size: int = 64) -> tuple[dict, dict]:
    """One entry of VE-shapes and its image."""
    shown, other = rng.sample(list(SIDES), 2)
    colour = rng.choice(list(COLOURS))
    label = rng.choice(LABELS)
    if label == "entailment":
        content, covered = _group(rng, colour), rng.random() < 0.5
    else:
        # nothing visible (1 in 4) or shapes of another colour
        content = None if rng.random() < 0.25 else _group(rng, rng.choice([c for c in COLOURS if c != colour]))
        covered = label == "neutral"
    name = f"{split}{index:06d}"
    sentence = rng.choice(HYPOTHESES).format(colour=colour)
    image = render_halves(dict(sorted({shown: content, other: "cover" if covered else None}.items())), image_size, rng)
    return {"image": image_path(name), "sentence": sentence, "label": label}, {f"{name}.jpg": image}


def write_ve_shapes(out_dir: str, **sizes) -> dict:
    """Writes ve_train/dev/test.json and their images to `out_dir` (once per configuration;
    `sizes`: train, dev, test samples, image_size, seed as write_labelled_corpus takes them).
    Returns {"image_root": out_dir, "train": path, "dev": path, "test": path}."""
    return write_labelled_corpus(out_dir, PREFIX, VERSION, make_sample, **sizes)
