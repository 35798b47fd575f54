"""The image encoder: timm's ViT (DeiT-B/16 for the base model), without a classifier head."""
from __future__ import annotations

import os
from functools import partial

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from ..config import VisionConfig


def build_vit(cfg: VisionConfig) -> nn.Module:
    """A timm VisionTransformer returning all tokens ([B, 1 + P, width], token 0 is CLS).

    `cfg.pretrained`: None/False for random init, True for timm's hub weights of `timm_name`
    (deit_base_patch16_224: DeiT-B/16 on ImageNet-1k), or a local weights file. timm resizes the
    position embeddings bicubically when the pretrained grid differs (14x14 at 224px -> 16x16 at
    256px, 24x24 at 384px).
    """
    kwargs = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
                  num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, num_classes=0,
                  global_pool="", norm_layer=partial(nn.LayerNorm, eps=1e-6))
    pretrained = cfg.pretrained
    if isinstance(pretrained, str):
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"model.vision.pretrained: no weights file at '{pretrained}'")
        kwargs["pretrained_cfg_overlay"] = {"file": pretrained, "num_classes": 0}
    vit = timm.create_model(cfg.timm_name, pretrained=bool(pretrained), **kwargs)
    vit.set_grad_checkpointing(cfg.grad_checkpointing)
    return vit


def resize_pos_embed(pos_embed: torch.Tensor, img_size: int, patch_size: int) -> torch.Tensor:
    """Position embeddings [1, 1 + g*g, D] of a checkpoint resized (bicubic) to img_size's grid."""
    grid = img_size // patch_size
    if pos_embed.shape[1] == 1 + grid * grid:
        return pos_embed
    # timm's defaults (bicubic), the same resampling its pretrained loader applies.
    return resample_abs_pos_embed(pos_embed, new_size=(grid, grid), num_prefix_tokens=1)
