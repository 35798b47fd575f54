"""NLVR2, its text-assignment pre-step and SNLI-VE in one process: the doubled fusion layers, the
released layouts against a loop reference, conversion round trips, the objectives, the codec, the
evaluator and the evaluate command on bad input. (2 ranks and learning: test_classification_learning.py)"""
import importlib.util
import io
import json
import os
import random

import classifier_reference as reference
import pytest
import torch
from PIL import Image

import albef_ds
from albef_ds.checkpoint.files import read_checkpoint
from albef_ds.config import load_config
from albef_ds.data.labelled import NLVR_LABELS, VE_LABELS, LabelError, LabelledCodec
from albef_ds.data.samples import annotation_sample
from albef_ds.data.transforms import EvalTransform
from albef_ds.eval.classification import evaluate_classification, predict, read_labelled_set
from albef_ds.evaluate import main as evaluate_main
from albef_ds.models.bert import double_fusion_layers
from albef_ds.tasks import get_task, objectives, recognise_release
from albef_ds.tasks.base import StepContext
from albef_ds.tokenizer import build_tokenizer, tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("convert_checkpoint", os.path.join(ROOT, "tools", "convert_checkpoint.py"))
convert_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_cli)

TASKS = ("nlvr2", "snli_ve", "nlvr2_ta")


def tiny(task, *overrides):
    return load_config("tiny", [f"task={task}", *overrides])


def texts(n, seed=0):
    tok = build_tokenizer("tiny_vocab.txt")
    sentences = ["the left image has red circles and the right one has none", "both images have blue shapes",
                 "there are green stars on the left", "neither image has two yellow crosses"]
    ids, mask = tokenize(tok, [sentences[(i + seed) % len(sentences)] for i in range(n)], 16)
    return ids, mask


def images(n, seed=0):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


# ---- the doubled fusion layers ----------------------------------------------------------------

def test_each_pretrained_fusion_layer_initialises_both_layers_of_its_pair():
    pretrained = albef_ds.build_model(tiny("pretrain"))
    state = pretrained.state_dict()
    cfg = tiny("nlvr2")
    model = get_task(cfg).build_model()
    model.load_state_dict(get_task(cfg).initial_state(state, "pretrain"), strict=False)
    layers, old = model.text_encoder.bert.encoder.layer, pretrained.text_encoder.bert.encoder.layer
    assert len(layers) == 6 and len(old) == 4                   # 2 text layers, 2 fusion layers -> 2 pairs
    for i in range(2):
        assert dict(layers[i].named_parameters()).keys() == dict(old[i].named_parameters()).keys()
        for name, value in old[i].state_dict().items():
            assert torch.equal(layers[i].state_dict()[name], value), (i, name)
    for n, pair in ((2, (2, 3)), (3, (4, 5))):
        source = old[n].state_dict()
        assert any(".crossattention." in f".{k}" for k in source)
        for layer in pair:
            target = layers[layer].state_dict()
            assert target.keys() == source.keys()
            for name, value in source.items():
                assert torch.equal(target[name], value), (n, layer, name)
    # the momentum text encoder's doubled layers come from the pretrained momentum layers
    assert torch.equal(model.text_encoder_m.bert.encoder.layer[5].intermediate.dense.weight,
                       pretrained.text_encoder_m.bert.encoder.layer[3].intermediate.dense.weight)


def test_a_pair_shares_its_cross_attention_keys_and_values_only():
    model = get_task(tiny("nlvr2")).build_inference_model()
    layers = model.text_encoder.bert.encoder.layer
    for first in (2, 4):
        a, b = layers[first].crossattention, layers[first + 1].crossattention
        assert a.self.key.weight is b.self.key.weight and a.self.value.bias is b.self.value.bias
        assert a.self.query.weight is not b.self.query.weight and a.output.dense.weight is not b.output.dense.weight
        assert layers[first].intermediate.dense.weight is not layers[first + 1].intermediate.dense.weight
    assert layers[3].crossattention.self.key.weight is not layers[4].crossattention.self.key.weight
    state = model.state_dict()
    assert "text_encoder.bert.encoder.layer.3.crossattention.self.key.weight" in state       # listed twice,
    names = dict(model.named_parameters())                                                    # named once
    assert "text_encoder.bert.encoder.layer.2.crossattention.self.key.weight" in names
    assert "text_encoder.bert.encoder.layer.3.crossattention.self.key.weight" not in names


