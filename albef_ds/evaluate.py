"""Image-text retrieval evaluated as ALBEF does it, split over ranks; the demo's held-out checks.

    python -m albef_ds.evaluate retrieval --checkpoint PATH --data DATA --output_dir DIR
        [--image_root DIR] [--k_test 128] [--config CFG] [--batch_size 64] [--add_sim]

DATA: an ALBEF evaluation JSON (`[{"image": path, "caption": [...]}]`, paths under --image_root),
a shard pattern (`/data/coco_test/coco-{00000..00004}.tar`; json "caption" lists keep every
caption), or the `synthetic.json` manifest of a shapes corpus (its held-out split). Also runs
under the deepspeed launcher, torchrun, srun or mpirun: the work is split over the ranks and the
result is the one a single process computes. See docs/retrieval.md.

Protocol (ALBEF's): ITC similarities image_features @ text_features.T for all pairs; for every
image its k_test most similar texts, and for every text its k_test most similar images, are
re-scored by the fusion encoder; the score of a re-ranked pair is its ITM "match" logit
(itm_logits[:, 1]; `add_sim` adds the similarity, as BLIP does), every other entry is -100.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

if __package__ in (None, ""):      # run as a script: import the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from albef_ds import distributed as dist

RECALL_KEYS = ("txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10",
               "img_r_mean", "r_mean")
# what evaluate_retrieval reports: re-ranked recalls and the ITC-only ones
RETRIEVAL_METRICS = RECALL_KEYS + tuple(f"itc_{k}" for k in RECALL_KEYS)
NOT_RERANKED = -100.0                 # ALBEF's score of pairs outside the top k_test
RESULT_FILE = "retrieval.json"
HELDOUT_FILE = "heldout_eval.json"


# ---- recall --------------------------------------------------------------------------------

def _gt_mask(targets: Sequence, rows: int, cols: int) -> torch.Tensor:
    """Boolean [rows, cols]: True at each row's ground-truth columns (an int or a list of ints)."""
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    if len(targets) != rows:
        raise ValueError(f"{len(targets)} ground-truth entries for {rows} queries")
    for row, target in enumerate(targets):
        several = isinstance(target, (list, tuple)) or getattr(target, "ndim", 0) > 0
        cols_of_row = [int(t) for t in target] if several else [int(target)]
        if not cols_of_row:
            raise ValueError(f"query {row} has no ground truth")
        mask[row, cols_of_row] = True
    return mask


