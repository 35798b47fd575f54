"""Pretraining: ITC + ITM + MLM with momentum distillation on image-caption pairs."""
from __future__ import annotations

from typing import Optional

from ..config import ConfigError, ModelConfig
from ..data.annotations import CAPTIONS
from ..data.codec import CaptionCodec
from ..data.transforms import build_transform
from ..eval.retrieval import RetrievalEvaluator
from ..models import ALBEF
from .base import Task
from .contrastive import ContrastiveModel
from .eval_pictures import caption_pictures


class PretrainTask(Task):
    annotation_schema = CAPTIONS
    name = "pretrain"
    inference_class = ALBEF
    # released pretraining files hold BertForMaskedLM text encoders (`bert.` infix, MLM head)
    released_text_parts = {"text_encoder.": True, "text_encoder_m.": True}

    eval_metrics = RetrievalEvaluator.metrics
    select_metric = "r_mean"

    @classmethod
    def is_release(cls, keys: set) -> bool:
        return "itm_head.weight" in keys and any(k.startswith("text_encoder.bert.") for k in keys)

    def check(self, world_size: int) -> None:
        global_batch = self.cfg.train.batch_size * world_size
        if global_batch > self.cfg.model.queue_size:
            raise ConfigError(f"global batch {global_batch} (micro batch {self.cfg.train.batch_size} x "
                              f"{world_size} ranks) is larger than model.queue_size {self.cfg.model.queue_size}")

    def build_model(self, model_cfg: Optional[ModelConfig] = None) -> ContrastiveModel:
        return ContrastiveModel(model_cfg or self.cfg.model, mlm=True)

    def codec(self, tokenizer, train: bool):
        return caption_codec(self.cfg, tokenizer, train, image_ids=False)

    def evaluator(self, output_dir: str) -> RetrievalEvaluator:
        return RetrievalEvaluator(self.cfg, output_dir)

    def eval_pictures(self, evaluator: RetrievalEvaluator, model, count: int) -> dict:
        return caption_pictures(model, evaluator.data, evaluator.tokenizer, count, self.cfg.data.max_tokens)


def caption_codec(cfg, tokenizer, train: bool, image_ids: bool):
    transform = build_transform(cfg.model.vision.img_size, cfg.data.augment and train, cfg.data.crop_scale)
    return CaptionCodec(tokenizer, transform, cfg.data.max_words, cfg.data.max_tokens, image_ids=image_ids)


TASK = PretrainTask
