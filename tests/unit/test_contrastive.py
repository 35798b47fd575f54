"""The contrastive training model (pretraining, retrieval) in one process: API, gradients, queues,
momentum, and that it learns."""
import pytest
import torch
from helpers import forward, tiny_batch, tiny_model_config

import albef_ds
from albef_ds.config import load_config
from albef_ds.tasks.momentum import MomentumEMA, enqueue, momentum_parameter_pairs

KEYS = {"loss", "loss_itc", "loss_itm", "loss_mlm", "itm_acc", "mlm_acc", "alpha"}


def test_forward_outputs_and_inference_api():
    model = albef_ds.build_model(tiny_model_config())
    images, ids, mask = tiny_batch(model.cfg, 6)
    out = forward(model, images, ids, mask, alpha=0.4)
    assert set(out) == KEYS and all(torch.isfinite(torch.as_tensor(v)) for v in out.values())
    assert torch.allclose(out["loss"], out["loss_itc"] + out["loss_itm"] + out["loss_mlm"])
    model.eval()
    with torch.no_grad():
        img, txt = model.image_features(images), model.text_features(ids, mask)
        scores = model.itm_scores(images, ids, mask)
    assert img.shape == txt.shape == (6, model.cfg.embed_dim)
    assert torch.allclose(img.norm(dim=-1), torch.ones(6)) and torch.allclose(txt.norm(dim=-1), torch.ones(6))
    assert scores.shape == (6,) and ((scores >= 0) & (scores <= 1)).all()


def test_batch_of_one_is_finite():
    model = albef_ds.build_model(tiny_model_config())
    images, ids, mask = tiny_batch(model.cfg, 1)
    out = forward(model, images, ids, mask, alpha=0.4)
    assert all(torch.isfinite(torch.as_tensor(v)) for v in out.values())
    out["loss"].backward()


def test_gradients_reach_online_weights_and_never_momentum_weights():
    model = albef_ds.build_model(tiny_model_config())
    images, ids, mask = tiny_batch(model.cfg, 4)
    forward(model, images, ids, mask, alpha=0.4)["loss"].backward()
    momentum = {id(pm) for _, pm in momentum_parameter_pairs(model)}
    for name, p in model.named_parameters():
        if id(p) in momentum:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert {n.split(".")[0] for n, p in model.named_parameters() if not p.requires_grad} == {
        "visual_encoder_m", "text_encoder_m", "vision_proj_m", "text_proj_m"}


def test_caller_supplied_masking_is_used():
    """A masking of the caller's own (here one the generator would not draw: positions 2 and 4 of
    every row, one [MASK]ed, one replaced) gives the MLM loss computed by hand from that masking:
    the inference model's vocabulary logits at every position (one plain fusion pass, no masked-
    position gather), cross entropy at the labelled positions, and for the distillation the
    momentum encoders' logits of the same masked text."""
    import torch.nn.functional as F

    from albef_ds.tasks.objectives import IGNORE

    model = albef_ds.build_model(tiny_model_config()).eval()
    images, ids, mask = tiny_batch(model.cfg, 4)
    masked, labels = ids.clone(), torch.full_like(ids, IGNORE)
    masked[:, 2] = model.cfg.text.mask_token_id
    masked[:, 4] = (ids[:, 4] + 1) % model.cfg.text.vocab_size
    labels[:, [2, 4]] = ids[:, [2, 4]]
    alpha = 0.4
    with torch.no_grad():
        got = forward(model, images, ids, mask, alpha=alpha, masked_ids=masked, mlm_labels=labels)
        own = forward(model, images, ids, mask, alpha=alpha)       # the model's own masking
        at = labels != IGNORE
        logits = model.mlm_logits(images, masked, mask)[at]
        t = model.text_encoder_m
        fused_m = t.fuse(t.encode_text(masked, mask), mask, [model.visual_encoder_m(images)])
        soft_targets = F.softmax(t.mlm_logits(fused_m)[at], dim=-1)
        ce = F.cross_entropy(logits, labels[at], reduction="none")
        soft_ce = -(soft_targets * F.log_softmax(logits, dim=-1)).sum(-1)
        want = ((1 - alpha) * ce + alpha * soft_ce).mean()
    assert int(at.sum()) == 8
    torch.testing.assert_close(got["loss_mlm"], want, rtol=1e-5, atol=1e-6)
    assert got["mlm_acc"] == pytest.approx((logits.argmax(-1) == labels[at]).float().mean().item())
    assert not torch.allclose(own["loss_mlm"], want, rtol=1e-3)


