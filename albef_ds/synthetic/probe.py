"""The demo's held-out checks on the shapes corpus: retrieval, ITM and masked-attribute MLM, and the
per-attribute probe of what a model reads from the image."""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.nn.functional as F

from .. import distributed as dist
from ..engine.zero import inference_model
from ..eval.inputs import check_failures, load_images, model_device
from ..eval.recall import format_table
from ..eval.retrieval import RetrievalSet, evaluate_retrieval, read_shard_set
from ..models import evaluating
from ..tasks import get_task
from ..tokenizer import build_tokenizer, tokenize
from .shapes import (COLOURS, COUNT_WORDS, POSITION_PHRASES, SHAPES, SIZE_WORDS, shared_synthetic_corpus,
                     write_synthetic_corpus)

HELDOUT_FILE = "heldout_eval.json"


def word_ids(tokenizer, words) -> torch.Tensor:
    ids = tokenizer.convert_tokens_to_ids(list(words))
    if tokenizer.unk_token_id in ids:
        raise ValueError(f"the tokenizer has no single token for one of {list(words)}")
    return torch.tensor(ids)


def first_word_positions(ids: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
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

    rank, world = dist.work_split(split_ranks)
    device = model_device(model)
    n = len(data.images)
    if n < 2:
        raise ValueError("held-out checks need at least two images")
    other = [(i + n // 2) % n for i in range(n)]        # a partner with (normally) other attributes
    valid = torch.tensor([not data.meta[i].get("attributes") or
                          data.meta[i].get("attributes") != data.meta[other[i]].get("attributes")
                          for i in range(n)])
    ids, mask = tokenize(tokenizer, [caps[0] for caps in data.captions], max_tokens)
    colours = word_ids(tokenizer, COLOURS)
    singular, plural = word_ids(tokenizer, SHAPES), word_ids(tokenizer, SHAPES.values())
    colour_pos = first_word_positions(ids, colours)
    shape_pos = first_word_positions(ids, torch.cat([singular, plural]))
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
    with evaluating(model):
        for batch in dist.my_batches(n, batch_size, rank, world):
            b = torch.tensor(list(batch))
            images = load_images(data.images, data.names, batch, img_size, failed).to(device)
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
            shuffled_images = load_images(data.images, data.names, [other[i] for i in batch], img_size, failed).to(device)
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
        check_failures(failed, world, device)
        counts = dist.sum_over_split(counts, world, device).cpu()
    pos, neg, valid_n = counts[0].item(), counts[1].item(), counts[8].item()
    return {"itm_acc": 100 * (pos + neg) / (n + valid_n), "itm_pos_acc": 100 * pos / n,
            "itm_neg_acc": 100 * neg / valid_n, "itm_pairwise": 100 * counts[9].item() / valid_n,
            "itm_neg_colour": 100 * counts[2].item() / n, "itm_neg_shape": 100 * counts[3].item() / n,
            "mlm_colour_acc": 100 * counts[4].item() / n, "mlm_shape_acc": 100 * counts[5].item() / n,
            "mlm_colour_acc_shuffled": 100 * counts[6].item() / counts[8].item(),
            "mlm_shape_acc_shuffled": 100 * counts[7].item() / counts[8].item(),
            "mlm_colour_chance": 100 / len(COLOURS), "mlm_shape_chance": 100 / len(SHAPES)}


def attribute_words() -> dict:
    """{attribute: the words that name it in the captions (synthetic.caption)}; of a position
    phrase, the word that tells the side ("on the left side", "in the middle")."""

    return {"colour": list(COLOURS), "shape": [*SHAPES, *SHAPES.values()],
            "count": sorted({w for words in COUNT_WORDS.values() for w in words} - {"a"}),   # "a" opens templates too
            "size": sorted({w for words in SIZE_WORDS.values() for w in words}),
            "position": sorted({w for phrases in POSITION_PHRASES.values() for p in phrases for w in p.split()}
                               - {"on", "the", "at", "in", "near", "side"})}


@torch.no_grad()
def attribute_probe(model, data: RetrievalSet, tokenizer, img_size: int, max_tokens: int) -> dict:
    """What the model reads from the image, per attribute of the shapes corpus (one process): in
    each held-out caption (the first of each image) the attribute's word is masked and the MLM head
    picks among that attribute's words, with the caption's own image and with another held-out
    image (what the caption's other words alone tell). {attribute: {"image": %, "other_image": %,
    "captions": n}}; count: the captions that say one / two / three ("a" also opens templates)."""

    device = model_device(model)
    n = len(data.images)
    ids, mask = tokenize(tokenizer, [captions[0] for captions in data.captions], max_tokens)
    failed = []
    images = load_images(data.images, data.names, range(n), img_size, failed)
    check_failures(failed, 1, device)
    images = images.to(device)
    others = images[[(i + n // 2) % n for i in range(n)]]
    out = {}
    with evaluating(model):
        for attribute, words in attribute_words().items():
            candidates = word_ids(tokenizer, words)
            position = first_word_positions(ids, candidates)
            rows = (position >= 0).nonzero().squeeze(1)
            at = position[rows]
            masked = ids[rows].clone()
            truth = masked[torch.arange(len(rows)), at].clone()
            masked[torch.arange(len(rows)), at] = tokenizer.mask_token_id
            scores = {}
            for name, pixels in (("image", images[rows]), ("other_image", others[rows])):
                logits = model.mlm_logits(pixels, masked.to(device), mask[rows].to(device)).float().cpu()
                chosen = logits[torch.arange(len(rows)), at][:, candidates].argmax(1)
                scores[name] = round(100.0 * (candidates[chosen] == truth).float().mean().item(), 1)
            out[attribute] = {**scores, "captions": len(rows)}
    return out


def evaluate_heldout(model, cfg, output_dir: str, k_test: int = 32, batch_size: int = 64,
                     split_ranks: Optional[bool] = None) -> dict:
    """Retrieval, ITM and masked-attribute checks on the shapes corpus' held-out split (the demo's
    evaluation); prints a table and writes `<output_dir>/heldout_eval.json` (rank 0 of the split).

    Call it on every rank of a distributed run (default: the work is split over the process
    group), or on one process alone with split_ranks=False. `model`: an ALBEF or a DeepSpeed
    engine (ZeRO-3 too: its weights are gathered into a plain copy, on every rank). The corpus
    is read from (or, if missing, written to) `<output_dir>/synthetic_data`, where the trainer
    writes it."""

    if cfg.data.synthetic is None:
        raise ValueError("evaluate_heldout needs data.synthetic (the shapes corpus)")
    rank, world = dist.work_split(split_ranks)
    folder = os.path.join(output_dir, "synthetic_data")
    # written by rank 0 of the split, or by this process when it works alone
    corpus = shared_synthetic_corpus if world > 1 else write_synthetic_corpus
    corpora = corpus(folder, cfg.data.synthetic)["heldout"]
    model = inference_model(model, get_task(cfg))
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
