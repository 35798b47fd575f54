"""Image-text retrieval evaluated as ALBEF does it, split over ranks.

Protocol (ALBEF's): ITC similarities image_features @ text_features.T for all pairs; for every
image its k_test most similar texts, and for every text its k_test most similar images, are
re-scored by the fusion encoder; the score of a re-ranked pair is its ITM "match" logit
(itm_logits[:, 1]; `add_sim` adds the similarity, as BLIP does), every other entry is -100.

Data: an ALBEF evaluation JSON (`[{"image": path, "caption": [...]}]`, paths under image_root),
or shard patterns (json "caption" lists keep every caption). The work is split over the ranks and
the result is the one a single process computes. See docs/retrieval.md.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from .. import distributed as dist
from ..config import ConfigError
from ..data.annotations import CAPTIONS, check_entries
from ..data.samples import ERROR_KEY, IMAGE_KEYS, read_shard, sample_captions
from ..data.shards import expand_pattern, group_annotations, read_annotations
from ..models import evaluating
from ..tokenizer import build_tokenizer, clean_caption, tokenize, words_past
from .inputs import check_failures, load_images, model_device, skip_summary
from .recall import RECALL_KEYS, retrieval_metrics

# what evaluate_retrieval reports: re-ranked recalls and the ITC-only ones
RETRIEVAL_METRICS = RECALL_KEYS + tuple(f"itc_{k}" for k in RECALL_KEYS)
NOT_RERANKED = -100.0                 # ALBEF's score of pairs outside the top k_test


@dataclass
class RetrievalSet:
    """Images with their captions. images[i]: a file path, the encoded bytes, or None (not kept
    by this rank); captions[i]: its cleaned captions; meta[i]: the sample's json (shards)."""
    images: list
    captions: list
    names: list
    meta: list = field(default_factory=list)
    skipped_items: list = field(default_factory=list)     # samples left out when reading, with why

    @property
    def texts(self) -> list[str]:
        return [c for caps in self.captions for c in caps]

    @property
    def img2txt(self) -> list[list[int]]:
        out, n = [], 0
        for caps in self.captions:
            out.append(list(range(n, n + len(caps))))
            n += len(caps)
        return out

    @property
    def txt2img(self) -> list[int]:
        return [i for i, caps in enumerate(self.captions) for _ in caps]


def _clean(captions: list[str], max_words: int) -> list[str]:
    return [c for c in (clean_caption(c, max_words) for c in captions) if c]


def read_json_set(path: str, image_root: Optional[str] = None, max_words: int = 30) -> RetrievalSet:
    """ALBEF's evaluation JSON; an image listed once per caption is merged into one entry. A wrong
    entry is a ValueError naming it."""
    annotations = read_annotations(path)
    check_entries(annotations, path, CAPTIONS)
    images, captions, missing = [], [], []
    for image, caps in group_annotations(annotations):
        file = os.path.join(image_root, image) if image_root else image
        caps = _clean(caps, max_words)
        if not caps:
            raise ValueError(f"{path}: image {image} has no usable caption")
        if not os.path.isfile(file):
            missing.append(file)
        images.append(file)
        captions.append(caps)
    if missing:
        raise ValueError(f"{len(missing)} images of {path} not found (--image_root?), e.g. {missing[:3]}")
    return RetrievalSet(images, captions, list(images), [{} for _ in images])


def read_shard_set(shards: Union[str, list], max_words: int = 30,
                   keep: Optional[Callable[[int], bool]] = None) -> RetrievalSet:
    """Samples of webdataset shards in the order listed (each shard front to back), every caption
    of each. `shards`: a pattern, or a list of patterns or of corpus dicts ({"shards": [...]},
    as write_synthetic_corpus returns). `keep(i)`: whether to keep image i's bytes (default all);
    a rank keeps only the images it encodes. Samples without image or caption are skipped."""
    patterns = [shards] if isinstance(shards, str) else [
        p for item in shards for p in (item["shards"] if isinstance(item, dict) else [item])]
    images, captions, names, meta, skipped = [], [], [], [], []
    for url in (u for p in patterns for u in expand_pattern(p)):
        for raw in read_shard(url):
            if ERROR_KEY in raw:
                raise ValueError(f"shard {url} could not be read to its end ({raw[ERROR_KEY]})")
            try:
                caps = _clean(sample_captions(raw), max_words)
                info = json.loads(raw["json"].decode("utf-8")) if "json" in raw else {}
            except ValueError:
                caps = []
            data = next((raw[k] for k in IMAGE_KEYS if k in raw), None)
            if not caps or data is None:
                skipped.append(f"{os.path.basename(url)}/{raw['__key__']}: " + ("no image" if caps else "no caption"))
                continue
            images.append(data if keep is None or keep(len(images)) else None)
            captions.append(caps)
            names.append(f"{os.path.basename(url)}/{raw['__key__']}")
            meta.append(info if isinstance(info, dict) else {})
    if not images:
        raise ValueError(f"no usable sample in {patterns} ({len(skipped)} skipped, e.g. {'; '.join(skipped[:3])})")
    return RetrievalSet(images, captions, names, meta, skipped)


