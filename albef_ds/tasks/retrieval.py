"""Retrieval fine-tuning (COCO, Flickr30K): ITC with positives by image id through the index queue,
ITM hard negatives that never pick a caption of the same image, no MLM; evaluated by ALBEF's
retrieval protocol (albef_ds.eval.retrieval), the best val r_mean kept."""
from __future__ import annotations

from typing import Optional

from ..config import ModelConfig
from .contrastive import ContrastiveModel
from .pretrain import PretrainTask, caption_codec


class RetrievalTask(PretrainTask):
    name = "retrieval"
    # fine-tuned releases hold BertModel text encoders: no `bert.` infix, no MLM head
    released_text_parts = {"text_encoder.": False, "text_encoder_m.": False}

    @classmethod
    def is_release(cls, keys: set) -> bool:
        return ("itm_head.weight" in keys and "text_encoder.embeddings.word_embeddings.weight" in keys
                and not any(k.startswith("text_decoder.") for k in keys))

    def build_model(self, model_cfg: Optional[ModelConfig] = None) -> ContrastiveModel:
        return ContrastiveModel(model_cfg or self.cfg.model, mlm=False)

    def codec(self, tokenizer, train: bool):
        # the image id is a stable hash of the sample key: one sample per image (make_shards.py)
        return caption_codec(self.cfg, tokenizer, train, image_ids=True)

    eval_command_help = "image-text retrieval with ITM re-ranking (ALBEF's protocol); any checkpoint with an ITM head"

    @classmethod
    def add_eval_arguments(cls, parser) -> None:
        parser.add_argument("--k_test", type=int, default=128, help="candidates re-ranked per query (0: ITC only)")
        parser.add_argument("--add_sim", action="store_true", help="score = ITM logit + similarity (BLIP) "
                            "instead of ALBEF's ITM logit")

    @classmethod
    def evaluate_command(cls, model, args) -> dict:
        from ..config import ConfigError, load_config
        from ..eval.retrieval import evaluate_retrieval, images_of_this_rank, read_retrieval_set
        from ..tokenizer import build_tokenizer

        max_tokens, max_words = 30, 30                 # ALBEF's evaluation text length
        if args.config:
            cfg = load_config(args.config)
            max_tokens, max_words = cfg.data.max_tokens, cfg.data.max_words
        max_tokens = min(max_tokens, model.cfg.text.max_position)
        try:
            data = read_retrieval_set(args.data, args.image_root, max_words, images_of_this_rank(args.batch_size))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--data {args.data}: {exc}") from None
        out = evaluate_retrieval(model, data, build_tokenizer(model.cfg.text.tokenizer), model.cfg.vision.img_size,
                                 max_tokens, args.k_test, args.batch_size, args.add_sim)
        out.update(add_sim=args.add_sim)
        return out

    @classmethod
    def format_metrics(cls, metrics: dict) -> str:
        from ..eval.recall import format_table

        return format_table(metrics, f"retrieval: {metrics['images']} images, {metrics['texts']} texts, "
                                     f"k_test {metrics['k_test']}")


TASK = RetrievalTask
