"""What every evaluator does with its inputs: the model's device, images decoded on the rank that
encodes them, failures reported by every rank together, per-item predictions split over the ranks."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import distributed as dist
from ..config import ConfigError
from ..data.samples import decode_image
from ..data.transforms import EvalTransform
from ..models import evaluating


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def load_images(sources: list, names: list, indices, img_size: int, failed: list,
                failed_rows: Optional[list] = None) -> torch.Tensor:
    """[len(indices), 3, img_size, img_size] uint8 pixels (the model's ViT normalises them):
    sources[i] (bytes or a path) decoded and resized for evaluation. An image that cannot be read
    is zeros, its name and error appended to `failed` (and its row in the result to `failed_rows`,
    when given)."""
    transform, out = EvalTransform(img_size), []
    for row, i in enumerate(indices):
        source = sources[i]
        try:
            if source is None:
                raise RuntimeError("image not kept by this rank")
            out.append(transform(decode_image(source)))
        except Exception as exc:          # PIL raises many types; every rank must reach the check
            failed.append(f"{names[i]}: {exc}")
            if failed_rows is not None:
                failed_rows.append(row)
            out.append(torch.zeros(3, img_size, img_size, dtype=torch.uint8))
    return torch.stack(out)


def check_failures(failed: list, world: int, device: torch.device) -> None:
    """Every rank of the split stops (ConfigError), naming the first failures, if any rank had one:
    for evaluations that need every image (retrieval ranks each query among all of them)."""
    count = dist.sum_over_split(torch.tensor([float(len(failed))], device=device), world, device)
    if count.item():
        raise ConfigError(f"{int(count.item())} evaluation images could not be read (retrieval needs every "
                          f"image); on rank {dist.rank()}: {'; '.join(failed[:3])}")


def skip_summary(items: int, skipped_items: list[str], prefix: str = "") -> dict:
    """What an evaluation reports of the items it could not evaluate: `items` (in the set),
    `skipped`, and `skipped_items` (each named, with why)."""
    return {f"{prefix}items": items, f"{prefix}skipped": len(skipped_items), f"{prefix}skipped_items": skipped_items}


def check_skipped(metrics: dict, max_fraction: float, option: str) -> None:
    """ConfigError when no item of a set could be evaluated, or more than `max_fraction` of its
    items could not (the option that allows more named): a metric over what is left would not be
    the set's. Checks every set a metrics dict reports (keys `<prefix>skipped_items`)."""
    for key in (k for k in metrics if k.endswith("skipped_items")):
        prefix = key[: -len("skipped_items")]
        names, items = metrics[key], metrics[f"{prefix}items"]
        which = f" of set {prefix.rstrip('_')}" if prefix else ""
        if names and len(names) >= items:
            raise ConfigError(f"no item{which} could be evaluated: all {items} skipped, e.g. {'; '.join(names[:3])}")
        if len(names) > max_fraction * items:
            raise ConfigError(f"{len(names)} of {items} items{which} could not be evaluated ({len(names) / items:.1%}; "
                              f"{option} allows {max_fraction:g}), e.g. {'; '.join(names[:3])}")


@torch.no_grad()
def predict_split(model, images: list, img_size: int, batch_size: int,
                  predict: Callable[[list, list], torch.Tensor], unread: int,
                  split_ranks: Optional[bool] = None) -> torch.Tensor:
    """[n] (long, on the CPU): one prediction per item, the same on every rank of the split (default:
    all ranks of the process group). images[i]: item i's image sources (bytes or paths, as many for
    every item). The items go in batches of batch_size dealt to the ranks (albef_ds.distributed's
    work split); a rank decodes the images of its own batches and, with the model in eval mode and
    no gradients, calls `predict(slots, items)` for the items whose images all decode (items: their
    indices; slots: one [len(items), 3, img_size, img_size] uint8 tensor per image of an item, on
    the model's device: its ViT normalises them) -> their [len(items)] predictions. An item with an
    image that cannot be read is predicted `unread`. The predictions are gathered."""
    rank, world = dist.work_split(split_ranks)
    device = model_device(model)
    n = len(images)
    parts = []
    with evaluating(model):
        for batch in dist.my_batches(n, batch_size, rank, world):
            failed_rows: list[int] = []
            slots = []
            for j in range(len(images[batch[0]])):
                sources = [images[i][j] for i in batch]
                slots.append(load_images(sources, sources, range(len(batch)), img_size, [], failed_rows))
            rows = [k for k in range(len(batch)) if k not in failed_rows]
            out = torch.full((len(batch),), unread, dtype=torch.long, device=device)
            if rows:
                out[rows] = predict([s[rows].to(device) for s in slots], [batch[k] for k in rows])
            parts.append(out)
    local = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)
    return dist.gather_rows(local, n, batch_size, world).cpu()
