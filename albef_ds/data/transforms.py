"""Image transforms of the ALBEF pretraining recipe: images (albef_ds.data.images: a JPEG decoded a
region at a time, or a PIL image) in, uint8 [3, H, W] tensors out.

Every random choice comes from a `random.Random` passed in per sample, so a sample's augmentation
is a function of the stream's seed and its position, whichever process decodes it, and the global
torch / Python RNGs of the training process are left alone (with `workers: 0` the transform runs
in the training process).

The images stay uint8 until they are on the device: the model's image encoder turns them into
CLIP-normalised floats of its own dtype (albef_ds.models.vit.image_input), so the workers neither
spend the time nor hand over four times the bytes. Only the crop is decoded (a JPEG) or copied
out (a PIL image); from then on every step runs on uint8 tensors: the resize is torch's vectorised uint8 bicubic
(antialiased, as PIL's), the geometric RandAugment ops PIL's bilinear affine transform written
with grid_sample (a translation by whole pixels as a copy), sharpness as shifted sums, the other
colour ops torchvision's tensor kernels. The draws are those of the PIL-based path this replaced
(tools/transforms_reference.py), in the same order; docs/data.md gives the measured difference
of the pixels (interpolation and rounding only) and the time.
"""
from __future__ import annotations

import math
import random
from functools import lru_cache

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

