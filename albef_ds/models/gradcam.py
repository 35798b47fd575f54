"""Grad-CAM heat maps of ALBEF: where in the image the model looks for each word of a text.

Two modes, as ALBEF's grounding code has them:
  - "itm": the attention of the text tokens to the image patches in one fusion layer's
    cross-attention, weighted by the gradient of the ITM "match" logit with respect to it. The
    gradient is clamped at zero, multiplied by the attention and averaged over the heads: one map
    per text token ([B, L, g, g], padding tokens zero); the sentence's map is the average over its
    tokens ([CLS] included, padding excluded).
  - "itc": the [CLS] query's attention to the patches in one ViT block, weighted by the gradient
    of the image-text similarity (image_feat . text_feat / temp): one map per image-text pair.
The fusion-layer maps of the fine-tuned models weigh the same attention by the gradient of their
own output: a VQA answer's log-likelihood through the answer decoder (answer_token_maps: the
question encoder's cross-attention, as the paper's VQA figure draws it) and a classifier's class
logit (class_token_maps: NLVR2's doubled fusion layers give one map per image).
The fused attention kernels return no probabilities, so the chosen layer alone computes them
explicitly (Attention.attend_explicitly, or timm's own explicit path) while a map is made; nothing
changes for training. Gradients are taken with torch.autograd.grad, so no parameter's .grad is
touched, and through the attention only: a model whose weights need no gradient works too.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from .albef import TEMP_RANGE
from .vit import image_input

MODES = ("itm", "itc")
# ALBEF's --block_num 8: the third of six fusion layers (BERT layer 8) for ITM, ViT block 8 of 12 for ITC.
OFFICIAL_FUSION = (2, 6)
OFFICIAL_BLOCK = (8, 12)


def default_gradcam_layer(cfg: ModelConfig, mode: str) -> int:
    """ALBEF's choice at the same relative depth of this model: the third of six fusion layers
    (ITM: BERT layer 8 of the base model) or ViT block 8 of 12 (ITC). The tiny model (two fusion
    layers, four blocks): BERT layer 2, the first fusion layer, and ViT block 2."""
    if mode == "itm":
        t = cfg.text
        return t.fusion_start + OFFICIAL_FUSION[0] * (t.layers - t.fusion_start) // OFFICIAL_FUSION[1]
    return OFFICIAL_BLOCK[0] * cfg.vision.depth // OFFICIAL_BLOCK[1]


def check_gradcam(cfg: ModelConfig, mode: str, layer: int) -> None:
    """ValueError naming the mode or layer when this model has no such layer to take a map from."""
    if mode not in MODES:
        raise ValueError(f"Grad-CAM mode '{mode}' is not one of {', '.join(MODES)}")
    if mode == "itm":
        check_fusion_layer(cfg, layer, "Grad-CAM layer", " (mode itm)")
    elif not 0 <= layer < cfg.vision.depth:
        raise ValueError(f"Grad-CAM layer {layer} (mode {mode}): the model's ViT blocks are 0..{cfg.vision.depth - 1}")


def check_fusion_layer(cfg: ModelConfig, layer: int, what: str = "layer", detail: str = "") -> None:
    """ValueError naming the layer when it is not one of the model's fusion layers (BERT layers
    fusion_start .. layers - 1, numbered as in the config)."""
    low, high = cfg.text.fusion_start, cfg.text.layers
    if not low <= layer < high:
        raise ValueError(f"{what} {layer}{detail}: the model's fusion layers of BERT are {low}..{high - 1}")


def stack_layers(text_encoder, layer: int) -> list[int]:
    """The BERT layers of the text encoder's stack that fusion layer `layer` became: itself, or
    with several images per text (NLVR2) one per image, image j's at fusion_start +
    images_per_text * (layer - fusion_start) + j (models/bert.py)."""
    n, start = text_encoder.images_per_text, text_encoder.cfg.fusion_start
    return [start + n * (layer - start) + j for j in range(n)]


@contextlib.contextmanager
def cross_attention_probs(model, layer: int) -> Iterator[list]:
    """BERT layer `layer`'s cross-attention computes its probabilities explicitly and appends them
    ([B, heads, L, 1 + P]) to the yielded list while the context lasts."""
    attention = model.text_encoder.bert.encoder.layer[layer].crossattention
    captured: list = []
    attention.probs_hook = captured.append
    try:
        yield captured
    finally:
        attention.probs_hook = None


@contextlib.contextmanager
def vit_attention_probs(model, block: int) -> Iterator[list]:
    """ViT block `block` runs timm's explicit attention and appends its probabilities ([B, heads,
    1 + P, 1 + P], as they leave attn_drop: ALBEF's choice) to the yielded list."""
    attention = model.visual_encoder.blocks[block].attn
    captured: list = []
    fused = attention.fused_attn
    attention.fused_attn = False
    handle = attention.attn_drop.register_forward_hook(lambda module, args, out: captured.append(out))
    try:
        yield captured
    finally:
        handle.remove()
        attention.fused_attn = fused


def patch_grid(maps: torch.Tensor) -> torch.Tensor:
    """[..., P] -> [..., g, g]."""
    g = int(round(maps.shape[-1] ** 0.5))
    return maps.reshape(*maps.shape[:-1], g, g)


