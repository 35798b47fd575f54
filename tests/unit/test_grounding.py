"""Grounding: boxes and proposal scores against hand-worked numbers, the generated grounding_corpus in the
RefCOCO+ formats, the data readers and their bad inputs, the evaluation's skips, the task's checks."""
import json
import math
import os
import pickle
import re

import pytest
import torch
from helpers import tiny_albef, write_refer_folder

import albef_ds
from albef_ds.config import ConfigError
from albef_ds.eval.grounding import (Expression, GroundingSet, best_proposal, box_iou, evaluate_grounding, heat_on_box,
                                     proposal_baselines, proposal_scores, read_grounding_set, read_proposals)
from albef_ds.models.gradcam import resize_map
from albef_ds.tokenizer import build_tokenizer


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


# ---- the generated grounding_corpus and the readers ---------------------------------------------------------



def test_generated_corpus_in_albef_formats(grounding_corpus):
    from PIL import Image

    from albef_ds.synthetic.shapes import COLOURS, SHAPES

    train = json.load(open(grounding_corpus["train"]))
    assert all(set(e) == {"image", "text"} for e in train)
    dets, cocos = json.load(open(grounding_corpus["dets"])), json.load(open(grounding_corpus["cocos"]))
    refs = json.load(open(grounding_corpus["val"])) + json.load(open(grounding_corpus["test"]))
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
        assert Image.open(os.path.join(grounding_corpus["image_root"], items[0]["image"])).size == (96, 96)
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


