"""Search an index as ALBEF retrieves: the k nearest by ITC (albef_ds.search.ann), the first
`rerank` of them re-scored by the ITM head and put first, by ITM logit (ALBEF's score).

Re-ranking recomputes the image tokens of the candidates only: per text query that is `rerank`
images read and decoded, `rerank` ViT passes and `rerank` fusion passes (one batch); per image
query one ViT pass and `rerank` fusion passes over candidate captions. Each result carries its
timings (ms).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from PIL import Image

from ..data.transforms import EvalTransform
from ..eval.inputs import model_device
from ..tokenizer import clean_caption, tokenize
from . import ann
from .features import decoded_batches


@dataclass
class Hit:
    """One result: an image (text -> image) or a caption (image -> text). itm: the ITM "match"
    logit, ALBEF's score (None: not re-ranked); match: its probability."""
    rank: int
    row: int
    name: str
    itc: float
    itm: Optional[float] = None
    match: Optional[float] = None
    text: Optional[str] = None
    captions: list = field(default_factory=list)
    source: dict = field(default_factory=dict)
    url: Optional[str] = None


@dataclass
class Result:
    query: str
    hits: list
    reranked: int
    timings: dict


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


class Searcher:
    """Text -> images and image -> texts over a StoredIndex with the model that made it
    (albef_ds.search.loading.load_for_index)."""

    def __init__(self, index, loaded, batch_size: int = 64, workers: int = 4, nprobe: Optional[int] = None):
        self.index, self.model, self.tokenizer = index, loaded.model, loaded.tokenizer
        self.nprobe = nprobe                # an inverted index's lists scanned per query (None: the index's)
        self.max_tokens, self.max_words = loaded.max_tokens, loaded.max_words
        self.batch_size, self.workers = batch_size, workers
        self.img_size = self.model.cfg.vision.img_size
        self.device = model_device(self.model)

    def clean(self, text: str) -> str:
        cleaned = clean_caption(text, self.max_words)
        if not cleaned:
            raise ValueError(f"the query {text!r} is empty once cleaned (lower case, no punctuation)")
        return cleaned

    def _tokens(self, texts: list[str]):
        ids, mask = tokenize(self.tokenizer, texts, self.max_tokens)
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def images_for_text(self, text: str, k: int = 10, rerank: int = 64) -> Result:
        """The k best images for `text`. ValueError for a text that is empty once cleaned."""
        timings, start = {}, time.perf_counter()
        cleaned = self.clean(text)
        ids, mask = self._tokens([cleaned])
        query = self.model.text_features(ids, mask).float().cpu().numpy()
        timings["text_ms"] = _ms(start)
        start = time.perf_counter()
        sims, rows = ann.search(self.index.image_ann, self.index.image_features, query, max(k, rerank),
                                self.index.specs["images"], self.nprobe)
        timings["ann_ms"] = _ms(start)
        sims, rows = sims[0], rows[0]
        candidates = [self.index.images[int(r)] | {"row": int(r)} for r in rows[:rerank]]
        logits = self._image_logits(candidates, ids, mask, timings)
        hits = [Hit(0, int(r), row["name"], float(s), captions=row["captions"], source=row["source"],
                    url=row.get("url")) for r, s, row in
                zip(rows, sims, candidates + [self.index.images[int(r)] for r in rows[len(candidates):]])]
        return Result(text, _ranked(hits, logits, k), len(candidates), timings)

    def _image_logits(self, candidates: list, ids, mask, timings: dict) -> list:
        """ITM logits [match, no match] of the text with each candidate image (None: unreadable)."""
        logits: list = [None] * len(candidates)
        if not candidates:
            return logits
        read = vit = fusion = 0.0
        start = time.perf_counter()
        for batch, pixels in decoded_batches(candidates, self.img_size, self.batch_size, self.workers):
            good = [j for j, p in enumerate(pixels) if not isinstance(p, str)]
            read += time.perf_counter() - start
            if good:
                start = time.perf_counter()
                embeds = self.model.image_embeds(torch.stack([pixels[j] for j in good]).to(self.device))
                vit += time.perf_counter() - start
                start = time.perf_counter()
                out = self.model.itm_logits(embeds, ids.expand(len(good), -1), mask.expand(len(good), -1)).float()
                fusion += time.perf_counter() - start
                for j, value in zip(good, out.cpu()):
                    logits[batch[j]] = value
            start = time.perf_counter()
        timings.update(read_decode_ms=round(read * 1000, 3), vit_ms=round(vit * 1000, 3),
                       fusion_ms=round(fusion * 1000, 3))
        return logits

    @torch.no_grad()
    def texts_for_image(self, image: Image.Image, k: int = 10, rerank: int = 64, label: str = "(image)") -> Result:
        """The k best captions of the collection for `image` (named `label` in the result).
        ValueError when the collection has none."""
        if not self.index.has_texts:
            raise ValueError("this collection has no captions to search: image -> text needs an index of "
                             "images with captions")
        timings, start = {}, time.perf_counter()
        pixels = EvalTransform(self.img_size)(image.convert("RGB"))[None].to(self.device)
        embeds = self.model.image_embeds(pixels)
        query = self.model.project_image(embeds).float().cpu().numpy()
        timings["vit_ms"] = _ms(start)
        start = time.perf_counter()
        sims, rows = ann.search(self.index.text_ann, self.index.text_features, query, max(k, rerank),
                                self.index.specs["texts"], self.nprobe)
        timings["ann_ms"] = _ms(start)
        texts = [self.index.texts[int(r)] for r in rows[0]]
        start = time.perf_counter()
        logits: list = []
        for s in range(0, min(rerank, len(texts)), self.batch_size):
            chunk = texts[s:min(s + self.batch_size, rerank)]
            ids, mask = self._tokens([t["text"] for t in chunk])
            logits += list(self.model.itm_logits(embeds.expand(len(chunk), -1, -1), ids, mask).float().cpu())
        timings["fusion_ms"] = _ms(start)
        hits = [Hit(0, int(r), self.index.images[t["row"]]["name"], float(s), text=t["text"])
                for r, s, t in zip(rows[0], sims[0], texts)]
        return Result(label, _ranked(hits, logits, k), len(logits), timings)


def _ranked(hits: list, logits: list, k: int) -> list:
    """The re-ranked hits first by ITM match logit (ties: ITC order), then the others in ITC
    order; the first k, numbered from 1."""
    for hit, logit in zip(hits, logits):
        if logit is not None:
            hit.itm = float(logit[1])
            hit.match = float(F.softmax(logit, -1)[1])
    reranked = sorted((h for h in hits if h.itm is not None), key=lambda h: -h.itm)
    out = reranked + [h for h in hits if h.itm is None]
    for rank, hit in enumerate(out[:k], 1):
        hit.rank = rank
    return out[:k]


def as_records(result: Result) -> list[dict]:
    """JSON-ready rows of a result, one per hit, each naming its query."""
    return [{"query": result.query, **dataclasses.asdict(hit)} for hit in result.hits]

