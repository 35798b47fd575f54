"""Weakly supervised visual grounding evaluated as ALBEF does it (RefCOCO+ with detector
proposals), split over ranks.

Protocol: the Grad-CAM heat map of each referring expression on its image
(albef_ds.models.gradcam: ITM mode at a fusion layer, or ITC mode at a ViT block) is resized
(bicubic) to the image's own size; every proposal box of the image is scored by the heat inside
it divided by its area to the power 0.5; the best-scoring box counts as correct when its IoU with
the referred object's box is at least 0.5. Accuracy is reported per split (val, testA, testB).

Data: ALBEF's `refcoco+_val.json` / `refcoco+_test.json` ([{"image", "text", "ref_id"}]) and the
proposal file `dets.json` ({str(image_id): [[x, y, w, h, ...], ...]}, in image pixels). Each
expression's referred box, split and image id come from the entry itself when it has "bbox",
"split" and "image_id" (the generated corpus, albef_ds.synthetic.grounding), else from the
REFER folder of the dataset (`refs(unc).p` and `instances.json`, as ALBEF's evaluation reads them).
Bad samples are skipped and counted: an empty text, an image without proposals, an image that
cannot be read. See docs/grounding.md.
"""
from __future__ import annotations

import json
import os
import pickle
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import distributed as dist
from ..config import ConfigError
from ..data.samples import decode_image
from ..data.transforms import EvalTransform
from ..models import evaluating
from ..models.gradcam import default_gradcam_layer, gradcam, resize_map
from ..tokenizer import build_tokenizer, clean_caption, tokenize
from .inputs import check_skipped, model_device, skip_summary

IOU_THRESHOLD = 0.5
AREA_EXPONENT = 0.5               # ALBEF's alpha: score = heat in box / area ** alpha
SKIP_REASONS = ("empty_text", "no_proposals", "unreadable_image")


# ---- boxes ------------------------------------------------------------------------------------

def box_iou(a, b) -> float:
    """IoU of two [x, y, w, h] boxes as ALBEF's computeIoU has it: inclusive pixel corners
    (x + w - 1), an intersection only where both sides are strictly positive, plain areas w * h."""
    ix1, iy1 = max(a[0], b[0]), max(a[1], b[1])
    ix2, iy2 = min(a[0] + a[2] - 1, b[0] + b[2] - 1), min(a[1] + a[3] - 1, b[1] + b[3] - 1)
    inter = (ix2 - ix1 + 1) * (iy2 - iy1 + 1) if ix1 < ix2 and iy1 < iy2 else 0
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def proposal_scores(heat: torch.Tensor, boxes: torch.Tensor, exponent: float = AREA_EXPONENT) -> torch.Tensor:
    """[N] scores of [N, 4] boxes (x, y, w, h) on a heat map [H, W] at the image's resolution: the
    sum of heat[int(y):int(y + h), int(x):int(x + w)] divided by (w * h) ** exponent, as ALBEF
    scores proposals (rows and columns cut at the image's edges; a box of no area scores -inf).
    Sums come from one summed-area table, so a box costs O(1)."""
    h, w = heat.shape
    table = torch.zeros(h + 1, w + 1, dtype=torch.float64)
    table[1:, 1:] = heat.double().cumsum(0).cumsum(1)
    boxes = boxes.double()
    x0 = boxes[:, 0].trunc().long().clamp(0, w)
    y0 = boxes[:, 1].trunc().long().clamp(0, h)
    x1 = torch.maximum((boxes[:, 0] + boxes[:, 2]).trunc().long().clamp(0, w), x0)
    y1 = torch.maximum((boxes[:, 1] + boxes[:, 3]).trunc().long().clamp(0, h), y0)
    inside = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    area = boxes[:, 2] * boxes[:, 3]
    scores = inside / area.clamp(min=1e-12) ** exponent
    return torch.where(area > 0, scores, torch.full_like(scores, -torch.inf))


def heat_on_box(heat: torch.Tensor, box) -> bool:
    """Whether a heat map at the image's resolution is higher on average inside the [x, y, w, h] box
    (rows and columns cut as proposals are) than outside it: where a picture shows the heat."""
    h, w = heat.shape
    x0, y0 = min(max(int(box[0]), 0), w), min(max(int(box[1]), 0), h)
    x1, y1 = min(max(int(box[0] + box[2]), x0), w), min(max(int(box[1] + box[3]), y0), h)
    inside = heat[y0:y1, x0:x1].double()
    n_in, n_out = inside.numel(), h * w - inside.numel()
    if not n_in or not n_out:
        return False
    return bool(inside.sum() / n_in > (heat.double().sum() - inside.sum()) / n_out)


