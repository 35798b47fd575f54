"""Grounding, end to end: the evaluation on 2 gloo ranks equals one process (and the command line
equals the library); docs/grounding.md's commands, run as written (output/ in a temporary folder,
the machine's own thread count), give the doc's table: the tiny pretrained checkpoint, fine-tuned
for grounding on the generated corpus, picks the referred shape's proposal by ITM Grad-CAM (ALBEF's
mode) far more often than the baselines and than before fine-tuning, and draws its pictures."""
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
    # one of the 23 images is broken on purpose: a share of the set allowed to be skipped
    assert main(["grounding", "--checkpoint", os.path.join(folder, "tiny.pt"), "--data", os.path.join(folder, "test.json"),
                 "--dets", corpus["dets"], "--image_root", corpus["image_root"], "--output_dir", out_dir,
                 "--config", "tiny", "--batch_size", "5", "--gradcam_layer", "2", "--max_skipped", "0.1"]) == 0
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
    assert reference["itm"]["skipped_by_reason"]["unreadable_image"] == 1 and reference["itm"]["expressions"] == 22
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


# ---- learning ----------------------------------------------------------------------------------

DOC = "docs/grounding.md"
# Bars: the number the doc's commands gave on the 2-core machine (2 threads, train.seed 42) less
# its spread (max - min) over train.seed 42, 0, 1 at 2 and 1 threads (45.72 to 75.66 for ITM),
# measured by
#   python tools/doc_proofs.py docs/grounding.md --out output/spread_grounding --seeds 42 0 1 --threads 2 1
# (every run's numbers: docs/grounding.md). Measured 74.01 - spread 29.93; 94.41 - 14.47; 42.43 - 9.54.
BARS = {("fine-tuned, ITM Grad-CAM", "accuracy"): 44.08,
        ("fine-tuned, ITM Grad-CAM", "heat on the referred box"): 79.94,
        ("fine-tuned, ITC Grad-CAM", "accuracy"): 32.89}
# What fine-tuning adds to the starting checkpoint's ITM accuracy (4.28%), at least: the ITM bar's
# gain (measured 69.73 points less the spread 29.93).
ITM_GAIN = 39.80
# How far this run's numbers may lie from the doc's table: each number's spread over those runs
# (another CPU rounds otherwise, which moves a run as another seed does), and at least a point
# (the evaluations of the pretrained checkpoint, the same in every run there).
TOLERANCE = {("fine-tuned, ITM Grad-CAM", "accuracy"): 29.93, ("fine-tuned, ITM Grad-CAM", "testA"): 32.14,
             ("fine-tuned, ITM Grad-CAM", "testB"): 28.65, ("fine-tuned, ITM Grad-CAM", "heat on the referred box"): 14.47,
             ("fine-tuned, ITC Grad-CAM", "accuracy"): 9.54, ("fine-tuned, ITC Grad-CAM", "testA"): 14.29,
             ("fine-tuned, ITC Grad-CAM", "testB"): 6.77, ("fine-tuned, ITC Grad-CAM", "heat on the referred box"): 4.93}
FLOOR = 1.0


def test_the_documented_commands_ground_expressions_through_itm_far_above_the_baselines(tmp_path):
    from helpers import png_size, tool

    proofs = tool("doc_proofs")
    got = proofs.run(DOC, str(tmp_path))
    print(json.dumps(got, indent=1))
    best_baseline = max(got["a random proposal (expected)"]["accuracy"], got["the largest proposal"]["accuracy"])
    tuned, start = got["fine-tuned, ITM Grad-CAM"], got["pretrained, ITM Grad-CAM"]
    # ALBEF's grounding, ITM Grad-CAM: twice the better baseline, and what fine-tuning adds
    assert tuned["accuracy"] >= 2 * best_baseline, got
    assert tuned["accuracy"] >= start["accuracy"] + ITM_GAIN, got
    for (row, column), bar in BARS.items():
        assert got[row][column] >= bar, (row, column, bar, got)
    metrics = json.loads((tmp_path / "grounding_eval" / "finetuned_itm" / "metrics.json").read_text())
    assert metrics["expressions"] == 304 and set(metrics["counts"]) == {"testA", "testB"}
    # the training run's own evaluation (ITM mode, the val file) ran after each whole epoch of 254
    # steps: 4 in its 1,200 steps
    with open(tmp_path / "tiny_grounding" / "metrics.jsonl") as f:
        assert [r["step"] for r in map(json.loads, f) if "eval/acc" in r] == [254, 508, 762, 1016]
    # the pictures of the doc's last commands: per expression the sentence map, the word panels, the ITC map
    pictures = sorted((tmp_path / "pictures").iterdir())
    assert len(pictures) == 6 and all(png_size(p) for p in pictures), pictures
    moved = proofs.differences(got, proofs.table(DOC), TOLERANCE, FLOOR)
    assert not moved, moved