def test_fusion_layers_alternate_between_the_two_images():
    """Every call of a pair's shared key projection sees the image of its layer: 0, 1, 0, 1."""
    model = get_task(tiny("nlvr2")).build_inference_model().eval()
    seen = []
    hooks = [model.text_encoder.bert.encoder.layer[n].crossattention.self.key.register_forward_hook(
        lambda module, args, out: seen.append(args[0])) for n in (3, 5)]
    image0, image1 = images(2, 1), images(2, 2)
    ids, mask = texts(2)
    with torch.no_grad():
        tokens0, tokens1 = model.image_embeds(image0), model.image_embeds(image1)
        model.logits(image0, image1, ids, mask)
    for hook in hooks:
        hook.remove()
    assert len(seen) == 4
    for got, want in zip(seen, (tokens0, tokens1, tokens0, tokens1)):
        torch.testing.assert_close(got, want)


def test_doubled_model_matches_the_loop_reference_and_the_order_of_the_images_matters():
    cfg = tiny("nlvr2")
    model = get_task(cfg).build_inference_model().eval()
    released = {k.replace("text_encoder.bert.", "text_encoder."): v for k, v in model.state_dict().items()}
    image0, image1 = images(3, 1), images(3, 2)
    ids, mask = texts(3)
    mask[1, 6:] = 0
    with torch.no_grad():
        got = model.logits(image0, image1, ids, mask)
        swapped = model.logits(image1, image0, ids, mask)
        cls = model.fused_cls(model.split_images(torch.cat([image0, image1]), 2), ids, mask)
    torch.testing.assert_close(got, reference.logits(released, [image0, image1], ids, mask, cfg.model),
                               rtol=1e-4, atol=1e-5)
    # the [CLS] itself, layer by layer
    with torch.no_grad():
        embeds = [reference.vit(released, i, 8, 4) for i in (image0, image1)]
        want = reference.bert(released, ids, mask, embeds, 2, 4)[:, 0]
    torch.testing.assert_close(cls, want, rtol=1e-4, atol=1e-5)
    assert (got - swapped).abs().max() > 1e-3
    with torch.no_grad():           # routing both layers of a pair to one image is another model
        same = reference.bert(released, ids, mask, [embeds[0]], 2, 4)[:, 0]
    assert (cls - same).abs().max() > 1e-3


def test_double_fusion_layers_maps_keys_and_leaves_a_doubled_state_alone():
    t = tiny("nlvr2").model.text
    state = {"text_encoder.bert.encoder.layer.1.output.dense.weight": torch.ones(1),
             "text_encoder.bert.encoder.layer.2.crossattention.self.key.weight": torch.full((1,), 2.0),
             "text_encoder_m.bert.encoder.layer.3.intermediate.dense.bias": torch.full((1,), 3.0),
             "visual_encoder.blocks.3.attn.qkv.weight": torch.zeros(1)}
    doubled = double_fusion_layers(state, t)
    assert sorted(doubled) == sorted([
        "text_encoder.bert.encoder.layer.1.output.dense.weight",
        "text_encoder.bert.encoder.layer.2.crossattention.self.key.weight",
        "text_encoder.bert.encoder.layer.3.crossattention.self.key.weight",
        "text_encoder_m.bert.encoder.layer.4.intermediate.dense.bias",
        "text_encoder_m.bert.encoder.layer.5.intermediate.dense.bias",
        "visual_encoder.blocks.3.attn.qkv.weight"])
    assert doubled["text_encoder_m.bert.encoder.layer.5.intermediate.dense.bias"].item() == 3.0
    assert double_fusion_layers(doubled, t) == doubled


# ---- released layouts, conversion ------------------------------------------------------------