def test_expression_codec_ids_by_image_file(grounding_corpus):
    import random

    from albef_ds.data.grounding import ExpressionCodec
    from albef_ds.data.samples import annotation_sample
    from albef_ds.data.transforms import build_transform

    tok = build_tokenizer("tiny_vocab.txt")
    codec = ExpressionCodec(tok, build_transform(64, True, None), 30, 16)
    entries = json.load(open(grounding_corpus["train"]))
    same = [e for e in entries if e["image"] == entries[0]["image"]]
    other = next(e for e in entries if e["image"] != entries[0]["image"])
    samples = [codec.decode(annotation_sample(f"{i:09d}", e, grounding_corpus["image_root"]), f"c/{i}", random.Random(i))
               for i, e in enumerate(same[:2] + [other])]
    batch = codec.collate(samples, ["a", "b", "c"])
    assert batch["image"].shape == (3, 3, 64, 64)
    assert batch["image_id"][0] == batch["image_id"][1] != batch["image_id"][2]
    assert samples[0]["caption"] == same[0]["text"]
    assert codec.decode(annotation_sample("x", {"image": same[0]["image"], "text": "?!"}, grounding_corpus["image_root"]),
                        "x", random.Random(0)) == "empty_caption"
    assert codec.decode(annotation_sample("x", {"image": "nope.png", "text": "a"}, grounding_corpus["image_root"]),
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


def test_read_grounding_set_counts_and_names_bad_input(grounding_corpus, tmp_path):
    data = read_grounding_set(grounding_corpus["test"], grounding_corpus["dets"], grounding_corpus["image_root"])
    entries = json.load(open(grounding_corpus["test"]))
    assert len(data.expressions) == len(entries) and not sum(data.skipped.values())
    assert data.splits == ["testA", "testB"]
    first = data.expressions[0]
    assert first.box == tuple(entries[0]["bbox"]) and first.image_id == str(entries[0]["image_id"])
    # an empty text and an image the proposal file lacks: skipped and counted
    dets = json.load(open(grounding_corpus["dets"]))
    dets.pop(str(entries[-1]["image_id"]))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    bad = [dict(entries[0], text="!?")] + entries[1:]
    (tmp_path / "test.json").write_text(json.dumps(bad))
    data = read_grounding_set(str(tmp_path / "test.json"), str(tmp_path / "dets.json"), grounding_corpus["image_root"])
    lacking = sum(e["image_id"] == entries[-1]["image_id"] for e in entries)
    assert data.skipped == {"empty_text": 1, "no_proposals": lacking}
    assert len(data.expressions) == len(entries) - 1 - lacking
    # ALBEF's entries carry no box or split: without a REFER folder that is an error naming the entry
    (tmp_path / "bare.json").write_text(json.dumps([{"image": e["image"], "text": e["text"], "ref_id": e["ref_id"]}
                                                    for e in entries]))
    with pytest.raises(ValueError, match=r"entry 0 \(ref_id \d+\) has no bbox / split / image_id"):
        read_grounding_set(str(tmp_path / "bare.json"), grounding_corpus["dets"], grounding_corpus["image_root"])
    # ... with one (refs(unc).p and instances.json), the boxes and splits come from it
    refer = tmp_path / "refcoco+"
    write_refer_folder(refer, entries, 1000)
    via_refer = read_grounding_set(str(tmp_path / "bare.json"), grounding_corpus["dets"], grounding_corpus["image_root"], str(refer))
    assert via_refer.expressions == read_grounding_set(grounding_corpus["test"], grounding_corpus["dets"], grounding_corpus["image_root"]).expressions
    # a pickle that asks for code is refused
    (refer / "refs(unc).p").write_bytes(pickle.dumps([Expression("a", "b", 1, "1", (0, 0, 1, 1), "val")]))
    with pytest.raises(pickle.UnpicklingError, match="not a plain-data pickle"):
        read_grounding_set(str(tmp_path / "bare.json"), grounding_corpus["dets"], grounding_corpus["image_root"], str(refer))
    (tmp_path / "list.json").write_text("[[1, 2, 3, 4]]")
    with pytest.raises(ValueError, match="list.json holds a list"):
        read_proposals(str(tmp_path / "list.json"))


def test_evaluation_skips_and_counts_unreadable_images(grounding_corpus, tmp_path):
    model = tiny_albef()
    tok = build_tokenizer(model.cfg.text.tokenizer)
    data = read_grounding_set(grounding_corpus["val"], grounding_corpus["dets"], grounding_corpus["image_root"])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    data.expressions[1].image = str(broken)
    data.expressions[2].image = str(tmp_path / "missing.png")
    out = evaluate_grounding(model, data, tok, 64, 16, batch_size=4)
    n = len(data.expressions)
    assert out["skipped_by_reason"] == {"empty_text": 0, "no_proposals": 0, "unreadable_image": 2}
    refs = [e.ref_id for e in data.expressions[1:3]]
    assert out["skipped_items"] == [f"expression {refs[0]}: image {broken} unreadable",
                                    f"expression {refs[1]}: image {tmp_path / 'missing.png'} unreadable"]
    assert out["skipped"] == 2 and out["items"] == n
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
    with pytest.raises(ConfigError, match="no item could be evaluated: all 2 skipped"):
        evaluate_grounding(model, GroundingSet(data.expressions[1:3], data.proposals), tok, 64, 16)


# ---- pictures ------------------------------------------------------------------------------------


def test_the_task_checks_its_options_and_evaluation_data(grounding_corpus):
    from albef_ds.config import ConfigError
    from albef_ds.tasks import get_task

    cfg = albef_ds.load_config("tiny_grounding", [f"data.corpora=[{{annotations: [{grounding_corpus['train']}]}}]"])
    assert albef_ds.load_config(cfg.to_dict()).to_dict() == cfg.to_dict()           # stored configs load back
    task = get_task(cfg)
    task.check(1)
    assert type(task.build_model()).__name__ == "ContrastiveModel" and not task.build_model().mlm
    for overrides, message in ((["grounding.mode=cam"], "grounding.mode / grounding.gradcam_layer: Grad-CAM mode 'cam'"),
                               (["grounding.gradcam_layer=4"], "the model's fusion layers of BERT are 2..3"),
                               (["grounding.mode=itc", "grounding.gradcam_layer=4"], "ViT blocks are 0..3")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            get_task(albef_ds.load_config(cfg, overrides)).check(1)
    with pytest.raises(ConfigError, match="grounding evaluation needs eval.data"):
        get_task(albef_ds.load_config(cfg, ["eval.data=[]"])).evaluator("unused")
    bad = albef_ds.load_config(cfg, [f"eval.data=[{grounding_corpus['val']}]", f"grounding.dets={grounding_corpus['train']}"])
    with pytest.raises(ConfigError, match="holds a list, not"):
        get_task(bad).evaluator("unused")
    good = albef_ds.load_config(cfg, [f"eval.data=[{grounding_corpus['val']}, {grounding_corpus['test']}]",
                                      f"grounding.dets={grounding_corpus['dets']}",
                                      f"eval.image_root={grounding_corpus['image_root']}"])
    evaluator = get_task(good).evaluator("unused")
    assert evaluator.data.splits == ["val", "testA", "testB"]
    assert set(evaluator(tiny_albef())) >= set(get_task(good).eval_metrics)


def test_the_generator_prints_the_overrides_that_point_the_tiny_recipe_at_its_corpus(tmp_path, capsys):
    """`python -m albef_ds.synthetic.grounding` prints the overrides of the corpus it wrote, and the
    shipped tiny_grounding.yaml's own paths are those overrides for --out_dir output/grounding_data."""
    import shlex

    from albef_ds.config import load_config
    from albef_ds.synthetic.grounding import SPLIT_FILES, main, training_overrides

    main(["--out_dir", str(tmp_path), "--train_images", "2", "--val_images", "1", "--test_images", "1"])
    printed = json.loads(capsys.readouterr().out)
    files = printed["files"]
    cfg = load_config("tiny_grounding", shlex.split(printed["train_overrides"]))
    assert [(c.annotations, c.image_root) for c in cfg.data.corpora] == [([files["train"]], str(tmp_path))]
    assert (cfg.eval.data, cfg.eval.image_root, cfg.options["dets"]) == ([files["val"]], str(tmp_path), files["dets"])
    assert shlex.split(printed["evaluate_arguments"]) == ["--data", files["test"], "--dets", files["dets"],
                                                          "--image_root", str(tmp_path)]
    shipped = {split: f"output/grounding_data/{name}" for split, name in SPLIT_FILES.items()}
    shipped.update(dets="output/grounding_data/dets.json", image_root="output/grounding_data")
    assert load_config("tiny_grounding", training_overrides(shipped)) == load_config("tiny_grounding")
