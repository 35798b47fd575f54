"""A sample's image as the transforms take it: a JPEG kept encoded until a region of it is asked
for, or any other image decoded by Pillow.

A training crop covers about half of a photo (RandomResizedCrop at scale 0.2-1), so decoding the
whole JPEG and cropping it wastes about half of the decode, the largest share of a worker's time.
`open_image` reads a JPEG's header only; `region_pixels` then decodes the crop's rows and columns
with libjpeg-turbo (albef_ds/data/_jpeg.c), the same pixels as Pillow's full decode cropped, bit
for bit (tests/unit/test_jpeg_region.py). Whatever the region decoder does not take goes to
Pillow as before, so every file gives what it gave and fails where it failed: CMYK, 12-bit and
oversized JPEGs at open; one on which libjpeg warns or fails anywhere in the file (corrupt or
truncated data), at decode, raising CorruptImage where Pillow raises.
"""
from __future__ import annotations

import functools
import logging
import warnings
from typing import Union

import numpy as np
import torch
from PIL import Image

from .samples import decode_image

try:
    from . import _jpeg
    _JPEG_MISSING = None
except ImportError as error:     # not built (no compiler or libjpeg-turbo headers at install)
    _jpeg, _JPEG_MISSING = None, error

log = logging.getLogger(__name__)

JPEG_START = b"\xff\xd8\xff"


class CorruptImage(ValueError):
    """An image whose header was sound but whose data is not (found when its pixels are decoded)."""


class EncodedJpeg:
    """A JPEG's bytes and size; its pixels decoded on demand, a region at a time."""

    def __init__(self, data: bytes, width: int, height: int):
        self.data, self.width, self.height = data, width, height

    def region(self, left: int, top: int, width: int, height: int) -> torch.Tensor:
        """uint8 [3, height, width]: the rows and columns of the box (laid out channels-last)."""
        if not (0 <= left and 0 <= top and 0 < width and 0 < height
                and left + width <= self.width and top + height <= self.height):
            raise ValueError(f"region ({left}, {top}, {width} x {height}) outside the {self.width} x "
                             f"{self.height} image")
        out = torch.empty((height, width, 3), dtype=torch.uint8)
        try:
            clean = _jpeg.decode_region(self.data, left, top, width, height, out.numpy())
        except ValueError:          # libjpeg failed on the data
            clean = False
        if not clean:        # corrupt data: Pillow's full decode, as before (which may raise)
            try:
                image = decode_image(self.data)
            except Exception as error:      # PIL raises many types on broken files
                raise CorruptImage(str(error)) from error
            return region_pixels(image, left, top, width, height)
        return out.permute(2, 0, 1)


Decoded = Union[Image.Image, EncodedJpeg]


def open_image(source: bytes) -> Decoded:
    """An image from a sample's encoded bytes: an EncodedJpeg where the region decoder takes it,
    else Pillow's RGB image (decode_image). Raises as decode_image does on what it cannot read."""
    if _jpeg is None:
        _say_missing()
        return decode_image(source)
    if not source.startswith(JPEG_START):
        return decode_image(source)
    try:
        width, height, supported = _jpeg.read_header(source)
    except ValueError:
        return decode_image(source)
    if not supported or width * height > Image.MAX_IMAGE_PIXELS:     # Pillow's bomb check
        return decode_image(source)
    return EncodedJpeg(source, width, height)


def region_decoder_built() -> bool:
    """Whether albef_ds/data/_jpeg.c was built (else JPEGs are decoded whole by Pillow)."""
    return _jpeg is not None


def pixels(image: Image.Image) -> torch.Tensor:
    """uint8 [3, H, W] of an RGB PIL image: one copy (PIL's tobytes, laid out channels-last as PIL
    holds it). The tensor is read-only memory: every op after it makes a new tensor."""
    with warnings.catch_warnings():          # torch warns, once, that the array is not writable
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(image)).permute(2, 0, 1)


def region_pixels(image: Decoded, left: int, top: int, width: int, height: int) -> torch.Tensor:
    """uint8 [3, height, width] of the box; only the box is decoded (JPEG) or copied (PIL)."""
    if isinstance(image, EncodedJpeg):
        return image.region(left, top, width, height)
    return pixels(image.crop((left, top, left + width, top + height)))


def all_pixels(image: Decoded) -> torch.Tensor:
    """uint8 [3, H, W] of the whole image."""
    if isinstance(image, EncodedJpeg):
        return image.region(0, 0, image.width, image.height)
    return pixels(image)


@functools.cache          # once per process
def _say_missing():
    log.warning("albef_ds.data._jpeg is not built (%s): JPEGs are decoded whole by Pillow, about "
                "half a millisecond more per training sample; reinstall with libjpeg-turbo's headers "
                "(Debian: apt-get install libjpeg62-turbo-dev; pip install -e .)", _JPEG_MISSING)
