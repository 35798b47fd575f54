"""The training model of the align-then-fuse objectives: ITC against the global batch and the queue,
ITM with hard negatives drawn from the global batch, and (pretraining) MLM; all with momentum
distillation. Pretraining, retrieval fine-tuning and grounding fine-tuning train it.

The objectives are pure functions (albef_ds.tasks.objectives); every exchange with other ranks goes
through albef_ds.distributed, whose helpers are the identity in one process.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from .. import distributed as dist
from ..config import ModelConfig
from ..models import ALBEF, TEMP_RANGE
from ..models.bert import BertTextFusion
from ..models.vit import build_vit
from . import objectives
from .base import StepContext, TrainingModel
from .momentum import QUEUE_BUFFERS, add_momentum_copies, enqueue, register_queues

MOMENTUM_PARTS = ("visual_encoder", "vision_proj", "text_encoder", "text_proj")


class ContrastiveModel(ALBEF, TrainingModel):
    """ALBEF with momentum copies and feature queues; forward(batch, ctx) -> (loss, metrics).

    batch: image [b, 3, H, W], input_ids and attention_mask [b, L], and for positives by image id
    (retrieval, grounding) image_id [b]. `mlm`: add masked language modelling (pretraining)."""

    def __init__(self, cfg: ModelConfig, mlm: bool):
        super().__init__(cfg)
        self.mlm = mlm
        v, t = cfg.vision, cfg.text
        # momentum copies built without pretrained weights, then copied from the online side
        add_momentum_copies(self, {
            "visual_encoder": lambda: build_vit(dataclasses.replace(v, pretrained=None)),
            "text_encoder": lambda: BertTextFusion(dataclasses.replace(t, pretrained=None), image_width=v.width),
            "vision_proj": lambda: nn.Linear(v.width, cfg.embed_dim),
            "text_proj": lambda: nn.Linear(t.hidden, cfg.embed_dim)})
        if not mlm:     # the MLM head (but its tied decoder) is unused
            self.text_encoder.cls.predictions.transform.requires_grad_(False)
            self.text_encoder.cls.predictions.bias.requires_grad_(False)
        register_queues(self, cfg.embed_dim, cfg.queue_size)
        self._pending = None          # the last forward's queue write, committed after_micro_batch

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(getattr(self, name), getattr(self, f"{name}_m")) for name in MOMENTUM_PARTS]

    def clamped_parameters(self) -> dict[str, tuple[float, float]]:
        return {"temp": TEMP_RANGE}

    def checkpoint_buffers(self) -> tuple[str, ...]:
        return QUEUE_BUFFERS

    def mask_text(self, input_ids: torch.Tensor, generator=None, rows=None):
        t = self.cfg.text
        return objectives.mlm_mask(input_ids, t.vocab_size, t.mask_token_id, t.pad_token_id,
                                   t.cls_token_id, self.cfg.mlm_probability, generator, rows)

    def forward(self, batch: dict, ctx: StepContext, alpha: Optional[float] = None, masked_ids=None,
                mlm_labels=None):
        """The losses of one (local) batch. With several ranks, ITC contrasts against the global
        batch and the hard negatives are drawn from it (see albef_ds.distributed); ctx.generator
        drives the masking and the negative draws, its numbers drawn for the global batch and
        sliced. `alpha`: the distillation weight (default: model.alpha ramped over the first
        epoch); `masked_ids`, `mlm_labels`: a masking of one's own instead of the generator's.
        Metrics: loss_itc, loss_itm, itm_acc, alpha, and with MLM loss_mlm, mlm_acc."""
        generator = ctx.generator
        if alpha is None:
            alpha = objectives.alpha_at(ctx.step, ctx.steps_per_epoch, self.cfg.alpha)
        images = batch["image"]                # pixels: the ViT normalises them (models/vit.py)
        input_ids, attention_mask, image_ids = batch["input_ids"], batch["attention_mask"], batch.get("image_id")
        b = images.shape[0]
        m = b if self.mlm else 0              # rows of masked text
        rows = (dist.rank() * b, dist.world_size() * b)
        # Functional clamp: an in-place clamp would be lost on a ZeRO-3 gathered copy. The trainer
        # also clamps the stored value after each step (clamped_parameters), as ALBEF does, so the
        # parameter never drifts out of range where this clamp would stop its gradient.
        temp = self.temp.clamp(*TEMP_RANGE)
        if m and masked_ids is None:
            masked_ids, mlm_labels = self.mask_text(input_ids, generator, rows)
        if m:
            predicted = mlm_labels != objectives.IGNORE
            # Flat indices of the predicted tokens, found once: each boolean-mask index is a host sync.
            positions = predicted.flatten().nonzero().squeeze(1)

            def at_predicted(x: torch.Tensor) -> torch.Tensor:
                return x.flatten(0, 1).index_select(0, positions)
            ids2 = torch.cat([input_ids, masked_ids])
            mask2 = torch.cat([attention_mask, attention_mask])
        else:
            ids2, mask2 = input_ids, attention_mask

        image_embeds = self.image_embeds(images)
        image_feat = self.project_image(image_embeds)
        text_states = self.text_encoder.encode_text(ids2, mask2)      # [plain | masked] text
        text_embeds, masked_embeds = text_states[:b], text_states[b:]
        text_feat = torch.nn.functional.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)

        with torch.no_grad():
            image_embeds_m = self.visual_encoder_m(images)
            image_feat_m = torch.nn.functional.normalize(self.vision_proj_m(image_embeds_m[:, 0]), dim=-1)
            text_states_m = self.text_encoder_m.encode_text(ids2, mask2)
            text_feat_m = torch.nn.functional.normalize(self.text_proj_m(text_states_m[:b, 0]), dim=-1)
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

        # Negatives from the global batch: hard ones mined with the ITC similarities (ALBEF), or
        # drawn uniformly (model.itm_negatives: random; the softmax of equal scores).
        with torch.no_grad():
            draw_i2t, draw_t2i = sim_i2t[:, :n], sim_t2i[:, :n]
            if self.cfg.itm_negatives == "random":
                draw_i2t, draw_t2i = torch.zeros_like(draw_i2t), torch.zeros_like(draw_t2i)
            weights_i2t, valid_i = objectives.negative_weights(draw_i2t, positives[:, :n])
            weights_t2i, valid_t = objectives.negative_weights(draw_t2i, positives[:, :n])
            uniforms = objectives.batch_uniforms(2, b, rows, generator, images.device)
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
            counts = torch.stack([b + valid.sum()] + ([predicted.sum()] if m else [])).float()
            norms = dist.all_reduce_sum(counts) / dist.world_size()
        loss_itm, itm_acc = objectives.itm(self.itm_head(fused[m:, 0]), valid, norms[0])
        metrics = {"loss_itc": loss_itc, "loss_itm": loss_itm}
        loss = loss_itc + loss_itm
        if m:
            mlm_logits = self.text_encoder.mlm_logits(at_predicted(fused[:m]))
            loss_mlm, mlm_acc = objectives.mlm(mlm_logits, at_predicted(input_ids), mlm_logits_m, alpha, norms[1])
            loss = loss + loss_mlm
            metrics.update(loss_mlm=loss_mlm, mlm_acc=mlm_acc)
        metrics.update(itm_acc=itm_acc, alpha=alpha)
        self._pending = (image_feat_all, text_feat_all, ids_all) if self.training else None
        return loss, metrics

    def after_micro_batch(self) -> None:
        if self._pending is not None:
            enqueue(self, *self._pending)
            self._pending = None
