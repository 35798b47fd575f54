"""The uint8 data path against the PIL path it replaced (tools/transforms_reference.py, the library's
transforms before), for the same draws, on real photographs at img2dataset's sizes and at 640x480:
the same crop boxes, flips and RandAugment ops, so the pixels differ only by interpolation and
rounding (torch's uint8 bicubic resize and PIL's round differently, by up to a few levels when
shrinking more than 2x). The bounds are docs/data.md's, measured by tools/bench_data.py on
2 x 2,000 photos: the mean over samples of the per-sample mean absolute difference at most 0.07
of a level of 255, the worst sample 5.5 levels (equalize or autocontrast remapping a level that
rounding moved); the evaluation resize at most 0.25 per sample."""
import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from albef_ds.data.samples import decode_image
from albef_ds.data.transforms import RAND_AUGMENT_OPS, EvalTransform, TrainTransform, apply_op

ROOT = Path(__file__).resolve().parents[2]


def tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = tool("transforms_reference")
photos = tool("make_photo_shards")

MEAN = torch.tensor(reference.CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(reference.CLIP_STD).view(3, 1, 1)
SAMPLE_BOUND, MEAN_BOUND = 6.0, 0.15         # levels of 255: the worst sample, the mean over samples


@pytest.fixture(scope="module")
def jpegs():
    return ([s["jpg"] for s in photos.photo_samples(18, "img2dataset", seed=1)]
            + [s["jpg"] for s in photos.photo_samples(9, "640x480", seed=2)])


def reference_pixels(normalised: torch.Tensor) -> torch.Tensor:
    """The reference's CLIP-normalised output back as the uint8 pixels it was made from."""
    return (normalised * STD + MEAN).mul(255).round().to(torch.uint8)


def mean_abs_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.int() - b.int()).abs().float().mean().item()


@pytest.mark.parametrize("crop_scale", [(0.2, 1.0), (0.5, 1.0), None], ids=["pretraining", "fine-tuning", "whole"])
def test_train_transform_matches_the_pil_path_for_the_same_draws(jpegs, crop_scale):
    differences = []
    for i, data in enumerate(jpegs):
        for seed in (i, i + 1000):
            before = reference.TrainTransform(256, crop_scale)(reference.decode_image(data), random.Random(seed))
            old = reference_pixels(before)
            new = TrainTransform(256, crop_scale)(decode_image(data), random.Random(seed))
            assert new.shape == old.shape == (3, 256, 256) and new.dtype == torch.uint8
            differences.append(mean_abs_difference(new, old))
    assert max(differences) <= SAMPLE_BOUND and np.mean(differences) <= MEAN_BOUND, (max(differences),
                                                                                   np.mean(differences))


def test_eval_transform_is_pils_resize_to_within_rounding(jpegs):
    for data in jpegs:
        old = reference_pixels(reference.EvalTransform(256)(reference.decode_image(data)))
        new = EvalTransform(256)(decode_image(data))
        assert (new.int() - old.int()).abs().max() <= 4 and mean_abs_difference(new, old) <= 0.3


@pytest.mark.parametrize("op", RAND_AUGMENT_OPS)
def test_each_op_is_pils_to_within_one_level(jpegs, op):
    """Each op on a 256px photo, both directions: the tensor op against the PIL op (one level at a
    rounding boundary; the shifts by whole pixels, brightness and equalize exactly)."""
    for data in jpegs[:8]:
        image = decode_image(data).resize((256, 256), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
        for sign in (-1.0, 1.0):
            old = torch.from_numpy(np.array(reference.apply_op(image, op, sign))).permute(2, 0, 1)
            new = apply_op(pixels, op, sign)
            exact = op in ("identity", "brightness", "equalize", "translate_x", "translate_y")
            assert (new.int() - old.int()).abs().max() <= (0 if exact else 1), (op, sign)
