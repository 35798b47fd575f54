#!/usr/bin/env python
"""Shards of distinct JPEGs cut from real photographs, for measuring the data path on photos.

    python tools/make_photo_shards.py --out /tmp/photos [--count 2000] [--layout img2dataset|640x480]
                                      [--per-shard 500] [--seed 0]

The photographs are the colour ones scikit-image ships (astronaut, cat, coffee, rocket, motorcycle
left and right, retina, immunohistochemistry, Hubble deep field: 300 to 1,411 px, nothing is
downloaded). Each output is a random crop of one of them (40-100% of the area), mirrored half the
time, its brightness, contrast and saturation jittered by up to 20%, then resized and encoded:
- `img2dataset`: as img2dataset's `--resize_mode keep_ratio` writes them, the short side 256-512 px
  (uniform) and the aspect ratio one of the common photo ratios (1:1, 4:3, 3:2, 16:9 and their
  portrait forms), JPEG quality 95 (img2dataset's default);
- `640x480`: 640 x 480 landscape, quality 90 (what tools/bench_data.py decoded before).
Samples are `<key>.jpg` + `<key>.txt` (a caption naming the source photo), written as
`photos-NNNNN.tar` with `sizes.json`. Prints the corpus as JSON (a `data.corpora` entry).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from typing import Iterator

import numpy as np
from PIL import Image, ImageEnhance

from albef_ds.cli import ArgumentParser, check_at_least, check_writable_folder, report_input_error
from albef_ds.config import ConfigError

# scikit-image's colour photographs (files in skimage/data) and a caption word for each.
SOURCES = {"astronaut.png": "an astronaut", "chelsea.png": "a cat", "coffee.png": "a cup of coffee",
           "rocket.jpg": "a rocket on its launch pad", "motorcycle_left.png": "a motorcycle",
           "motorcycle_right.png": "a motorcycle", "retina.jpg": "a retina",
           "ihc.png": "a stained tissue sample", "hubble_deep_field.jpg": "galaxies in the sky"}
ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9, 3 / 4, 2 / 3, 9 / 16)
LAYOUTS = ("img2dataset", "640x480")


def source_photos() -> dict[str, Image.Image]:
    import skimage
    folder = os.path.join(os.path.dirname(skimage.__file__), "data")
    return {name: Image.open(os.path.join(folder, name)).convert("RGB") for name in SOURCES}


def jittered_jpeg(photo: Image.Image, layout: str, rng: np.random.Generator) -> bytes:
    """One random crop of `photo`, jittered, resized and encoded as `layout` says (module doc)."""
    if layout == "640x480":
        aspect, size, quality = 4 / 3, (640, 480), 90
    else:
        aspect, quality = float(rng.choice(ASPECTS)), 95
        short = int(rng.integers(256, 513))
        size = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
    width, height = photo.size
    area = rng.uniform(0.4, 1.0) * width * height
    w = min(width, round(np.sqrt(area * aspect)))
    h = min(height, round(w / aspect))
    w = min(w, round(h * aspect))
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    image = photo.crop((left, top, left + w, top + h))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(rng.uniform(0.8, 1.2))
    image = image.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def photo_samples(count: int, layout: str, seed: int = 0) -> Iterator[dict]:
    """`count` raw samples ({"__key__", "jpg", "txt"}), cycling over the source photos."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    photos = source_photos()
    names = list(SOURCES)
    rng = np.random.default_rng(seed)
    for i in range(count):
        name = names[i % len(names)]
        yield {"__key__": f"{i:06d}", "jpg": jittered_jpeg(photos[name], layout, rng),
               "txt": f"a photo of {SOURCES[name]}".encode()}


def write_photo_shards(out_dir: str, count: int, layout: str, per_shard: int = 500, seed: int = 0) -> dict:
    """Writes the shards and sizes.json into out_dir; returns the corpus (a data.corpora entry)."""
    from albef_ds.data.shards import write_shard, write_sizes

    os.makedirs(out_dir, exist_ok=True)
    samples = photo_samples(count, layout, seed)
    sizes, paths = {}, []
    for index in range(0, count, per_shard):
        name = f"photos-{index // per_shard:05d}.tar"
        paths.append(os.path.join(out_dir, name))
        sizes[name] = write_shard(paths[-1], (next(samples) for _ in range(min(per_shard, count - index))))
    write_sizes(out_dir, sizes)
    return {"name": f"photos_{layout}", "shards": paths, "samples": count}


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--count", type=int, default=2000, help="JPEGs in all")
    parser.add_argument("--layout", choices=LAYOUTS, default="img2dataset")
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        check_at_least({"--count": args.count, "--per-shard": args.per_shard}, 1)
        check_writable_folder(args.out, "--out")
    except ConfigError as exc:
        return report_input_error(exc)
    print(json.dumps(write_photo_shards(args.out, args.count, args.layout, args.per_shard, args.seed), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
