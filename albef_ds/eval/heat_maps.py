"""Where the model looks: the Grad-CAM heat maps of a text over an image, for the whole sentence and
per word (albef_ds.models.gradcam computes them; albef_ds.pictures draws them)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from PIL import Image

from ..data.transforms import EvalTransform
from ..models import evaluating
from ..models.gradcam import check_gradcam, default_gradcam_layer, itc_maps, itm_token_maps, sentence_maps
from ..tokenizer import clean_caption, tokenize, words_past
from .inputs import model_device


class HeatMaps(NamedTuple):
    sentence: torch.Tensor          # [g, g]: the sentence's map
    words: list[str]                # the words of the cleaned text (none in ITC mode)
    word_maps: list[torch.Tensor]   # [g, g] per word: the mean of its word pieces' maps
    mode: str                       # "itm" (a fusion layer's cross-attention) or "itc" (a ViT block)
    dropped: int = 0                # words of the text past what the model reads (max_tokens), not mapped


def heat_maps(model, tokenizer, image: Image.Image, text: str, mode: str = "itm", max_tokens: int = 30,
              layer: Optional[int] = None) -> HeatMaps:
    """The heat maps of `text` over `image` by a model with an ITM head. ITC mode has one map per
    image-text pair: no words then. ValueError for a text that is empty once cleaned, or a bad mode
    / layer."""
    cleaned = clean_caption(text)
    every_word = clean_caption(text, max_words=len(text))
    if not cleaned:
        raise ValueError(f"text {text!r} is empty once cleaned (lower case, no punctuation)")
    layer = default_gradcam_layer(model.cfg, mode) if layer is None else layer
    check_gradcam(model.cfg, mode, layer)
    device = model_device(model)
    ids, mask = tokenize(tokenizer, [cleaned], max_tokens)
    dropped = len(every_word.split(" ")) - len(cleaned.split(" ")) + words_past(tokenizer, cleaned, max_tokens)
    pixels = EvalTransform(model.cfg.vision.img_size)(image.convert("RGB"))[None].to(device)
    with evaluating(model):
        if mode == "itc":
            return HeatMaps(itc_maps(model, pixels, ids.to(device), mask.to(device), layer)[0].cpu(), [], [], mode,
                            dropped)
        maps, _ = itm_token_maps(model, pixels, ids.to(device), mask.to(device), layer)
    maps = maps.cpu()
    pieces = tokenizer(cleaned, add_special_tokens=False, truncation=True, max_length=max_tokens - 1,
                       return_offsets_mapping=True)
    positions: dict[int, list[int]] = {}
    for position, word in enumerate(pieces.word_ids(), start=1):        # position 0 is [CLS]
        positions.setdefault(word, []).append(position)
    offsets = pieces["offset_mapping"]
    words = [cleaned[offsets[p[0] - 1][0]:offsets[p[-1] - 1][1]] for p in positions.values()]
    return HeatMaps(sentence_maps(maps, mask)[0], words, [maps[0, p].mean(0) for p in positions.values()], mode,
                    dropped)

