"""NLVR-shapes: a generated corpus in ALBEF's NLVR2 format, for tests and the demo of NLVR2.

Each sample is a pair of images from the shapes renderer (albef_ds.data.synthetic: one group of
1-3 shapes of one colour and kind) and a statement about both, True or False:

    the left image has red circles and the right one has none      (image 0 has them, image 1 not)
    the right image has blue shapes and the left one has none      (the mirror)
    both images have green stars                                   (both have them)
    neither image has purple squares                               (neither has them)

"has red circles": the image's shapes are red circles ("red shapes": are red). The label is drawn
first (True or False with probability 1/2, whatever the statement), then the images are drawn to
make it so; a False pair is any of the other three has / has-not combinations, so half of them
differ from a True pair by one image and a third by the order of the images alone. The sentence
alone therefore tells nothing (its label is a coin flip), and the left / right words matter.
Entries: {"images": ["images/<split>-<i>-img0.png", ...], "sentence", "label": "True" | "False"}.
"""
from __future__ import annotations

import random

from .synthetic import ALL_ATTRIBUTES, COLOURS, SHAPES, render
from .synthetic_labelled import image_path, write_labelled_corpus

PREFIX = "nlvr"
# statement template -> (phrasings, which images have the thing when it is True)
STATEMENTS = {
    "left_only": (("the left image has {thing} and the right one has none",
                   "only the left image has {thing}"), (True, False)),
    "right_only": (("the right image has {thing} and the left one has none",
                    "only the right image has {thing}"), (False, True)),
    "both": (("both images have {thing}", "each image has {thing}"), (True, True)),
    "neither": (("neither image has {thing}", "no image has {thing}"), (False, False)),
}
CASES = ((True, True), (True, False), (False, True), (False, False))
VERSION = 1


def _has(attributes: dict, colour: str, shape) -> bool:
    return attributes["colour"] == colour and (shape is None or attributes["shape"] == shape)


def _attributes(colour: str, shape, has: bool, rng: random.Random) -> dict:
    """Renderer attributes whose shapes are (has) or are not (not has) the thing."""
    candidates = [a for a in ALL_ATTRIBUTES if _has(a, colour, shape) == has]
    return rng.choice(candidates)


def make_sample(split: str, index: int, rng: random.Random, image_size: int = 64) -> tuple[dict, dict]:
    """One entry of NLVR-shapes and its two images."""
    template = rng.choice(list(STATEMENTS))
    phrasings, when_true = STATEMENTS[template]
    colour = rng.choice(list(COLOURS))
    shape = rng.choice([None, *SHAPES])
    thing = f"{colour} {SHAPES[shape] if shape else 'shapes'}"
    truth = rng.random() < 0.5
    case = when_true if truth else rng.choice([c for c in CASES if c != when_true])
    names = [f"{split}-{index:06d}-img{slot}.png" for slot in (0, 1)]
    images = {name: render(_attributes(colour, shape, has, rng), image_size, rng) for name, has in zip(names, case)}
    entry = {"images": [image_path(n) for n in names], "sentence": rng.choice(phrasings).format(thing=thing),
             "label": "True" if truth else "False"}
    return entry, images


def write_nlvr_shapes(out_dir: str, train: int = 4000, dev: int = 400, test: int = 400, image_size: int = 64,
                      seed: int = 0) -> dict:
    """Writes nlvr_train/dev/test.json and their images to `out_dir` (once per configuration).
    Returns {"image_root": out_dir, "train": path, "dev": path, "test": path}."""
    config = {"version": VERSION, "image_size": image_size, "seed": seed}
    return write_labelled_corpus(out_dir, PREFIX, {"train": train, "dev": dev, "test": test}, config,
                                 lambda split, i, rng: make_sample(split, i, rng, image_size))