def best_proposal(heat: torch.Tensor, boxes: torch.Tensor) -> int:
    """The index of the highest-scoring box (the first of equals). ALBEF starts its search at a
    score of 0, so where no box scores above 0 it keeps the previous expression's box; here the
    best box is taken whatever its sign."""
    return int(proposal_scores(heat, boxes).argmax())


# ---- data -------------------------------------------------------------------------------------

@dataclass
class Expression:
    image: str                 # the image file
    text: str                  # cleaned
    ref_id: int
    image_id: str              # the key of its proposals
    box: tuple                 # the referred object's [x, y, w, h]
    split: str


@dataclass
class GroundingSet:
    expressions: list
    proposals: dict            # image id -> [N, 4] float64 boxes
    skipped: Counter = field(default_factory=Counter)     # found while reading (same on every rank), by reason
    skipped_items: list = field(default_factory=list)     # ... each named, with its reason

    @property
    def splits(self) -> list[str]:
        """Split names, ALBEF's first (val, testA, testB), then any other in sorted order."""
        found = {e.split for e in self.expressions}
        return [s for s in ("val", "testA", "testB") if s in found] + sorted(found - {"val", "testA", "testB"})


class _PlainData(pickle.Unpickler):
    """refs(unc).p holds lists, dicts, strings and numbers only: anything else is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refs(unc).p asks for {module}.{name}: not a plain-data pickle")


def read_refer(folder: str) -> dict[int, dict]:
    """ref_id -> {"image_id", "split", "bbox"} from a REFER dataset folder (`refs(unc).p`, the refs
    with their split, and `instances.json`, whose annotations hold the boxes), as ALBEF's
    evaluation looks them up."""
    refs_path, instances_path = os.path.join(folder, "refs(unc).p"), os.path.join(folder, "instances.json")
    for path in (refs_path, instances_path):
        if not os.path.isfile(path):
            raise ValueError(f"REFER folder {folder}: no {os.path.basename(path)}")
    with open(refs_path, "rb") as f:
        refs = _PlainData(f).load()
    with open(instances_path) as f:
        boxes = {ann["id"]: ann["bbox"] for ann in json.load(f)["annotations"]}
    out = {}
    for ref in refs:
        if ref["ann_id"] not in boxes:
            raise ValueError(f"{refs_path}: ref {ref['ref_id']} names annotation {ref['ann_id']}, "
                             f"which {instances_path} lacks")
        out[ref["ref_id"]] = {"image_id": ref["image_id"], "split": ref["split"], "bbox": boxes[ref["ann_id"]]}
    return out


def read_proposals(path: str) -> dict:
    """dets.json (or cocos.json): {str(image_id): [[x, y, w, h, ...], ...]} -> image id -> [N, 4]."""
    with open(path) as f:
        content = json.load(f)
    if not isinstance(content, dict):
        raise ValueError(f"proposal file {path} holds a {type(content).__name__}, not {{image id: boxes}}")
    out = {}
    for image_id, boxes in content.items():
        if not isinstance(boxes, list) or any(not isinstance(b, list) or len(b) < 4 for b in boxes):
            raise ValueError(f"proposal file {path}: image {image_id} has no list of [x, y, w, h] boxes")
        if boxes:
            out[str(image_id)] = torch.tensor([b[:4] for b in boxes], dtype=torch.float64)
    return out


def read_grounding_set(path: str, proposals: str, image_root: Optional[str] = None,
                       refer: Optional[str] = None, max_words: int = 30) -> GroundingSet:
    """The expressions of an ALBEF grounding file with their referred boxes and splits (from the
    entries, else from the REFER folder `refer`) and the proposals of `proposals`. Empty texts
    and images without proposals are counted as skipped; an entry whose box or split is nowhere
    is an error naming it."""
    with open(path) as f:
        entries = json.load(f)
    if not isinstance(entries, list):
        raise ValueError(f"{path} holds a {type(entries).__name__}, not a list of expressions")
    truth = read_refer(refer) if refer else {}
    boxes = read_proposals(proposals)
    expressions, skipped, skipped_items = [], Counter(), []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not all(k in entry for k in ("image", "text", "ref_id")):
            raise ValueError(f"{path}: entry {i} lacks one of image, text, ref_id")
        known = entry if all(k in entry for k in ("bbox", "split", "image_id")) else truth.get(entry["ref_id"])
        if known is None:
            raise ValueError(f"{path}: entry {i} (ref_id {entry['ref_id']}) has no bbox / split / image_id, "
                             + ("and the REFER folder has no such ref" if refer else "and no REFER folder was given"))
        box = known["bbox"]
        if (not isinstance(box, (list, tuple)) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            raise ValueError(f"{path}: entry {i} (ref_id {entry['ref_id']}): bbox {box!r} is not [x, y, w, h]")
        if not isinstance(entry["text"], str):
            raise ValueError(f"{path}: entry {i} (ref_id {entry['ref_id']}): text {entry['text']!r} is not a string")
        text = clean_caption(entry["text"], max_words)
        image_id = str(known["image_id"])
        if not text or image_id not in boxes:
            reason = "empty_text" if not text else "no_proposals"
            skipped[reason] += 1
            skipped_items.append(f"{os.path.basename(path)}[{i}] (ref_id {entry['ref_id']}): {reason.replace('_', ' ')}")
        else:
            image = os.path.join(image_root, entry["image"]) if image_root else entry["image"]
            expressions.append(Expression(image, text, int(entry["ref_id"]), image_id,
                                          tuple(float(v) for v in known["bbox"]), str(known["split"])))
    if not expressions:
        raise ValueError(f"{path}: no expression to evaluate (skipped: {dict(skipped)})")
    return GroundingSet(expressions, boxes, skipped, skipped_items)


def proposal_baselines(data: GroundingSet) -> dict:
    """Accuracy (%) of choices that look at no image and no text: "random", a proposal drawn at
    random (its expected accuracy: the share of the image's proposals with IoU >= 0.5), and
    "largest", the proposal of the largest area (the first of equals)."""
    random_hits = largest_hits = 0.0
    for e in data.expressions:
        boxes = data.proposals[e.image_id]
        hits = [box_iou(b, e.box) >= IOU_THRESHOLD for b in boxes.tolist()]
        random_hits += sum(hits) / len(hits)
        largest_hits += hits[int((boxes[:, 2] * boxes[:, 3]).argmax())]
    n = len(data.expressions)
    return {"random": 100.0 * random_hits / n, "largest": 100.0 * largest_hits / n}


# ---- evaluation -------------------------------------------------------------------------------

def _load(expressions: list, img_size: int) -> tuple[list, list]:
    """(tensors, (width, height)) of the images that decode; None in both where one does not."""
    transform, tensors, sizes = EvalTransform(img_size), [], []
    for e in expressions:
        try:
            image = decode_image(e.image)
        except Exception:               # PIL raises many types on broken files; missing: OSError
            tensors.append(None)
            sizes.append(None)
            continue
        tensors.append(transform(image))
        sizes.append(image.size)
    return tensors, sizes


def evaluate_grounding(model, data: GroundingSet, tokenizer, img_size: int, max_tokens: int,
                       mode: str = "itm", layer: Optional[int] = None, batch_size: int = 32,
                       split_ranks: Optional[bool] = None) -> dict:
    """Accuracy (%) of the best-scoring proposal of every expression, overall ("acc") and per
    split ("acc_<split>"); "heat_on_box": the share (%) of expressions whose heat map is higher
    inside the referred box than outside it; the counts, the skipped samples and "predictions"
    ([n, 5]: the chosen box x, y, w, h and its IoU per expression in file order, NaN where
    skipped). Call on every rank of the split (default: all ranks of the process group when there
    is one); every rank returns the same."""
    layer = default_gradcam_layer(model.cfg, mode) if layer is None else layer
    rank, world = dist.work_split(split_ranks)
    device = model_device(model)
    splits = data.splits
    n = len(data.expressions)
    # per split: [correct, seen, heat on the referred box]; the last row's first: unreadable images
    counts = torch.zeros(len(splits) + 1, 3, dtype=torch.float64)
    rows = []
    with evaluating(model):
        for batch in dist.my_batches(n, batch_size, rank, world):
            items = [data.expressions[i] for i in batch]
            tensors, sizes = _load(items, img_size)
            found = [j for j, t in enumerate(tensors) if t is not None]
            counts[-1, 0] += len(items) - len(found)
            out = torch.full((len(items), 5), float("nan"), dtype=torch.float64)
            if found:
                ids, mask = tokenize(tokenizer, [items[j].text for j in found], max_tokens)
                images = torch.stack([tensors[j] for j in found]).to(device)
                maps = gradcam(model, images, ids.to(device), mask.to(device), mode, layer).cpu()
                for heat, j in zip(maps, found):
                    e = items[j]
                    width, height = sizes[j]
                    boxes = data.proposals[e.image_id]
                    heat = resize_map(heat, height, width)
                    chosen = boxes[best_proposal(heat, boxes)]
                    iou = box_iou(chosen.tolist(), e.box)
                    out[j, :4], out[j, 4] = chosen, iou
                    s = splits.index(e.split)
                    counts[s] += torch.tensor([iou >= IOU_THRESHOLD, 1, heat_on_box(heat, e.box)])
            rows.append(out)
        counts = dist.sum_over_split(counts, world, device).cpu()
        local = torch.cat(rows) if rows else torch.zeros(0, 5, dtype=torch.float64)
        predictions = dist.gather_rows(local.to(device), n, batch_size, world).cpu()
    skipped = dict(data.skipped)
    skipped["unreadable_image"] = int(counts[-1, 0])
    unread = [f"expression {data.expressions[i].ref_id}: image {data.expressions[i].image} unreadable"
              for i in predictions[:, 4].isnan().nonzero().flatten().tolist()]
    summary = skip_summary(n + len(data.skipped_items), data.skipped_items + unread)
    seen = counts[:-1, 1].sum().item()
    if seen == 0:
        check_skipped(summary, 1.0, "")          # none evaluated: says so, naming them
    metrics = {"acc": 100.0 * counts[:-1, 0].sum().item() / seen}
    for s, name in enumerate(splits):
        if counts[s, 1]:
            metrics[f"acc_{name}"] = 100.0 * counts[s, 0].item() / counts[s, 1].item()
    metrics.update(heat_on_box=100.0 * counts[:-1, 2].sum().item() / seen, expressions=int(seen),
                   counts={name: int(counts[s, 1]) for s, name in enumerate(splits)},
                   skipped_by_reason={k: skipped.get(k, 0) for k in SKIP_REASONS}, mode=mode, layer=layer,
                   predictions=predictions, **summary)
    return metrics


def format_grounding(metrics: dict) -> str:
    splits = [k[4:] for k in metrics if k.startswith("acc_")]
    lines = [f"grounding ({metrics['mode']} Grad-CAM, layer {metrics['layer']}): {metrics['expressions']} "
             f"expressions, accuracy {metrics['acc']:.2f}% (heat higher on the referred box than off it: "
             f"{metrics['heat_on_box']:.1f}%)"]
    lines += [f"  {s:>6}: {metrics['acc_' + s]:.2f}% of {metrics['counts'][s]}" for s in splits]
    skipped = {k: v for k, v in metrics["skipped_by_reason"].items() if v}
    if skipped:
        lines.append("  skipped: " + ", ".join(f"{k} {v}" for k, v in skipped.items()))
    if "baselines" in metrics:
        b = metrics["baselines"]
        lines.append(f"  baselines: a random proposal {b['random']:.2f}% (expected), the largest {b['largest']:.2f}%")
    return "\n".join(lines)


class GroundingEvaluator:
    """The grounding evaluation of a training run: eval.data (ALBEF's val / test files) with the
    task's proposal file, read when the run starts (a missing or bad file is a ConfigError then).
    A collective: every rank calls it with the model and gets the same metrics."""
    metrics = ("acc", "acc_val", "acc_testA", "acc_testB")
    headline = metrics

    def __init__(self, cfg, options, output_dir: str):
        """`options`: the task's (GroundingOptions: the proposal file, the Grad-CAM mode and layer)."""
        self.cfg, self.options = cfg, options
        if not cfg.eval.data or not options.dets:
            raise ConfigError("grounding evaluation needs eval.data (ALBEF's refcoco+_val.json / "
                              "refcoco+_test.json) and grounding.dets (the proposal file)")
        try:
            sets = [read_grounding_set(path, options.dets, cfg.eval.image_root or None, options.refer or None,
                                       cfg.data.max_words) for path in cfg.eval.data]
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"eval.data {cfg.eval.data} / grounding.dets {options.dets}: {exc}") from None
        self.data = GroundingSet([e for s in sets for e in s.expressions], sets[0].proposals,
                                 sum((s.skipped for s in sets), Counter()))
        self.tokenizer = build_tokenizer(cfg.model.text.tokenizer)

    def __call__(self, model) -> dict:
        o = self.options
        out = evaluate_grounding(model, self.data, self.tokenizer, self.cfg.model.vision.img_size,
                                 self.cfg.data.max_tokens, o.mode, o.gradcam_layer, self.cfg.eval.batch_size)
        out.pop("predictions")
        return out
