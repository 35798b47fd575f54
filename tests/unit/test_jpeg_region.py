"""The JPEG region decoder (albef_ds/data/_jpeg.c, through albef_ds.data.images) against Pillow's
full decode: the same pixels, bit for bit, for every box and JPEG layout, so the data path's
output is what it was before it (tests/unit/test_data_pixels.py's bounds and the recorded loss
trajectories hold unchanged); and every broken file fails where Pillow fails."""
import io
import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image

from albef_ds.data import images
from albef_ds.data.codec import decode_images
from albef_ds.data.samples import decode_image
from albef_ds.data.transforms import EvalTransform, TrainTransform

from helpers import tool

photos = tool("make_photo_shards")

# Pillow's JPEG writer options: chroma subsampling 4:2:0 / 4:2:2 / 4:4:4, progressive scans,
# restart markers, optimised Huffman tables, a grey image
LAYOUTS = {
    "4:2:0": dict(subsampling=2),
    "4:2:2": dict(subsampling=1),
    "4:4:4": dict(subsampling=0),
    "progressive": dict(progressive=True, subsampling=2),
    "restart markers": dict(restart_marker_blocks=7, optimize=True),
    "grey": dict(mode="L"),
}


def encode(image: Image.Image, mode: str = "RGB", **options) -> bytes:
    out = io.BytesIO()
    image.convert(mode).save(out, "JPEG", quality=92, **options)
    return out.getvalue()


@pytest.fixture(scope="module")
def photo():
    """A real photograph at an odd size (blocks and chroma samples cut at the right and bottom)."""
    data = next(photos.photo_samples(1, "img2dataset", seed=3))["jpg"]
    image = decode_image(data)
    return image.crop((0, 0, image.width - 3, image.height - 5))


def boxes(width, height, rng, count=30):
    """Random boxes, and the edge cases: the whole image, a corner pixel, one row, one column."""
    out = [(0, 0, width, height), (0, 0, 1, 1), (width - 1, height - 1, 1, 1), (0, height // 2, width, 1),
           (width - 1, 0, 1, height), (1, 1, width - 2, height - 2)]
    for _ in range(count):
        w, h = rng.randint(1, width), rng.randint(1, height)
        out.append((rng.randint(0, width - w), rng.randint(0, height - h), w, h))
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_region_is_pillows_full_decode_cropped(photo, layout):
    data = encode(photo, **LAYOUTS[layout])
    image = images.open_image(data)
    assert isinstance(image, images.EncodedJpeg), "albef_ds/data/_jpeg.c is not built (pip install -e .)"
    full = np.asarray(decode_image(data))
    assert (image.width, image.height) == (full.shape[1], full.shape[0])
    for left, top, w, h in boxes(image.width, image.height, random.Random(layout)):
        region = image.region(left, top, w, h)
        assert region.shape == (3, h, w) and region.dtype == torch.uint8
        assert np.array_equal(region.permute(1, 2, 0).numpy(), full[top:top + h, left:left + w]), (left, top, w, h)


def test_the_transforms_give_the_same_pixels_from_either_decoder():
    """The stream's path (open_image) and the Pillow path, same draws: the same tensors."""
    jpegs = ([s["jpg"] for s in photos.photo_samples(6, "img2dataset", seed=4)]
             + [s["jpg"] for s in photos.photo_samples(3, "640x480", seed=5)])
    for transform in (TrainTransform(64, (0.2, 1.0)), TrainTransform(64, (0.5, 1.0)), TrainTransform(64, None),
                      EvalTransform(64)):
        for i, data in enumerate(jpegs):
            assert isinstance(images.open_image(data), images.EncodedJpeg)
            assert torch.equal(transform(images.open_image(data), random.Random(i)),
                               transform(decode_image(data), random.Random(i))), (transform, i)


def broken_files(photo):
    """(name, bytes, where the damage is) for files that are not plain RGB / grey JPEGs."""
    data = encode(photo)
    scan = data.index(b"\xff\xda")                      # start of scan: its header, then the entropy data
    lower = scan + (len(data) - scan) * 3 // 4          # about three quarters down the image
    noise = bytes(np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8))
    bad_table, bad_component = bytearray(data), bytearray(data)
    bad_table[scan + 6] = 0x77                          # the first component's Huffman tables: missing
    bad_component[scan + 5] = 99                        # a component the frame does not have
    png = io.BytesIO()
    photo.save(png, "PNG")
    return [
        ("truncated", data[:lower]),
        ("truncated, end marker added", data[:lower] + b"\xff\xd9"),
        ("noise in the lower quarter", data[:lower] + noise + data[lower + 400:]),
        ("missing Huffman table", bytes(bad_table)),
        ("unknown component in the scan", bytes(bad_component)),
        ("bytes after the end marker", data + b"\x00" * 10),
        ("CMYK", encode(photo, mode="CMYK")),
        ("PNG", png.getvalue()),
        ("not an image", b"\xff\xd8\xff\xe0 hello"),
        ("empty", b""),
    ]