def read_retrieval_set(data: Union[str, list], image_root: Optional[str] = None, max_words: int = 30,
                       keep: Optional[Callable[[int], bool]] = None) -> RetrievalSet:
    """An evaluation JSON (ALBEF's retrieval files), or shard patterns."""
    if isinstance(data, str) and data.endswith(".json"):
        return read_json_set(data, image_root, max_words)
    return read_shard_set(data, max_words, keep)


def images_of_this_rank(batch_size: int) -> Callable[[int], bool]:
    """`keep` for read_retrieval_set: whether this rank encodes image i."""
    rank, world = dist.work_split(None)
    return lambda i: dist.owner_of(i, batch_size, world) == rank


@torch.no_grad()
def encode_set(model, data: RetrievalSet, tokenizer, img_size: int, max_tokens: int,
               batch_size: int = 64, split_ranks: Optional[bool] = None) -> dict:
    """Features of every image and text (gathered on every rank), this rank's image embeddings,
    and the tokens of all texts."""
    rank, world = dist.work_split(split_ranks)
    device = model_device(model)
    texts = data.texts
    ids, mask = tokenize(tokenizer, texts, max_tokens)
    unread = [words_past(tokenizer, t, max_tokens) for t in texts]
    if any(unread) and rank == 0:
        print(f"note: {sum(map(bool, unread))} of {len(texts)} texts are longer than the model reads ({max_tokens} "
              f"tokens): {sum(unread)} words in all are not read", file=sys.stderr, flush=True)
    image_feats, image_embeds, text_feats, failed = [], [], [], []
    for batch in dist.my_batches(len(data.images), batch_size, rank, world):
        images = load_images(data.images, data.names, batch, img_size, failed).to(device)
        embeds = model.image_embeds(images)
        image_embeds.append(embeds)
        image_feats.append(model.project_image(embeds).float())       # the ViT run once
    check_failures(failed, world, device)
    for batch in dist.my_batches(len(texts), batch_size, rank, world):
        part = slice(batch.start, batch.stop)
        text_feats.append(model.text_features(ids[part].to(device), mask[part].to(device)).float())
    dim = model.cfg.embed_dim

    def stacked(parts):
        return torch.cat(parts) if parts else torch.zeros(0, dim, device=device)

    return {"image_feats": dist.gather_rows(stacked(image_feats), len(data.images), batch_size, world),
            "text_feats": dist.gather_rows(stacked(text_feats), len(texts), batch_size, world),
            "image_embeds": image_embeds, "input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def rerank_scores(model, encoded: dict, k_test: int, batch_size: int = 64, add_sim: bool = False,
                  split_ranks: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(score_i2t, score_t2i, sims) on the CPU, identical on every rank.

    Every pair in an image's top-k_test texts or in a text's top-k_test images is scored once by
    the fusion encoder, on the rank that holds the image's embeddings, one image at a time (its
    pairs in chunks of batch_size, the image repeated); the logits are summed over ranks."""
    rank, world = dist.work_split(split_ranks)
    device = model_device(model)
    sims = encoded["image_feats"] @ encoded["text_feats"].t()
    n_img, n_txt = sims.shape
    if k_test <= 0:
        sims = sims.cpu()
        return sims, sims.t().contiguous(), sims
    top_txt = sims.topk(min(k_test, n_txt), dim=1).indices                # [n_img, k]
    top_img = sims.t().topk(min(k_test, n_img), dim=1).indices            # [n_txt, k]
    rows = torch.arange(n_img, device=sims.device)[:, None]
    cols = torch.arange(n_txt, device=sims.device)[:, None]
    pairs = torch.unique(torch.cat([(rows * n_txt + top_txt).flatten(), (top_img * n_txt + cols).flatten()]))
    pair_img = pairs // n_txt
    values = torch.zeros(len(pairs), dtype=torch.float32, device=sims.device)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    locals_ = torch.cat(encoded["image_embeds"]) if encoded["image_embeds"] else None
    starts = torch.searchsorted(pair_img, torch.arange(n_img + 1, device=sims.device)).tolist()
    for batch in dist.my_batches(n_img, batch_size, rank, world):
        for i in batch:
            embeds = locals_[dist.local_row(i, batch_size, world)][None]
            for s in range(starts[i], starts[i + 1], batch_size):
                e = min(s + batch_size, starts[i + 1])
                txt = (pairs[s:e] % n_txt).cpu()
                logits = model.itm_logits(embeds.expand(e - s, -1, -1), ids[txt].to(device), mask[txt].to(device))
                values[s:e] = logits[:, 1].float().to(values.device)
    values = dist.sum_over_split(values, world, device).to(sims.device)

    def lookup(image_idx, text_idx):
        return values[torch.searchsorted(pairs, image_idx * n_txt + text_idx)]

    score_i2t = torch.full((n_img, n_txt), NOT_RERANKED, device=sims.device)
    score_i2t.scatter_(1, top_txt, lookup(rows, top_txt) + (sims.gather(1, top_txt) if add_sim else 0))
    score_t2i = torch.full((n_txt, n_img), NOT_RERANKED, device=sims.device)
    score_t2i.scatter_(1, top_img, lookup(top_img, cols) + (sims.t().gather(1, top_img) if add_sim else 0))
    return score_i2t.cpu(), score_t2i.cpu(), sims.cpu()


def evaluate_retrieval(model, data: RetrievalSet, tokenizer, img_size: int, max_tokens: int,
                       k_test: int = 128, batch_size: int = 64, add_sim: bool = False,
                       split_ranks: Optional[bool] = None, return_scores: bool = False) -> dict:
    """ALBEF's retrieval protocol on `data` -> recall metrics of the re-ranked scores, plus the
    ITC-only ones under "itc_*". Call on every rank of the split (default: all ranks of the process
    group when there is one); every rank returns the same. return_scores: also "scores" =
    (score_i2t, score_t2i, sims)."""
    with evaluating(model):
        encoded = encode_set(model, data, tokenizer, img_size, max_tokens, batch_size, split_ranks)
        score_i2t, score_t2i, sims = rerank_scores(model, encoded, k_test, batch_size, add_sim, split_ranks)
    out = retrieval_metrics(score_i2t, score_t2i, data.txt2img, data.img2txt)
    out.update({f"itc_{k}": v for k, v in retrieval_metrics(sims, sims.t(), data.txt2img, data.img2txt).items()})
    out.update(images=len(data.images), texts=len(data.texts), k_test=k_test,
               **skip_summary(len(data.images) + len(data.skipped_items), data.skipped_items))
    if return_scores:
        out["scores"] = (score_i2t, score_t2i, sims)
    return out


class RetrievalEvaluator:
    """The retrieval evaluation of a training run: eval.data, read when the run starts: a missing or
    unreadable set is a ConfigError then, not an epoch in. A collective: every rank calls it with
    the model and gets the same metrics."""
    metrics = RETRIEVAL_METRICS
    headline = RECALL_KEYS

    def __init__(self, cfg, output_dir: str):
        self.cfg = cfg
        e = cfg.eval
        if not e.data:
            raise ConfigError("evaluation needs eval.data (an evaluation JSON with eval.image_root, or shards)")
        source = e.data[0] if len(e.data) == 1 else e.data
        try:
            # this rank keeps the bytes of the images it encodes
            self.data = read_retrieval_set(source, e.image_root or None, cfg.data.max_words,
                                           images_of_this_rank(e.batch_size))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"eval.data {e.data or source}: {exc}") from None
        self.tokenizer = build_tokenizer(cfg.model.text.tokenizer)

    def __call__(self, model) -> dict:
        e = self.cfg.eval
        return evaluate_retrieval(model, self.data, self.tokenizer, self.cfg.model.vision.img_size,
                                  self.cfg.data.max_tokens, k_test=e.k_test, batch_size=e.batch_size)
