"""Random batches shaped as the data pipeline delivers them: for timing the step without a corpus."""
from __future__ import annotations

import torch

from albef_ds.config import Config


def random_batch(cfg: Config, batch_size: int, generator: torch.Generator) -> dict:
    """A batch shaped as the data pipeline delivers it (normalised images, token ids, mask), of
    random values: for timing the step without a corpus. Captions fill two thirds of the padded
    length, as real ones leave padding."""
    length, text = cfg.data.max_tokens, cfg.model.text
    ids = torch.randint(10, text.vocab_size, (batch_size, length), generator=generator)   # past tiny's special ids
    ids[:, 0] = text.cls_token_id
    mask = torch.ones_like(ids)
    mask[:, length * 2 // 3:] = 0
    ids[mask == 0] = text.pad_token_id
    size = cfg.model.vision.img_size
    return {"image": torch.randn(batch_size, 3, size, size, generator=generator), "input_ids": ids,
            "attention_mask": mask}
