"""NLVR-shapes: a generated corpus in ALBEF's NLVR2 format, for tests and the demo of NLVR2.

Each sample is a pair of images from the shapes renderer (albef_ds.synthetic.shapes: one group of
1-3 shapes of one colour and kind) and a statement about the colours of both, True or False:

    the left image has red shapes and the right one has none       (image 0 has them, image 1 not)
    only the right image has blue shapes                           (the mirror)
    both images have green shapes                                  (both have them)
    neither image has purple shapes                                (neither has them)

The statements speak of colours, which the tiny pretrained model names reliably (its masked colour
word: 100%), not of kinds of shapes, which it barely tells apart at 64 px (31%, chance 20%).
The label is drawn first (True or False with probability 1/2, whatever the statement), then the
images are drawn to make it so: a False pair is any of the other three has / has-not combinations,
for "the left image has ... and the right one has none" one of them the True pair in the other
order. The sentence alone therefore tells nothing (its label is a coin flip), and which image is
the left one matters: the left / right words speak of the image slots (NLVR2's pairs).
Entries: {"images": ["images/<split>-<i>-img0.png", ...], "sentence", "label": "True" | "False"}.
"""
from __future__ import annotations

import random

from .labelled import image_path, write_labelled_corpus
from .shapes import ALL_ATTRIBUTES, COLOURS, render

PREFIX = "nlvr"
# statement template -> (phrasings, which images have the thing when it is True)
STATEMENTS = {
    "left_only": (("the left image has {colour} shapes and the right one has none",
                   "only the left image has {colour} shapes"), (True, False)),
    "right_only": (("the right image has {colour} shapes and the left one has none",
                    "only the right image has {colour} shapes"), (False, True)),
    "both": (("both images have {colour} shapes", "each image has {colour} shapes"), (True, True)),
    "neither": (("neither image has {colour} shapes", "no image has {colour} shapes"), (False, False)),
}
CASES = ((True, True), (True, False), (False, True), (False, False))
VERSION = 2


def _attributes(colour: str, has: bool, rng: random.Random) -> dict:
    """Renderer attributes whose shapes are (has) or are not (not has) of `colour`."""
    return rng.choice([a for a in ALL_ATTRIBUTES if (a["colour"] == colour) == has])


def make_sample(split: str, index: int, rng: random.Random, image_size: int = 64) -> tuple[dict, dict]:
    """One entry of NLVR-shapes and its two images."""
    template = rng.choice(list(STATEMENTS))
    phrasings, when_true = STATEMENTS[template]
    colour = rng.choice(list(COLOURS))
    truth = rng.random() < 0.5
    case = when_true if truth else rng.choice([c for c in CASES if c != when_true])
    names = [f"{split}-{index:06d}-img{slot}.png" for slot in (0, 1)]
    images = {name: render(_attributes(colour, has, rng), image_size, rng) for name, has in zip(names, case)}
    entry = {"images": [image_path(n) for n in names], "sentence": rng.choice(phrasings).format(colour=colour),
             "label": "True" if truth else "False"}
    return entry, images


def write_nlvr_shapes(out_dir: str, **sizes) -> dict:
    """Writes nlvr_train/dev/test.json and their images to `out_dir` (once per configuration;
    `sizes`: train, dev, test samples, image_size, seed as write_labelled_corpus takes them).
    Returns {"image_root": out_dir, "train": path, "dev": path, "test": path}."""
    return write_labelled_corpus(out_dir, PREFIX, VERSION, make_sample, **sizes)
