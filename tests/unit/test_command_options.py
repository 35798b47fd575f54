"""Documented options of the command lines, each run through its command's main() in this process
and compared with the library call it stands for: `evaluate snli_ve`, `evaluate retrieval
--add_sim`, `evaluate grounding --mode itc --refer`, `visualize --mode itc --device cpu`.
(--trust_checkpoint and model.trust_init_checkpoint, refused and opted into: test_safe_loading.py; convert_checkpoint.py
--set: tests/integration/test_convert.py.)"""
import json
import os

import pytest
import torch
from helpers import shapes_set, tiny_albef, write_refer_folder

from albef_ds.checkpoint.files import save_albef_ds
from albef_ds.checkpoint.layout import layout_of
from albef_ds.config import load_config
from albef_ds.evaluate import main as evaluate_main
from albef_ds.tokenizer import build_tokenizer


def save_inference_file(model, cfg, path):
    layout = layout_of(model)
    save_albef_ds(str(path), {k: v for k, v in model.state_dict().items() if k in layout.keys and k not in layout.aliases},
                  cfg, layout)
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny ALBEF (random weights, eval mode) and its converted file."""
    model = tiny_albef()
    return model, save_inference_file(model, load_config("tiny"), tmp_path_factory.mktemp("tiny") / "tiny.pt")


def metrics_of(folder):
    with open(os.path.join(folder, "metrics.json")) as f:
        return json.load(f)


def as_written(metrics: dict) -> dict:
    """A library result as metrics.json holds it (JSON: tuples become lists, floats round-trip)."""
    return json.loads(json.dumps(metrics))


def test_evaluate_snli_ve_reports_the_evaluators_accuracy(tmp_path, capsys):
    from albef_ds.data.labelled import VE_LABELS
    from albef_ds.eval.classification import evaluate_classification, read_labelled_set
    from albef_ds.synthetic.ve import write_ve_shapes
    from albef_ds.tasks import get_task

    corpus = write_ve_shapes(str(tmp_path / "ve"), train=1, dev=1, test=9)
    cfg = load_config("tiny", ["task=snli_ve"])
    torch.manual_seed(0)
    model = get_task(cfg).build_model().eval()
    path = save_inference_file(model, cfg, tmp_path / "ve.pt")
    out = tmp_path / "eval"
    assert evaluate_main(["snli_ve", "--checkpoint", path, "--data", corpus["test"], "--image_root",
                          corpus["image_root"], "--output_dir", str(out), "--batch_size", "4"]) == 0
    metrics = metrics_of(out)
    data = read_labelled_set(corpus["test"], VE_LABELS, 1, corpus["image_root"])
    assert sorted(set(data.labels)) == [0, 1, 2]                      # all three classes are asked for
    want = evaluate_classification(model, data, build_tokenizer("tiny_vocab.txt"), 64, 30, batch_size=4)
    assert metrics["samples"] == metrics["evaluated"] == 9
    assert {k: metrics[k] for k in want} == as_written(want)
    assert f"snli_ve: accuracy {want['acc']:.2f}% on 9 of 9 samples" in capsys.readouterr().out


def test_evaluate_retrieval_add_sim_scores_itm_plus_similarity(tiny, tmp_path):
    """--add_sim reaches the evaluator: the recalls of evaluate_retrieval(add_sim=True), which on
    this set differ from ALBEF's ITM-only ranking."""
    from albef_ds.eval.recall import RECALL_KEYS
    from albef_ds.eval.retrieval import evaluate_retrieval

    model, path = tiny
    data = shapes_set(7)
    for i, png in enumerate(data.images):
        (tmp_path / f"{i}.png").write_bytes(png)
    (tmp_path / "test.json").write_text(json.dumps([{"image": f"{i}.png", "caption": c}
                                                    for i, c in enumerate(data.captions)]))
    tok = build_tokenizer(model.cfg.text.tokenizer)
    want = {add_sim: evaluate_retrieval(model, data, tok, 64, 30, k_test=4, batch_size=8, add_sim=add_sim)
            for add_sim in (True, False)}
    assert any(want[True][k] != want[False][k] for k in RECALL_KEYS)     # the option shows in the recalls
    assert evaluate_main(["retrieval", "--checkpoint", path, "--data", str(tmp_path / "test.json"), "--image_root",
                          str(tmp_path), "--output_dir", str(tmp_path / "eval"), "--k_test", "4", "--batch_size", "8",
                          "--add_sim"]) == 0
    metrics = metrics_of(tmp_path / "eval")
    assert metrics["add_sim"] is True
    assert {k: metrics[k] for k in want[True]} == as_written(want[True])


