"""Visual question answering (VQA v2 + Visual Genome QA), fine-tuned from a pretrained ALBEF as in
the paper: the question encoded with the image fused in, an answer decoder started from the
pretrained fusion layers, trained on each annotated answer (weighted by the annotators' agreement)
with momentum distillation; evaluated by ranking an answer list (albef_ds.eval.vqa_answering) with
the standard VQA accuracy (albef_ds.eval.vqa). See docs/vqa.md.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..cli import check_at_least
from ..config import ConfigError, ModelConfig
from ..data.annotations import VQA_TRAIN
from ..data.transforms import build_transform
from ..data.vqa import VQACodec
from ..eval.vqa_answering import RESULT_FILE, VQAEvaluator, evaluate_vqa, read_vqa_inputs
from ..models.vit import build_vit
from ..models.vqa import (VQAModel, build_decoder, decoder_logits, encode_question, predicted_positions,
                          predicted_tokens, question_encoder)
from . import objectives
from .base import StepContext, Task, TrainingModel
from .eval_pictures import vqa_pictures
from .momentum import add_momentum_copies

MOMENTUM_PARTS = ("visual_encoder", "text_encoder", "text_decoder")
_LAYER = re.compile(r"bert\.encoder\.layer\.(\d+)\.(.+)")


@dataclass
class VQAOptions:
    """The config section `vqa:`."""
    # ALBEF's answer_list.json: the answers evaluation ranks (3,128 for VQA v2)
    answer_list: str = ""


class VQATrainingModel(VQAModel, TrainingModel):
    """VQAModel with momentum copies of its three parts; forward(batch, ctx) -> (loss, metrics).

    batch (albef_ds.data.vqa.VQACodec): image, input_ids, attention_mask (the questions), and the
    answers of all questions flattened: answer_ids, answer_mask, answer_weight, answer_question."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        v, t = cfg.vision, cfg.text
        add_momentum_copies(self, {
            "visual_encoder": lambda: build_vit(dataclasses.replace(v, pretrained=None)),
            "text_encoder": lambda: question_encoder(dataclasses.replace(t, pretrained=None), v.width),
            "text_decoder": lambda: build_decoder(t)})

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(getattr(self, name), getattr(self, f"{name}_m")) for name in MOMENTUM_PARTS]

    def forward(self, batch: dict, ctx: StepContext, alpha: Optional[float] = None):
        """The loss of one (local) batch: each answer's summed token loss, weighted, summed and
        divided by the questions of the batch (ranks hold equal batches, so the mean over ranks is
        the whole batch's). `alpha`: the distillation weight (default: model.alpha ramped over the
        first epoch). Metrics: loss_vqa, token_acc (answer tokens predicted right), alpha."""
        if alpha is None:
            alpha = objectives.alpha_at(ctx.step, ctx.steps_per_epoch, self.cfg.alpha)
        images = batch["image"]                # pixels: the ViT normalises them (models/vit.py)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        answer_ids, answer_mask, rows = batch["answer_ids"], batch["answer_mask"], batch["answer_question"]
        positions = predicted_positions(answer_mask)
        targets, answer = predicted_tokens(answer_ids, positions)

        states = encode_question(self.visual_encoder, self.text_encoder, images, ids, mask)
        logits = decoder_logits(self.text_decoder, states, mask, answer_ids, answer_mask, rows, positions)
        logits_m = None
        if alpha > 0:           # the same on every rank: ZeRO-3 gathers the momentum weights on all
            with torch.no_grad():
                states_m = encode_question(self.visual_encoder_m, self.text_encoder_m, images, ids, mask)
                logits_m = decoder_logits(self.text_decoder_m, states_m, mask, answer_ids, answer_mask, rows,
                                          positions)
        per_answer = objectives.answer_losses(logits, targets, answer, answer_ids.shape[0], logits_m, alpha)
        loss = objectives.vqa_loss(per_answer, batch["answer_weight"], images.shape[0])
        token_acc = (logits.argmax(-1) == targets).float().mean()
        return loss, {"loss_vqa": loss, "token_acc": token_acc, "alpha": alpha}


