"""Parameter groups and the paper's learning-rate schedule."""
import math

from helpers import tiny_model_config

import albef_ds
from albef_ds.config import TrainConfig
from albef_ds.optim import ALIGN, lr_at, param_groups


def test_no_weight_decay_on_biases_norms_and_temperature_and_no_momentum_weights():
    model = albef_ds.build_model(tiny_model_config())
    decay, no_decay = param_groups(model, 0.02)
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert "temp" in undecayed and "text_encoder.bert.embeddings.LayerNorm.weight" in undecayed
    assert "vision_proj.bias" in undecayed and "vision_proj.weight" in decayed
    assert not any("_m." in n for n in decayed | undecayed)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | undecayed == trainable and not decayed & undecayed


def test_lr_warms_up_linearly_then_decays_by_cosine_per_epoch():
    cfg = TrainConfig(lr=1e-4, warmup_lr=1e-5, min_lr=1e-5, warmup_steps=2000, epochs=30)
    assert lr_at(0, cfg, 5000) == 1e-5
    assert math.isclose(lr_at(1000, cfg, 5000), 5.5e-5)
    assert math.isclose(lr_at(2000, cfg, 5000), 1e-4)            # epoch 0 after warm-up: the peak
    assert lr_at(5000 * 15, cfg, 5000) == lr_at(5000 * 15 + 4999, cfg, 5000)   # constant in an epoch
    assert math.isclose(lr_at(5000 * 15, cfg, 5000), 1e-5 + 0.5 * 9e-5)
    assert math.isclose(lr_at(5000 * 30, cfg, 5000), 1e-5)


def test_groups_keep_every_flat_buffer_view_aligned():
    """DeepSpeed ZeRO-1/2 flatten each group in order; every tensor must start at an offset that
    is a multiple of ALIGN elements, except the odd-sized ones, which come last."""
    model = albef_ds.build_model(tiny_model_config())
    assert model.cfg.text.vocab_size % ALIGN != 0       # the MLM bias is odd-sized here too
    groups = param_groups(model, 0.02)
    assert any(p.numel() % ALIGN for p in groups[1]["params"])
    for group in groups:
        sizes = [p.numel() for p in group["params"]]
        odd = [s % ALIGN != 0 for s in sizes]
        assert odd == sorted(odd)                       # the odd-sized tensors, all at the end
        offset = 0
        for size, is_odd in zip(sizes, odd):
            assert offset % ALIGN == 0 or is_odd
            offset += size