def test_queue_wraps_around_for_any_batch_size():
    model = albef_ds.build_model(tiny_model_config(**{"model.queue_size": 10}))
    images, ids, mask = tiny_batch(model.cfg, 4)
    feats = []
    for step in range(3):
        forward(model, images, ids, mask)
        feats.append(model.image_queue.clone())
    assert int(model.queue_ptr) == 2                        # 12 written, wrapped at 10
    # the third batch went to slots 8, 9, 0, 1: slot 0 now differs from what the first batch wrote
    assert not torch.equal(feats[1][:, 0], feats[2][:, 0]) and torch.equal(feats[1][:, 2:8], feats[2][:, 2:8])
    model.eval()
    forward(model, images, ids, mask)
    assert int(model.queue_ptr) == 2                        # evaluation never writes the queue
    with pytest.raises(ValueError, match="global batch 11 is larger than the queue"):
        enqueue(model, torch.zeros(11, model.cfg.embed_dim), torch.zeros(11, model.cfg.embed_dim))


def test_ema_equals_closed_form_after_k_updates():
    torch.manual_seed(0)
    model = albef_ds.build_model(tiny_model_config())
    m = model.cfg.momentum
    pairs = momentum_parameter_pairs(model)
    start = [pm.detach().clone() for _, pm in pairs]
    ema = MomentumEMA(model, m)
    history = []
    for _ in range(5):
        with torch.no_grad():
            for p, _ in pairs:
                p.add_(torch.randn_like(p))
        history.append([p.detach().clone() for p, _ in pairs])
        ema.update()
    k = len(history)
    for i, (_, pm) in enumerate(pairs):
        expected = m ** k * start[i].double()
        for j, online in enumerate(history):
            expected += (1 - m) * m ** (k - 1 - j) * online[i].double()
        assert torch.allclose(pm.double(), expected, atol=1e-5)


def test_ema_accumulates_in_fp32_for_bf16_weights():
    model = albef_ds.build_model(tiny_model_config()).bfloat16()
    pairs = momentum_parameter_pairs(model)
    ema = MomentumEMA(model, 0.995)
    p, pm = pairs[0]
    with torch.no_grad():
        pm.fill_(1.0)
        ema.fp32[0].fill_(1.0)
        p.fill_(1.5)
    for _ in range(20):
        ema.update()
    expected = 1.5 - 0.5 * 0.995 ** 20                       # 1.0475; bf16 alone would stay at 1.0
    assert abs(ema.fp32[0].flatten()[0].item() - expected) < 1e-5
    assert abs(pm.float().flatten()[0].item() - expected) < 1e-2


def test_tiny_model_overfits_a_fixed_batch():
    # alpha=0, as at the start of training: with distillation on, the targets come from a momentum
    # model that moves 0.5% a step, which bounds the loss from below over only 100 steps.
    torch.manual_seed(0)
    model = albef_ds.build_model(tiny_model_config())
    images, ids, mask = tiny_batch(model.cfg, 8)
    masked, labels = model.mask_text(ids)
    ema = MomentumEMA(model, model.cfg.momentum)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(100):
        out = forward(model, images, ids, mask, alpha=0.0, masked_ids=masked, mlm_labels=labels)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        with torch.no_grad():
            model.temp.clamp_(*model.clamped_parameters()["temp"])
        ema.update()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    assert 0.001 <= model.temp.item() <= 0.5


def test_non_finite_features_never_reach_the_queue():
    model = albef_ds.build_model(tiny_model_config())
    images, ids, mask = tiny_batch(model.cfg, 4)
    before = model.image_queue.clone()
    images[0, 0, 0, 0] = float("nan")
    out = forward(model, images, ids, mask)
    assert not torch.isfinite(out["loss"])
    assert torch.equal(model.image_queue, before) and int(model.queue_ptr) == 0


