"""Weakly supervised visual grounding (RefCOCO+): the contrastive model fine-tuned with ITC + ITM on
referring expressions, the expressions of one image positives of each other (no box is ever
trained on); evaluated by ranking detector proposals with Grad-CAM heat maps
(albef_ds.eval.grounding, albef_ds.models.gradcam). See docs/grounding.md."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from .. import distributed as dist
from ..cli import eval_text_lengths
from ..config import ConfigError
from ..data.annotations import GROUNDING_TRAIN
from ..data.grounding import ExpressionCodec
from ..data.transforms import build_transform
from ..eval.grounding import (GroundingEvaluator, evaluate_grounding, format_grounding, proposal_baselines,
                              read_grounding_set)
from ..eval.inputs import check_skipped
from ..fileio import atomic_write
from ..models.gradcam import check_gradcam, default_gradcam_layer
from ..tokenizer import build_tokenizer
from .eval_pictures import grounding_pictures
from .retrieval import RetrievalTask


@dataclass
class GroundingOptions:
    """The `grounding:` config section."""
    dets: str = ""                         # the proposal file the evaluation ranks (ALBEF's dets.json)
    refer: str = ""                        # REFER folder (refs(unc).p, instances.json): boxes and splits
                                           # of files whose entries do not carry them
    mode: str = "itm"                      # Grad-CAM of the ITM logit (fusion layer) or ITC (ViT block)
    gradcam_layer: Optional[int] = None    # BERT layer (itm) / ViT block (itc); None: ALBEF's position


class GroundingTask(RetrievalTask):
    annotation_schema = GROUNDING_TRAIN
    name = "grounding"
    Options = GroundingOptions
    eval_metrics = GroundingEvaluator.metrics
    select_metric = "acc"

    @classmethod
    def is_release(cls, keys: set) -> bool:
        # ALBEF's grounding release (refcoco.pth) has the retrieval layout and is read as one;
        # `--config` with `task: grounding` loads it into this task.
        return False

    def check(self, world_size: int) -> None:
        super().check(world_size)
        o = self.options
        layer = default_gradcam_layer(self.cfg.model, o.mode) if o.gradcam_layer is None else o.gradcam_layer
        try:
            check_gradcam(self.cfg.model, o.mode, layer)
        except ValueError as exc:
            raise ConfigError(f"grounding.mode / grounding.gradcam_layer: {exc}") from None

    def codec(self, tokenizer, train: bool):
        # data.crop_scale as every task's; the grounding configs' null is ALBEF's grounding transform
        # (the image resized whole, so the geometry the expressions describe is kept)
        d = self.cfg.data
        transform = build_transform(self.cfg.model.vision.img_size, d.augment and train, d.crop_scale)
        return ExpressionCodec(tokenizer, transform, d.max_words, d.max_tokens)

    def evaluator(self, output_dir: str) -> GroundingEvaluator:
        return GroundingEvaluator(self.cfg, self.options, output_dir)

    def eval_pictures(self, evaluator: GroundingEvaluator, model, count: int) -> dict:
        return grounding_pictures(model, evaluator.data, evaluator.tokenizer, count, self.cfg.data.max_tokens,
                                  self.options.mode, self.options.gradcam_layer)

    eval_command_help = ("weakly supervised grounding: Grad-CAM ranks detector proposals (ALBEF's "
                         "RefCOCO+ protocol); any checkpoint with an ITM head")

    @classmethod
    def add_eval_arguments(cls, parser) -> None:
        parser.add_argument("--dets", required=True, help="proposal file: {image id: [[x, y, w, h], ...]} "
                            "(ALBEF's dets.json; cocos.json for ground-truth boxes)")
        parser.add_argument("--refer", default=None, help="REFER folder with refs(unc).p and instances.json, "
                            "for files whose entries carry no bbox / split / image_id (ALBEF's)")
        parser.add_argument("--mode", choices=("itm", "itc"), default="itm",
                            help="Grad-CAM of the ITM logit at a fusion layer, or of ITC at a ViT block")
        parser.add_argument("--gradcam_layer", type=int, default=None, help="BERT layer (itm) or ViT block "
                            "(itc), 0-based; default: ALBEF's at the same relative depth (layer 8 / block 8 "
                            "of the base model)")

    @classmethod
    def check_eval_arguments(cls, args) -> None:
        """Nothing before the model is loaded: --gradcam_layer's range is the model's (checked then)."""

    @classmethod
    def evaluate_command(cls, model, args) -> dict:
        max_tokens, max_words = eval_text_lengths(args.config, model)
        layer = default_gradcam_layer(model.cfg, args.mode) if args.gradcam_layer is None else args.gradcam_layer
        try:
            check_gradcam(model.cfg, args.mode, layer)
            data = read_grounding_set(args.data, args.dets, args.image_root, args.refer, max_words)
        except (OSError, ValueError) as exc:
            raise ConfigError(str(exc)) from None
        out = evaluate_grounding(model, data, build_tokenizer(model.cfg.text.tokenizer), model.cfg.vision.img_size,
                                 max_tokens, args.mode, layer, args.batch_size)
        predictions = out.pop("predictions")
        check_skipped(out, args.max_skipped, "--max_skipped")          # before anything is written
        if dist.rank() == 0:
            rows = [{"ref_id": e.ref_id, "split": e.split, "box": [round(v, 2) for v in p[:4].tolist()],
                     "iou": round(float(p[4]), 4)} if not p[4].isnan() else {"ref_id": e.ref_id, "skipped": True}
                    for e, p in zip(data.expressions, predictions)]
            text = json.dumps(rows)
            atomic_write(os.path.join(args.output_dir, "predictions.json"), lambda tmp: open(tmp, "w").write(text))
        out.update(dets=args.dets, baselines=proposal_baselines(data))
        return out

    @classmethod
    def format_metrics(cls, metrics: dict) -> str:
        return format_grounding(metrics)


TASK = GroundingTask
