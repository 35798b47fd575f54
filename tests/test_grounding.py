"""Grounding and Grad-CAM units: the maps against loop references, the explicit-attention path
against the fused one in training, boxes and proposal scores against hand-worked numbers, the
generated corpus, the data readers and the bad inputs."""
import copy
import json
import math
import os
import pickle
import re

import pytest
import torch

import albef_ds
from albef_ds.eval.grounding import (Expression, GroundingSet, best_proposal, box_iou, evaluate_grounding,
                                     heat_on_box, proposal_baselines, proposal_scores, read_grounding_set,
                                     read_proposals)
from albef_ds.models.gradcam import (check_gradcam, cross_attention_probs, default_gradcam_layer, gradcam,
                                     itc_maps, itm_token_maps, resize_map, sentence_maps, vit_attention_probs)
from albef_ds.data.transforms import EvalTransform
from albef_ds.tokenizer import build_tokenizer, tokenize
from helpers import forward, tiny_batch, tiny_model_config


def tiny_albef(seed=0):
    torch.manual_seed(seed)
    return albef_ds.models.ALBEF(tiny_model_config()).eval()


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
        block = te.bert.encoder.layer[i]
        x = block.attention(x, te.key_mask(mask))
        ca = block.crossattention
        q, k, v = ca.self.query(x), ca.self.key(image_embeds), ca.self.value(image_embeds)
        d = q.shape[-1] // ca.heads
        probs, outs = [], []
        for h in range(ca.heads):
            part = slice(h * d, (h + 1) * d)
            p = torch.softmax(q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(d), -1)
            probs.append(p)
            outs.append(p @ v[..., part])
        x = ca.output(torch.cat(outs, -1), x)
        x = block.output(block.intermediate(x), x)
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
    from albef_ds.tasks.contrastive import ContrastiveModel

    torch.manual_seed(0)
    fused = ContrastiveModel(tiny_model_config(), mlm=True)
    explicit = copy.deepcopy(fused)
    images, ids, mask = tiny_batch(fused.cfg, 6)
    image_ids = torch.tensor([0, 0, 1, 2, 3, 3])
    outs = []
    for model, on in ((fused, False), (explicit, True)):
        with cross_attention_probs(model, 2) as captured, cross_attention_probs(model, 3), \
                vit_attention_probs(model, 1) if on else cross_attention_probs(model, 2):
            if not on:             # the first context was entered for symmetry: leave the layer fused
                model.text_encoder.bert.encoder.layer[2].crossattention.probs_hook = None
            out = forward(model, images, ids, mask, alpha=0.4, generator=torch.Generator().manual_seed(1),
                          image_ids=image_ids)
            out["loss"].backward()
        assert bool(captured) == on
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

def test_box_iou_hand_worked():
    # corners 0..9 and 5..14: 5 x 5 pixels shared, areas 100 + 100 - 25
    assert box_iou([0, 0, 10, 10], [5, 5, 10, 10]) == pytest.approx(25 / 175)
    assert box_iou([2, 3, 4, 5], [2, 3, 4, 5]) == 1.0
    assert box_iou([0, 0, 10, 10], [20, 20, 5, 5]) == 0.0
    # sharing one pixel column (x = 9): ALBEF's strict test counts no intersection
    assert box_iou([0, 0, 10, 10], [9, 0, 10, 10]) == 0.0
    # half of a box: inter 5 x 10 = 50, union 100 + 50 - 50
    assert box_iou([0, 0, 10, 10], [0, 0, 5, 10]) == pytest.approx(0.5)
    # corners 1.5..4.5 and 0..3 across: (3 - 1.5 + 1) x (1 - 0 + 1) = 5 shared, union 8 + 8 - 5
    assert box_iou([1.5, 0, 4, 2], [0, 0, 4, 2]) == pytest.approx(5 / 11)