@pytest.mark.parametrize("task", TASKS)
def test_random_released_file_gives_the_loop_references_logits(tmp_path, task):
    cfg = tiny(task)
    released = reference.random_release(cfg.model, task)
    path = str(tmp_path / f"{task}.pth")
    torch.save({"model": released}, path)
    assert recognise_release(set(released)).name == task
    model = albef_ds.load_model(path, config=cfg)
    assert type(model) is get_task(cfg).inference_class
    count = model.images_per_text
    batch = [images(3, seed) for seed in range(count)]
    ids, mask = texts(3)
    mask[2, 5:] = 0
    with torch.no_grad():
        got = model.logits(*batch, ids, mask)
    assert got.shape == (3, {"nlvr2": 2, "snli_ve": 3, "nlvr2_ta": 3}[task])
    torch.testing.assert_close(got, reference.logits(released, batch, ids, mask, cfg.model), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("task", TASKS)
def test_released_layout_round_trips_through_ours(tmp_path, task, capsys):
    cfg = tiny(task)
    released = reference.random_release(cfg.model, task, seed=1)
    original, ours, back = (str(tmp_path / n) for n in ("released.pth", "ours.safetensors", "back.pth"))
    torch.save({"model": released}, original)
    yaml = tmp_path / "cfg.yaml"
    yaml.write_text(json.dumps(cfg.to_dict()))
    assert convert_cli.main(["--input", original, "--output", ours, "--config", str(yaml)]) == 0
    assert convert_cli.main(["--input", ours, "--output", back, "--to", "albef"]) == 0
    again = torch.load(back)["model"]
    assert set(again) == set(released)
    for key, value in released.items():
        assert again[key].dtype == value.dtype and torch.equal(again[key], value), key
    state = read_checkpoint(ours).state_dict          # ours: `bert.` infix, shared keys stored once
    assert "text_encoder.bert.embeddings.word_embeddings.weight" in state
    if task != "snli_ve":
        assert "text_encoder.bert.encoder.layer.3.crossattention.self.key.weight" not in state
    capsys.readouterr()


def test_a_two_image_checkpoint_cannot_start_a_one_image_task(tmp_path):
    released = reference.random_release(tiny("nlvr2").model, "nlvr2")
    path = str(tmp_path / "nlvr.pth")
    torch.save({"model": released}, path)
    with pytest.raises(ValueError, match="nlvr2 checkpoint has doubled fusion layers.*snli_ve starts"):
        read_checkpoint(path, config=tiny("snli_ve", f"model.init_checkpoint={path}"))


# ---- objectives ----------------------------------------------------------------------------------

def test_classification_loss_is_albefs_distilled_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, logits_m = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    labels = torch.tensor([0, 2, 1, 1, 0])
    ce = torch.nn.functional.cross_entropy(logits, labels)
    loss, acc = objectives.classification(logits, labels)
    assert torch.equal(loss, ce) and acc.item() == (logits.argmax(1) == labels).float().mean().item()
    loss, _ = objectives.classification(logits, labels, logits_m, 0.4)
    soft = -(logits.log_softmax(1) * logits_m.softmax(1)).sum(1).mean()
    torch.testing.assert_close(loss, 0.6 * ce + 0.4 * soft)


def test_text_assignment_draws_classes_as_albef_and_never_pairs_an_image_with_itself():
    n, rows = 12, 4000
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(rows, n, generator=g) * 3
    own = torch.randint(0, n, (rows,), generator=g)
    uniforms = torch.rand(4, rows, generator=g)
    slot0, slot1, labels = objectives.assign_text(sim, own, uniforms)
    share = torch.bincount(labels, minlength=3).float() / rows
    torch.testing.assert_close(share, torch.tensor([1 / 3, 1 / 3, 1 / 3]), atol=0.03, rtol=0)
    assert (slot0 != slot1).all()
    assert (slot0[labels == 0] == own[labels == 0]).all() and (slot1[labels == 0] != own[labels == 0]).all()
    assert (slot1[labels == 1] == own[labels == 1]).all() and (slot0[labels == 1] != own[labels == 1]).all()
    assert ((slot0 != own) & (slot1 != own))[labels == 2].all()
    # the other image follows softmax(sim) over the other images: the most similar one is drawn most
    row_sim = sim.clone()
    row_sim[torch.arange(rows), own] = -1e9
    first = torch.where(labels == 0, slot1, slot0)
    assert (first == row_sim.argmax(1)).float().mean() > 0.3
    # a row's draw depends on its own numbers only: any split of the rows draws the same
    part = slice(1000, 1500)
    got = objectives.assign_text(sim[part], own[part], uniforms[:, part])
    for a, b in zip(got, (slot0, slot1, labels)):
        assert torch.equal(a, b[part])


def test_training_forward_of_each_task_and_its_metrics():
    for task in TASKS:
        cfg = tiny(task, "model.alpha=0.4")
        model = get_task(cfg).build_model()
        ids, mask = texts(6)
        if task == "nlvr2_ta":
            batch = {"image": images(6), "input_ids": ids, "attention_mask": mask}
            keys = {"loss_ta", "ta_acc"}
        else:
            batch = {"images": torch.stack([images(6, s) for s in range(model.images_per_text)], 1),
                     "input_ids": ids, "attention_mask": mask, "label": torch.arange(6) % model.classes}
            keys = {"loss_cls", "acc", "alpha"}
        loss, metrics = model(batch, StepContext(5, 10, torch.Generator().manual_seed(0)))
        assert set(metrics) == keys and torch.isfinite(loss)
        if task == "nlvr2":
            assert metrics["alpha"] == pytest.approx(0.2)          # ramped over the first epoch
        if task == "snli_ve":
            assert metrics["alpha"] == 0.4
        loss.backward()
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad), task
        if task == "nlvr2_ta":
            assert {"vision_proj.weight", "text_proj.weight", "temp"} <= frozen
        else:
            assert {n.split(".")[0] for n in frozen} == {"visual_encoder_m", "text_encoder_m", "cls_head_m", "text_encoder"}