from .images import Decoded, all_pixels, region_pixels

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
FILL = 128                                              # grey where geometric ops uncover


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic, antialiased when shrinking (PIL's resize filter), to size x size; uint8 [3, s, s],
    contiguous (the ops after it run several times slower on the channels-last layout torch's
    uint8 kernel returns; numpy's transposing copy is three times faster than torch's for uint8)."""
    out = F.resize(image, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return torch.from_numpy(np.ascontiguousarray(out.numpy()))


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


def warp_affine(image: torch.Tensor, matrix: tuple) -> torch.Tensor:
    """PIL's Image.transform(AFFINE, BILINEAR, fillcolor=FILL) on a uint8 [3, H, W] tensor.
    `matrix` (a, b, c, d, e, f) maps an output pixel's centre (x, y) to the input point
    (a x + b y + c, d x + e y + f); that point is sampled bilinearly with the edge pixels
    repeated, and the output pixel is FILL when the point falls outside the image (PIL's rules)."""
    grid, outside = _sampling_grid(matrix, image.shape[-2], image.shape[-1])
    out = torch.nn.functional.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="border",
                                          align_corners=False)[0]
    # PIL truncates the interpolated value to uint8 (no rounding)
    return torch.where(outside, float(FILL), out).to(torch.uint8)


@lru_cache(maxsize=64)
def _sampling_grid(matrix: tuple, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """grid_sample's grid for warp_affine (its coordinates, align_corners=False: -1 and 1 are the
    image's outer edges) and where it falls outside. RandAugment's ops at one image size make a
    handful of matrices: each grid is made once per worker."""
    a, b, c, d, e, f = matrix
    xs = torch.arange(0.5, width, dtype=torch.float64)
    ys = torch.arange(0.5, height, dtype=torch.float64)[:, None]
    x_in, y_in = a * xs + b * ys + c, d * xs + e * ys + f                   # [H, W] each
    grid = torch.stack([x_in * (2 / width) - 1, y_in * (2 / height) - 1], -1).float()[None]
    return grid, (x_in < 0) | (x_in >= width) | (y_in < 0) | (y_in >= height)


def translate(image: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """warp_affine's result for a shift by whole pixels (every point lands on a pixel centre):
    the image moved by (dx, dy), FILL where it uncovers."""
    _, height, width = image.shape
    out = torch.full_like(image, FILL)
    out[:, max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
        image[:, max(-dy, 0):height - max(dy, 0), max(-dx, 0):width - max(dx, 0)]
    return out


def sharpen(image: torch.Tensor, factor: float) -> torch.Tensor:
    """torchvision's adjust_sharpness (PIL's ImageEnhance.Sharpness): the image blended with its
    3x3 smoothing (1s around a 5, the border kept) by `factor`; written with shifted sums, which
    are several times faster on one core than the depthwise convolution torchvision runs."""
    x = image.to(torch.float32)
    centre = x[:, 1:-1, 1:-1]
    around = x[:, :-2, :-2] + x[:, :-2, 1:-1]
    for rows, cols in ((slice(None, -2), slice(2, None)), (slice(1, -1), slice(None, -2)),
                       (slice(1, -1), slice(2, None)), (slice(2, None), slice(None, -2)),
                       (slice(2, None), slice(1, -1)), (slice(2, None), slice(2, None))):
        around += x[:, rows, cols]
    smooth = around.add_(centre, alpha=5).div_(13).round_()
    centre.add_(smooth.sub_(centre), alpha=1.0 - factor)
    return x.clamp_(0, 255).to(torch.uint8)


def affine_matrix(op: str, sign: float, width: int, height: int) -> tuple:
    """The inverse matrix (output -> input point, see warp_affine) of a geometric RandAugment op,
    as torchvision's affine (shear about the top-left corner, as ALBEF's and the original
    RandAugment's shear; translation) and PIL's rotate (about the centre, counter-clockwise)
    compute it for PIL images."""
    if op == "shear_x":
        return 1.0, math.tan(math.radians(sign * SHEAR_DEGREES)), 0.0, 0.0, 1.0, 0.0
    if op == "shear_y":
        return 1.0, 0.0, 0.0, math.tan(math.radians(sign * SHEAR_DEGREES)), 1.0, 0.0
    if op == "translate_x":
        return 1.0, 0.0, -sign * TRANSLATE_FRACTION * width, 0.0, 1.0, 0.0
    if op == "translate_y":
        return 1.0, 0.0, 0.0, 0.0, 1.0, -sign * TRANSLATE_FRACTION * width
    # rotate, as PIL's Image.rotate builds its matrix (cos and sin rounded to 15 places)
    angle = -math.radians(sign * ROTATE_DEGREES)
    cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
    cx, cy = width / 2, height / 2
    return cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy


def apply_op(image: torch.Tensor, op: str, sign: float) -> torch.Tensor:
    """One RandAugment op at ALBEF's magnitude on a uint8 [3, H, W] image; `sign` (+1 / -1) sets
    the direction of the geometric ones."""
    if op == "identity":
        return image
    if op == "autocontrast":
        return F.autocontrast(image)
    if op == "equalize":
        return F.equalize(image)
    if op == "brightness":
        return F.adjust_brightness(image, ENHANCE_FACTOR)
    if op == "sharpness":
        return sharpen(image, ENHANCE_FACTOR)
    if op in ("shear_x", "shear_y", "translate_x", "translate_y", "rotate"):
        matrix = affine_matrix(op, sign, image.shape[-1], image.shape[-2])
        shift = (-matrix[2], -matrix[5])
        if op.startswith("translate") and all(float(v).is_integer() for v in shift):
            return translate(image, int(shift[0]), int(shift[1]))       # 7 px at 256 px
        return warp_affine(image, matrix)
    raise ValueError(f"unknown RandAugment op '{op}'")


def rand_augment(image: torch.Tensor, rng: random.Random) -> torch.Tensor:
    ops = [rng.choice(RAND_AUGMENT_OPS) for _ in range(NUM_OPS)]
    for op in ops:
        sign = rng.choice((-1.0, 1.0))
        if rng.random() < 0.5:
            image = apply_op(image, op, sign)
    return image


class TrainTransform:
    """RandomResizedCrop(`crop_scale`, bicubic; None: the whole image resized), horizontal flip,
    RandAugment(2, 7): uint8 [3, img_size, img_size]."""

    def __init__(self, img_size: int, crop_scale=(0.2, 1.0)):
        self.img_size = img_size
        self.crop_scale = tuple(crop_scale) if crop_scale is not None else None

    def __call__(self, image: Decoded, rng: random.Random) -> torch.Tensor:
        if self.crop_scale is not None:
            top, left, h, w = random_resized_crop_box(rng, image.width, image.height, self.crop_scale)
            image = region_pixels(image, left, top, w, h)          # only the crop is decoded
        else:
            image = all_pixels(image)
        image = resize(image, self.img_size)
        if rng.random() < 0.5:
            image = F.horizontal_flip(image)
        return rand_augment(image, rng)


class EvalTransform:
    """Resize to img_size x img_size (bicubic): evaluation, and `augment: false`; uint8 [3, H, W]."""

    def __init__(self, img_size: int):
        self.img_size = img_size

    def __call__(self, image: Decoded, rng: random.Random = None) -> torch.Tensor:
        return resize(all_pixels(image), self.img_size)


def build_transform(img_size: int, augment: bool, crop_scale=(0.2, 1.0)):
    return TrainTransform(img_size, crop_scale) if augment else EvalTransform(img_size)
