"""Raw cross-attention maps: where each text token looks in the image in one fusion layer, per
head, with no gradient (the reviewers of ALBEF drew them as DINO draws its [CLS] attention, and
found the word-region matching that Grad-CAM shows). Any model with fusion layers: ALBEF, the VQA
question encoder, the classifiers (NLVR2's doubled fusion layers give one map per image).
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from .gradcam import patch_grid, cross_attention_probs, stack_layers


@torch.no_grad()
def attention_maps(model, images: Sequence[torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   layer: int) -> torch.Tensor:
    """[B, images, heads, L, g, g] float32: the attention probabilities of text i's tokens to the
    patches of its images (`images`: one tensor per image of a text, [B, 3, H, W] each) in fusion
    layer `layer`'s cross-attention (each image's layer of the pair where the fusion layers are
    doubled), as the softmax over the image's tokens gave them: the image [CLS] key is left out,
    so a row sums to 1 less the [CLS] key's share. Padding tokens' maps are zero."""
    encoder = model.text_encoder
    with contextlib.ExitStack() as hooks:
        captured = [hooks.enter_context(cross_attention_probs(model, n)) for n in stack_layers(encoder, layer)]
        embeds = model.visual_encoder(torch.cat(list(images))).chunk(len(images))
        encoder.fuse(encoder.encode_text(input_ids, attention_mask), attention_mask, list(embeds))
    valid = attention_mask[:, None, :, None].float()
    return torch.stack([patch_grid(c[0][..., 1:].float() * valid) for c in captured], 1)
