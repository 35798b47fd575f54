"""Proof of learning: docs/retrieval.md's commands, run as written (output/ in a temporary folder,
the machine's own thread count): the tiny ALBEF, pretrained from scratch on the generated shapes
corpus by the demo (DeepSpeed ZeRO-2, one CPU process), aligns images with their captions on
held-out samples and reads the colour word from the image, and gives the doc's table of numbers.
Also: the shipped tiny pretrained checkpoints are today's architecture and read what their doc
says."""
import json

from helpers import tool

DOC = "docs/retrieval.md"
ROW = "pretrained from scratch"
R1_CHANCE, COLOUR_CHANCE = 100 / 256, 100 / 6          # 256 held-out images; six colours
# Bars: the number the doc's command gave on the 2-core machine (2 threads, train.seed 42) less its
# spread (max - min) over train.seed 42, 0, 1 at 2 threads and 42 at 1 thread, measured by
#   python tools/doc_proofs.py docs/retrieval.md --out output/spread_retrieval --runs 2:42 2:0 2:1 1:42
# (every run's numbers: docs/retrieval.md), rounded down to the hundredth. Measured 23.44 - 5.08,
# 16.41 - 8.59, 92.38 - 1.17, 100.00 - 0.39. The shape word stays near chance (docs/retrieval.md):
# reported, not barred.
BARS = {"text -> image R@1": 18.35, "image -> text R@1": 7.81, "ITM accuracy": 91.21, "masked colour word": 99.60}
# How far this run's numbers may lie from the doc's table: each number's spread over those runs
# (another CPU rounds otherwise, which moves a run as another seed does), rounded up to the
# hundredth, plus the table's rounding; at least a point.
TOLERANCE = {(ROW, "text -> image R@1"): 5.09, (ROW, "image -> text R@1"): 8.61, (ROW, "ITM accuracy"): 1.19,
             (ROW, "masked colour word"): 0.41, (ROW, "masked colour word, images shuffled"): 1.58,
             (ROW, "masked shape word"): 5.09, (ROW, "masked shape word, images shuffled"): 3.14}
FLOOR = 1.0


def test_the_documented_pretraining_aligns_images_and_captions_from_scratch(tmp_path):
    proofs = tool("doc_proofs")
    got = proofs.run(DOC, str(tmp_path))
    print(json.dumps(got, indent=1))
    run = got[ROW]
    for column, bar in BARS.items():
        assert run[column] >= bar, (column, bar, run)
    # the colour word is read from the image: with another sample's image it is a guess
    assert abs(run["masked colour word, images shuffled"] - COLOUR_CHANCE) <= 10.0, run
    assert run["text -> image R@1"] >= 10 * R1_CHANCE, run
    moved = proofs.differences(got, proofs.table(DOC), TOLERANCE, FLOOR)
    assert not moved, moved


def test_the_shipped_pretrained_checkpoint_fits_the_tiny_model_and_has_learned(tiny_pretrained, tmp_path):
    """tests/data/tiny_pretrained.safetensors (make tiny-pretrained) is the tiny architecture of
    today's config, and it aligns held-out images with their captions far above chance."""
    import dataclasses

    from albef_ds import load_model
    from albef_ds.checkpoint import read_checkpoint
    from albef_ds.config import load_config
    from albef_ds.eval.retrieval import evaluate_retrieval, read_shard_set
    from albef_ds.synthetic.shapes import write_synthetic_corpus
    from albef_ds.tokenizer import build_tokenizer

    tiny = load_config("tiny")
    stored = read_checkpoint(tiny_pretrained).config.model
    assert dataclasses.asdict(stored) == dataclasses.asdict(tiny.model.architecture_only())
    heldout = write_synthetic_corpus(str(tmp_path), dataclasses.replace(
        tiny.data.synthetic, train_samples=0, heldout_samples=64, seed=7))["heldout"]
    data = read_shard_set(heldout)
    model = load_model(tiny_pretrained)
    out = evaluate_retrieval(model, data, build_tokenizer(tiny.model.text.tokenizer), tiny.model.vision.img_size,
                             tiny.data.max_tokens, k_test=16, split_ranks=False)
    print({k: round(out[k], 2) for k in ("img_r1", "txt_r1", "r_mean")})
    # measured 45.31% (29 of 64; `pytest tests/learning/test_learning.py -k shipped -s`, 2026-12-06): a
    # fixed file, so only another CPU's rounding moves it; the bar allows three images less
    assert out["img_r1"] >= 100 * 26 / 64, out


def test_the_positions_checkpoint_reads_where_things_are(tiny_pretrained, tiny_pretrained_positions, tmp_path):
    """tests/data/tiny_pretrained_positions.safetensors (make tiny-pretrained-positions) is the tiny
    architecture with the sin-cos position start, and names the position of the shapes from the
    image (masked position word), where tiny_pretrained does no better than the caption alone."""
    import dataclasses

    from albef_ds import load_model
    from albef_ds.checkpoint import read_checkpoint
    from albef_ds.config import load_config
    from albef_ds.eval.retrieval import read_shard_set
    from albef_ds.synthetic.probe import attribute_probe
    from albef_ds.synthetic.shapes import write_synthetic_corpus
    from albef_ds.tokenizer import build_tokenizer

    tiny = load_config("tiny", ["model.vision.pos_embed_init=sincos"])
    stored = read_checkpoint(tiny_pretrained_positions).config.model
    assert dataclasses.asdict(stored) == dataclasses.asdict(tiny.model.architecture_only())
    heldout = write_synthetic_corpus(str(tmp_path), dataclasses.replace(
        tiny.data.synthetic, train_samples=0, heldout_samples=128, seed=7))["heldout"]
    data, tok = read_shard_set(heldout), build_tokenizer(tiny.model.text.tokenizer)
    probe = {name: attribute_probe(load_model(path), data, tok, tiny.model.vision.img_size, tiny.data.max_tokens)
             for name, path in (("positions", tiny_pretrained_positions), ("former", tiny_pretrained))}
    print(probe)
    position = probe["positions"]["position"]
    # measured 94.5% with the image, 27.3% with another (`pytest tests/learning/test_learning.py -k
    # positions -s`, 2026-12-06): a fixed file; the bar allows five of the 128 captions less
    assert position["image"] >= 90.0 and position["image"] >= 2 * position["other_image"], probe
    former = probe["former"]["position"]
    assert abs(former["image"] - former["other_image"]) <= 10.0, probe
    for checkpoint in probe.values():       # both name the colour from the image
        assert checkpoint["colour"]["image"] >= 90.0 and checkpoint["colour"]["other_image"] <= 35.0, probe
