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
    if not pretrained and cfg.pos_embed_init == "sincos":
        with torch.no_grad():
            vit.pos_embed.copy_(sincos_pos_embed(cfg.img_size // cfg.patch_size, cfg.width))
    return vit


def sincos_pos_embed(grid: int, width: int) -> torch.Tensor:
    """MAE's 2D sin-cos position table [1, 1 + grid * grid, width], zeros for the CLS token: the
    first half of the channels encodes the patch's row, the second half its column, each as
    sin / cos of the index at frequencies 1 / 10000^(j / (width / 4))."""
    if width % 4:
        raise ValueError(f"a 2D sin-cos table needs a width divisible by 4, not {width}")
    quarter = width // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    halves = []
    for index in (rows, cols):
        angles = index.flatten().double()[:, None] * frequencies[None]
        halves.append(torch.cat([angles.sin(), angles.cos()], 1))
    table = torch.cat([torch.zeros(1, width, dtype=torch.float64), torch.cat(halves, 1)])
    return table[None].float()


def resize_pos_embed(pos_embed: torch.Tensor, img_size: int, patch_size: int) -> torch.Tensor:
    """Position embeddings [1, 1 + g*g, D] of a checkpoint resized (bicubic) to img_size's grid."""
    grid = img_size // patch_size
    if pos_embed.shape[1] == 1 + grid * grid:
        return pos_embed
    # timm's defaults (bicubic), the same resampling its pretrained loader applies.
    return resample_abs_pos_embed(pos_embed, new_size=(grid, grid), num_prefix_tokens=1)