def test_nlvr_training_logits_are_the_inference_logits():
    cfg = tiny("nlvr2")
    model = get_task(cfg).build_model().eval()
    image0, image1 = images(4, 1), images(4, 2)
    ids, mask = texts(4)
    labels = torch.tensor([0, 1, 1, 0])
    batch = {"images": torch.stack([image0, image1], 1), "input_ids": ids, "attention_mask": mask, "label": labels}
    with torch.no_grad():
        loss, _ = model(batch, StepContext(0, 1), alpha=0.0)
        logits = model.logits(image0, image1, ids, mask)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, labels))


# ---- data, evaluation, bad input ---------------------------------------------------------------

def png(colour, size=16) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(out, format="PNG")
    return out.getvalue()


def write_nlvr_files(root, entries, name="nlvr_dev.json"):
    for entry in entries:
        for i, image in enumerate(entry["images"]):
            if image.startswith("missing"):
                continue
            with open(os.path.join(root, image), "wb") as f:
                f.write(b"not an image" if image.startswith("corrupt") else png((40 * i, 90, 200)))
    path = os.path.join(root, name)           # a new name: annotation files are read once per process
    with open(path, "w") as f:
        json.dump(entries, f)
    return path


NLVR_ENTRIES = [{"images": [f"a{i}.png", f"b{i}.png"], "sentence": "both images have red circles",
                 "label": "True" if i % 2 else "False"} for i in range(5)]


def test_codec_reads_both_images_and_skips_a_sample_missing_or_corrupt_one(tmp_path):
    codec = LabelledCodec(build_tokenizer("tiny_vocab.txt"), EvalTransform(32), 30, 16, 2, NLVR_LABELS)
    write_nlvr_files(tmp_path, NLVR_ENTRIES[:1] + [{"images": ["a9.png", "corrupt.png"]}])
    rng = random.Random(0)
    sample = codec.decode(annotation_sample("k", NLVR_ENTRIES[0], str(tmp_path)), "k", rng)
    assert sample["images"].shape == (2, 3, 32, 32) and sample["label"] == 0
    assert not torch.equal(sample["images"][0], sample["images"][1])
    batch = codec.collate([sample, sample], ["k", "k"])
    assert batch["images"].shape == (2, 2, 3, 32, 32) and batch["label"].tolist() == [0, 0]
    entry = dict(NLVR_ENTRIES[0], images=["a0.png", "missing.png"])
    assert codec.decode(annotation_sample("k", entry, str(tmp_path)), "k", rng) == "missing_image"
    entry = dict(NLVR_ENTRIES[0], images=["a0.png", "corrupt.png"])
    assert codec.decode(annotation_sample("k", entry, str(tmp_path)), "k", rng) == "corrupt_image"
    entry = dict(NLVR_ENTRIES[0], sentence="")
    assert codec.decode(annotation_sample("k", entry, str(tmp_path)), "k", rng) == "empty_caption"
    entry = dict(NLVR_ENTRIES[0], label="Maybe")
    with pytest.raises(LabelError, match="sample corpus/x-00000/000000007: label 'Maybe' is not one of False, True"):
        codec.decode(annotation_sample("k", entry, str(tmp_path)), "corpus/x-00000/000000007", rng)


@pytest.mark.parametrize("task", ["nlvr2", "snli_ve"])
def test_training_codec_crops_as_albefs_fine_tuning_and_as_data_crop_scale_says(task):
    tokenizer = build_tokenizer("tiny_vocab.txt")
    assert get_task(load_config(task)).codec(tokenizer, train=True).transform.crop_scale == (0.5, 1.0)
    cfg = load_config(f"tiny_{task}", ["data.augment=true", "data.crop_scale=[0.3, 0.9]"])   # tiny: no augmentation
    assert get_task(cfg).codec(tokenizer, train=True).transform.crop_scale == (0.3, 0.9)
    assert isinstance(get_task(cfg).codec(tokenizer, train=False).transform, EvalTransform)


def test_ve_labels_are_albefs_ids():
    assert VE_LABELS == {"contradiction": 0, "neutral": 1, "entailment": 2}


