"""Grounding, end to end: the evaluation on 2 gloo ranks equals one process (and the command line
equals the library); the tiny pretrained model, fine-tuned for grounding on the generated corpus,
picks the referred shape's proposal far more often than the baselines, and its heat map lies on the
named shape. See docs/grounding.md for the recorded numbers."""
import json
import os

import pytest
import torch
from helpers import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from albef_ds.synthetic.grounding import write_grounding_corpus

    return write_grounding_corpus(str(tmp_path_factory.mktemp("grounding")))


# ---- ranks -----------------------------------------------------------------------------------------

def _evaluate(rank, world, folder, corpus):
    from helpers import tiny_albef

    from albef_ds.eval.grounding import evaluate_grounding, read_grounding_set
    from albef_ds.evaluate import main
    from albef_ds.tokenizer import build_tokenizer

    model = tiny_albef()
    tok = build_tokenizer(model.cfg.text.tokenizer)
    data = read_grounding_set(corpus["test"], corpus["dets"], corpus["image_root"])
    data.expressions = data.expressions[:23]
    data.expressions[7].image = os.path.join(folder, "broken.png")          # held by rank 1 in batches of 5
    out = {mode: evaluate_grounding(model, data, tok, 64, 16, mode, layer, batch_size=5)
           for mode, layer in (("itm", 2), ("itc", 3))}
    out_dir = os.path.join(folder, f"out{world}")
    main(["grounding", "--checkpoint", os.path.join(folder, "tiny.pt"), "--data", os.path.join(folder, "test.json"),
          "--dets", corpus["dets"], "--image_root", corpus["image_root"], "--output_dir", out_dir,
          "--config", "tiny", "--batch_size", "5", "--gradcam_layer", "2"])
    if world == 1:              # retrieval's pictures of the top images, on the same checkpoint
        main(["retrieval", "--checkpoint", os.path.join(folder, "tiny.pt"), "--data",
              os.path.join(folder, "captions.json"), "--image_root", corpus["image_root"], "--output_dir",
              os.path.join(folder, "show"), "--config", "tiny", "--k_test", "4", "--show", "3"])
    if rank > 0:
        return out, None
    files = {name: json.load(open(os.path.join(out_dir, name))) for name in ("metrics.json", "predictions.json")}
    return out, files


def test_two_ranks_equal_one_process_and_the_command_line(corpus, tmp_path):
    from helpers import png_size, tiny_albef

    from albef_ds.checkpoint.files import save_albef_ds
    from albef_ds.checkpoint.layout import layout_of
    from albef_ds.config import load_config
    from albef_ds.pictures import PANEL, grid_size

    model = tiny_albef()
    layout = layout_of(model)
    save_albef_ds(str(tmp_path / "tiny.pt"), {k: v for k, v in model.state_dict().items() if k in layout.keys},
                  load_config("tiny"), layout)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    entries = json.load(open(corpus["test"]))[:23]
    entries[7] = dict(entries[7], image=str(tmp_path / "broken.png"))
    (tmp_path / "test.json").write_text(json.dumps(entries))
    captions = {}
    for e in json.load(open(corpus["val"])):
        captions.setdefault(e["image"], []).append(e["text"])
    (tmp_path / "captions.json").write_text(json.dumps([{"image": i, "caption": c} for i, c in captions.items()]))

    ((reference, files),) = run_ranks(_evaluate, 1, str(tmp_path), corpus)
    assert reference["itm"]["skipped"]["unreadable_image"] == 1 and reference["itm"]["expressions"] == 22
    ranks = run_ranks(_evaluate, 2, str(tmp_path), corpus)
    for out, _ in ranks:
        for mode in ("itm", "itc"):
            torch.testing.assert_close(out[mode].pop("predictions"), reference[mode]["predictions"], rtol=0, atol=0,
                                       equal_nan=True)
            assert out[mode] == {k: v for k, v in reference[mode].items() if k != "predictions"}
    # the command line: the library's numbers, a prediction per expression, the same on 2 ranks
    metrics, predictions = files["metrics.json"], files["predictions.json"]
    want = {k: v for k, v in reference["itm"].items() if k != "predictions"}
    assert {k: metrics[k] for k in want} == want
    assert [p["ref_id"] for p in predictions] == [e["ref_id"] for e in entries]
    assert predictions[7] == {"ref_id": entries[7]["ref_id"], "skipped": True}
    assert ranks[0][1] == files
    # retrieval --show: a picture of the top-5 images for each of 3 queries
    shown = sorted((tmp_path / "show" / "show").iterdir())
    assert len(shown) == 3 and all(png_size(p) == grid_size((PANEL, PANEL), 5, bar=False, columns=5) for p in shown)


