"""REFERENCE ONLY: the PIL-based image transforms the library used before the uint8 path
(albef_ds/data/transforms.py as of the commit before it), kept verbatim as the "today's path" that
tools/bench_data.py times side by side with the library's and that tests/unit/test_data_pixels.py
compares the library's output with, for the same draws. Nothing in albef_ds imports it.

Image transforms of the ALBEF pretraining recipe, on PIL images with torchvision.transforms.v2 ops.

Every random choice comes from a `random.Random` passed in per sample, so a sample's augmentation
is a function of the stream's seed and its position, whichever process decodes it, and the global
torch / Python RNGs of the training process are left alone (with `workers: 0` the transform runs
in the training process).
"""
from __future__ import annotations

import math
import random

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ALBEF's RandAugment: 2 ops drawn with replacement from this list, each then applied with
# probability 0.5, at magnitude 7 of 10.
RAND_AUGMENT_OPS = ("identity", "autocontrast", "equalize", "brightness", "sharpness",
                    "shear_x", "shear_y", "translate_x", "translate_y", "rotate")
NUM_OPS = 2
LEVEL = 7 / 10
ENHANCE_FACTOR = LEVEL * 1.8 + 0.1                      # 1.36; ALBEF only brightens / sharpens
SHEAR_DEGREES = math.degrees(math.atan(LEVEL * 0.3))    # shear factor 0.21
TRANSLATE_FRACTION = LEVEL * 10 / 256                   # 7 pixels at 256px
ROTATE_DEGREES = LEVEL * 30                             # 21 degrees
FILL = [128, 128, 128]                                  # grey where geometric ops uncover


def to_normalized_tensor(image: Image.Image) -> torch.Tensor:
    tensor = F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True)
    return F.normalize(tensor, CLIP_MEAN, CLIP_STD)


def random_resized_crop_box(rng: random.Random, width: int, height: int,
                            scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, height, width) as torchvision's RandomResizedCrop draws them: 10 tries at an
    area fraction in `scale` and a log-uniform aspect ratio in `ratio`, else a centre crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def apply_op(image: Image.Image, op: str, sign: float) -> Image.Image:
    """One RandAugment op at ALBEF's magnitude; `sign` (+1 / -1) sets the direction of the
    geometric ones."""
    if op == "identity":
        return image
    if op == "autocontrast":
        return F.autocontrast(image)
    if op == "equalize":
        return F.equalize(image)
    if op == "brightness":
        return F.adjust_brightness(image, ENHANCE_FACTOR)
    if op == "sharpness":
        return F.adjust_sharpness(image, ENHANCE_FACTOR)
    if op in ("shear_x", "shear_y"):
        shear = [sign * SHEAR_DEGREES, 0.0] if op == "shear_x" else [0.0, sign * SHEAR_DEGREES]
        # About the top-left corner, as ALBEF's (and the original RandAugment's) shear.
        return F.affine(image, angle=0.0, translate=[0.0, 0.0], scale=1.0, shear=shear, center=[0.0, 0.0],
                        interpolation=InterpolationMode.BILINEAR, fill=FILL)
    if op in ("translate_x", "translate_y"):
        pixels = sign * TRANSLATE_FRACTION * image.width
        translate = [pixels, 0.0] if op == "translate_x" else [0.0, pixels]
        return F.affine(image, angle=0.0, translate=translate, scale=1.0, shear=[0.0, 0.0],
                        interpolation=InterpolationMode.BILINEAR, fill=FILL)
    if op == "rotate":
        return F.rotate(image, sign * ROTATE_DEGREES, interpolation=InterpolationMode.BILINEAR, fill=FILL)
    raise ValueError(f"unknown RandAugment op '{op}'")


def rand_augment(image: Image.Image, rng: random.Random) -> Image.Image:
    ops = [rng.choice(RAND_AUGMENT_OPS) for _ in range(NUM_OPS)]
    for op in ops:
        sign = rng.choice((-1.0, 1.0))
        if rng.random() < 0.5:
            image = apply_op(image, op, sign)
    return image


class TrainTransform:
    """RandomResizedCrop(`crop_scale`, bicubic; None: the whole image resized), horizontal flip,
    RandAugment(2, 7), CLIP norm."""

    def __init__(self, img_size: int, crop_scale=(0.2, 1.0)):
        self.img_size = img_size
        self.crop_scale = tuple(crop_scale) if crop_scale is not None else None

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        if self.crop_scale is None:
            image = F.resize(image, [self.img_size, self.img_size], interpolation=InterpolationMode.BICUBIC)
        else:
            top, left, h, w = random_resized_crop_box(rng, image.width, image.height, self.crop_scale)
            image = F.resized_crop(image, top, left, h, w, [self.img_size, self.img_size],
                                   interpolation=InterpolationMode.BICUBIC)
        if rng.random() < 0.5:
            image = F.horizontal_flip(image)
        return to_normalized_tensor(rand_augment(image, rng))


class EvalTransform:
    """Resize to img_size x img_size (bicubic) and CLIP norm: evaluation, and `augment: false`."""

    def __init__(self, img_size: int):
        self.img_size = img_size

    def __call__(self, image: Image.Image, rng: random.Random = None) -> torch.Tensor:
        image = F.resize(image, [self.img_size, self.img_size], interpolation=InterpolationMode.BICUBIC)
        return to_normalized_tensor(image)


def build_transform(img_size: int, augment: bool, crop_scale=(0.2, 1.0)):
    return TrainTransform(img_size, crop_scale) if augment else EvalTransform(img_size)


def decode_image(source) -> Image.Image:
    """albef_ds.data.samples.decode_image as it was: an RGB PIL image from encoded bytes or a path."""
    import io

    # convert() forces the full decode, so a truncated file fails here.
    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source).convert("RGB")
