"""The tiny VQA model and its inputs, shared by the VQA tests of every tier."""
import os
import random

import torch

from albef_ds.config import load_config
from albef_ds.data.transforms import EvalTransform
from albef_ds.data.vqa import VQACodec
from albef_ds.eval.vqa_answering import VQASet
from albef_ds.tasks.vqa import VQATrainingModel
from albef_ds.tokenizer import build_tokenizer

TOKENIZER = build_tokenizer("tiny_vocab.txt")
QUESTIONS = ["what colour is the shape", "how many", "is there a red circle in the picture", "where"]
ANSWERS = [["red", "orange", "purple"], ["2", "3"], ["yes"], ["left", "top", "center", "right"]]
WEIGHTS = [[0.7, 0.2, 0.1], [0.6, 0.4], [0.5], [0.4, 0.3, 0.2, 0.1]]
ANSWER_LIST = ["red", "yes", "no", "two red", "left", "2", "circle", "purple", "square", "top"]


def tiny_vqa(seed=0, spread=0.0):
    """The tiny VQA model; `spread`: noise of that size on the decoder's weights, whose initial
    distributions are too flat to rank answers apart."""
    torch.manual_seed(seed)
    model = VQATrainingModel(load_config("tiny_vqa").model)
    with torch.no_grad():
        for p in model.text_decoder.parameters():
            p.add_(torch.randn_like(p) * spread)
    return model


def samples(n=4, seed=0):
    """Decoded samples as VQACodec.decode gives them: random images, questions of several lengths
    (the batch pads them) and 1-4 weighted answers each, one with several word pieces."""
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(3, 64, 64, generator=g), "question": QUESTIONS[i % 4], "answers": ANSWERS[i % 4],
             "weights": WEIGHTS[i % 4]} for i in range(n)]


def codec():
    """The VQA codec at the tiny model's sizes."""
    return VQACodec(TOKENIZER, EvalTransform(64), 30, 20, 64)


def heldout_questions(folder, n=6):
    """n rendered shapes images in `folder` with the test questions, as an evaluation set."""
    from albef_ds.synthetic.shapes import ALL_ATTRIBUTES, render

    rng = random.Random(0)
    images = []
    for i in range(n):
        path = os.path.join(folder, f"{i}.png")
        render(ALL_ATTRIBUTES[i * 7], 64, rng).save(path)
        images.append(path)
    return VQASet(list(range(n)), [QUESTIONS[i % 4] for i in range(n)], images)
