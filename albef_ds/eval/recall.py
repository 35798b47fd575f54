"""Recall@K of image-text retrieval from score matrices, as ALBEF reports it."""
from __future__ import annotations

from typing import Sequence

import torch

RECALL_KEYS = ("txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10",
               "img_r_mean", "r_mean")


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


def format_table(metrics: dict, title: str) -> str:
    keys = [k for k in RECALL_KEYS if k in metrics]
    width = max(8, *(len(k) for k in keys))
    lines = [title, " ".join(f"{k:>{width}}" for k in keys), " ".join(f"{metrics[k]:>{width}.2f}" for k in keys)]
    if f"itc_{keys[0]}" in metrics:
        lines.append(" ".join(f"{metrics['itc_' + k]:>{width}.2f}" for k in keys) + "   (ITC only, no re-ranking)")
    return "\n".join(lines)
