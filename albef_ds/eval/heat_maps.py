"""Where the model looks: heat maps of a text over an image, for the whole text and per word
(albef_ds.models.gradcam and albef_ds.models.attention_maps compute them; albef_ds.pictures draws
them). A word's map is the mean of its word pieces' maps.

  - heat_maps: a caption's Grad-CAM by a model with an ITM head (ITM or ITC mode);
  - answer_heat_maps: a VQA model's answer to a question, with the Grad-CAM of that answer's
    log-likelihood per question word;
  - class_heat_maps: a classifier's prediction (SNLI-VE, NLVR2) with the Grad-CAM of its class per
    image;
  - attention_heat_maps: the raw cross-attention of [CLS] and each word, per head (no gradients).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
from PIL import Image

from ..data.transforms import EvalTransform
from ..data.vqa import answer_tokens, clean_question
from ..models import evaluating
from ..models.attention_maps import attention_maps
from ..models.gradcam import (answer_token_maps, check_fusion_layer, check_gradcam, class_token_maps,
                              default_gradcam_layer, itc_maps, itm_token_maps, sentence_maps)
from ..tokenizer import clean_caption, tokenize, words_past
from .inputs import model_device
from .vqa_answering import QUESTION_WORDS

CLS = "[CLS]"


class HeatMaps(NamedTuple):
    sentence: torch.Tensor          # [g, g]: the sentence's map
    words: list[str]                # the words of the cleaned text (none in ITC mode)
    word_maps: list[torch.Tensor]   # [g, g] per word: the mean of its word pieces' maps
    mode: str                       # "itm" (a fusion layer's cross-attention), "itc" (a ViT block), "vqa", "class"
    dropped: int = 0                # words of the text past what the model reads (max_tokens), not mapped


class AnswerMaps(NamedTuple):
    question: str                   # cleaned
    answer: str                     # the answer whose Grad-CAM `maps` holds: the best ranked, or the one given
    ranked: list[tuple[str, float]]  # the model's top answers with their probabilities (see answer_heat_maps)
    maps: HeatMaps                  # per question word, and the whole question's


class ClassMaps(NamedTuple):
    predicted: int                  # the class the maps explain
    probabilities: list[float]      # softmax of the logits
    maps: list[HeatMaps]            # one per image of the text


class AttentionMaps(NamedTuple):
    tokens: list[str]               # "[CLS]" and the words of the cleaned text
    maps: torch.Tensor              # [images, heads, tokens, g, g]: a word's is the mean of its pieces'


def _cleaned(text: str, cleaned: str, what: str = "text") -> str:
    if not cleaned:
        raise ValueError(f"{what} {text!r} is empty once cleaned (lower case, no punctuation)")
    return cleaned


def word_positions(tokenizer, cleaned: str, max_tokens: int) -> tuple[list[str], list[list[int]]]:
    """(the words of a cleaned text, each word's positions in its `[CLS] words` tokens), the words
    cut where the tokens are (max_tokens, [CLS] included)."""
    pieces = tokenizer.encode([cleaned], max_tokens - 1)[0]
    positions: dict[int, list[int]] = {}
    for position, word in enumerate(pieces.word_ids, start=1):        # position 0 is [CLS]
        positions.setdefault(word, []).append(position)
    offsets = pieces.offsets
    words = [cleaned[offsets[p[0] - 1][0]:offsets[p[-1] - 1][1]] for p in positions.values()]
    return words, list(positions.values())


def _inputs(model, tokenizer, images: Sequence[Image.Image], cleaned: str, max_tokens: int):
    """(pixels: one [1, 3, S, S] uint8 tensor per image (the ViT normalises them), ids, mask) on the
    model's device; the tokens without padding (masked, it changes no valid token's map)."""
    device = model_device(model)
    ids, mask = tokenize(tokenizer, [cleaned], max_tokens)
    length = int(mask.sum())
    ids, mask = ids[:, :length], mask[:, :length]
    transform = EvalTransform(model.cfg.vision.img_size)
    pixels = [transform(image.convert("RGB"))[None].to(device) for image in images]
    return pixels, ids.to(device), mask.to(device)


def _word_maps(tokenizer, cleaned: str, max_tokens: int, token_maps: torch.Tensor, mask: torch.Tensor,
               mode: str) -> HeatMaps:
    """HeatMaps of one text from its token maps [L, g, g]."""
    words, positions = word_positions(tokenizer, cleaned, max_tokens)
    token_maps, mask = token_maps.cpu(), mask.cpu()
    return HeatMaps(sentence_maps(token_maps[None], mask)[0], words, [token_maps[p].mean(0) for p in positions], mode)


def heat_maps(model, tokenizer, image: Image.Image, text: str, mode: str = "itm", max_tokens: int = 30,
              layer: Optional[int] = None) -> HeatMaps:
    """The heat maps of `text` over `image` by a model with an ITM head. ITC mode has one map per
    image-text pair: no words then. ValueError for a text that is empty once cleaned, or a bad mode
    / layer."""
    cleaned = _cleaned(text, clean_caption(text))
    every_word = clean_caption(text, max_words=len(text))
    dropped = len(every_word.split(" ")) - len(cleaned.split(" ")) + words_past(tokenizer, cleaned, max_tokens)
    layer = default_gradcam_layer(model.cfg, mode) if layer is None else layer
    check_gradcam(model.cfg, mode, layer)
    (pixels,), ids, mask = _inputs(model, tokenizer, [image], cleaned, max_tokens)
    with evaluating(model):
        if mode == "itc":
            return HeatMaps(itc_maps(model, pixels, ids, mask, layer)[0].cpu(), [], [], mode, dropped)
        maps, _ = itm_token_maps(model, pixels, ids, mask, layer)
    return _word_maps(tokenizer, cleaned, max_tokens, maps[0], mask, mode)._replace(dropped=dropped)


def answer_heat_maps(model, tokenizer, image: Image.Image, question: str, answer: Optional[str] = None,
                     answer_list: Optional[Sequence[str]] = None, top: int = 5, k_test: int = 128,
                     layer: Optional[int] = None) -> AnswerMaps:
    """A VQA model's answer to `question` about `image` and the Grad-CAM of its log-likelihood per
    question word. With `answer_list` the model ranks it as evaluation does (rank_answers, the
    k_test likeliest first tokens): `ranked` holds the `top` best with their probabilities over
    the ranked candidates, and the maps are of the best one unless `answer` is given; without a
    list, `answer` is needed and `ranked` holds it with p(answer) = exp(its log-likelihood).
    ValueError for an empty question or answer, no answer to draw, or a layer that is not a
    fusion layer."""
    cleaned = _cleaned(question, clean_question(question, QUESTION_WORDS), "question")
    if answer is not None and not answer.strip():
        raise ValueError("the answer to draw is empty")
    if answer is None and not answer_list:
        raise ValueError("no answer to draw: give the answer, or an answer list for the model to rank")
    layer = default_gradcam_layer(model.cfg, "itm") if layer is None else layer
    check_fusion_layer(model.cfg, layer, "Grad-CAM layer")
    max_tokens = model.cfg.text.max_position
    (pixels,), ids, mask = _inputs(model, tokenizer, [image], cleaned, max_tokens)
    ranked: list[tuple[str, float]] = []
    with evaluating(model):
        if answer_list:
            candidates = [t.to(ids.device) for t in answer_tokens(tokenizer, list(answer_list), max_tokens)]
            with torch.no_grad():
                states = model.question_states(pixels, ids, mask)
                best, probabilities = model.rank_answers(states, mask, *candidates, k_test)
            ranked = [(answer_list[i], p) for i, p in zip(best[0, :top].tolist(), probabilities[0, :top].tolist())]
        chosen = answer.strip() if answer is not None else ranked[0][0]
        answer_ids, answer_mask = (t.to(ids.device) for t in answer_tokens(tokenizer, [chosen], max_tokens))
        maps, log_likelihood = answer_token_maps(model, pixels, ids, mask, answer_ids, answer_mask, layer)
    if not answer_list:
        ranked = [(chosen, math.exp(log_likelihood[0].item()))]
    return AnswerMaps(cleaned, chosen, ranked, _word_maps(tokenizer, cleaned, max_tokens, maps[0], mask, "vqa"))


def class_heat_maps(model, tokenizer, images: Sequence[Image.Image], text: str, max_tokens: int = 30,
                    layer: Optional[int] = None) -> ClassMaps:
    """A classifier's prediction for `text` with its images (one per image of a text) and the
    Grad-CAM of the predicted class's logit at fusion layer `layer`, per image."""
    cleaned = _cleaned(text, clean_caption(text))
    layer = default_gradcam_layer(model.cfg, "itm") if layer is None else layer
    check_fusion_layer(model.cfg, layer, "Grad-CAM layer")
    pixels, ids, mask = _inputs(model, tokenizer, images, cleaned, max_tokens)
    with evaluating(model):
        maps, logits = class_token_maps(model, pixels, ids, mask, layer)
    probabilities = torch.softmax(logits[0].float(), -1)
    per_image = [_word_maps(tokenizer, cleaned, max_tokens, maps[0, j], mask, "class") for j in range(len(images))]
    return ClassMaps(int(probabilities.argmax()), probabilities.tolist(), per_image)


def attention_heat_maps(model, tokenizer, images: Sequence[Image.Image], text: str, max_tokens: int = 30,
                        layer: Optional[int] = None, question: bool = False) -> AttentionMaps:
    """The raw cross-attention of [CLS] and each word of `text` to the patches of its images at
    fusion layer `layer` (default: Grad-CAM's), per head. `question`: the text is a VQA question
    (cleaned as one). ValueError for an empty text or a layer that is not a fusion layer."""
    cleaned = (_cleaned(text, clean_question(text, QUESTION_WORDS), "question") if question
               else _cleaned(text, clean_caption(text)))
    layer = default_gradcam_layer(model.cfg, "itm") if layer is None else layer
    check_fusion_layer(model.cfg, layer, "attention layer")
    pixels, ids, mask = _inputs(model, tokenizer, images, cleaned, max_tokens)
    with evaluating(model):
        maps = attention_maps(model, pixels, ids, mask, layer)[0].cpu()       # [images, heads, L, g, g]
    words, positions = word_positions(tokenizer, cleaned, max_tokens)
    per_token = [maps[:, :, 0]] + [maps[:, :, p].mean(2) for p in positions]
    return AttentionMaps([CLS, *words], torch.stack(per_token, 2))
