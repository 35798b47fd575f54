"""The paper's train transform and the eval transform."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from albef_ds.data import transforms
from albef_ds.data.images import pixels
from albef_ds.data.transforms import (RAND_AUGMENT_OPS, EvalTransform, TrainTransform, apply_op, build_transform,
                                      random_resized_crop_box)
from albef_ds.models.vit import CLIP_MEAN, CLIP_STD, image_input


def noise_image(width=100, height=80, seed=0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_train_transform_is_a_function_of_the_rng():
    image = noise_image()
    out = TrainTransform(32)(image, random.Random(1))
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8          # normalised on the device
    assert torch.equal(out, TrainTransform(32)(image, random.Random(1)))
    assert not torch.equal(out, TrainTransform(32)(image, random.Random(2)))


def test_eval_transform_resizes_and_normalises_with_clip_statistics():
    image = Image.new("RGB", (50, 30), (255, 0, 128))
    out = EvalTransform(16)(image)
    assert out.shape == (3, 16, 16) and out.dtype == torch.uint8
    # the pixels leave the workers as they are; the model's ViT normalises them (image_input)
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), CLIP_MEAN, CLIP_STD)]
    assert torch.allclose(image_input(out, torch.float32).mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)
    assert isinstance(build_transform(16, augment=False), EvalTransform)
    assert isinstance(build_transform(16, augment=True), TrainTransform)


def test_random_resized_crop_box_follows_scale_and_ratio():
    rng = random.Random(0)
    fractions = []
    for _ in range(500):
        top, left, h, w = random_resized_crop_box(rng, 640, 480)
        assert 0 <= top and top + h <= 480 and 0 <= left and left + w <= 640
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
        fractions.append(w * h / (640 * 480))
    assert 0.19 <= min(fractions) < 0.3 and 0.9 < max(fractions) <= 1.0
    # No crop of ratio 3/4..4/3 fits in 10 tries: a centre crop clamped to the ratio range.
    assert random_resized_crop_box(random.Random(0), 1000, 10) == (0, 493, 10, 13)


def hwc(pixels: torch.Tensor) -> np.ndarray:
    return pixels.permute(1, 2, 0).numpy()


def test_each_rand_augment_op():
    # Noise in 20..200, so that autocontrast and equalize have work to do.
    image = pixels(Image.fromarray((20 + np.asarray(noise_image(256, 256)) * 0.7).astype(np.uint8)))
    values = hwc(image).astype(int)
    for op in RAND_AUGMENT_OPS:
        out = hwc(apply_op(image, op, 1.0)).astype(int)
        assert out.shape == values.shape
        assert (op == "identity") == np.array_equal(out, values), op
    # ALBEF's magnitude 7: 7 values of translation at 256px, brightness x1.36, grey fill.
    shifted = hwc(apply_op(image, "translate_x", 1.0)).astype(int)
    assert np.array_equal(shifted[:, 7:], values[:, :-7]) and (shifted[:, :7] == 128).all()
    brighter = hwc(apply_op(image, "brightness", 1.0)).astype(int)
    assert np.abs(brighter - np.minimum(255, values * 1.36)).max() <= 1
    rotated = hwc(apply_op(image, "rotate", -1.0))
    assert (rotated[0, 0] == 128).all() and (rotated[-1, -1] == 128).all()
    with pytest.raises(ValueError):
        apply_op(image, "solarize", 1.0)


def test_rand_augment_draws_two_ops_each_applied_half_the_time(monkeypatch):
    applied = []
    monkeypatch.setattr(transforms, "apply_op", lambda image, op, sign: applied.append(op) or image)
    rng = random.Random(0)
    for _ in range(2000):
        transforms.rand_augment(noise_image(8, 8), rng)
    assert set(applied) == set(RAND_AUGMENT_OPS)
    assert 1800 < len(applied) < 2200             # 2 ops x 0.5 per image


def test_the_crop_scale_is_the_recipes_per_task():
    """Pretraining crops with area fractions in (0.2, 1), fine-tuning in (0.5, 1) as ALBEF does;
    null resizes the whole image (nothing cut off: where a box is stays where it was)."""
    from albef_ds.config import load_config

    assert load_config("base").data.crop_scale == [0.2, 1.0]
    assert load_config("retrieval_coco").data.crop_scale == [0.5, 1.0]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    fractions = [w * h / (640 * 480) for top, left, h, w in
                 (random_resized_crop_box(random.Random(i), 640, 480, (0.5, 1.0)) for i in range(300))]
    assert 0.49 <= min(fractions) < 0.6
    whole = TrainTransform(32, crop_scale=None)
    flipped_or_not = [whole(image, random.Random(i)) for i in range(2)]
    assert all(t.shape == (3, 32, 32) for t in flipped_or_not)
    with pytest.raises(Exception, match=r"data.crop_scale \[0.7, 0.3\] must be"):
        load_config("tiny", ["data.crop_scale=[0.7, 0.3]"])
