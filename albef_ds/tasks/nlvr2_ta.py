"""NLVR2's text-assignment (TA) pre-step: one epoch on the pretraining corpus teaching the model with
doubled fusion layers (models/classifier.py) whether a caption belongs to the image in slot 0, in
slot 1 or to neither. It starts from a pretrained checkpoint; its result starts NLVR2 fine-tuning
(tasks/nlvr2.py). See docs/classification.md.

The second image of a pair is drawn by image-image similarity of the projected ViT [CLS] features
(ALBEF's Pretrain_nlvr.py: softmax over sim / 0.07, the image itself excluded), here among the
GLOBAL batch (ALBEF: the rank's own batch), with random numbers drawn for the global batch and
sliced, so a run on any number of ranks draws what one process draws; the chosen images' tokens
come from the rank that holds them (albef_ds.distributed.fetch_rows, gradients flowing back).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import distributed as dist
from ..config import ConfigError, ModelConfig
from ..data.annotations import CAPTIONS
from ..models.bert import double_fusion_layers
from ..models.classifier import PAIRING_TEMP, TextAssignment
from . import objectives
from .base import StepContext, Task, TrainingModel
from .pretrain import caption_codec


class TextAssignmentModel(TextAssignment, TrainingModel):
    """forward(batch, ctx) -> (loss, metrics: loss_ta, ta_acc); batch: image [b, 3, H, W],
    input_ids and attention_mask [b, L] (the pretraining codec's). No momentum distillation."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        # vision_proj only pairs the images (no gradient reaches it, as in ALBEF); text_proj and
        # temp are carried for the released layout.
        for part in (self.vision_proj, self.text_proj):
            part.requires_grad_(False)
        self.temp.requires_grad_(False)

    def forward(self, batch: dict, ctx: StepContext):
        images = batch["image"]                # pixels: the ViT normalises them (models/vit.py)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        b, generator = images.shape[0], ctx.generator
        first = dist.rank() * b
        embeds = self.image_embeds(images)
        with torch.no_grad():
            features = self.project_image(embeds)
            everyone = dist.all_gather_nograd(features)
            n = everyone.shape[0]
            own = torch.arange(first, first + b, device=images.device)
            uniforms = objectives.batch_uniforms(4, b, (first, n), generator, images.device)
            slot0, slot1, labels = objectives.assign_text(features @ everyone.t() / PAIRING_TEMP, own, uniforms)
        (pairs,) = dist.fetch_rows(torch.cat([slot0, slot1]), embeds)
        logits = self.head(self.fused_cls([pairs[:b], pairs[b:]], ids, mask))
        loss, acc = objectives.classification(logits, labels)
        return loss, {"loss_ta": loss, "ta_acc": acc}


class NLVR2TATask(Task):
    name = "nlvr2_ta"
    inference_class = TextAssignment
    # ALBEF's pretrain_model_nlvr.pth: a BertModel text encoder, no momentum model
    released_text_parts = {"text_encoder.": False}
    fresh_parts = ("ta_head.",)
    fine_tuned_parts = ("ta_head.",)
    annotation_schema = CAPTIONS

    @classmethod
    def is_release(cls, keys: set) -> bool:
        return "ta_head.weight" in keys

    def check(self, world_size: int) -> None:
        global_batch = self.cfg.train.batch_size * world_size
        if global_batch < 3:
            raise ConfigError(f"global batch {global_batch} (micro batch {self.cfg.train.batch_size} x {world_size} "
                              "ranks): text assignment pairs each image with two others, it needs at least 3")

    def build_model(self, model_cfg: Optional[ModelConfig] = None) -> TextAssignmentModel:
        return TextAssignmentModel(model_cfg or self.cfg.model)

    def initial_state(self, state: dict, source_task: str) -> dict:
        """A pretrained checkpoint with each fusion layer copied into its pair (ALBEF's
        Pretrain_nlvr.py); its ITM head, queues and momentum weights are dropped."""
        return double_fusion_layers(state, self.cfg.model.text)

    def codec(self, tokenizer, train: bool):
        return caption_codec(self.cfg, tokenizer, train, image_ids=False)


TASK = NLVR2TATask