# ---- learning --------------------------------------------------------------------------------------

def _finetune(rank, world, out_dir, corpus, checkpoint):
    import time

    from PIL import Image

    import albef_ds
    from albef_ds.config import load_config
    from albef_ds.engine import Trainer
    from albef_ds.eval.grounding import evaluate_grounding, heat_on_box, proposal_baselines, read_grounding_set
    from albef_ds.eval.heat_maps import heat_maps
    from albef_ds.models.gradcam import resize_map
    from albef_ds.tokenizer import build_tokenizer
    from albef_ds.visualize import write_heat_pictures

    started, cpu = time.perf_counter(), time.process_time()
    tok = build_tokenizer("tiny_vocab.txt")
    heldout = read_grounding_set(corpus["test"], corpus["dets"], corpus["image_root"])

    def measure(model):
        out = evaluate_grounding(model, heldout, tok, 64, 16, "itc", batch_size=32)
        out.pop("predictions")
        return out

    result = {"baselines": proposal_baselines(heldout), "pretrained": measure(albef_ds.load_model(checkpoint))}
    cfg = load_config("tiny_grounding", [
        f"model.init_checkpoint={checkpoint}",
        f"data.corpora=[{{name: g, annotations: [{corpus['train']}], image_root: {corpus['image_root']}}}]",
        f"eval.data=[{corpus['val']}]", f"eval.image_root={corpus['image_root']}", f"grounding.dets={corpus['dets']}"])
    trainer = Trainer(cfg, os.path.join(ROOT, "ds_configs", "zero2.json"), out_dir)
    result["exit_code"] = trainer.train()
    trained = time.perf_counter()
    model = trainer.engine.module
    result["finetuned"] = measure(model)
    # the pictures of the first held-out expression: the ITC map the test asserts on, the ITM word panels
    first = heldout.expressions[0]
    image = Image.open(first.image)
    folder = os.path.join(out_dir, "pictures")
    result["pictures"] = (write_heat_pictures(model, tok, image, [first.text], folder, "heldout", "itc", 16)
                          + write_heat_pictures(model, tok, image, [first.text], folder, "heldout", "itm", 16))
    sentence = heat_maps(model, tok, image, first.text, "itc", 16).sentence
    result["pictured_heat_on_box"] = heat_on_box(resize_map(sentence, image.height, image.width), first.box)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        result["evaluations"] = [r for r in map(json.loads, f) if "eval/acc" in r]
    result.update(steps=trainer.state.step, train_s=trained - started, total_s=time.perf_counter() - started,
                  cpu_s=time.process_time() - cpu)
    trainer.close()
    return result


def test_finetuning_grounds_expressions_far_above_the_baselines(corpus, tiny_pretrained, tmp_path):
    from helpers import png_size

    out = run_ranks(_finetune, 1, str(tmp_path), corpus, tiny_pretrained)[0]
    print(json.dumps(out, indent=1, default=str))
    assert out["exit_code"] == 0 and out["steps"] == 600
    best_baseline = max(out["baselines"].values())
    tuned, pretrained = out["finetuned"], out["pretrained"]
    assert tuned["acc"] >= 2 * best_baseline, out
    assert tuned["acc"] > pretrained["acc"], out
    assert tuned["expressions"] == 304 and set(tuned["counts"]) == {"testA", "testB"}
    # the training run's own evaluation (the task's evaluator on the val file) ran each epoch
    assert len(out["evaluations"]) == 2 and out["evaluations"][-1]["eval/acc"] >= 2 * best_baseline
    # the pictures: valid PNGs, and the heat lies on the named shape
    assert len(set(out["pictures"])) == 3 and all(png_size(p) for p in out["pictures"])
    assert out["pictured_heat_on_box"]
    assert tuned["heat_on_box"] >= 75.0, out
