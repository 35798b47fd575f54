"""Retrieval fine-tuning (COCO, Flickr30K): ITC with positives by image id through the index queue,
ITM hard negatives that never pick a caption of the same image, no MLM; evaluated by ALBEF's
retrieval protocol (albef_ds.eval.retrieval), the best val r_mean kept."""
from __future__ import annotations

import os
from typing import Optional

import torch
from PIL import ImageOps

from .. import distributed as dist
from ..cli import eval_text_lengths
from ..config import ConfigError, ModelConfig
from ..data.samples import decode_image
from ..eval.recall import format_table
from ..eval.retrieval import NOT_RERANKED, RetrievalSet, evaluate_retrieval, images_of_this_rank, read_retrieval_set
from ..pictures import PANEL, labelled_grid, save_png, slug
from ..tokenizer import build_tokenizer
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
        parser.add_argument("--show", type=int, default=0, metavar="N", help="also draw the top-5 images of N "
                            "text queries spread over the set (OUTPUT_DIR/show/*.png)")

    @classmethod
    def evaluate_command(cls, model, args) -> dict:
        max_tokens, max_words = eval_text_lengths(args.config, model)
        # the pictures need every image on rank 0: then every rank keeps them all
        keep = None if args.show else images_of_this_rank(args.batch_size)
        try:
            data = read_retrieval_set(args.data, args.image_root, max_words, keep)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--data {args.data}: {exc}") from None
        out = evaluate_retrieval(model, data, build_tokenizer(model.cfg.text.tokenizer), model.cfg.vision.img_size,
                                 max_tokens, args.k_test, args.batch_size, args.add_sim, return_scores=bool(args.show))
        out.update(add_sim=args.add_sim)
        if args.show:
            _, score_t2i, _ = out.pop("scores")
            if dist.rank() == 0:
                out["pictures"] = write_top_images(data, score_t2i, os.path.join(args.output_dir, "show"), args.show)
        return out

    @classmethod
    def format_metrics(cls, metrics: dict) -> str:
        return format_table(metrics, f"retrieval: {metrics['images']} images, {metrics['texts']} texts, "
                                     f"k_test {metrics['k_test']}")


def write_top_images(data: RetrievalSet, score_t2i: torch.Tensor, output_dir: str, queries: int,
                     k: int = 5) -> list[str]:
    """Pictures of the k best-scored images of `queries` text queries spread evenly over the set
    (score_t2i [texts, images], as evaluate_retrieval returns it): the query as title, each image
    with its rank and score, the query's own image framed in green. Needs every image's bytes
    (or path). Returns the PNG paths."""
    texts, txt2img = data.texts, data.txt2img
    picks = sorted({round(i * (len(texts) - 1) / max(1, queries - 1)) for i in range(min(queries, len(texts)))})
    paths = []
    for t in picks:
        scores, top = score_t2i[t].topk(min(k, score_t2i.shape[1]))
        panels = [ImageOps.pad(decode_image(data.images[i]), (PANEL, PANEL), color="white") for i in top.tolist()]
        labels = [f"{r + 1}: " + (f"{s:.2f}" if s != NOT_RERANKED else "not re-ranked")
                  for r, s in enumerate(scores.tolist())]
        frames = ["#20a020" if i == txt2img[t] else None for i in top.tolist()]
        title = f"{texts[t]}   (own image {'framed' if txt2img[t] in top.tolist() else f'not in the top {k}'})"
        picture = labelled_grid(panels, labels, title, bar=False, outlines=frames, columns=k)
        paths.append(save_png(picture, os.path.join(output_dir, f"query{t:05d}_{slug(texts[t])}.png")))
    return paths


TASK = RetrievalTask