class VQATask(Task):
    name = "vqa"
    Options = VQAOptions
    inference_class = VQAModel
    # the released VQA files: BertModel question encoders (no `bert.` infix, no MLM head) and
    # BertLMHeadModel answer decoders (`bert.` infix, `cls.predictions`)
    released_text_parts = {"text_encoder.": False, "text_encoder_m.": False,
                           "text_decoder.": True, "text_decoder_m.": True}
    eval_metrics = VQAEvaluator.metrics
    select_metric = "acc"

    # from pretraining, the answer decoder is the question encoder's fusion layers (initial_state)
    fine_tuned_parts = ("text_decoder.",)
    annotation_schema = VQA_TRAIN

    @classmethod
    def is_release(cls, keys: set) -> bool:
        return any(k.startswith("text_decoder.bert.") for k in keys)

    def check(self, world_size: int) -> None:
        if self.cfg.train.compile:
            raise ConfigError("train.compile is not supported for vqa: the number and length of the answers "
                              "change every batch, and each new shape would compile the decoder layers again")
        if self.cfg.eval.every_epochs and self.cfg.eval.k_test < 1:
            raise ConfigError(f"eval.k_test is {self.cfg.eval.k_test}: VQA re-ranks the k_test answers most likely "
                              "by their first token, so it must be at least 1")

    def build_model(self, model_cfg: Optional[ModelConfig] = None) -> VQATrainingModel:
        return VQATrainingModel(model_cfg or self.cfg.model)

    def initial_state(self, state: dict, source_task: str) -> dict:
        """From a checkpoint of another task (pretraining): every weight by name, and the answer
        decoder (and its momentum copy) started as ALBEF's recipe starts it, from the question
        encoder's: its fusion layers (layer fusion_start + i becomes decoder layer i, cross-attention
        included), its embeddings and its MLM head (the LM head)."""
        start = self.cfg.model.text.fusion_start
        out = dict(state)
        for key, value in state.items():
            for encoder, decoder in (("text_encoder.", "text_decoder."), ("text_encoder_m.", "text_decoder_m.")):
                if not key.startswith(encoder):
                    continue
                rest = key[len(encoder):]
                layer = _LAYER.fullmatch(rest)
                if layer is None:
                    out[decoder + rest] = value
                elif int(layer.group(1)) >= start:
                    out[f"{decoder}bert.encoder.layer.{int(layer.group(1)) - start}.{layer.group(2)}"] = value
        return out

    def codec(self, tokenizer, train: bool):
        transform = build_transform(self.cfg.model.vision.img_size, self.cfg.data.augment and train,
                                    self.cfg.data.crop_scale)
        return VQACodec(tokenizer, transform, self.cfg.data.max_words, self.cfg.data.max_tokens,
                        self.cfg.model.text.max_position)

    def evaluator(self, output_dir: str) -> VQAEvaluator:
        return VQAEvaluator(self.cfg, self.options.answer_list, output_dir)

    def eval_pictures(self, evaluator: VQAEvaluator, model, count: int) -> dict:
        return vqa_pictures(model, evaluator.data, evaluator.answer_list, evaluator.tokenizer, count,
                            self.cfg.eval.k_test)

    eval_command_help = ("visual question answering: answers ranked from an answer list (ALBEF's protocol); "
                         "writes vqa_result.json (the evaluation server's format) and, when the questions "
                         "have answers, the VQA accuracy")

    @classmethod
    def add_eval_arguments(cls, parser) -> None:
        parser.add_argument("--answer_list", required=True, help="ALBEF's answer_list.json: the candidate answers")
        parser.add_argument("--k_test", type=int, default=128,
                            help="answers kept by their first token's probability, then re-ranked")

    @classmethod
    def check_eval_arguments(cls, args) -> None:
        check_at_least({"--k_test": args.k_test}, 1)

    @classmethod
    def evaluate_command(cls, model, args) -> dict:
        data, answer_list, tokenizer = read_vqa_inputs(args.data, args.image_root, args.answer_list,
                                                       model.cfg.text.tokenizer, "--data", "--answer_list")
        return evaluate_vqa(model, data, answer_list, tokenizer, model.cfg.vision.img_size, args.k_test,
                            args.batch_size, os.path.join(args.output_dir, RESULT_FILE), max_skipped=args.max_skipped)

    @classmethod
    def format_metrics(cls, metrics: dict) -> str:
        lines = [f"VQA: {metrics['questions']} questions, {metrics['answered']} answered "
                 f"({metrics['skipped']} skipped: image unreadable), k_test {metrics['k_test']} of "
                 f"{metrics['answer_list']} answers"]
        accuracies = {k: v for k, v in metrics.items() if k == "acc" or k.startswith("acc_")}
        if accuracies:
            lines.append("  ".join(f"{k} {v:.2f}" for k, v in accuracies.items()))
        else:
            lines.append("no answers in the data: accuracy not computed")
        if "per_question_type" in metrics:
            lines.append("per question type: " + "  ".join(f"{k} {v:.2f}" for k, v in metrics["per_question_type"].items()))
        if "result_file" in metrics:
            lines.append(f"answers written to {metrics['result_file']}")
        return "\n".join(lines)


TASK = VQATask