def test_activation_checkpointing_gives_the_same_losses_and_gradients():
    plain = albef_ds.build_model(tiny_model_config())
    ckpt = albef_ds.build_model(tiny_model_config(**{"model.vision.grad_checkpointing": "true",
                                                     "model.text.grad_checkpointing": "true"}))
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.text_encoder.grad_checkpointing and ckpt.visual_encoder.grad_checkpointing
    images, ids, mask = tiny_batch(plain.cfg, 4)
    grads = []
    for model in (plain, ckpt):
        out = forward(model, images, ids, mask, alpha=0.4, generator=torch.Generator().manual_seed(1))
        out["loss"].backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_retrieval_mode_uses_image_ids_and_no_mlm():
    model = albef_ds.build_model(load_config("tiny", ["task=retrieval", "model.queue_size=16"]))
    assert not model.text_encoder.cls.predictions.transform.dense.weight.requires_grad
    images, ids, mask = tiny_batch(model.cfg, 4)
    image_ids = torch.tensor([7, 7, 8, 9])              # two captions of image 7
    images[1] = images[0]
    out = forward(model, images, ids, mask, alpha=0.4, image_ids=image_ids)
    assert "loss_mlm" not in out and torch.isfinite(out["loss"])
    assert torch.allclose(out["loss"], out["loss_itc"] + out["loss_itm"])
    out["loss"].backward()
    assert model.itm_head.weight.grad is not None
    assert model.idx_queue[0, :4].tolist() == [7, 7, 8, 9] and int(model.queue_ptr) == 4


def test_random_itm_negatives_are_drawn_uniformly_hard_ones_by_similarity(monkeypatch):
    """model.itm_negatives: "hard" (ALBEF) draws each ITM negative in proportion to the softmax of its
    ITC similarity; "random" (the tiny grounding recipe) uniformly among the batch's items of
    other image ids, whatever the similarities."""
    from albef_ds.config import ConfigError
    from albef_ds.tasks import objectives

    weights = []
    sample = objectives.sample_negatives
    monkeypatch.setattr(objectives, "sample_negatives", lambda w, u: weights.append(w) or sample(w, u))
    images, ids, mask = tiny_batch(tiny_model_config(), 4)
    image_ids = torch.tensor([7, 7, 8, 9])              # rows 0 and 1: captions of one image
    others = (image_ids[:, None] != image_ids[None, :]).float()
    for mode in ("hard", "random"):
        torch.manual_seed(0)
        model = albef_ds.build_model(load_config("tiny", ["task=retrieval", "model.queue_size=16",
                                                          f"model.itm_negatives={mode}"]))
        forward(model, images, ids, mask, image_ids=image_ids)
    (hard_i2t, hard_t2i, random_i2t, random_t2i) = weights
    for w in (random_i2t, random_t2i):
        assert torch.equal(w, others / 4)                # softmax of equal scores over 4 columns, others kept
    for w in (hard_i2t, hard_t2i):
        assert torch.equal(w > 0, others > 0) and not torch.allclose(w, others / 4)
    with pytest.raises(ConfigError, match="model.itm_negatives 'easy' is not one of hard, random"):
        load_config("tiny", ["model.itm_negatives=easy"])


def test_init_fresh_parameters_keep_their_initialisation_the_rest_comes_from_the_checkpoint(tmp_path):
    """model.init_fresh: the parameters it names start from the model's initialisation (temp from
    model.temp), every other from model.init_checkpoint; a name that is no parameter stops the build."""
    from helpers import tiny_albef

    from albef_ds.checkpoint.files import save_albef_ds
    from albef_ds.checkpoint.layout import layout_of
    from albef_ds.config import ConfigError

    source = tiny_albef(seed=3)
    with torch.no_grad():
        source.temp.fill_(0.001)
    layout = layout_of(source)
    path = str(tmp_path / "start.pt")
    save_albef_ds(path, {k: v for k, v in source.state_dict().items() if k in layout.keys}, load_config("tiny"), layout)
    start = f"model.init_checkpoint={path}"
    loaded = albef_ds.build_model(load_config("tiny", [start]))
    fresh = albef_ds.build_model(load_config("tiny", [start, "model.init_fresh=[temp]", "model.temp=0.05"]))
    assert loaded.temp.item() == pytest.approx(0.001) and fresh.temp.item() == pytest.approx(0.05)
    for model in (loaded, fresh):
        assert torch.equal(model.vision_proj.weight, source.vision_proj.weight)
        assert torch.equal(model.itm_head.weight, source.itm_head.weight)
    with pytest.raises(ConfigError, match="model.init_fresh: tmp names no parameter of the model"):
        albef_ds.build_model(load_config("tiny", [start, "model.init_fresh=[tmp]"]))