def _best_gt_ranks(scores: torch.Tensor, gt: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Per query, the 0-based rank of its best-scored ground truth: the number of NON ground-truth
    candidates scored at least as high. Ties count against the query, so a model that scores
    everything alike gets no credit (ALBEF's argsort breaks ties arbitrarily)."""
    ranks = []
    for start in range(0, scores.shape[0], chunk):
        s, g = scores[start:start + chunk].float(), gt[start:start + chunk].to(scores.device)
        best = s.masked_fill(~g, float("-inf")).amax(1, keepdim=True)
        ranks.append(((s >= best) & ~g).sum(1).cpu())
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def retrieval_metrics(score_i2t, score_t2i, txt2img, img2txt) -> dict:
    """ALBEF's recall table from score matrices.

    score_i2t [images, texts] and score_t2i [texts, images]: higher is better. txt2img[t]: the
    image of text t (an int, or a list of ints); img2txt[i]: the texts of image i (a list).
    Text retrieval (txt_*) ranks the texts of each image: R@K is the percentage of images with
    some ground-truth text among their K best; image retrieval (img_*) ranks the images of each
    text. Returns percentages: txt_r1 txt_r5 txt_r10 txt_r_mean img_r1 img_r5 img_r10 img_r_mean
    r_mean (the mean of the two means)."""
    s_i2t, s_t2i = torch.as_tensor(score_i2t), torch.as_tensor(score_t2i)
    n_img, n_txt = s_i2t.shape
    if tuple(s_t2i.shape) != (n_txt, n_img):
        raise ValueError(f"score_t2i has shape {tuple(s_t2i.shape)}, expected {(n_txt, n_img)}")
    txt_ranks = _best_gt_ranks(s_i2t, _gt_mask(img2txt, n_img, n_txt))
    img_ranks = _best_gt_ranks(s_t2i, _gt_mask(txt2img, n_txt, n_img))
    out = {}
    for side, ranks in (("txt", txt_ranks), ("img", img_ranks)):
        for k in (1, 5, 10):
            out[f"{side}_r{k}"] = 100.0 * (ranks < k).double().mean().item()
        out[f"{side}_r_mean"] = (out[f"{side}_r1"] + out[f"{side}_r5"] + out[f"{side}_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return {k: out[k] for k in RECALL_KEYS}


# ---- data ----------------------------------------------------------------------------------

@dataclass
class RetrievalSet:
    """Images with their captions. images[i]: a file path, the encoded bytes, or None (not kept
    by this rank); captions[i]: its cleaned captions; meta[i]: the sample's json (shards)."""
    images: list
    captions: list
    names: list
    meta: list = field(default_factory=list)

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
    from albef_ds.tokenizer import clean_caption

    return [c for c in (clean_caption(c, max_words) for c in captions) if c]


def read_json_set(path: str, image_root: Optional[str] = None, max_words: int = 30) -> RetrievalSet:
    """ALBEF's evaluation JSON; an image listed once per caption is merged into one entry."""
    from albef_ds.data.shards import group_annotations

    with open(path) as f:
        annotations = json.load(f)
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
    from albef_ds.data.pipeline import ERROR_KEY, IMAGE_KEYS, read_shard, sample_captions
    from albef_ds.data.shards import expand_pattern

    patterns = [shards] if isinstance(shards, str) else [
        p for item in shards for p in (item["shards"] if isinstance(item, dict) else [item])]
    images, captions, names, meta, skipped = [], [], [], [], 0
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
                skipped += 1
                continue
            images.append(data if keep is None or keep(len(images)) else None)
            captions.append(caps)
            names.append(f"{os.path.basename(url)}/{raw['__key__']}")
            meta.append(info if isinstance(info, dict) else {})
    if not images:
        raise ValueError(f"no usable sample in {patterns} ({skipped} skipped)")
    if skipped and dist.rank() == 0:
        print(f"evaluation data: skipped {skipped} samples without image or caption", flush=True)
    return RetrievalSet(images, captions, names, meta)


def read_retrieval_set(data: Union[str, list], image_root: Optional[str] = None, max_words: int = 30,
                       keep: Optional[Callable[[int], bool]] = None) -> RetrievalSet:
    """An evaluation JSON, a synthetic.json manifest (its held-out split), or shards."""
    if isinstance(data, str) and data.endswith(".json"):
        with open(data) as f:
            content = json.load(f)
        if isinstance(content, dict) and "heldout" in content:
            return read_shard_set(content["heldout"], max_words, keep)
        return read_json_set(data, image_root, max_words)
    return read_shard_set(data, max_words, keep)


# ---- work split over ranks -----------------------------------------------------------------
# Items (images, texts) go in batches of batch_size in dataset order; batch b is encoded by rank
# b % world. Every batch then holds the same items on any number of ranks, so each feature is
# computed exactly as one process computes it, and the gathered result is identical.

def _owner(i: int, batch_size: int, world: int) -> int:
    """The rank that encodes item i: batches of batch_size items are dealt round-robin."""
    return (i // batch_size) % world


def _my_batches(n: int, batch_size: int, rank: int, world: int) -> list[range]:
    return [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size) if _owner(s, batch_size, world) == rank]


def _local_row(i: int, batch_size: int, world: int) -> int:
    """Where item i sits among its owner's rows (the owner's batches concatenated in order)."""
    b = i // batch_size
    return (b // world) * batch_size + i - b * batch_size


def _gather_rows(local: torch.Tensor, n: int, batch_size: int, world: int) -> torch.Tensor:
    """[n, ...] of all items from each rank's rows of its own batches."""
    if world == 1:
        return local
    batches = -(-n // batch_size)
    most = -(-batches // world) * batch_size
    padded = local.new_zeros((most, *local.shape[1:]))
    padded[:local.shape[0]] = local
    gathered = dist.all_gather_nograd(padded).view(world, most, *local.shape[1:])
    parts = []
    for b in range(batches):
        start = (b // world) * batch_size
        parts.append(gathered[b % world, start:start + min(batch_size, n - b * batch_size)])
    return torch.cat(parts)


def _sum_over_ranks(x: torch.Tensor, world: int) -> torch.Tensor:
    return dist.all_reduce_sum(x) if world > 1 else x


def _split(split_ranks: Optional[bool]) -> tuple[int, int]:
    """(rank, world) of the work split: all ranks of the process group, or this process alone."""
    if split_ranks is None:
        split_ranks = dist.is_distributed()
    return (dist.rank(), dist.world_size()) if split_ranks else (0, 1)


def images_of_this_rank(batch_size: int) -> Callable[[int], bool]:
    """`keep` for read_retrieval_set: whether this rank encodes image i."""
    rank, world = _split(None)
    return lambda i: _owner(i, batch_size, world) == rank


def _device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(p for p in model.parameters() if p.is_floating_point())
    return p.device, p.dtype


def _load_images(data: RetrievalSet, indices, img_size: int, failed: list) -> torch.Tensor:
    from albef_ds.data.pipeline import decode_image
    from albef_ds.data.transforms import EvalTransform

    transform, out = EvalTransform(img_size), []
    for i in indices:
        source = data.images[i]
        try:
            if source is None:
                raise RuntimeError("image not kept by this rank")
            out.append(transform(decode_image(source)))
        except Exception as exc:          # PIL raises many types; every rank must reach the check
            failed.append(f"{data.names[i]}: {exc}")
            out.append(torch.zeros(3, img_size, img_size))
    return torch.stack(out)


def _check_failures(failed: list, world: int, device: torch.device) -> None:
    count = _sum_over_ranks(torch.tensor([float(len(failed))], device=device), world)
    if count.item():
        raise RuntimeError(f"{int(count.item())} evaluation images could not be read; on rank "
                           f"{dist.rank()}: {failed[:5]}")


def _gather_device(x: torch.Tensor, device: torch.device, world: int) -> torch.Tensor:
    """Collectives run where the backend wants them (CUDA for NCCL)."""
    return x.to(device) if world > 1 else x


# ---- retrieval -----------------------------------------------------------------------------

@torch.no_grad()
def encode_set(model, data: RetrievalSet, tokenizer, img_size: int, max_tokens: int,
               batch_size: int = 64, split_ranks: Optional[bool] = None) -> dict:
    """Features of every image and text (gathered on every rank), this rank's image embeddings,
    and the tokens of all texts."""
    from albef_ds.tokenizer import tokenize

    rank, world = _split(split_ranks)
    device, dtype = _device_dtype(model)
    texts = data.texts
    ids, mask = tokenize(tokenizer, texts, max_tokens)
    image_feats, image_embeds, text_feats, failed = [], [], [], []
    for batch in _my_batches(len(data.images), batch_size, rank, world):
        images = _load_images(data, batch, img_size, failed).to(device, dtype)
        embeds = model.image_embeds(images)
        image_embeds.append(embeds)
        # model.image_features(images) without running the ViT a second time
        image_feats.append(F.normalize(model.vision_proj(embeds[:, 0]), dim=-1).float())
    _check_failures(failed, world, device)
    for batch in _my_batches(len(texts), batch_size, rank, world):
        part = slice(batch.start, batch.stop)
        text_feats.append(model.text_features(ids[part].to(device), mask[part].to(device)).float())
    dim = model.cfg.embed_dim

    def stacked(parts):
        return torch.cat(parts) if parts else torch.zeros(0, dim, device=device)

    return {"image_feats": _gather_rows(stacked(image_feats), len(data.images), batch_size, world),
            "text_feats": _gather_rows(stacked(text_feats), len(texts), batch_size, world),
            "image_embeds": image_embeds, "input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def rerank_scores(model, encoded: dict, k_test: int, batch_size: int = 64, add_sim: bool = False,
                  split_ranks: Optional[bool] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(score_i2t, score_t2i, sims) on the CPU, identical on every rank.

    Every pair in an image's top-k_test texts or in a text's top-k_test images is scored once by
    the fusion encoder, on the rank that holds the image's embeddings, one image at a time (its
    pairs in chunks of batch_size, the image repeated); the logits are summed over ranks."""
    rank, world = _split(split_ranks)
    device, _ = _device_dtype(model)
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
    for batch in _my_batches(n_img, batch_size, rank, world):
        for i in batch:
            embeds = locals_[_local_row(i, batch_size, world)][None]
            for s in range(starts[i], starts[i + 1], batch_size):
                e = min(s + batch_size, starts[i + 1])
                txt = (pairs[s:e] % n_txt).cpu()
                logits = model.itm_logits(embeds.expand(e - s, -1, -1), ids[txt].to(device), mask[txt].to(device))
                values[s:e] = logits[:, 1].float().to(values.device)
    values = _sum_over_ranks(_gather_device(values, device, world), world).to(sims.device)

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
    was_training = model.training
    model.eval()
    try:
        encoded = encode_set(model, data, tokenizer, img_size, max_tokens, batch_size, split_ranks)
        score_i2t, score_t2i, sims = rerank_scores(model, encoded, k_test, batch_size, add_sim, split_ranks)
    finally:
        model.train(was_training)
    out = retrieval_metrics(score_i2t, score_t2i, data.txt2img, data.img2txt)
    out.update({f"itc_{k}": v for k, v in retrieval_metrics(sims, sims.t(), data.txt2img, data.img2txt).items()})
    out.update(images=len(data.images), texts=len(data.texts), k_test=k_test)
    if return_scores:
        out["scores"] = (score_i2t, score_t2i, sims)
    return out


def format_table(metrics: dict, title: str) -> str:
    keys = [k for k in RECALL_KEYS if k in metrics]
    width = max(8, *(len(k) for k in keys))
    lines = [title, " ".join(f"{k:>{width}}" for k in keys), " ".join(f"{metrics[k]:>{width}.2f}" for k in keys)]
    if f"itc_{keys[0]}" in metrics:
        lines.append(" ".join(f"{metrics['itc_' + k]:>{width}.2f}" for k in keys) + "   (ITC only, no re-ranking)")
    return "\n".join(lines)


# ---- the demo's held-out checks ------------------------------------------------------------

def eval_model(model):
    """The model to evaluate: a DeepSpeed engine's module; under ZeRO-3 (partitioned weights) a
    plain copy with the whole online weights (a collective: every rank must call it)."""
    module = getattr(model, "module", model)
    params = list(module.named_parameters())
    if not any(hasattr(p, "ds_id") for _, p in params):
        return module
    import deepspeed

    from albef_ds.models import ALBEF

    online = [(n, p) for n, p in params if "_m." not in n]
    state = {}
    for name, p in online:
        with deepspeed.zero.GatheredParameters([p]):
            state[name] = p.detach().clone()
    first = state[online[0][0]]
    plain = ALBEF(module.cfg.architecture_only())
    missing = {n for n, _ in plain.named_parameters() if "_m." not in n} - set(state)
    if missing:
        raise RuntimeError(f"could not rebuild the model for evaluation: no weights for {sorted(missing)[:5]}")
    plain.load_state_dict(state, strict=False)
    return plain.to(first.device, first.dtype).eval()


def _word_ids(tokenizer, words) -> torch.Tensor:
    ids = tokenizer.convert_tokens_to_ids(list(words))
    if tokenizer.unk_token_id in ids:
        raise ValueError(f"the tokenizer has no single token for one of {list(words)}")
    return torch.tensor(ids)


def _word_positions(ids: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Per row, the first position holding one of `candidates` (-1: none)."""
    hit = torch.isin(ids, candidates)
    pos = hit.float().argmax(1)
    return torch.where(hit.any(1), pos, torch.full_like(pos, -1))


@torch.no_grad()
def heldout_checks(model, data: RetrievalSet, tokenizer, img_size: int, max_tokens: int,
                   batch_size: int = 64, split_ranks: Optional[bool] = None) -> dict:
    """ITM and masked-attribute MLM on the shapes held-out split (the first caption of each image).

    - itm_acc: image with its caption (should match) and with the caption of another image with
      other attributes (should not), threshold 0.5 on the match probability (itm_pos_acc /
      itm_neg_acc: the two parts; itm_pairwise: share of images whose caption scores above the
      other caption); itm_neg_colour / itm_neg_shape: share of captions with only the colour /
      shape word swapped that are rejected (harder negatives).
    - mlm_colour_acc / mlm_shape_acc: the colour (shape) word masked, the prediction restricted to
      the colour (shape) words of the same number; *_shuffled: the same with the image of another
      sample: about chance (1/colours, 1/shapes) when the text alone tells nothing.
    Every image needs all image bytes (keep them all when reading)."""
    from albef_ds.data.synthetic import COLOURS, SHAPES
    from albef_ds.tokenizer import tokenize

    rank, world = _split(split_ranks)
    device, dtype = _device_dtype(model)
    n = len(data.images)
    if n < 2:
        raise ValueError("held-out checks need at least two images")
    other = [(i + n // 2) % n for i in range(n)]        # a partner with (normally) other attributes
    valid = torch.tensor([not data.meta[i].get("attributes") or
                          data.meta[i].get("attributes") != data.meta[other[i]].get("attributes")
                          for i in range(n)])
    ids, mask = tokenize(tokenizer, [caps[0] for caps in data.captions], max_tokens)
    colours = _word_ids(tokenizer, COLOURS)
    singular, plural = _word_ids(tokenizer, SHAPES), _word_ids(tokenizer, SHAPES.values())
    colour_pos = _word_positions(ids, colours)
    shape_pos = _word_positions(ids, torch.cat([singular, plural]))
    if (colour_pos < 0).any() or (shape_pos < 0).any():
        raise ValueError("held-out captions without a colour or shape word: not the shapes corpus?")
    rows = torch.arange(n)
    colour_true = ids[rows, colour_pos]
    shape_true = ids[rows, shape_pos]
    is_plural = torch.isin(shape_true, plural)
    shape_sets = torch.where(is_plural[:, None], plural[None], singular[None])      # [n, 5]

    def swapped(pos, true, choices):
        """ids with the word at pos replaced by another of `choices` ([n, c] or [c])."""
        choices = choices.expand(n, -1)
        k = (choices == true[:, None]).float().argmax(1)
        shift = 1 + rows % (choices.shape[1] - 1)
        out = ids.clone()
        out[rows, pos] = choices[rows, (k + shift) % choices.shape[1]]
        return out

    colour_swapped = swapped(colour_pos, colour_true, colours)
    shape_swapped = swapped(shape_pos, shape_true, shape_sets)
    mask_id = tokenizer.mask_token_id
    # counts: positives accepted, negatives rejected, colour-swap rejected, shape-swap rejected,
    # mlm colour, mlm shape, mlm colour shuffled, mlm shape shuffled, valid negatives,
    # positive scored above its negative
    counts = torch.zeros(10, dtype=torch.float64)
    failed = []
    was_training = model.training
    model.eval()
    try:
        for batch in _my_batches(n, batch_size, rank, world):
            b = torch.tensor(list(batch))
            images = _load_images(data, batch, img_size, failed).to(device, dtype)
            embeds = model.image_embeds(images)
            m = mask[b].to(device)
            itm_ids = torch.cat([ids[b], ids[[other[i] for i in batch]], colour_swapped[b], shape_swapped[b]])
            probs = F.softmax(model.itm_logits(embeds.repeat(4, 1, 1), itm_ids.to(device),
                                               torch.cat([m, mask[[other[i] for i in batch]].to(device), m, m])
                                               ).float(), -1)[:, 1].cpu().view(4, -1)
            ok = valid[b]
            counts[0] += (probs[0] > 0.5).sum()
            counts[1] += ((probs[1] <= 0.5) & ok).sum()
            counts[9] += ((probs[0] > probs[1]) & ok).sum()
            counts[2] += (probs[2] <= 0.5).sum()
            counts[3] += (probs[3] <= 0.5).sum()
            shuffled_images = _load_images(data, [other[i] for i in batch], img_size, failed).to(device, dtype)
            for slot, pos, true, choices in ((4, colour_pos, colour_true, colours.expand(n, -1)),
                                             (5, shape_pos, shape_true, shape_sets)):
                masked = ids[b].clone()
                masked[torch.arange(len(b)), pos[b]] = mask_id
                for shift, imgs in ((0, images), (2, shuffled_images)):
                    logits = model.mlm_logits(imgs, masked.to(device), m).float().cpu()
                    picked = logits[torch.arange(len(b)), pos[b]].gather(1, choices[b])
                    right = choices[b].gather(1, picked.argmax(1, keepdim=True))[:, 0] == true[b]
                    counts[slot + shift] += (right & ok).sum() if shift else right.sum()
            counts[8] += ok.sum()
        _check_failures(failed, world, device)
        counts = _sum_over_ranks(_gather_device(counts, device, world), world).cpu()
    finally:
        model.train(was_training)
    pos, neg, valid_n = counts[0].item(), counts[1].item(), counts[8].item()
    return {"itm_acc": 100 * (pos + neg) / (n + valid_n), "itm_pos_acc": 100 * pos / n,
            "itm_neg_acc": 100 * neg / valid_n, "itm_pairwise": 100 * counts[9].item() / valid_n,
            "itm_neg_colour": 100 * counts[2].item() / n, "itm_neg_shape": 100 * counts[3].item() / n,
            "mlm_colour_acc": 100 * counts[4].item() / n, "mlm_shape_acc": 100 * counts[5].item() / n,
            "mlm_colour_acc_shuffled": 100 * counts[6].item() / counts[8].item(),
            "mlm_shape_acc_shuffled": 100 * counts[7].item() / counts[8].item(),
            "mlm_colour_chance": 100 / len(COLOURS), "mlm_shape_chance": 100 / len(SHAPES)}


def evaluate_heldout(model, cfg, output_dir: str, k_test: int = 32, batch_size: int = 64,
                     split_ranks: Optional[bool] = None) -> dict:
    """Retrieval, ITM and masked-attribute checks on the shapes corpus' held-out split (the demo's
    evaluation); prints a table and writes `<output_dir>/heldout_eval.json` (rank 0 of the split).

    Call it on every rank of a distributed run (default: the work is split over the process
    group), or on one process alone with split_ranks=False. `model`: an ALBEF or a DeepSpeed
    engine (ZeRO-3 too: its weights are gathered into a plain copy, on every rank). The corpus
    is read from (or, if missing, written to) `<output_dir>/synthetic_data`, where the trainer
    writes it."""
    from albef_ds.data import shared_synthetic_corpus, write_synthetic_corpus
    from albef_ds.tokenizer import build_tokenizer

    if cfg.data.synthetic is None:
        raise ValueError("evaluate_heldout needs data.synthetic (the shapes corpus)")
    rank, world = _split(split_ranks)
    folder = os.path.join(output_dir, "synthetic_data")
    # written by rank 0 of the split, or by this process when it works alone
    corpus = shared_synthetic_corpus if world > 1 else write_synthetic_corpus
    corpora = corpus(folder, cfg.data.synthetic)["heldout"]
    model = eval_model(model)
    data = read_shard_set(corpora, cfg.data.max_words)
    tokenizer = build_tokenizer(cfg.model.text.tokenizer)
    args = (tokenizer, cfg.model.vision.img_size, cfg.data.max_tokens)
    out = evaluate_retrieval(model, data, *args, k_test=k_test, batch_size=batch_size, split_ranks=split_ranks)
    out.update(heldout_checks(model, data, *args, batch_size=batch_size, split_ranks=split_ranks))
    out["retrieval_chance_r1"] = 100.0 / out["images"]
    if rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, HELDOUT_FILE), "w") as f:
            json.dump(out, f, indent=1)
        print(format_heldout(out), flush=True)
    return out


def format_heldout(out: dict) -> str:
    lines = [format_table(out, f"held-out retrieval: {out['images']} images, {out['texts']} captions, "
                               f"k_test {out['k_test']} (chance R@1 {out['retrieval_chance_r1']:.2f})")]
    lines.append(f"ITM accuracy {out['itm_acc']:.1f}% (positives accepted {out['itm_pos_acc']:.1f}%, "
                 f"other-attribute negatives rejected {out['itm_neg_acc']:.1f}%; own caption above the other "
                 f"{out['itm_pairwise']:.1f}%); swapped colour rejected {out['itm_neg_colour']:.1f}%, "
                 f"swapped shape {out['itm_neg_shape']:.1f}%")
    lines.append(f"masked colour word {out['mlm_colour_acc']:.1f}% (shuffled images "
                 f"{out['mlm_colour_acc_shuffled']:.1f}%, chance {out['mlm_colour_chance']:.1f}%); "
                 f"masked shape word {out['mlm_shape_acc']:.1f}% (shuffled {out['mlm_shape_acc_shuffled']:.1f}%, "
                 f"chance {out['mlm_shape_chance']:.1f}%)")
    return "\n".join(lines)


# ---- command line --------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="ALBEF-DS evaluation")
    sub = ap.add_subparsers(dest="task", required=True)
    r = sub.add_parser("retrieval", help="image-text retrieval with ITM re-ranking (ALBEF's protocol)")
    r.add_argument("--checkpoint", required=True, help="a training folder, a converted file or a released ALBEF file")
    r.add_argument("--data", required=True, help="evaluation JSON, shard pattern, or a shapes synthetic.json")
    r.add_argument("--image_root", default=None, help="folder the JSON's image paths are relative to")
    r.add_argument("--output_dir", required=True)
    r.add_argument("--k_test", type=int, default=128, help="candidates re-ranked per query (0: ITC only)")
    r.add_argument("--config", default=None, help="config (shipped name or yaml) to load the checkpoint into, "
                   "and whose data.max_tokens / max_words to use (default: the checkpoint's own config; 30 / 30)")
    r.add_argument("--batch_size", type=int, default=64)
    r.add_argument("--add_sim", action="store_true", help="score = ITM logit + similarity (BLIP) "
                   "instead of ALBEF's ITM logit")
    r.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)   # deepspeed launcher
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = dist.init_distributed()        # any launcher, or a process group of one
    try:
        return _evaluate_command(args)
    finally:
        if started:
            dist.shutdown()


def _evaluate_command(args) -> int:
    import albef_ds
    from albef_ds.config import load_config
    from albef_ds.tokenizer import build_tokenizer

    os.makedirs(args.output_dir, exist_ok=True)      # before the work: a bad folder fails now
    device = torch.device(f"cuda:{dist.local_rank()}" if torch.cuda.is_available() else "cpu")
    model = albef_ds.load_model(args.checkpoint, config=args.config, device=device, momentum=False)
    max_tokens, max_words = 30, 30                 # ALBEF's evaluation text length
    if args.config:
        cfg = load_config(args.config)
        max_tokens, max_words = cfg.data.max_tokens, cfg.data.max_words
    max_tokens = min(max_tokens, model.cfg.text.max_position)
    data = read_retrieval_set(args.data, args.image_root, max_words, images_of_this_rank(args.batch_size))
    out = evaluate_retrieval(model, data, build_tokenizer(model.cfg.text.tokenizer), model.cfg.vision.img_size,
                             max_tokens, args.k_test, args.batch_size, args.add_sim)
    out.update(checkpoint=args.checkpoint, data=args.data, add_sim=args.add_sim)
    if dist.rank() == 0:
        with open(os.path.join(args.output_dir, RESULT_FILE), "w") as f:
            json.dump(out, f, indent=1)
        print(format_table(out, f"retrieval: {out['images']} images, {out['texts']} texts, k_test {args.k_test}"),
              flush=True)
        print(f"written {os.path.join(args.output_dir, RESULT_FILE)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