def test_proposal_scores_hand_worked():
    heat = torch.arange(20, dtype=torch.float64).view(4, 5)      # heat[r, c] = 5r + c
    boxes = torch.tensor([[1, 1, 2, 2],          # rows 1-2, cols 1-2: 6 + 7 + 11 + 12 = 36, / 2
                          [0.7, 0.2, 2.6, 1.9],  # rows 0:2, cols 0:3 (int of 0.2, 2.1, 0.7, 3.3)
                          [3, 2, 10, 10],        # cut at the edges: rows 2-3, cols 3-4
                          [1, 1, 0, 3]])         # no area
    scores = proposal_scores(heat, boxes)
    assert scores[0].item() == pytest.approx(36 / 2)
    assert scores[1].item() == pytest.approx((0 + 1 + 2 + 5 + 6 + 7) / math.sqrt(2.6 * 1.9))
    assert scores[2].item() == pytest.approx((13 + 14 + 18 + 19) / 10)
    assert scores[3].item() == -math.inf
    for box, score in zip(boxes.tolist()[:3], scores):       # ALBEF's slicing, written out
        x, y, w, h = box
        assert score.item() == pytest.approx(heat[int(y):int(y + h), int(x):int(x + w)].sum().item() / (w * h) ** 0.5)
    assert best_proposal(heat, boxes) == 0                    # 18 > 9.45 > 6.4
    # the area's square root: a tight box beats a large one with the same heat inside
    spot = torch.zeros(10, 10)
    spot[2:4, 2:4] = 1
    assert best_proposal(spot, torch.tensor([[0.0, 0, 10, 10], [2, 2, 2, 2], [1, 1, 4, 4]])) == 1


def test_heat_on_box_hand_worked():
    heat = torch.zeros(10, 10)
    heat[2:4, 2:4] = 1.0                            # 4 hot pixels
    assert heat_on_box(heat, [2, 2, 2, 2])          # mean 1 inside, 0 outside
    assert heat_on_box(heat, [0, 0, 5, 5])          # 4 / 25 inside, 0 outside
    assert not heat_on_box(heat, [5, 5, 5, 5])      # 0 inside, 4 / 75 outside
    heat[8, 8] = 30.0                               # a hot spot off the box: 4 / 4 inside, 30 / 96 outside
    assert heat_on_box(heat, [2, 2, 2, 2]) and not heat_on_box(heat, [0, 0, 5, 5])   # 4 / 25 < 30 / 75
    assert not heat_on_box(heat, [0, 0, 10, 10]) and not heat_on_box(heat, [3, 3, 0, 2])    # nothing outside / inside


def test_proposal_baselines_hand_worked():
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 10, 10], [0, 0, 40, 40]], dtype=torch.float64)
    expressions = [Expression("a.png", "t", 1, "1", (0, 0, 10, 10), "val"),     # 1 of 3 boxes, not the largest
                   Expression("a.png", "t", 2, "1", (0, 0, 40, 40), "val"),     # the largest box
                   Expression("b.png", "t", 3, "2", (5, 5, 2, 2), "val")]       # no box passes IoU 0.5
    got = proposal_baselines(GroundingSet(expressions, {"1": boxes, "2": boxes[:2]}))
    assert got["random"] == pytest.approx(100 * (1 / 3 + 1 / 3 + 0) / 3)
    assert got["largest"] == pytest.approx(100 / 3)


def test_resize_map_is_bicubic_at_the_image_size():
    heat = torch.rand(8, 8)
    out = resize_map(heat, 30, 50)
    assert out.shape == (30, 50)
    want = torch.nn.functional.interpolate(heat[None, None], size=(30, 50), mode="bicubic", align_corners=False)
    assert torch.equal(out, want[0, 0])
    assert torch.allclose(resize_map(torch.full((8, 8), 2.0), 16, 16), torch.full((16, 16), 2.0))


# ---- the generated corpus and the readers ---------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from albef_ds.data.synthetic_grounding import write_grounding_corpus

    return write_grounding_corpus(str(tmp_path_factory.mktemp("grounding")), train_images=12, val_images=4,
                                  test_images=6, image_size=96, seed=3)