def test_evaluation_skips_and_counts_missing_and_corrupt_images(tmp_path):
    entries = [dict(e) for e in NLVR_ENTRIES]
    entries[1]["images"] = ["a1.png", "missing1.png"]
    entries[3]["images"] = ["corrupt3.png", "b3.png"]
    path = write_nlvr_files(tmp_path, entries)
    data = read_labelled_set(path, NLVR_LABELS, 2, str(tmp_path))
    assert len(data.images) == 4 and data.skipped == {"missing_image": 1}
    model = get_task(tiny("nlvr2")).build_inference_model().eval()
    tok = build_tokenizer("tiny_vocab.txt")
    predictions = predict(model, data, tok, 64, 16, batch_size=2)
    assert predictions.tolist()[2] == -1 and all(p in (0, 1) for i, p in enumerate(predictions.tolist()) if i != 2)
    out = evaluate_classification(model, data, tok, 64, 16, batch_size=2)
    assert out["samples"] == 5 and out["evaluated"] == 3
    assert out["skipped_missing_image"] == 1 and out["skipped_corrupt_image"] == 1 and out["skipped_empty_caption"] == 0
    right = [p == y for i, (p, y) in enumerate(zip(predictions.tolist(), data.labels)) if i != 2]
    assert data.labels == [0, 0, 1, 0] and out["acc"] == pytest.approx(100 * sum(right) / 3)


def test_unknown_label_word_stops_evaluation_naming_it(tmp_path):
    entries = [dict(e) for e in NLVR_ENTRIES]
    entries[2]["label"] = "true"
    path = write_nlvr_files(tmp_path, entries)
    with pytest.raises(LabelError, match=r"nlvr_dev.json entry 2: label 'true' is not one of False, True"):
        read_labelled_set(path, NLVR_LABELS, 2, str(tmp_path))


def save_inference_file(task, path):
    cfg = tiny(task)
    model = get_task(cfg).build_model()
    from albef_ds.checkpoint.files import save_albef_ds
    from albef_ds.checkpoint.layout import layout_of
    layout = layout_of(model)
    save_albef_ds(path, {k: v for k, v in model.state_dict().items() if k not in layout.aliases}, cfg, layout)
    return model


def test_evaluate_command_reports_accuracy_and_refuses_another_tasks_checkpoint(tmp_path, capsys):
    entries = [dict(e) for e in NLVR_ENTRIES]
    entries[0]["images"] = ["a0.png", "missing0.png"]
    data = write_nlvr_files(tmp_path, entries)
    nlvr, ve = str(tmp_path / "nlvr.pt"), str(tmp_path / "ve.safetensors")
    model = save_inference_file("nlvr2", nlvr)
    save_inference_file("snli_ve", ve)
    out = tmp_path / "eval"
    assert evaluate_main(["nlvr2", "--checkpoint", nlvr, "--data", data, "--image_root", str(tmp_path),
                          "--output_dir", str(out), "--batch_size", "3"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == 5 and metrics["evaluated"] == 4 and metrics["skipped_missing_image"] == 1
    tok = build_tokenizer("tiny_vocab.txt")
    set_ = read_labelled_set(data, NLVR_LABELS, 2, str(tmp_path))
    assert metrics["acc"] == evaluate_classification(model.eval(), set_, tok, 64, 30)["acc"]
    assert "nlvr2: accuracy" in capsys.readouterr().out
    assert evaluate_main(["nlvr2", "--checkpoint", ve, "--data", data, "--image_root", str(tmp_path),
                          "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{ve} holds a VEClassifier, not the NLVRClassifier that `evaluate nlvr2` needs" in err
    entries[1]["label"] = "yes"
    data = write_nlvr_files(tmp_path, entries, "nlvr_test.json")
    assert evaluate_main(["nlvr2", "--checkpoint", nlvr, "--data", data, "--image_root", str(tmp_path),
                          "--output_dir", str(out)]) == 2
    assert "entry 1: label 'yes' is not one of False, True" in capsys.readouterr().err


def test_training_refuses_an_annotation_file_with_an_unknown_label(tmp_path):
    from albef_ds.config import ConfigError
    entries = [dict(e) for e in NLVR_ENTRIES]
    entries[4]["label"] = "Unknown"
    path = write_nlvr_files(tmp_path, entries)
    cfg = tiny("nlvr2", f"data.corpora=[{{annotations: [{path}], image_root: {tmp_path}}}]")
    with pytest.raises(ConfigError, match="entry 4: label 'Unknown' is not one of False, True"):
        get_task(cfg).check(1)
