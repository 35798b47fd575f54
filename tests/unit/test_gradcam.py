"""Grad-CAM: the ITM and ITC maps against loop references, the model left as it was, the explicit
attention path against the fused one in training, layers, modes and defaults."""
import contextlib
import copy
import math

import pytest
import torch
from helpers import forward, loop_fusion_layer, tiny_albef, tiny_batch, tiny_model_config

import albef_ds
from albef_ds.models.gradcam import (check_gradcam, cross_attention_probs, default_gradcam_layer, gradcam, itc_maps,
                                     itm_token_maps, sentence_maps, vit_attention_probs)
from albef_ds.tokenizer import build_tokenizer, tokenize


def padded_batch(model, n=3):
    """Images and texts of different lengths (so some rows have padding)."""
    images, _, _ = tiny_batch(model.cfg, n)
    texts = ["the red circle", "a large blue square at the top of the picture", "two stars"][:n]
    ids, mask = tokenize(build_tokenizer(model.cfg.text.tokenizer), texts, 16)
    assert (mask == 0).any()
    return images, ids, mask


# ---- Grad-CAM against loop references ------------------------------------------------------------

def reference_itm_maps(model, images, ids, mask, layer):
    """The fusion written out head by head with explicit softmax attention; autograd of the match
    logit to the chosen layer's probabilities; then loops for the clamp and the averages."""
    te = model.text_encoder
    with torch.no_grad():
        image_embeds = model.visual_encoder(images)
    image_embeds.requires_grad_()
    x = te.encode_text(ids, mask)
    kept = None
    for i in range(te.cfg.fusion_start, te.cfg.layers):
        x, probs = loop_fusion_layer(te.bert.encoder.layer[i], x, te.key_mask(mask), image_embeds)
        if i == layer:
            kept = probs
    logit = model.itm_head(x[:, 0])[:, 1]
    grads = torch.autograd.grad(logit.sum(), kept)
    b, length = ids.shape
    patches = image_embeds.shape[1] - 1
    tokens = torch.zeros(b, length, patches)
    sentence = torch.zeros(b, patches)
    for row in range(b):
        valid = [t for t in range(length) if mask[row, t]]
        for t in valid:
            for h in range(len(kept)):
                tokens[row, t] += kept[h][row, t, 1:] * grads[h][row, t, 1:].clamp(min=0) / len(kept)
            sentence[row] += tokens[row, t] / len(valid)
    g = int(patches ** 0.5)
    return tokens.view(b, length, g, g), sentence.view(b, g, g)


def reference_itc_maps(model, images, ids, mask, block):
    vit = model.visual_encoder
    with torch.no_grad():
        text_feat = model.text_features(ids, mask)
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    for i, blk in enumerate(vit.blocks):
        if i != block:
            x = blk(x)
            continue
        y = blk.norm1(x)
        heads = blk.attn.num_heads
        q, k, v = blk.attn.qkv(y).chunk(3, -1)
        d = q.shape[-1] // heads
        probs, outs = [], []
        for h in range(heads):
            part = slice(h * d, (h + 1) * d)
            p = torch.softmax(q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(d), -1)
            probs.append(p)
            outs.append(p @ v[..., part])
        x = x + blk.ls1(blk.attn.proj(torch.cat(outs, -1)))
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    x = vit.forward_head(vit.norm(x))
    image_feat = torch.nn.functional.normalize(model.vision_proj(x[:, 0]), dim=-1)
    sim = (image_feat * text_feat).sum(-1) / model.temp.clamp(0.001, 0.5)
    grads = torch.autograd.grad(sim.sum(), probs)
    b, patches = images.shape[0], x.shape[1] - 1
    out = torch.zeros(b, patches)
    for row in range(b):
        for h in range(heads):
            out[row] += probs[h][row, 0, 1:] * grads[h][row, 0, 1:].clamp(min=0) / heads
    g = int(patches ** 0.5)
    return out.view(b, g, g)


def test_itm_gradcam_equals_the_loop_reference():
    model = tiny_albef()
    images, ids, mask = padded_batch(model)
    for layer in (2, 3):
        want_tokens, want_sentence = reference_itm_maps(model, images, ids, mask, layer)
        tokens, logits = itm_token_maps(model, images, ids, mask, layer)
        assert tokens.shape == (3, 16, 8, 8) and logits.shape == (3, 2)
        assert torch.allclose(tokens, want_tokens, rtol=1e-4, atol=1e-9)
        assert (tokens[mask == 0] == 0).all()
        assert torch.allclose(sentence_maps(tokens, mask), want_sentence, rtol=1e-4, atol=1e-9)
        assert torch.allclose(gradcam(model, images, ids, mask, "itm", layer), want_sentence, rtol=1e-4, atol=1e-9)
    # the layer matters: the maps of the two fusion layers differ
    assert not torch.allclose(itm_token_maps(model, images, ids, mask, 2)[0], tokens)
    # in the last layer only [CLS]'s attention reaches the head: every word's map is zero
    assert (tokens[:, 1:] == 0).all() and (tokens[:, 0] > 0).any()