def test_generated_corpus_in_albef_formats(corpus):
    from PIL import Image

    from albef_ds.data.synthetic import COLOURS, SHAPES

    train = json.load(open(corpus["train"]))
    assert all(set(e) == {"image", "text"} for e in train)
    dets, cocos = json.load(open(corpus["dets"])), json.load(open(corpus["cocos"]))
    refs = json.load(open(corpus["val"])) + json.load(open(corpus["test"]))
    assert {e["split"] for e in refs} == {"val", "testA", "testB"}
    assert len({e["ref_id"] for e in refs}) == len(refs)
    assert not {e["image"] for e in train} & {e["image"] for e in refs}       # images of one split only
    by_image = {}
    for e in refs:
        by_image.setdefault(e["image_id"], []).append(e)
    for image_id, items in by_image.items():
        boxes = dets[str(image_id)]
        count = len(items)
        assert count in (2, 3) and {e["split"] for e in items} <= {"val", "testA" if count == 2 else "testB"}
        assert Image.open(os.path.join(corpus["image_root"], items[0]["image"])).size == (96, 96)
        assert sorted(cocos[str(image_id)]) == sorted(e["bbox"] for e in items)
        named = [tuple(w for w in e["text"].split() if w in COLOURS or w in SHAPES) for e in items]
        assert all(len(n) == 2 for n in named) and len(set(named)) == count      # colour + kind, unique
        for e in items:
            # the referred box is a proposal, and no other proposal passes IoU 0.5 with it
            assert e["bbox"] in boxes
            assert sum(box_iou(b, e["bbox"]) >= 0.5 for b in boxes) == 1
            x, y, w, h = e["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 96 and y + h <= 96
        assert len(boxes) > count and max(b[2] * b[3] for b in boxes) > max(e["bbox"][2] * e["bbox"][3] for e in items)


def test_expression_codec_ids_by_image_file(corpus):
    import random

    from albef_ds.data.grounding import ExpressionCodec
    from albef_ds.data.samples import annotation_sample
    from albef_ds.data.transforms import build_transform

    tok = build_tokenizer("tiny_vocab.txt")
    codec = ExpressionCodec(tok, build_transform(64, True, None), 30, 16)
    entries = json.load(open(corpus["train"]))
    same = [e for e in entries if e["image"] == entries[0]["image"]]
    other = next(e for e in entries if e["image"] != entries[0]["image"])
    samples = [codec.decode(annotation_sample(f"{i:09d}", e, corpus["image_root"]), f"c/{i}", random.Random(i))
               for i, e in enumerate(same[:2] + [other])]
    batch = codec.collate(samples, ["a", "b", "c"])
    assert batch["image"].shape == (3, 3, 64, 64)
    assert batch["image_id"][0] == batch["image_id"][1] != batch["image_id"][2]
    assert samples[0]["caption"] == same[0]["text"]
    assert codec.decode(annotation_sample("x", {"image": same[0]["image"], "text": "?!"}, corpus["image_root"]),
                        "x", random.Random(0)) == "empty_caption"
    assert codec.decode(annotation_sample("x", {"image": "nope.png", "text": "a"}, corpus["image_root"]),
                        "x", random.Random(0)) == "missing_image"


def test_grounding_trains_on_the_whole_image():
    """The grounding configs set data.crop_scale null (ALBEF's grounding transform: resized whole,
    no crop) and the task's codec takes it, as retrieval's takes its (0.5, 1)."""
    from albef_ds.config import load_config
    from albef_ds.data.transforms import TrainTransform
    from albef_ds.tasks import get_task

    for name in ("grounding", "tiny_grounding"):
        assert load_config(name).data.crop_scale is None
    cfg = load_config("tiny_grounding", ["data.augment=true"])
    transform = get_task(cfg).codec(build_tokenizer(cfg.model.text.tokenizer), train=True).transform
    assert isinstance(transform, TrainTransform) and transform.crop_scale is None
    cfg = load_config("tiny_grounding", ["data.augment=true", "data.crop_scale=[0.5, 1.0]"])
    assert get_task(cfg).codec(build_tokenizer(cfg.model.text.tokenizer), train=True).transform.crop_scale == (0.5, 1.0)


def test_read_grounding_set_counts_and_names_bad_input(corpus, tmp_path):
    data = read_grounding_set(corpus["test"], corpus["dets"], corpus["image_root"])
    entries = json.load(open(corpus["test"]))
    assert len(data.expressions) == len(entries) and not sum(data.skipped.values())
    assert data.splits == ["testA", "testB"]
    first = data.expressions[0]
    assert first.box == tuple(entries[0]["bbox"]) and first.image_id == str(entries[0]["image_id"])
    # an empty text and an image the proposal file lacks: skipped and counted
    dets = json.load(open(corpus["dets"]))
    dets.pop(str(entries[-1]["image_id"]))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    bad = [dict(entries[0], text="!?")] + entries[1:]
    (tmp_path / "test.json").write_text(json.dumps(bad))
    data = read_grounding_set(str(tmp_path / "test.json"), str(tmp_path / "dets.json"), corpus["image_root"])
    lacking = sum(e["image_id"] == entries[-1]["image_id"] for e in entries)
    assert data.skipped == {"empty_text": 1, "no_proposals": lacking}
    assert len(data.expressions) == len(entries) - 1 - lacking
    # ALBEF's entries carry no box or split: without a REFER folder that is an error naming the entry
    (tmp_path / "bare.json").write_text(json.dumps([{"image": e["image"], "text": e["text"], "ref_id": e["ref_id"]}
                                                    for e in entries]))
    with pytest.raises(ValueError, match=r"entry 0 \(ref_id \d+\) has no bbox / split / image_id"):
        read_grounding_set(str(tmp_path / "bare.json"), corpus["dets"], corpus["image_root"])
    # ... with one (refs(unc).p and instances.json), the boxes and splits come from it
    refer = tmp_path / "refcoco+"
    refer.mkdir()
    refs = [{"ref_id": e["ref_id"], "ann_id": 1000 + i, "image_id": e["image_id"], "split": e["split"],
             "sentences": [{"sent": e["text"]}]} for i, e in enumerate(entries)]
    (refer / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    (refer / "instances.json").write_text(json.dumps({"annotations": [{"id": 1000 + i, "bbox": e["bbox"]}
                                                                      for i, e in enumerate(entries)]}))
    via_refer = read_grounding_set(str(tmp_path / "bare.json"), corpus["dets"], corpus["image_root"], str(refer))
    assert via_refer.expressions == read_grounding_set(corpus["test"], corpus["dets"], corpus["image_root"]).expressions
    # a pickle that asks for code is refused
    (refer / "refs(unc).p").write_bytes(pickle.dumps([Expression("a", "b", 1, "1", (0, 0, 1, 1), "val")]))
    with pytest.raises(pickle.UnpicklingError, match="not a plain-data pickle"):
        read_grounding_set(str(tmp_path / "bare.json"), corpus["dets"], corpus["image_root"], str(refer))
    (tmp_path / "list.json").write_text("[[1, 2, 3, 4]]")
    with pytest.raises(ValueError, match="list.json holds a list"):
        read_proposals(str(tmp_path / "list.json"))


def test_evaluation_skips_and_counts_unreadable_images(corpus, tmp_path):
    model = tiny_albef()
    tok = build_tokenizer(model.cfg.text.tokenizer)
    data = read_grounding_set(corpus["val"], corpus["dets"], corpus["image_root"])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    data.expressions[1].image = str(broken)
    data.expressions[2].image = str(tmp_path / "missing.png")
    out = evaluate_grounding(model, data, tok, 64, 16, batch_size=4)
    n = len(data.expressions)
    assert out["skipped"] == {"empty_text": 0, "no_proposals": 0, "unreadable_image": 2}
    assert out["expressions"] == n - 2 and out["counts"] == {"val": n - 2}
    preds = out["predictions"]
    assert preds.shape == (n, 5) and preds[1:3].isnan().all() and not preds[[0, 3]].isnan().any()
    ious = preds[~preds[:, 4].isnan(), 4]
    assert out["acc"] == pytest.approx(100 * (ious >= 0.5).double().mean().item())
    assert out["acc_val"] == out["acc"]
    # every chosen box is one of the image's proposals, and its IoU is box_iou's
    for e, p in zip(data.expressions, preds):
        if not p[4].isnan():
            assert p[:4].tolist() in data.proposals[e.image_id].tolist()
            assert p[4].item() == pytest.approx(box_iou(p[:4].tolist(), e.box))
    with pytest.raises(RuntimeError, match="no expression could be evaluated"):
        evaluate_grounding(model, GroundingSet(data.expressions[1:3], data.proposals), tok, 64, 16)


# ---- pictures ------------------------------------------------------------------------------------

def png_size(path):
    from PIL import Image

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def test_pictures_are_pngs_of_the_layout_size(corpus, tmp_path):
    from PIL import Image

    from albef_ds.pictures import PANEL, grid_size, heat_maps, jet, write_heat_pictures

    assert jet([0.0])[0].tolist() == [0, 0, 128] and jet([1.0])[0].tolist() == [128, 0, 0]
    model = tiny_albef()
    tok = build_tokenizer(model.cfg.text.tokenizer)
    image = Image.open(os.path.join(corpus["image_root"], "images/000020.png")).resize((120, 90))
    sentence, words, maps = heat_maps(model, tok, image, "The red-circle, zebra!")
    assert words == ["the", "red", "circle", "zebra"] and len(maps) == 4     # "zebra": 4 word pieces, one map
    ids, mask = tokenize(tok, ["the red circle zebra"], 30)
    pixels = EvalTransform(64)(image)[None]
    tokens, _ = itm_token_maps(model, pixels, ids, mask, 2)
    assert torch.allclose(maps[3], tokens[0, 4:8].mean(0)) and torch.allclose(sentence, sentence_maps(tokens, mask)[0])
    itc, none, _ = heat_maps(model, tok, image, "the red circle", "itc")
    assert torch.allclose(itc, itc_maps(model, pixels, ids[:, :4], mask[:, :4], 2)[0]) and none == []
    paths = write_heat_pictures(model, tok, image, ["the red circle"], str(tmp_path), "photo")
    assert [os.path.basename(p) for p in paths] == ["photo__the_red_circle.png", "photo__the_red_circle_words.png"]
    panel = (PANEL, round(90 * PANEL / 120))
    assert png_size(paths[0]) == grid_size(panel, 1)
    assert png_size(paths[1]) == grid_size(panel, 2 + 3)          # image, sentence, three words
    (itc_path,) = write_heat_pictures(model, tok, image, ["the red circle"], str(tmp_path), "photo", "itc")
    assert os.path.basename(itc_path) == "photo__the_red_circle_itc.png" and png_size(itc_path) == grid_size(panel, 1)
    with pytest.raises(ValueError, match="empty once cleaned"):
        heat_maps(model, tok, image, " ?! ")


def test_visualize_command_line_and_its_errors(corpus, tmp_path, capsys):
    from albef_ds.checkpoint.files import save_albef_ds
    from albef_ds.checkpoint.layout import layout_of
    from albef_ds.visualize import main

    model = tiny_albef()
    layout = layout_of(model)
    save_albef_ds(str(tmp_path / "tiny.pt"), {k: v for k, v in model.state_dict().items() if k in layout.keys},
                  albef_ds.load_config("tiny"), layout)
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("000020.png", "000021.png"):
        (folder / name).write_bytes(open(os.path.join(corpus["image_root"], "images", name), "rb").read())
    (tmp_path / "texts.txt").write_text("the red circle\n\na blue square\n")
    out = tmp_path / "out"
    assert main(["--checkpoint", str(tmp_path / "tiny.pt"), "--image", str(folder), "--texts",
                 str(tmp_path / "texts.txt"), "--output_dir", str(out)]) == 0
    assert len(os.listdir(out)) == 2 * 2 * 2                      # images x texts x (sentence, words)
    assert all(png_size(out / name) for name in os.listdir(out))
    capsys.readouterr()

    def error(*args):
        assert main(["--checkpoint", str(tmp_path / "tiny.pt"), "--output_dir", str(out), *args]) == 2
        return capsys.readouterr().err

    (folder / "broken.png").write_bytes(b"not a png")
    assert "image " + str(folder / "broken.png") + " cannot be read" in error("--image", str(folder), "--text", "a")
    assert "empty once cleaned" in error("--image", str(folder / "000020.png"), "--text", "?")
    assert "no such file" in error("--image", str(tmp_path / "none.png"), "--text", "a")
    assert "nothing.pt" in error("--checkpoint", str(tmp_path / "nothing.pt"), "--image", str(folder), "--text", "a")


def test_visualize_refuses_a_model_without_an_itm_head(monkeypatch, tmp_path, corpus):
    from albef_ds import visualize

    monkeypatch.setattr(albef_ds, "load_model", lambda *a, **k: torch.nn.Linear(2, 2))
    args = visualize.parse_args(["--checkpoint", "vqa.pth", "--image", os.path.join(corpus["image_root"], "images"),
                                 "--text", "a", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="checkpoint vqa.pth holds a Linear, which has no ITM head"):
        visualize.run(args)


class _Trap:
    """Unpickling it touches a marker file (what a crafted checkpoint could do instead)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_visualize_loads_checkpoints_weights_only(monkeypatch, tmp_path, corpus, capsys):
    """As every command line: a file that would run code is refused on one line naming it and the
    opt-in; --trust_checkpoint passes trusted=True."""
    from albef_ds import visualize

    marker, path = tmp_path / "unpickled.marker", str(tmp_path / "crafted.pth")
    torch.save({"model": tiny_albef().state_dict(), "extra": _Trap(str(marker))}, path)
    image = os.path.join(corpus["image_root"], "images", "000020.png")
    argv = ["--checkpoint", path, "--image", image, "--text", "a", "--output_dir", str(tmp_path / "out")]
    assert visualize.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and path in err and "--trust_checkpoint" in err and not marker.exists()
    seen = {}
    monkeypatch.setattr(albef_ds, "load_model", lambda *a, **k: seen.update(k) or torch.nn.Linear(2, 2))
    assert visualize.main(argv + ["--trust_checkpoint"]) == 2 and seen["trusted"] is True


def test_demo_pictures_of_two_heldout_images(tmp_path):
    from albef_ds.pictures import write_demo_pictures

    cfg = albef_ds.load_config("tiny", ["data.synthetic.train_samples=4", "data.synthetic.heldout_samples=3",
                                        "data.synthetic.samples_per_shard=4"])
    paths = write_demo_pictures(tiny_albef(), cfg, str(tmp_path))
    assert len(paths) == 4 and all(p.startswith(str(tmp_path / "pictures" / "heldout_")) for p in paths)
    assert all(png_size(p) for p in paths)


def test_the_demo_ends_with_its_pictures(monkeypatch, tmp_path):
    """albef_ds/train.py without --config (the demo) draws the pictures after its held-out
    evaluation, on every rank, with the engine, the run's config and its folder; a configured run
    does not. (The training is stubbed: the drawing itself is the test above.)"""
    import albef_ds.engine
    import albef_ds.eval.shapes_probe
    import albef_ds.pictures
    from albef_ds import train

    calls = []

    class Trainer:
        def __init__(self, cfg, ds_config, output_dir, resume=None):
            self.cfg, self.engine, self.total_steps = cfg, "engine", 0
            self.ds_config = {"zero_optimization": {"stage": 2}}

        def train(self):
            return 0

        def close(self):
            calls.append("close")

    monkeypatch.setattr(albef_ds.engine, "Trainer", Trainer)
    monkeypatch.setattr(albef_ds.eval.shapes_probe, "evaluate_heldout", lambda *a: calls.append(("heldout", *a)))
    monkeypatch.setattr(albef_ds.pictures, "write_demo_pictures", lambda *a: calls.append(("pictures", *a)))
    out = str(tmp_path / "demo")
    assert train._run(train.parse_args(["--deepspeed", "ds_configs/zero2.json", "--output_dir", out]), demo=True) == 0
    heldout, pictures, close = calls
    cfg = heldout[2]
    assert heldout == ("heldout", "engine", cfg, out) and pictures == ("pictures", "engine", cfg, out)
    assert close == "close"
    assert cfg.task == "pretrain" and cfg.data.synthetic is not None
    calls.clear()
    args = train.parse_args(["--deepspeed", "ds_configs/zero2.json", "--config", "tiny", "--output_dir", out])
    assert train._run(args, demo=False) == 0 and calls == ["close"]


def test_the_task_checks_its_options_and_evaluation_data(corpus):
    from albef_ds.config import ConfigError
    from albef_ds.tasks import get_task

    cfg = albef_ds.load_config("tiny_grounding", [f"data.corpora=[{{annotations: [{corpus['train']}]}}]"])
    assert albef_ds.load_config(cfg.to_dict()).to_dict() == cfg.to_dict()           # stored configs load back
    task = get_task(cfg)
    task.check(1)
    assert type(task.build_model()).__name__ == "ContrastiveModel" and not task.build_model().mlm
    for override, message in (("grounding.mode=cam", "grounding.mode / grounding.gradcam_layer: Grad-CAM mode 'cam'"),
                              ("grounding.gradcam_layer=4", "ViT blocks are 0..3")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            get_task(albef_ds.load_config(cfg, [override])).check(1)
    with pytest.raises(ConfigError, match="grounding evaluation needs eval.data"):
        get_task(albef_ds.load_config(cfg, ["eval.data=[]"])).evaluator("unused")
    bad = albef_ds.load_config(cfg, [f"eval.data=[{corpus['val']}]", f"grounding.dets={corpus['train']}"])
    with pytest.raises(ConfigError, match="holds a list, not"):
        get_task(bad).evaluator("unused")
    good = albef_ds.load_config(cfg, [f"eval.data=[{corpus['val']}, {corpus['test']}]",
                                      f"grounding.dets={corpus['dets']}",
                                      f"eval.image_root={corpus['image_root']}"])
    evaluator = get_task(good).evaluator("unused")
    assert evaluator.data.splits == ["val", "testA", "testB"]
    assert set(evaluator(tiny_albef())) >= set(get_task(good).eval_metrics)
