"""A generated grounding corpus in ALBEF's RefCOCO+ file formats, for the tests and the docs.

Each image shows two or three coloured shapes (the shapes corpus' colours and outlines,
albef_ds.synthetic.shapes) at random places that do not overlap, on a plain grey background. Every
shape is referred to by one expression that names its colour and kind ("the red circle"), unique
in its image: the shapes of an image have distinct colours, and each after the first has the kind
of an earlier one half of the time (so the kind alone often does not tell them apart). Files
(under `out_dir`):

  images/<image id>.png
  refcoco+_train.json   [{"image", "text"}]                       (ALBEF's train entries)
  refcoco+_val.json     [{"image", "text", "ref_id", "image_id", "bbox", "split"}]
  refcoco+_test.json    the same, for testA (images of two shapes) and testB (three shapes)
  dets.json             {str(image id): [[x, y, w, h], ...]}: every shape's box plus distractors
                        (background boxes that touch no shape, and the box around two shapes),
                        in a shuffled order
  cocos.json            {str(image id): [[x, y, w, h], ...]}: the shapes' boxes alone

ALBEF's val / test entries carry only "ref_id": the box and split of a ref come from the REFER
toolkit's refs(unc).p, which is not distributed here. The generated entries therefore carry them
("bbox" [x, y, w, h] in image pixels, "split", "image_id"), and albef_ds.eval.grounding reads
them from the entry when present. Every file is a function of (seed, counts, image size).

    python -m albef_ds.synthetic.grounding --out_dir output/grounding_data

prints the files, the overrides that train albef_ds/configs/tiny_grounding.yaml on them and the
arguments of `python -m albef_ds.evaluate grounding` on the test file.
"""
from __future__ import annotations

import json
import os
import random
import shlex

from PIL import Image, ImageDraw

from ..cli import ArgumentParser
from .shapes import COLOURS, SHAPES, SUPERSAMPLE, outline

TEMPLATES = ("the {colour} {shape}", "a {colour} {shape}", "{colour} {shape}",
             "the {colour} {shape} in the picture", "the {colour} {shape} in the image")
RADIUS = (0.11, 0.17)             # shape radius as a fraction of the image side
BACKGROUND_BOXES = 3
SPLIT_FILES = {"train": "refcoco+_train.json", "val": "refcoco+_val.json", "test": "refcoco+_test.json"}


def _attributes(count: int, rng: random.Random) -> list[tuple[str, str]]:
    """`count` (colour, shape) pairs of distinct colours; each after the first is of the kind of an
    earlier one with probability 1/2 (so the kind alone often does not tell them apart)."""
    colours = rng.sample(list(COLOURS), count)
    shapes = [rng.choice(list(SHAPES))]
    for _ in range(count - 1):
        shapes.append(rng.choice(shapes) if rng.random() < 0.5 else rng.choice(list(SHAPES)))
    return list(zip(colours, shapes))


def _overlap(a, b, margin: float = 0.0) -> bool:
    return (a[0] < b[0] + b[2] + margin and b[0] < a[0] + a[2] + margin
            and a[1] < b[1] + b[3] + margin and b[1] < a[1] + a[3] + margin)


def _place(count: int, size: int, rng: random.Random) -> list[tuple[float, float, float]]:
    """(x, y, r) of `count` shapes whose bounding squares keep apart, inside the image."""
    while True:
        placed = []
        for _ in range(count):
            for _ in range(100):
                r = rng.uniform(*RADIUS) * size
                x, y = rng.uniform(1.3 * r, size - 1.3 * r), rng.uniform(1.3 * r, size - 1.3 * r)
                square = (x - 1.3 * r, y - 1.3 * r, 2.6 * r, 2.6 * r)
                if not any(_overlap(square, (px - 1.3 * pr, py - 1.3 * pr, 2.6 * pr, 2.6 * pr), 2)
                           for px, py, pr in placed):
                    placed.append((x, y, r))
                    break
        if len(placed) == count:
            return placed


