"""What every evaluator does with its inputs: the model's device, images decoded on the rank that
encodes them, failures reported by every rank together."""
from __future__ import annotations

from typing import Optional

import torch

from .. import distributed as dist


def device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(p for p in model.parameters() if p.is_floating_point())
    return p.device, p.dtype


def load_images(sources: list, names: list, indices, img_size: int, failed: list,
                failed_rows: Optional[list] = None) -> torch.Tensor:
    """[len(indices), 3, img_size, img_size]: sources[i] (bytes or a path) decoded and resized for
    evaluation. An image that cannot be read is zeros, its name and error appended to `failed`
    (and its row in the result to `failed_rows`, when given)."""
    from ..data.samples import decode_image
    from ..data.transforms import EvalTransform

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
            out.append(torch.zeros(3, img_size, img_size))
    return torch.stack(out)


def check_failures(failed: list, world: int, device: torch.device) -> None:
    """Every rank of the split stops, naming the first failures, if any rank had one."""
    count = dist.sum_over_split(torch.tensor([float(len(failed))], device=device), world, device)
    if count.item():
        raise RuntimeError(f"{int(count.item())} evaluation images could not be read; on rank "
                           f"{dist.rank()}: {failed[:5]}")