def test_every_file_fails_where_pillow_fails_and_decodes_as_pillow_does(photo):
    transform = TrainTransform(64, (0.2, 1.0))
    outcomes = {}
    for name, data in broken_files(photo):
        try:
            expected = transform(decode_image(data), random.Random(0))
        except Exception:                                # Pillow's verdict before the region decoder
            expected = "corrupt_image"
        got = decode_images({"jpg": data}, 1, transform, random.Random(0))
        if isinstance(expected, str):
            assert got == expected, name
        else:
            assert not isinstance(got, str) and torch.equal(got[0], expected), name
        outcomes[name] = isinstance(expected, str)
    # the table holds both kinds: Pillow decodes some (garbage after the end, an end marker after
    # the cut: grey rows) and rejects the others
    assert outcomes == {"truncated": True, "truncated, end marker added": False, "noise in the lower quarter": True,
                        "missing Huffman table": True, "unknown component in the scan": True,
                        "bytes after the end marker": False, "CMYK": False, "PNG": False, "not an image": True,
                        "empty": True}


def test_damage_below_the_region_still_fails(photo):
    """The region decoder reads the file to its end: a crop from the top of an image whose lower
    quarter is noise fails as Pillow's full decode does, instead of training on a corrupt file."""
    name, data = broken_files(photo)[2]
    image = images.open_image(data)
    assert isinstance(image, images.EncodedJpeg)        # its header is sound
    with pytest.raises(images.CorruptImage):
        image.region(0, 0, image.width, 8)


def test_a_box_outside_the_image_is_a_bug_not_a_corrupt_file(photo):
    image = images.open_image(encode(photo))
    for box in ((-1, 0, 5, 5), (0, 0, image.width + 1, 5), (0, image.height - 4, 5, 5), (0, 0, 0, 5)):
        with pytest.raises(ValueError, match="outside the") as caught:
            image.region(*box)
        assert not isinstance(caught.value, images.CorruptImage)


def test_without_the_extension_pillow_decodes_and_it_is_said_once(photo, monkeypatch, caplog):
    monkeypatch.setattr(images, "_jpeg", None)
    monkeypatch.setattr(images, "_JPEG_MISSING", ImportError("no module named _jpeg"))
    images._say_missing.cache_clear()
    data = encode(photo)
    with caplog.at_level(logging.WARNING, logger="albef_ds.data.images"):
        first, second = images.open_image(data), images.open_image(data)
    images._say_missing.cache_clear()
    assert isinstance(first, Image.Image) and isinstance(second, Image.Image)
    assert np.array_equal(images.all_pixels(first).permute(1, 2, 0).numpy(), np.asarray(decode_image(data)))
    said = [r.getMessage() for r in caplog.records if "_jpeg is not built" in r.getMessage()]
    assert len(said) == 1 and "no module named _jpeg" in said[0]
