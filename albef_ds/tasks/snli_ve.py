"""SNLI-VE fine-tuning: a 3-way MLP head (contradiction, neutral, entailment) on the fused [CLS] of an
image and a hypothesis, trained with cross-entropy and momentum distillation as ALBEF's VE.py; the
best val accuracy kept. Also the part NLVR2 shares (tasks/nlvr2.py derives from it, as retrieval
derives from pretraining): the distilled classifier training model, the labelled codec, the
accuracy evaluator and its command. See docs/classification.md.
"""
from __future__ import annotations

import dataclasses
import re
from typing import ClassVar, Optional

import torch
from torch import nn

from ..cli import eval_text_lengths
from ..config import ConfigError, ModelConfig
from ..data.annotations import LABELLED
from ..data.labelled import VE_LABELS, LabelledCodec, check_labels
from ..data.shards import check_corpus_annotations
from ..data.transforms import build_transform
from ..eval.classification import (ClassificationEvaluator, evaluate_classification, read_labelled_set,
                                   samples_of_this_rank)
from ..fileio import ConversionError
from ..models.classifier import Classifier, VEClassifier, classifier_head
from ..models.vit import build_vit
from ..tokenizer import build_tokenizer
from . import objectives
from .base import StepContext, Task, TrainingModel
from .eval_pictures import classification_pictures
from .momentum import add_momentum_copies

MOMENTUM_PARTS = ("visual_encoder", "text_encoder", "cls_head")
_LAYER = re.compile(r"^text_encoder\.(?:bert\.)?encoder\.layer\.(\d+)\.(\w+)\.")


class DistilledClassifier(TrainingModel):
    """A models.classifier.Classifier (the other base) trained as ALBEF's NLVR2 and VE heads:
    loss = (1 - alpha) CE + alpha soft-CE against the momentum model's softmax, with momentum
    copies of the ViT, the text/fusion encoder and the head. `alpha_warmup`: alpha ramps from 0
    over the first epoch (ALBEF's NLVR2) instead of holding from the start (VE).

    batch: images [B, images_per_text, 3, H, W], input_ids and attention_mask [B, L], label [B]."""
    alpha_warmup: ClassVar[bool] = False

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        # built without pretrained weights, then filled from the online parts
        add_momentum_copies(self, {
            "visual_encoder": lambda: build_vit(dataclasses.replace(cfg.vision, pretrained=None)),
            "text_encoder": lambda: self.new_text_encoder(cfg),
            "cls_head": lambda: classifier_head(cfg.text.hidden, self.classes)})

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(getattr(self, name), getattr(self, f"{name}_m")) for name in MOMENTUM_PARTS]

    def forward(self, batch: dict, ctx: StepContext, alpha: Optional[float] = None):
        """(loss, metrics: loss_cls, acc, alpha). `alpha`: the distillation weight (default:
        model.alpha, ramped over the first epoch where alpha_warmup)."""
        if alpha is None:
            alpha = (objectives.alpha_at(ctx.step, ctx.steps_per_epoch, self.cfg.alpha) if self.alpha_warmup
                     else self.cfg.alpha)
        images = batch["images"]               # pixels: the ViT normalises them (models/vit.py)
        count = images.shape[1]
        images = images.transpose(0, 1).flatten(0, 1)        # image 0 of every text, then image 1
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = self.head(self.fused_cls(self.split_images(images, count), ids, mask))
        logits_m = None
        if alpha > 0:
            with torch.no_grad():
                embeds_m = self.split_images(images, count, self.visual_encoder_m)
                logits_m = self.cls_head_m(self.fused_cls(embeds_m, ids, mask, self.text_encoder_m))
        loss, acc = objectives.classification(logits, batch["label"], logits_m, alpha)
        return loss, {"loss_cls": loss, "acc": acc, "alpha": alpha}


class VEModel(DistilledClassifier, VEClassifier):
    pass