def render_scene(count: int, size: int, rng: random.Random) -> tuple[Image.Image, list[dict]]:
    """An image of `count` shapes and, per shape, {"colour", "shape", "bbox"} (the outline's
    bounding box [x, y, w, h] in image pixels)."""
    side = size * SUPERSAMPLE
    grey = rng.randint(25, 80)
    image = Image.new("RGB", (side, side), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    objects = []
    for (colour, shape), (x, y, r) in zip(_attributes(count, rng), _place(count, size, rng)):
        polygon = outline(shape, x * SUPERSAMPLE, y * SUPERSAMPLE, r * SUPERSAMPLE)
        draw.polygon(polygon, fill=COLOURS[colour])
        xs, ys = [p[0] / SUPERSAMPLE for p in polygon], [p[1] / SUPERSAMPLE for p in polygon]
        box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
        objects.append({"colour": colour, "shape": shape, "bbox": [round(v, 2) for v in box]})
    return image.resize((size, size), Image.BOX), objects


def proposals(objects: list[dict], size: int, rng: random.Random) -> list[list[float]]:
    """Every shape's box, BACKGROUND_BOXES boxes of a shape's size that touch no shape, and the box
    around two of the shapes (the largest proposal), shuffled."""
    boxes = [o["bbox"] for o in objects]
    background = []
    for _ in range(200):
        if len(background) == BACKGROUND_BOXES:
            break
        w, h = (rng.uniform(0.2, 0.35) * size for _ in range(2))
        box = [rng.uniform(0, size - w), rng.uniform(0, size - h), w, h]
        if not any(_overlap(box, b) for b in boxes + background):
            background.append([round(v, 2) for v in box])
    a, b = rng.sample(boxes, 2)
    x0, y0 = min(a[0], b[0]), min(a[1], b[1])
    union = [x0, y0, max(a[0] + a[2], b[0] + b[2]) - x0, max(a[1] + a[3], b[1] + b[3]) - y0]
    out = boxes + background + [[round(v, 2) for v in union]]
    rng.shuffle(out)
    return out


def write_grounding_corpus(out_dir: str, train_images: int = 800, val_images: int = 60,
                           test_images: int = 120, image_size: int = 128, seed: int = 0) -> dict:
    """Writes the corpus (see the module doc) and returns the paths: {"train", "val", "test",
    "dets", "cocos", "image_root"}. Images of the three splits are distinct."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    entries = {"train": [], "val": [], "test": []}
    dets, cocos = {}, {}
    counts = {"train": train_images, "val": val_images, "test": test_images}
    image_id, ref_id = 0, 0
    for split, n in counts.items():
        for index in range(n):
            image_id += 1
            rng = random.Random(f"{seed}:{split}:{index}")
            count = rng.choice((2, 3))
            image, objects = render_scene(count, image_size, rng)
            name = f"images/{image_id:06d}.png"
            image.save(os.path.join(out_dir, name))
            for o in objects:
                text = rng.choice(TEMPLATES).format(colour=o["colour"], shape=o["shape"])
                if split == "train":
                    entries[split].append({"image": name, "text": text})
                    continue
                ref_id += 1
                label = "val" if split == "val" else ("testA" if count == 2 else "testB")
                entries[split].append({"image": name, "text": text, "ref_id": ref_id, "image_id": image_id,
                                       "bbox": o["bbox"], "split": label})
            if split != "train":
                dets[str(image_id)] = proposals(objects, image_size, rng)
                cocos[str(image_id)] = [o["bbox"] for o in objects]
    paths = {split: os.path.join(out_dir, SPLIT_FILES[split]) for split in entries}
    for split, items in entries.items():
        with open(paths[split], "w") as f:
            json.dump(items, f)
    for name, content in (("dets", dets), ("cocos", cocos)):
        paths[name] = os.path.join(out_dir, f"{name}.json")
        with open(paths[name], "w") as f:
            json.dump(content, f)
    paths["image_root"] = out_dir
    return paths


def training_overrides(paths: dict) -> list[str]:
    """The overrides that point albef_ds/configs/tiny_grounding.yaml at the corpus of `paths`
    (write_grounding_corpus's result)."""
    root = paths["image_root"]
    return [f"data.corpora=[{{name: shapes_grounding, annotations: [{paths['train']}], image_root: {root}}}]",
            f"eval.data=[{paths['val']}]", f"eval.image_root={root}", f"grounding.dets={paths['dets']}"]


def main(argv=None) -> None:
    ap = ArgumentParser(description="Writes the generated grounding corpus (ALBEF's formats)")
    ap.add_argument("--out_dir", required=True)
    ap.add_argument("--train_images", type=int, default=800)
    ap.add_argument("--val_images", type=int, default=60)
    ap.add_argument("--test_images", type=int, default=120)
    ap.add_argument("--image_size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    paths = write_grounding_corpus(args.out_dir, args.train_images, args.val_images, args.test_images,
                                   args.image_size, args.seed)
    print(json.dumps({"files": paths,
                      "train_overrides": shlex.join(training_overrides(paths)),
                      "evaluate_arguments": shlex.join(["--data", paths["test"], "--dets", paths["dets"],
                                                        "--image_root", paths["image_root"]])}, indent=1))


if __name__ == "__main__":
    main()
