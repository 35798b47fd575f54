"""ALBEF as pretrained: image encoder, text/fusion encoder, projections, ITM head, temperature.

Plain PyTorch: no momentum copies, no queues, no losses (what a task trains lives in
albef_ds.tasks), no contact with other ranks. The inference API below is what evaluation, the
Grad-CAM pictures and users call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .bert import BertTextFusion, load_hf_bert
from .vit import build_vit

TEMP_RANGE = (0.001, 0.5)


class ALBEF(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        v, t = cfg.vision, cfg.text
        self.visual_encoder = build_vit(v)
        self.text_encoder = BertTextFusion(t, image_width=v.width)
        if t.pretrained:
            load_hf_bert(self.text_encoder, t.pretrained)
        self.vision_proj = nn.Linear(v.width, cfg.embed_dim)
        self.text_proj = nn.Linear(t.hidden, cfg.embed_dim)
        self.itm_head = nn.Linear(t.hidden, 2)
        # shape [1], not 0-d as in the released checkpoints: DeepSpeed broadcasts parameters as bytes.
        self.temp = nn.Parameter(torch.tensor([cfg.temp]))

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """All image tokens [B, 1 + P, width]. Calls the ViT's forward (not forward_features) so
        ZeRO-3's hooks gather its top-level weights (cls_token, pos_embed)."""
        return self.visual_encoder(images)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features [B, embed_dim]."""
        return self.project_image(self.image_embeds(images))

    def project_image(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features from image tokens (the ViT already run)."""
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised text features [B, embed_dim]."""
        states = self.text_encoder.encode_text(input_ids, attention_mask)
        return F.normalize(self.text_proj(states[:, 0]), dim=-1)

    def itm_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """ITM logits [B, 2] ("no match", "match") of text i with image tokens i."""
        states = self.text_encoder.encode_text(input_ids, attention_mask)
        fused = self.text_encoder.fuse(states, attention_mask, [image_embeds])
        return self.itm_head(fused[:, 0])

    def itm_scores(self, images: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """Probability [B] that image i matches text i."""
        return F.softmax(self.itm_logits(self.image_embeds(images), input_ids, attention_mask).float(), -1)[:, 1]

    def mlm_logits(self, images: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits [B, L, V] of every position, with the image fused in."""
        states = self.text_encoder.encode_text(input_ids, attention_mask)
        fused = self.text_encoder.fuse(states, attention_mask, [self.image_embeds(images)])
        return self.text_encoder.mlm_logits(fused)
