"""A generated VQA corpus of the demo's shapes (albef_ds.synthetic.shapes), in ALBEF's file format.

Each image (1-3 shapes of one colour, kind and size at one position) gets questions about its
colour, shape, count and position, and a yes/no question ("is there a red circle"), each with ten
annotators' answers: most give the right one, the others another answer of the kind (another
colour, count ...), so the loss weights and the accuracy see disagreement. Files, as ALBEF's:
vqa_train.json and vqa_heldout.json (VQA entries with ten answers; held-out on other images, with
answer and question types), vg_qa.json (Visual Genome style: one answer, its own image root),
answer_list.json (every answer a question can have, and the confusions).

Every file is a function of (seed, sizes): a rerun writes the same bytes.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

from ..fileio import atomic_write
from .shapes import ALL_ATTRIBUTES, COLOURS, COUNTS, POSITIONS, SHAPES, render

ANNOTATORS = 10
AGREEING = (8, 10)                   # annotators who give the right answer: 8 to 10 of the ten
SHAPE_NAMES = tuple(SHAPES)
QUESTIONS = {   # kind -> (templates, answer type); {be} {thing}: "is the shape" or "are the shapes"
    "colour": (("what colour {be} the {thing}", "what is the colour of the {thing}", "which colour {be} shown"),
               "other"),
    "shape": (("what shape is it", "which shape is shown", "what kind of shape is in the picture"), "other"),
    "count": (("how many shapes are there", "how many shapes are in the image", "what number of shapes is shown"),
              "number"),
    "position": (("where {be} the {thing}", "where in the image {be} the {thing}", "at which side {be} the {thing}"),
                 "other"),
    "exists": (("is there a {colour} {shape}", "does the picture show a {colour} {shape}"), "yes/no"),
}


def _confusions(kind: str, truth: str) -> list[str]:
    """Answers an annotator gives by mistake."""
    if kind == "colour":
        return [c for c in COLOURS if c != truth]
    if kind == "shape":
        return [s for s in SHAPE_NAMES if s != truth]
    if kind == "count":
        return [str(c) for c in COUNTS if str(c) != truth]
    if kind == "position":
        return [p for p in POSITIONS if p != truth]
    return ["no" if truth == "yes" else "yes"]


def _question(kind: str, attributes: dict, rng: random.Random) -> tuple[str, str]:
    """(question, right answer) of one kind about an image."""
    templates = QUESTIONS[kind][0]
    be, thing = ("is", "shape") if attributes["count"] == 1 else ("are", "shapes")
    if kind == "exists":            # half the time one of the two is swapped
        colour, shape = attributes["colour"], attributes["shape"]
        truth = rng.random() < 0.5
        if not truth and rng.random() < 0.5:
            colour = rng.choice([c for c in COLOURS if c != colour])
        elif not truth:
            shape = rng.choice([s for s in SHAPE_NAMES if s != shape])
        return rng.choice(templates).format(colour=colour, shape=shape), "yes" if truth else "no"
    answer = {"colour": attributes["colour"], "shape": attributes["shape"], "count": str(attributes["count"]),
              "position": attributes["position"]}[kind]
    return rng.choice(templates).format(be=be, thing=thing), answer


def annotators_answers(kind: str, truth: str, rng: random.Random) -> list[str]:
    agreeing = rng.randint(*AGREEING)
    others = _confusions(kind, truth)
    answers = [truth] * agreeing + [rng.choice(others) for _ in range(ANNOTATORS - agreeing)]
    rng.shuffle(answers)
    return answers


def answer_list() -> list[str]:
    """Every answer a question or an annotator can give."""
    return [*COLOURS, *SHAPE_NAMES, *(str(c) for c in COUNTS), *POSITIONS, "yes", "no"]


def _rendered(root: str, folder: str, images: int, size: int, seed: int):
    """(index, path, attributes, rng) of `images` new images, written to root/folder/."""
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    for index in range(images):
        rng = random.Random(f"{seed}:{folder}:{index}")
        attributes = rng.choice(ALL_ATTRIBUTES)
        path = f"{folder}/{index:06d}.png"
        render(attributes, size, rng).save(os.path.join(root, path), format="PNG")
        yield index, path, attributes, rng


def _split(root: str, split: str, images: int, size: int, seed: int, first_id: int) -> list[dict]:
    """VQA entries of a split: `images` new images, one question of each kind per image."""
    entries = []
    for index, path, attributes, rng in _rendered(root, split, images, size, seed):
        for k, kind in enumerate(QUESTIONS):
            question, truth = _question(kind, attributes, rng)
            entries.append({"question_id": first_id + index * len(QUESTIONS) + k, "question": question,
                            "answer": annotators_answers(kind, truth, rng), "image": path, "dataset": "vqa",
                            "answer_type": QUESTIONS[kind][1], "question_type": kind})
    return entries


def _vg_split(root: str, images: int, size: int, seed: int) -> list[dict]:
    """Visual Genome style entries: one question per image, one answer (the right one)."""
    entries = []
    for index, path, attributes, rng in _rendered(root, "image", images, size, seed):
        question, truth = _question(rng.choice(list(QUESTIONS)), attributes, rng)
        entries.append({"question_id": index, "question": question, "answer": truth, "image": path, "dataset": "vg"})
    return entries


def _write_json(path: str, value) -> str:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value)))
    return path


def write_vqa_corpus(out_dir: str, train_images: int = 600, heldout_images: int = 100, vg_images: int = 150,
                     image_size: int = 64, seed: int = 0) -> dict:
    """Writes the corpus to `out_dir`; returns the paths: {"train", "heldout", "vg", "answer_list"}
    (annotation files), {"vqa_root", "vg_root"} (their image roots)."""
    out_dir = os.path.abspath(out_dir)
    vqa_root, vg_root = os.path.join(out_dir, "vqa_images"), os.path.join(out_dir, "vg_images")
    train = _split(vqa_root, "train", train_images, image_size, seed, 0)
    heldout = _split(vqa_root, "heldout", heldout_images, image_size, seed, len(train))
    for entry in train:               # ALBEF's training files carry no types
        del entry["answer_type"], entry["question_type"]
    return {"train": _write_json(os.path.join(out_dir, "vqa_train.json"), train),
            "heldout": _write_json(os.path.join(out_dir, "vqa_heldout.json"), heldout),
            "vg": _write_json(os.path.join(out_dir, "vg_qa.json"), _vg_split(vg_root, vg_images, image_size, seed)),
            "answer_list": _write_json(os.path.join(out_dir, "answer_list.json"), answer_list()),
            "vqa_root": vqa_root, "vg_root": vg_root}


def shuffle_images(source: str, destination: str, seed: int = 0) -> str:
    """The annotation file with its entries' images permuted: what a question-only model learns."""
    entries = json.loads(Path(source).read_text())
    images = [e["image"] for e in entries]
    random.Random(f"{seed}:shuffle").shuffle(images)
    return _write_json(destination, [{**e, "image": image} for e, image in zip(entries, images)])
