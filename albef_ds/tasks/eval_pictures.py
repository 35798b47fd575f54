"""Pictures of a fixed handful of evaluation items, drawn at every evaluation of a training run
(`eval.pictures` items; the engine logs them to TensorBoard under `pictures/<name>`): the first
items of the evaluation set that this rank holds the images of, the same at every evaluation, so
that a reader watches the maps change as the model learns. Each task picks its kind through
Task.eval_pictures; maps come from albef_ds.eval.heat_maps, drawing from albef_ds.pictures.

An item whose image cannot be read is left out (at every evaluation alike). The pictures are
made on one CPU thread: a picture is hundreds of small ops, each of which a second thread's
synchronisation slowed by 3-10x on the shared 2-core machine (docs/grounding.md, "Pictures").
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from PIL import Image

from ..data.samples import decode_image
from ..eval.classification import LabelledSet
from ..eval.grounding import GroundingSet, best_proposal, box_iou
from ..eval.heat_maps import answer_heat_maps, class_heat_maps, heat_maps
from ..eval.retrieval import RetrievalSet
from ..eval.vqa_answering import VQASet
from ..models.gradcam import resize_map
from ..pictures import answer_panels, class_panels, grounding_panels, word_panels


def _on_one_thread(draw: Callable) -> Callable:
    @functools.wraps(draw)
    def drawn(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return draw(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return drawn


def _readable(sources: list, count: int) -> list[tuple[int, list[Image.Image]]]:
    """(index, decoded images) of the first `count` items whose images this rank holds and can
    decode; sources[i]: an item's image source, or a list of them."""
    out = []
    for i, item in enumerate(sources):
        if len(out) == count:
            break
        item = item if isinstance(item, list) else [item]
        if any(source is None for source in item):        # kept by another rank
            continue
        try:
            out.append((i, [decode_image(source) for source in item]))
        except Exception:               # PIL raises many types on broken files; missing: OSError
            continue
    return out


@_on_one_thread
def caption_pictures(model, data: RetrievalSet, tokenizer, count: int, max_tokens: int) -> dict[str, Image.Image]:
    """Pretraining and retrieval: each item's first caption, its ITM Grad-CAM per word."""
    out = {}
    for i, (image,) in _readable(data.images, count):
        text = data.captions[i][0]
        maps = heat_maps(model, tokenizer, image, text, "itm", max_tokens)
        out[f"caption_{i}"] = word_panels(image, text, maps.sentence, maps.words, maps.word_maps)
    return out


@_on_one_thread
def grounding_pictures(model, data: GroundingSet, tokenizer, count: int, max_tokens: int, mode: str,
                       layer: Optional[int]) -> dict[str, Image.Image]:
    """Grounding: each expression's map (the evaluation's mode and layer) with the proposal it
    picks and the referred box."""
    out = {}
    for i, (image,) in _readable([e.image for e in data.expressions], count):
        e = data.expressions[i]
        heat = heat_maps(model, tokenizer, image, e.text, mode, max_tokens, layer).sentence
        boxes = data.proposals[e.image_id]
        picked = boxes[best_proposal(resize_map(heat, image.height, image.width), boxes)].tolist()
        out[f"expression_{i}"] = grounding_panels(image, e.text, heat, picked, e.box, box_iou(picked, e.box))
    return out


@_on_one_thread
def vqa_pictures(model, data: VQASet, answer_list: list[str], tokenizer, count: int,
                 k_test: int) -> dict[str, Image.Image]:
    """VQA: each question's best-ranked answer (ALBEF's ranking of the answer list) with the
    Grad-CAM of its log-likelihood per question word, and the top answers."""
    out = {}
    for i, (image,) in _readable(data.images, count):
        maps = answer_heat_maps(model, tokenizer, image, data.questions[i], answer_list=answer_list, k_test=k_test)
        out[f"question_{i}"] = answer_panels(image, maps.question, maps.answer, maps.ranked, maps.maps.sentence,
                                             maps.maps.words, maps.maps.word_maps)
    return out


@_on_one_thread
def classification_pictures(model, data: LabelledSet, labels: dict, tokenizer, count: int,
                            max_tokens: int) -> dict[str, Image.Image]:
    """NLVR2 / SNLI-VE: the Grad-CAM of the predicted class (the [CLS] head's logit, averaged over
    the sentence's tokens) over the image, or each image of the pair."""
    names = {v: k for k, v in labels.items()}
    out = {}
    for i, images in _readable(data.images, count):
        maps = class_heat_maps(model, tokenizer, images, data.sentences[i], max_tokens)
        title = (f"{data.sentences[i]}: {names[maps.predicted]} {maps.probabilities[maps.predicted]:.2f} "
                 f"(true: {names[data.labels[i]]})")
        out[f"sample_{i}"] = class_panels(images, title, [m.sentence for m in maps.maps])
    return out