def doubled_fusion(keys) -> bool:
    """Whether a text encoder's keys hold doubled fusion layers (NLVR2's) rather than one per
    pretrained fusion layer: ALBEF fuses in the upper half of its BERT (6 of 12 layers), so a
    doubled stack has more cross-attention layers than text layers (12 and 6)."""
    layers: dict[int, bool] = {}
    for match in filter(None, map(_LAYER.match, keys)):
        index = int(match.group(1))
        layers[index] = layers.get(index, False) or match.group(2) == "crossattention"
    fusion = sum(layers.values())
    return fusion > len(layers) - fusion


class SNLIVETask(Task):
    name = "snli_ve"
    inference_class = VEClassifier
    training_class: ClassVar[type] = VEModel
    labels: ClassVar[dict] = VE_LABELS
    # the released files (ALBEF's code, LAVIS' albef_snli_ve_lavis.pt) hold BertModel encoders
    released_text_parts = {"text_encoder.": False, "text_encoder_m.": False}
    fresh_parts = ("cls_head.",)
    fine_tuned_parts = ("cls_head.",)
    annotation_schema = LABELLED
    annotation_images = 1
    eval_metrics = ClassificationEvaluator.metrics
    select_metric = "acc"

    @classmethod
    def is_release(cls, keys: set) -> bool:
        return "cls_head.0.weight" in keys and not doubled_fusion(keys)

    def check(self, world_size: int) -> None:
        """The labels of the training annotation files, before anything is built (a bad one would
        otherwise stop the run where the stream reaches it)."""
        check_corpus_annotations(self.cfg.data.corpora, lambda entries, path: check_labels(entries, self.labels, path))

    def build_model(self, model_cfg: Optional[ModelConfig] = None) -> DistilledClassifier:
        return self.training_class(model_cfg or self.cfg.model)

    def initial_state(self, state: dict, source_task: str) -> dict:
        """Every weight by name (ALBEF's VE.py: the pretrained momentum weights included); a
        two-image model's doubled fusion layers cannot start a one-image model."""
        if doubled_fusion(state):
            raise ConversionError(f"a {source_task} checkpoint has doubled fusion layers (two images per "
                                  f"text): {self.name} starts from a one-image model such as pretrain")
        return state

    def codec(self, tokenizer, train: bool):
        transform = build_transform(self.cfg.model.vision.img_size, self.cfg.data.augment and train,
                                    self.cfg.data.crop_scale)
        return LabelledCodec(tokenizer, transform, self.cfg.data.max_words, self.cfg.data.max_tokens,
                             self.inference_class.images_per_text, self.labels)

    def evaluator(self, output_dir: str) -> ClassificationEvaluator:
        return ClassificationEvaluator(self.cfg, self.labels, self.inference_class.images_per_text)

    def eval_pictures(self, evaluator: ClassificationEvaluator, model, count: int) -> dict:
        """Of the first evaluation set (the one that selects the best checkpoint)."""
        return classification_pictures(model, evaluator.sets[0][1], self.labels, evaluator.tokenizer, count,
                                       self.cfg.data.max_tokens)

    eval_command_help = "visual entailment accuracy (contradiction / neutral / entailment) on ALBEF's ve_*.json"

    @classmethod
    def evaluate_command(cls, model: Classifier, args) -> dict:
        max_tokens, max_words = eval_text_lengths(args.config, model)
        try:
            data = read_labelled_set(args.data, cls.labels, model.images_per_text, args.image_root, max_words,
                                     samples_of_this_rank(args.batch_size))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--data {args.data}: {exc}") from None
        return evaluate_classification(model, data, build_tokenizer(model.cfg.text.tokenizer), model.cfg.vision.img_size,
                                       max_tokens, args.batch_size)

    @classmethod
    def format_metrics(cls, metrics: dict) -> str:
        skipped = ", ".join(f"{k[len('skipped_'):].replace('_', ' ')} {v}" for k, v in metrics.items()
                            if k.startswith("skipped_") and v)
        return (f"{cls.name}: accuracy {metrics['acc']:.2f}% on {metrics['evaluated']} of {metrics['samples']} "
                f"samples" + (f" (skipped: {skipped})" if skipped else ""))


TASK = SNLIVETask
