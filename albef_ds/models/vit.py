"""The image encoder: timm's ViT (DeiT-B/16 for the base model), without a classifier head.

Images reach it as uint8 pixels [..., 3, H, W], straight from the data workers (or an evaluator's
decoding) onto the device: the encoder itself turns them into CLIP-normalised floats of its own
dtype, in one place for training and evaluation of every task (docs/design.md, "Images").
"""
from __future__ import annotations

import os
from functools import lru_cache, partial

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from ..config import VisionConfig
from ..fileio import hub_cache_only

# The pixel statistics ALBEF's image encoder is trained and evaluated with (CLIP's), RGB.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@lru_cache(maxsize=None)
def _clip_statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # made once per device: a host-to-device copy at every step would be a wait
    return tuple(torch.tensor(v, dtype=torch.float32, device=device).view(3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))


def image_input(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What the ViT computes on: uint8 pixels scaled to [0, 1] and CLIP-normalised in float32 (the
    float ops of torchvision's to_dtype + normalize, so the values are those the data workers made
    before normalisation moved here), then cast to `dtype`. Floating-point images are taken as
    normalised already and only cast."""
    if images.dtype == torch.uint8:
        mean, std = _clip_statistics(images.device)
        images = images.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)
    elif not images.is_floating_point():
        raise TypeError(f"images must be uint8 pixels or normalised floats, not {images.dtype}")
    return images.to(dtype)


def _normalise_input(vit: nn.Module, args: tuple) -> tuple:
    return (image_input(args[0], vit.cls_token.dtype), *args[1:])


def build_vit(cfg: VisionConfig) -> nn.Module:
    """A timm VisionTransformer returning all tokens ([B, 1 + P, width], token 0 is CLS) of images
    given as uint8 pixels (or normalised floats): see image_input.

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
    elif pretrained:
        hub_cache_only()          # timm's hub weights: from the local cache alone where the hub cannot be reached
    vit = timm.create_model(cfg.timm_name, pretrained=bool(pretrained), **kwargs)
    vit.register_forward_pre_hook(_normalise_input)       # uint8 pixels in: see image_input
    vit.set_grad_checkpointing(cfg.grad_checkpointing)
    if not pretrained and cfg.pos_embed_init == "sincos":
        with torch.no_grad():
            vit.pos_embed.copy_(sincos_pos_embed(cfg.img_size // cfg.patch_size, cfg.width))
    return vit


# the files timm's loader looks for in a hub repo, in its order
TIMM_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def timm_hub_repo(timm_name: str):
    """The Hugging Face hub repo timm fetches `timm_name`'s pretrained weights from (None: timm
    downloads them by URL instead)."""
    return timm.models.get_pretrained_cfg(timm_name).hf_hub_id or None


def sincos_pos_embed(grid: int, width: int) -> torch.Tensor:
    """A 2D sin-cos position table [1, 1 + grid * grid, width], zeros for the CLS token: the first
    half of the channels encodes the patch's ROW, the second half its COLUMN, each as sin / cos of
    the index at frequencies 1 / 10000^(j / (width / 4)). MAE's table (get_2d_sincos_pos_embed) is
    the same with the halves the other way round (its meshgrid takes the column first): a fixed
    permutation of the channels, which a learned table and the layers after it do not notice; kept
    in this order because tests/data/tiny_pretrained_positions.safetensors was made from it."""
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