def test_evaluate_grounding_in_itc_mode_with_a_refer_folder(tiny, grounding_corpus, tmp_path):
    """ALBEF's grounding files carry no box or split: --refer's refs(unc).p and instances.json give
    them; --mode itc takes ITC Grad-CAM at its default ViT block. The metrics and every prediction
    are evaluate_grounding's on the generated corpus's own entries (which carry their boxes)."""
    from albef_ds.eval.grounding import evaluate_grounding, read_grounding_set
    from albef_ds.models.gradcam import default_gradcam_layer

    model, path = tiny
    entries = json.load(open(grounding_corpus["test"]))
    (tmp_path / "bare.json").write_text(json.dumps([{"image": e["image"], "text": e["text"], "ref_id": e["ref_id"]}
                                                    for e in entries]))
    refer = write_refer_folder(tmp_path / "refcoco+", entries, 500)
    out = tmp_path / "eval"
    assert evaluate_main(["grounding", "--checkpoint", path, "--data", str(tmp_path / "bare.json"), "--refer", refer,
                          "--dets", grounding_corpus["dets"], "--image_root", grounding_corpus["image_root"],
                          "--output_dir", str(out), "--mode", "itc", "--batch_size", "5"]) == 0
    metrics = metrics_of(out)
    data = read_grounding_set(grounding_corpus["test"], grounding_corpus["dets"], grounding_corpus["image_root"])
    want = evaluate_grounding(model, data, build_tokenizer(model.cfg.text.tokenizer), 64, 30, "itc", batch_size=5)
    predictions = want.pop("predictions")
    assert metrics["mode"] == "itc" and metrics["layer"] == default_gradcam_layer(model.cfg, "itc")
    assert metrics["expressions"] == len(entries) and set(metrics["counts"]) == {e["split"] for e in entries}
    assert {k: metrics[k] for k in want} == as_written(want)
    rows = json.loads((out / "predictions.json").read_text())
    assert [r["ref_id"] for r in rows] == [e.ref_id for e in data.expressions]
    for row, p in zip(rows, predictions.tolist()):
        assert row["box"] == [round(v, 2) for v in p[:4]] and row["iou"] == round(p[4], 4)


def test_visualize_itc_mode_on_the_cpu(tiny, grounding_corpus, tmp_path, monkeypatch):
    """--mode itc draws the ITC Grad-CAM pictures write_heat_pictures draws (byte for byte), and
    --device goes to the model loading."""
    from albef_ds import visualize
    from albef_ds.data.samples import decode_image
    from albef_ds.models.gradcam import default_gradcam_layer

    model, path = tiny
    image = os.path.join(grounding_corpus["image_root"], "images", "000020.png")
    loaded = {}
    real_load = visualize.load_model
    monkeypatch.setattr(visualize, "load_model", lambda *a, **k: loaded.update(k) or real_load(*a, **k))
    out = tmp_path / "out"
    assert visualize.main(["--checkpoint", path, "--image", image, "--text", "the red circle", "--output_dir", str(out),
                           "--mode", "itc", "--device", "cpu"]) == 0
    assert loaded["device"] == "cpu"
    want = tmp_path / "want"
    want.mkdir()
    paths = visualize.write_heat_pictures(model, build_tokenizer(model.cfg.text.tokenizer), decode_image(image),
                                          ["the red circle"], str(want), "000020", "itc", 30,
                                          default_gradcam_layer(model.cfg, "itc"))
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in paths) and paths
    for p in paths:
        assert (out / os.path.basename(p)).read_bytes() == open(p, "rb").read(), p
