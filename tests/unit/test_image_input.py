"""Images travel as uint8 pixels and the ViT normalises them (albef_ds.models.vit.image_input): every
consumer, the training forward of every task and every evaluator, must hand its ViT CLIP-normalised
floats of the model's dtype, never pixels cast to float. A spy on timm's patch embedding (the first
thing every ViT computes) sees what each ViT gets; the images are white, whose normalised value
per channel is known, while 255.0 or 1.0 (pixels cast, or scaled without the CLIP statistics)
would show."""
import importlib.util
import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from timm.layers import PatchEmbed

from albef_ds.config import load_config
from albef_ds.models.vit import CLIP_MEAN, CLIP_STD, image_input
from albef_ds.tasks import get_task
from albef_ds.tasks.base import StepContext
from albef_ds.tokenizer import build_tokenizer, tokenize

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("transforms_reference", ROOT / "tools" / "transforms_reference.py")
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)

TOKENIZER = build_tokenizer("tiny_vocab.txt")
WHITE = [(1.0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]       # 1.93, 2.07, 2.15


@pytest.fixture
def vit_inputs(monkeypatch):
    seen = []
    forward = PatchEmbed.forward
    monkeypatch.setattr(PatchEmbed, "forward", lambda self, x: seen.append(x.detach()) or forward(self, x))
    return seen


def assert_normalised_white(seen, dtype=torch.float32):
    assert seen, "no image reached a ViT"
    for x in seen:
        assert x.dtype == dtype
        for channel, value in enumerate(WHITE):
            assert torch.allclose(x[:, channel].float(), torch.tensor(value), atol=1e-2 if dtype != torch.float32
                                  else 1e-6), (channel, x[:, channel].flatten()[:3])


def white(*shape) -> torch.Tensor:
    return torch.full((*shape, 3, 64, 64), 255, dtype=torch.uint8)


def white_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), "white").save(out, format="PNG")
    return out.getvalue()


def text(n):
    return tokenize(TOKENIZER, ["a red circle on the left"] * n, 16)


def test_image_input_is_the_old_workers_normalisation_bit_for_bit():
    """uint8 -> float32 -> CLIP statistics as the data workers did it (torchvision's to_dtype and
    normalize on the same pixels): the same float32 numbers, so a step sees what it saw before."""
    pixels = torch.randint(0, 256, (2, 3, 24, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    before = torch.stack([reference.to_normalized_tensor(Image.fromarray(p.permute(1, 2, 0).numpy())) for p in pixels])
    assert torch.equal(image_input(pixels, torch.float32), before)
    assert image_input(pixels, torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(image_input(pixels, torch.bfloat16), before.to(torch.bfloat16))
    normalised = torch.randn(2, 3, 8, 8)
    assert torch.equal(image_input(normalised, torch.float32), normalised)     # floats are taken as normalised
    with pytest.raises(TypeError, match="uint8 pixels or normalised floats"):
        image_input(pixels.long(), torch.float32)


@pytest.mark.parametrize("config", ["tiny", "tiny_grounding", "tiny_vqa", "tiny_snli_ve", "tiny_nlvr2",
                                    "tiny_nlvr2_ta"])
def test_every_tasks_training_forward_normalises_uint8_pixels(config, vit_inputs):
    cfg = load_config(config, ["model.alpha=0.4"] if config != "tiny_grounding" else [])
    model = get_task(cfg).build_model()
    ids, mask = text(4)
    if config == "tiny_vqa":
        codec = get_task(cfg).codec(TOKENIZER, train=False)
        batch = codec.collate([{"image": white(1)[0], "question": "what is on the left", "answers": ["circle"],
                                "weights": [1.0]} for _ in range(4)], [str(i) for i in range(4)])
    elif config in ("tiny_snli_ve", "tiny_nlvr2"):
        batch = {"images": white(4, model.images_per_text), "input_ids": ids, "attention_mask": mask,
                 "label": torch.arange(4) % model.classes}
    else:
        batch = {"image": white(4), "input_ids": ids, "attention_mask": mask}
    loss, _ = model(batch, StepContext(5, 10, torch.Generator().manual_seed(0)))
    assert torch.isfinite(loss)
    assert_normalised_white(vit_inputs)


def test_a_bf16_model_gets_bf16_normalised_images(vit_inputs):
    model = get_task(load_config("tiny")).build_model().to(torch.bfloat16)
    ids, mask = text(2)
    model({"image": white(2), "input_ids": ids, "attention_mask": mask}, StepContext(0, 1, torch.Generator()))
    assert_normalised_white(vit_inputs, torch.bfloat16)


def test_every_evaluator_and_the_pictures_normalise_what_they_decode(vit_inputs, tmp_path):
    from albef_ds.eval.classification import LabelledSet, predict
    from albef_ds.eval.grounding import Expression, GroundingSet, evaluate_grounding
    from albef_ds.eval.retrieval import RetrievalSet, evaluate_retrieval
    from albef_ds.synthetic.probe import attribute_probe
    from albef_ds.eval.vqa_answering import VQASet, answer_questions
    from albef_ds.eval.heat_maps import heat_maps

    png = white_png()
    albef = get_task(load_config("tiny")).build_inference_model().eval()
    captions = [["two small red circles on the left"], ["three large blue squares at the top"]]
    evaluate_retrieval(albef, RetrievalSet([png, png], captions, ["a", "b"]), TOKENIZER, 64, 16, k_test=2)
    attribute_probe(albef, RetrievalSet([png, png], captions, ["a", "b"]), TOKENIZER, 64, 16)
    heat_maps(albef, TOKENIZER, Image.open(io.BytesIO(png)), "a red circle", mode="itm")
    heat_maps(albef, TOKENIZER, Image.open(io.BytesIO(png)), "a red circle", mode="itc")
    (tmp_path / "white.png").write_bytes(png)
    expression = Expression(str(tmp_path / "white.png"), "the red circle", 0, "1", (0, 0, 10, 10), "val")
    evaluate_grounding(albef, GroundingSet([expression], {"1": torch.tensor([[0.0, 0.0, 10.0, 10.0]])}),
                       TOKENIZER, 64, 16, split_ranks=False)
    classifier = get_task(load_config("tiny_nlvr2")).build_inference_model().eval()
    predict(classifier, LabelledSet([[png, png]], ["both images are white"], [0], ["x"]), TOKENIZER, 64, 16)
    vqa = get_task(load_config("tiny_vqa")).build_inference_model().eval()
    answer_questions(vqa, VQASet([0], ["what colour is it"], [png]), ["white", "red"], TOKENIZER, 64, k_test=2)
    assert_normalised_white(vit_inputs)