def fusion_gradcam(model, layers: Sequence[int], attention_mask: torch.Tensor,
                   forward: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Grad-CAM at the cross-attention of each BERT layer in `layers` (of model.text_encoder's
    stack): `forward()` runs the model and returns (score [B], output); the maps [B, L, g, g]
    float32 per layer are the mean over heads of attention * max(d score / d attention, 0), the
    image [CLS] key left out and padding tokens zero. Returns (maps, output detached)."""
    with torch.enable_grad(), contextlib.ExitStack() as hooks:
        captured = [hooks.enter_context(cross_attention_probs(model, layer)) for layer in layers]
        score, output = forward()
        probs = [c[0] for c in captured]
        grads = torch.autograd.grad(score.sum(), probs)
    valid = attention_mask[:, :, None].float()
    maps = [patch_grid((p[..., 1:] * g[..., 1:].clamp(min=0)).mean(1).detach().float() * valid)
            for p, g in zip(probs, grads)]
    return maps, output.detach()


def _image_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Image tokens computed without a graph, as a leaf the maps' gradients start from: the ViT's
    graph is not needed, and a model whose weights need no gradient still gets one at the attention."""
    return tokens.detach().requires_grad_()


def itm_token_maps(model, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps [B, L, g, g] float32 per text token, itm logits [B, 2]) of image i with text i:
    fusion_gradcam of the ITM "match" logit in BERT layer `layer`'s cross-attention."""
    with torch.no_grad():
        image_embeds = _image_tokens(model.image_embeds(images))

    def match():
        logits = model.itm_logits(image_embeds, input_ids, attention_mask)
        return logits[:, 1], logits

    (maps,), logits = fusion_gradcam(model, [layer], attention_mask, match)
    return maps, logits


def answer_token_maps(model, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      answer_ids: torch.Tensor, answer_mask: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps [B, L, g, g] float32 per question token, log-likelihoods [B]) of a VQA model
    (models/vqa.py): fusion_gradcam of log p(answer i | image i, question i) (answer_ids [B, La]:
    `[CLS] answer [SEP]` and padding), through the answer decoder, in the question encoder's fusion
    layer `layer`."""
    with torch.no_grad():
        image_embeds = _image_tokens(model.visual_encoder(images))
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    encoder = model.text_encoder

    def likelihood():
        states = encoder.fuse(encoder.encode_text(input_ids, attention_mask), attention_mask, [image_embeds])
        log_likelihood = model.answer_log_likelihood(states, attention_mask, answer_ids, answer_mask, rows)
        return log_likelihood, log_likelihood

    (maps,), log_likelihood = fusion_gradcam(model, [layer], attention_mask, likelihood)
    return maps, log_likelihood


def class_token_maps(model, images: Sequence[torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     layer: int, classes: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps [B, images, L, g, g] float32, logits [B, classes]) of a classifier on the fused [CLS]
    (models/classifier.py; `images`: one tensor per image of a text): fusion_gradcam of the logit
    of `classes` [B] (default: the predicted class) in fusion layer `layer`, one map per image (each
    image's layer of the pair where the fusion layers are doubled)."""
    with torch.no_grad():
        embeds = [_image_tokens(e) for e in model.split_images(torch.cat(list(images)), len(images))]

    def logit():
        logits = model.head(model.fused_cls(embeds, input_ids, attention_mask))
        chosen = logits.argmax(-1) if classes is None else classes
        return logits.gather(1, chosen[:, None]).squeeze(1), logits

    maps, logits = fusion_gradcam(model, stack_layers(model.text_encoder, layer), attention_mask, logit)
    return torch.stack(maps, 1), logits


def sentence_maps(token_maps: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, g, g]: the token maps averaged over each text's tokens (padding excluded). ALBEF divides
    by the padded length instead, a factor per text that changes no ranking of its boxes."""
    valid = attention_mask.to(token_maps.dtype).sum(1).clamp(min=1)
    return token_maps.sum(1) / valid[:, None, None]


def itc_maps(model, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             block: int) -> torch.Tensor:
    """[B, g, g] float32: mean over heads of the [CLS] query's attention to the patches in ViT
    block `block` * max(d similarity(image i, text i) / d attention, 0)."""
    with torch.no_grad():
        text_feat = model.text_features(input_ids, attention_mask)
    with torch.enable_grad():
        # normalised here (not by the ViT) to be a leaf that can require a gradient
        images = image_input(images, model.visual_encoder.cls_token.dtype).detach().requires_grad_()
        with vit_attention_probs(model, block) as captured:
            image_feat = model.image_features(images)
        probs = captured[0]
        sim = (image_feat * text_feat).sum(-1) / model.temp.clamp(*TEMP_RANGE)
        (grad,) = torch.autograd.grad(sim.sum(), probs)
    cam = (probs[:, :, 0, 1:] * grad[:, :, 0, 1:].clamp(min=0)).mean(1)   # [B, P]
    return patch_grid(cam.detach().float())


def gradcam(model, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            mode: str = "itm", layer: Optional[int] = None) -> torch.Tensor:
    """The sentence heat map [B, g, g] of image i and text i in `mode` (see the module doc) at
    `layer` (default: default_gradcam_layer). Run it with the model in eval mode (dropout off)."""
    layer = default_gradcam_layer(model.cfg, mode) if layer is None else layer
    check_gradcam(model.cfg, mode, layer)
    if mode == "itm":
        maps, _ = itm_token_maps(model, images, input_ids, attention_mask, layer)
        return sentence_maps(maps, attention_mask)
    return itc_maps(model, images, input_ids, attention_mask, layer)


def resize_map(heat: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A [g, g] map at an image's resolution [height, width]: bicubic, align_corners False, with no
    clamp (the overshoot may dip below zero), as ALBEF's evaluation resizes it."""
    return F.interpolate(heat[None, None].float(), size=(height, width), mode="bicubic",
                         align_corners=False)[0, 0]
