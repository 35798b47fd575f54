"""Classifiers on ALBEF's fused [CLS]: visual entailment (one image), NLVR2 (two images) and NLVR2's
text-assignment pre-step.

Plain PyTorch, as models/albef.py: the image encoder, the text/fusion encoder and a head on the
[CLS] state after the last fusion layer; no momentum copies, no losses (albef_ds.tasks). A text
about two images runs through doubled fusion layers (models/bert.py: each pretrained fusion layer
becomes a pair attending image 0, then image 1). Module names are the released files'
(`visual_encoder.*`, `text_encoder.*`, `cls_head.0/2.*`, `ta_head.*`).

Inference API: `logits(*images, input_ids, attention_mask)` -> [B, classes], positionally:
logits(image, ids, mask) for one image per text, logits(image0, image1, ids, mask) for two.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from ..config import ModelConfig
from .albef import ALBEF
from .bert import BertTextFusion, load_hf_bert
from .vit import build_vit

# The image-image similarity temperature of the text-assignment pairing: ALBEF's literal 0.07,
# not the learned ITC temperature the pretrained checkpoint carries.
PAIRING_TEMP = 0.07


def classifier_head(hidden: int, classes: int) -> nn.Sequential:
    """ALBEF's MLP head on the fused [CLS]: Linear, ReLU, Linear (keys 0.* and 2.*)."""
    return nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes))


class Classifier(nn.Module):
    """Encoders and a classifier head on the fused [CLS] of a text and its images."""
    images_per_text: ClassVar[int] = 1
    classes: ClassVar[int] = 2

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.visual_encoder = build_vit(cfg.vision)
        self.text_encoder = self.new_text_encoder(cfg)
        if cfg.text.pretrained:
            load_hf_bert(self.text_encoder, cfg.text.pretrained)
        # The MLM head is unused here (its decoder is the word embeddings, which are used).
        self.text_encoder.cls.predictions.transform.requires_grad_(False)
        self.text_encoder.cls.predictions.bias.requires_grad_(False)
        self.add_head(cfg)

    def new_text_encoder(self, cfg: ModelConfig) -> BertTextFusion:
        """A text/fusion encoder of this model's shape with fresh weights (nothing fetched)."""
        return BertTextFusion(dataclasses.replace(cfg.text, pretrained=None), image_width=cfg.vision.width,
                              images_per_text=self.images_per_text)

    def add_head(self, cfg: ModelConfig) -> None:
        self.cls_head = classifier_head(cfg.text.hidden, self.classes)

    def head(self, cls_states: torch.Tensor) -> torch.Tensor:
        return self.cls_head(cls_states)

    image_embeds = ALBEF.image_embeds          # all image tokens [B, 1 + P, width], as ALBEF's

    def fused_cls(self, image_embeds: list[torch.Tensor], input_ids: torch.Tensor,
                  attention_mask: torch.Tensor, text_encoder=None) -> torch.Tensor:
        """The [CLS] state [B, H] after the last fusion layer, text i fused with row i of each
        image's tokens (one tensor per image of the text). `text_encoder`: another encoder of the
        same shape (the momentum copy)."""
        encoder = text_encoder or self.text_encoder
        states = encoder.encode_text(input_ids, attention_mask)
        return encoder.fuse(states, attention_mask, image_embeds)[:, 0]

    def split_images(self, images: torch.Tensor, count: int, visual_encoder=None) -> list[torch.Tensor]:
        """Tokens of `images` ([count x B] images, image 0 of every text first): one ViT pass,
        split per image slot, as ALBEF's NLVR model runs them."""
        embeds = (visual_encoder or self.visual_encoder)(images)
        return list(embeds.chunk(count)) if count > 1 else [embeds]

    def logits(self, *inputs: torch.Tensor) -> torch.Tensor:
        """logits(*images, input_ids, attention_mask): [B, classes] for B texts, each with its
        images_per_text images ([B, 3, H, W] each)."""
        images, (input_ids, attention_mask) = inputs[:-2], inputs[-2:]
        if len(images) != self.images_per_text:
            raise ValueError(f"{type(self).__name__} takes {self.images_per_text} image tensor(s) per text, "
                             f"got {len(images)}")
        embeds = self.split_images(torch.cat(images), len(images))
        return self.head(self.fused_cls(embeds, input_ids, attention_mask))


class VEClassifier(Classifier):
    """SNLI-VE: an image and a hypothesis -> contradiction (0), neutral (1), entailment (2)."""
    classes = 3


class NLVRClassifier(Classifier):
    """NLVR2: two images and a sentence -> False (0), True (1); fusion layers doubled."""
    images_per_text = 2
    classes = 2


class TextAssignment(Classifier):
    """NLVR2's text-assignment pre-step: two images and a caption -> the caption belongs to
    image 0 (0), image 1 (1) or neither (2). A linear head (`ta_head`); the pretrained
    projections and temperature ride along as in ALBEF's file (vision_proj pairs the images, by
    their similarity; text_proj and temp are unused)."""
    images_per_text = 2
    classes = 3

    def add_head(self, cfg: ModelConfig) -> None:
        self.vision_proj = nn.Linear(cfg.vision.width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text.hidden, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor([cfg.temp]))      # [1]: see models/albef.py
        self.ta_head = nn.Linear(cfg.text.hidden, self.classes)

    def head(self, cls_states: torch.Tensor) -> torch.Tensor:
        return self.ta_head(cls_states)

    # ALBEF's L2-normalised image features [B, embed_dim] from image tokens [B, 1 + P, width]: what
    # pairs the images (their similarity over PAIRING_TEMP)
    project_image = ALBEF.project_image