def test_itc_gradcam_equals_the_loop_reference():
    model = tiny_albef()
    images, ids, mask = padded_batch(model)
    for block in (1, 3):
        want = reference_itc_maps(model, images, ids, mask, block)
        got = itc_maps(model, images, ids, mask, block)
        assert got.shape == (3, 8, 8) and (got >= 0).all() and got.sum() > 0
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-9)
    assert torch.allclose(gradcam(model, images, ids, mask, "itc", 3), got)


def test_a_map_leaves_the_model_as_it_was():
    model = tiny_albef()
    images, ids, mask = padded_batch(model)
    model.train()
    fused = model.visual_encoder.blocks[1].attn.fused_attn
    gradcam(model, images, ids, mask, "itm", 2)
    gradcam(model, images, ids, mask, "itc", 1)
    assert model.training                                             # mode untouched
    assert all(p.grad is None for p in model.parameters())            # no parameter gradient
    assert all(layer.crossattention.probs_hook is None
               for layer in model.text_encoder.bert.encoder.layer[2:])
    assert model.visual_encoder.blocks[1].attn.fused_attn == fused
    assert not model.visual_encoder.blocks[1].attn.attn_drop._forward_hooks
    # frozen weights: the gradient still reaches the attention
    model.eval().requires_grad_(False)
    assert gradcam(model, images, ids, mask, "itm", 2).sum() > 0
    assert gradcam(model, images, ids, mask, "itc", 1).sum() > 0


def test_the_explicit_attention_path_changes_no_training_number():
    """Every layer Grad-CAM can switch to its explicit attention (each fusion layer's cross-attention,
    each ViT block) switched at once gives the fused path's losses and gradients."""
    from albef_ds.tasks.contrastive import ContrastiveModel

    torch.manual_seed(0)
    fused = ContrastiveModel(tiny_model_config(), mlm=True)
    explicit = copy.deepcopy(fused)
    images, ids, mask = tiny_batch(fused.cfg, 6)
    image_ids = torch.tensor([0, 0, 1, 2, 3, 3])
    text, vision = fused.cfg.text, fused.cfg.vision
    outs = []
    for model, switched in ((fused, False), (explicit, True)):
        with contextlib.ExitStack() as stack:
            captured = []
            if switched:
                captured += [stack.enter_context(cross_attention_probs(model, layer))
                             for layer in range(text.fusion_start, text.layers)]
                captured += [stack.enter_context(vit_attention_probs(model, block)) for block in range(vision.depth)]
            out = forward(model, images, ids, mask, alpha=0.4, generator=torch.Generator().manual_seed(1),
                          image_ids=image_ids)
            out["loss"].backward()
        # every switched layer ran explicitly (its probabilities were captured)
        assert len(captured) == (text.layers - text.fusion_start + vision.depth if switched else 0)
        assert all(captured), [len(c) for c in captured]
        outs.append(out)
    for key in ("loss", "loss_itc", "loss_itm", "loss_mlm"):
        assert outs[1][key].item() == pytest.approx(outs[0][key].item(), rel=1e-5), key
    named = dict(explicit.named_parameters())
    for name, p in fused.named_parameters():
        # within 1e-5 of the gradient's size (float32 sums in another order); a key bias's gradient
        # is zero but for round-off (softmax ignores a shift), hence the absolute floor
        if p.grad is not None:
            assert (named[name].grad - p.grad).norm() <= 1e-5 * p.grad.norm() + 1e-9, name


def test_layers_modes_and_defaults():
    tiny, base = tiny_model_config(), albef_ds.load_config("base").model
    assert default_gradcam_layer(base, "itm") == 8 and default_gradcam_layer(base, "itc") == 8   # ALBEF's
    assert default_gradcam_layer(tiny, "itm") == 2 and default_gradcam_layer(tiny, "itc") == 2
    check_gradcam(base, "itm", 11)
    with pytest.raises(ValueError, match="fusion layers of BERT are 6..11"):
        check_gradcam(base, "itm", 5)
    with pytest.raises(ValueError, match="ViT blocks are 0..3"):
        check_gradcam(tiny, "itc", 4)
    with pytest.raises(ValueError, match="mode 'cam'"):
        check_gradcam(tiny, "cam", 2)


# ---- boxes ---------------------------------------------------------------------------------------
