"""The architecture's FLOP count agrees with PyTorch's own count of the executed matmuls."""
import pytest
import torch
from helpers import forward, tiny_batch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import albef_ds
from albef_ds.config import load_config
from albef_ds.flops import train_flops_per_sample


@pytest.mark.parametrize("task, mlm", [("pretrain", True), ("retrieval", False)])
def test_counted_flops_match_torch_flop_counter(task, mlm):
    config = load_config("tiny", [f"task={task}", "model.queue_size=64", "model.text.vocab_size=4096"])
    cfg = config.model
    model = albef_ds.build_model(config)
    batch = 8
    images, ids, mask = tiny_batch(cfg, batch)
    ids[:, 1:] = torch.where(ids[:, 1:] > 0, ids[:, 1:], 9)     # no padding: every token is real
    mask = torch.ones_like(ids)
    masked, labels = model.mask_text(ids)
    counter = FlopCounterMode(display=False)
    # The math backend runs attention as matmuls the counter sees (it has no formula for the
    # fused CPU kernel).
    with counter, sdpa_kernel(SDPBackend.MATH):
        forward(model, images, ids, mask, alpha=0.4, masked_ids=masked, mlm_labels=labels)["loss"].backward()
    measured = counter.get_total_flops() / batch
    masked_per_caption = (labels != -100).sum().item() / batch if mlm else 0
    counted = train_flops_per_sample(cfg, ids.shape[1], batch, masked_per_caption, mlm=mlm)
    assert abs(counted - measured) / measured < 0.05, (counted, measured)
