"""ALBEF: image encoder, text/fusion encoder, projections, heads, momentum copies and queues.

Plain PyTorch. The only contact with other ranks is through `albef_ds.distributed`, whose
helpers are the identity in one process; the losses come from `albef_ds.objectives`.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as dist
from .. import objectives
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

        # Momentum (EMA) copies: built without pretrained weights, then copied from the online side.
        self.visual_encoder_m = build_vit(dataclasses.replace(v, pretrained=None))
        self.text_encoder_m = BertTextFusion(dataclasses.replace(t, pretrained=None), image_width=v.width)
        self.vision_proj_m = nn.Linear(v.width, cfg.embed_dim)
        self.text_proj_m = nn.Linear(t.hidden, cfg.embed_dim)
        for _, momentum in self.momentum_pairs():
            momentum.requires_grad_(False)
        if not cfg.mlm:     # retrieval fine-tuning: the MLM head (but its tied decoder) is unused
            self.text_encoder.cls.predictions.transform.requires_grad_(False)
            self.text_encoder.cls.predictions.bias.requires_grad_(False)
        self.copy_to_momentum()

        # Queues of momentum features, [dim, size] as in the released checkpoints; idx_queue holds
        # image ids for retrieval fine-tuning (-100: no id, never a positive).
        self.register_buffer("image_queue", F.normalize(torch.randn(cfg.embed_dim, cfg.queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(cfg.embed_dim, cfg.queue_size), dim=0))
        self.register_buffer("idx_queue", torch.full((1, cfg.queue_size), -100, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.visual_encoder, self.visual_encoder_m), (self.vision_proj, self.vision_proj_m),
                (self.text_encoder, self.text_encoder_m), (self.text_proj, self.text_proj_m)]

    def transformer_layers(self) -> list[nn.Module]:
        """Every ViT block and BERT layer, online and momentum: the units worth compiling."""
        return [layer for vit in (self.visual_encoder, self.visual_encoder_m) for layer in vit.blocks] + [
            layer for text in (self.text_encoder, self.text_encoder_m) for layer in text.bert.encoder.layer]

    @torch.no_grad()
    def clamp_temperature_(self) -> None:
        """Clamps the stored temperature (whole-parameter case; the engine handles ZeRO masters)."""
        self.temp.clamp_(*TEMP_RANGE)

    @torch.no_grad()
    def copy_to_momentum(self) -> None:
        for online, momentum in self.momentum_pairs():
            momentum.load_state_dict(online.state_dict())

    # ---- inference API -------------------------------------------------------------------
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """All image tokens [B, 1 + P, width]. Calls the ViT's forward (not forward_features) so
        ZeRO-3's hooks gather its top-level weights (cls_token, pos_embed)."""
        return self.visual_encoder(images)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features [B, embed_dim]."""
        return F.normalize(self.vision_proj(self.image_embeds(images)[:, 0]), dim=-1)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised text features [B, embed_dim]."""
        states = self.text_encoder.encode_text(input_ids, attention_mask)
        return F.normalize(self.text_proj(states[:, 0]), dim=-1)

    def itm_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
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

    # ---- training ------------------------------------------------------------------------
    def mask_text(self, input_ids: torch.Tensor, generator=None, rows=None):
        t = self.cfg.text
        return objectives.mlm_mask(input_ids, t.vocab_size, t.mask_token_id, t.pad_token_id,
                                   t.cls_token_id, self.cfg.mlm_probability, generator, rows)

    def forward(self, images, input_ids, attention_mask, alpha: float = 0.0, image_ids=None,
                masked_ids=None, mlm_labels=None, generator=None) -> dict:
        """All three pretraining losses for one (local) batch.

        With several ranks, ITC contrasts against the global batch and the hard negatives are
        drawn from it (see albef_ds.distributed). `generator` (optional) drives the masking and
        the negative draws; its numbers are drawn for the global batch and sliced, so the same
        seed gives the same masks and negatives on any number of ranks. Returns loss, loss_itc,
        loss_itm, loss_mlm, itm_acc, mlm_acc.
        """
        b = images.shape[0]
        m = b if self.cfg.mlm else 0          # rows of masked text (retrieval fine-tuning has no MLM)
        rows = (dist.rank() * b, dist.world_size() * b)
        # Functional clamp: an in-place clamp would be lost on a ZeRO-3 gathered copy. The trainer
        # also clamps the stored value after each step (clamp_temperature_), as ALBEF does, so the
        # parameter never drifts out of range where this clamp would stop its gradient.
        temp = self.temp.clamp(*TEMP_RANGE)
        if not m:
            masked_ids, mlm_labels = input_ids[:0], input_ids[:0]
        elif masked_ids is None:
            masked_ids, mlm_labels = self.mask_text(input_ids, generator, rows)
        predicted = mlm_labels != objectives.IGNORE
        # Flat indices of the predicted tokens, found once: each boolean-mask index is a host sync.
        positions = predicted.flatten().nonzero().squeeze(1)

        def at_predicted(x: torch.Tensor) -> torch.Tensor:
            return x.flatten(0, 1).index_select(0, positions)
        ids2 = torch.cat([input_ids, masked_ids])
        mask2 = torch.cat([attention_mask, attention_mask[:m]])

        image_embeds = self.image_embeds(images)
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)
        text_states = self.text_encoder.encode_text(ids2, mask2)      # [plain | masked] text
        text_embeds, masked_embeds = text_states[:b], text_states[b:]
        text_feat = F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)

        with torch.no_grad():
            image_embeds_m = self.visual_encoder_m(images)
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0]), dim=-1)
            text_states_m = self.text_encoder_m.encode_text(ids2, mask2)
            text_feat_m = F.normalize(self.text_proj_m(text_states_m[:b, 0]), dim=-1)
            if m:
                fused_m = self.text_encoder_m.fuse(text_states_m[b:], attention_mask, [image_embeds_m])
                mlm_logits_m = self.text_encoder_m.mlm_logits(at_predicted(fused_m))

            image_feat_all = dist.all_gather_nograd(image_feat_m)
            text_feat_all = dist.all_gather_nograd(text_feat_m)
            n = image_feat_all.shape[0]
            if image_ids is None:
                ids_all = None
                positives = torch.zeros(b, n + self.cfg.queue_size, dtype=torch.bool, device=images.device)
                own = torch.arange(b, device=images.device)
                positives[own, dist.rank() * b + own] = True
            else:
                ids_all = dist.all_gather_nograd(image_ids)
                positives = image_ids[:, None] == torch.cat([ids_all, self.idx_queue[0]])[None, :]
            image_bank = torch.cat([image_feat_all, self.image_queue.t().to(image_feat_all.dtype)])
            text_bank = torch.cat([text_feat_all, self.text_queue.t().to(text_feat_all.dtype)])

        loss_itc, sim_i2t, sim_t2i = objectives.itc(image_feat, text_feat, image_feat_m, text_feat_m,
                                                    image_bank, text_bank, positives, temp, alpha)

        # Hard negatives from the global batch, mined with the ITC similarities.
        with torch.no_grad():
            weights_i2t, valid_i = objectives.negative_weights(sim_i2t[:, :n], positives[:, :n])
            weights_t2i, valid_t = objectives.negative_weights(sim_t2i[:, :n], positives[:, :n])
            uniforms = torch.rand(2, n, generator=generator, device=generator.device if generator
                                  else images.device)[:, rows[0]:rows[0] + b].to(images.device)
            neg_text = objectives.sample_negatives(weights_i2t, uniforms[0])   # a text for each image
            neg_image = objectives.sample_negatives(weights_t2i, uniforms[1])  # an image for each text
        (neg_image_embeds,) = dist.fetch_rows(neg_image, image_embeds)
        neg_text_embeds, neg_text_mask = dist.fetch_rows(neg_text, text_embeds, attention_mask)

        # One fusion pass over [masked text (MLM) | positives | text negatives | image negatives];
        # the first three attend to this batch's images, the last to the fetched negative images.
        fused = self.text_encoder.fuse(
            torch.cat([masked_embeds, text_embeds, neg_text_embeds, text_embeds]),
            torch.cat([attention_mask[:m], attention_mask, neg_text_mask, attention_mask]),
            [image_embeds, neg_image_embeds], [(m, 0), (b, 0), (b, 0), (b, 1)][0 if m else 1:])
        # ITM and MLM average over rows / tokens of the global batch, whose counts differ per rank.
        valid = torch.cat([valid_i, valid_t])
        with torch.no_grad():
            counts = torch.stack([b + valid.sum(), predicted.sum()]).float()
            itm_norm, mlm_norm = dist.all_reduce_sum(counts) / dist.world_size()
        loss_itm, itm_acc = objectives.itm(self.itm_head(fused[m:, 0]), valid, itm_norm)
        if m:
            mlm_logits = self.text_encoder.mlm_logits(at_predicted(fused[:m]))
            loss_mlm, mlm_acc = objectives.mlm(mlm_logits, at_predicted(input_ids[:m]), mlm_logits_m, alpha, mlm_norm)
        else:
            loss_mlm = mlm_acc = torch.zeros((), device=images.device)

        if self.training:
            self.enqueue(image_feat_all, text_feat_all, ids_all)
        return {"loss": loss_itc + loss_itm + loss_mlm, "loss_itc": loss_itc, "loss_itm": loss_itm,
                "loss_mlm": loss_mlm, "itm_acc": itm_acc, "mlm_acc": mlm_acc}

    @torch.no_grad()
    def enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, image_ids=None) -> None:
        """Writes the global batch's momentum features at the pointer, wrapping around, so any
        global batch size up to the queue size works (the batch need not divide the queue).
        A batch with non-finite features (a corrupt input) is not written: it would poison every
        later step. Runs without a host sync."""
        n, size = image_feat.shape[0], self.cfg.queue_size
        if n > size:
            raise ValueError(f"global batch {n} is larger than the queue ({size})")
        ok = torch.isfinite(image_feat).all() & torch.isfinite(text_feat).all()
        slots = (self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)) % size
        for queue, new in ((self.image_queue, image_feat.t()), (self.text_queue, text_feat.t())):
            queue[:, slots] = torch.where(ok, new.to(queue.dtype), queue[:, slots])
        if image_ids is not None:
            self.idx_queue[0, slots] = torch.where(ok, image_ids, self.idx_queue[0, slots])
        self.queue_ptr.copy_(torch.where(ok, (self.queue_ptr + n) % size, self.queue_ptr))
