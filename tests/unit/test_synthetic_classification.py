"""The generated NLVR-shapes and VE-shapes corpora: ALBEF's file formats, labels that the pictures
make true (checked on the pixels), labels independent of the sentence, deterministic files, and the
images-shuffled baseline."""
import json
import os
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from albef_ds.data.labelled import NLVR_LABELS, VE_LABELS, check_labels
from albef_ds.data.samples import entry_images
from albef_ds.synthetic.labelled import write_shuffled_images
from albef_ds.synthetic.nlvr import write_nlvr_shapes
from albef_ds.synthetic.shapes import COLOURS
from albef_ds.synthetic.ve import COVER, write_ve_shapes

SIZES = dict(train=600, dev=20, test=20)


@pytest.fixture(scope="module")
def nlvr(tmp_path_factory):
    return write_nlvr_shapes(str(tmp_path_factory.mktemp("nlvr")), **SIZES)


@pytest.fixture(scope="module")
def ve(tmp_path_factory):
    return write_ve_shapes(str(tmp_path_factory.mktemp("ve")), **SIZES)


def entries(path):
    with open(path) as f:
        return json.load(f)


def pixels(root, path):
    return np.asarray(Image.open(os.path.join(root, path)).convert("RGB")).astype(int)


def shows(image, colour, tolerance):
    """Whether a few pixels of the image have the colour (shape interiors are drawn in it)."""
    distance = np.abs(image - np.array(COLOURS[colour])).max(-1)
    return int((distance <= tolerance).sum()) >= 4


def colour_of(sentence):
    return next(w for w in sentence.split() if w in COLOURS)


def test_nlvr_shapes_labels_are_what_the_pictures_make_true(nlvr):
    truth = {"the left image has": lambda a, b: a and not b, "only the left image": lambda a, b: a and not b,
             "the right image has": lambda a, b: b and not a, "only the right image": lambda a, b: b and not a,
             "both images": lambda a, b: a and b, "each image": lambda a, b: a and b,
             "neither image": lambda a, b: not a and not b, "no image": lambda a, b: not a and not b}
    by_template = defaultdict(Counter)
    for entry in entries(nlvr["train"]):
        assert set(entry) == {"images", "sentence", "label"} and len(entry["images"]) == 2
        colour = colour_of(entry["sentence"])
        has = [shows(pixels(nlvr["image_root"], p), colour, 0) for p in entry["images"]]   # PNG: exact colours
        template = next(t for t in truth if entry["sentence"].startswith(t))
        assert truth[template](*has) == (entry["label"] == "True"), entry
        by_template[template][entry["label"]] += 1
    check_labels(entries(nlvr["train"]), NLVR_LABELS, nlvr["train"])
    # the sentence alone says nothing: every template is true about half of the time
    for template, counts in by_template.items():
        share = counts["True"] / sum(counts.values())
        assert 0.3 < share < 0.7, (template, counts)


def test_ve_shapes_classes_follow_the_cover_and_the_colour(ve):
    labels = Counter()
    covered_by_label = defaultdict(list)
    for entry in entries(ve["train"]):
        assert set(entry) == {"image", "sentence", "label"} and "." not in entry["image"]
        (path,) = entry_images(entry)                       # an id: the file is <id>.jpg
        image = pixels(ve["image_root"], path)
        half = image.shape[1] // 2
        covered = any(np.abs(side.mean((0, 1)) - np.array(COVER)).max() < 12
                      for side in (image[:, :half], image[:, half:]))
        visible = shows(image, colour_of(entry["sentence"]), 40)             # JPEG: near the colour
        expected = "entailment" if visible else ("neutral" if covered else "contradiction")
        assert entry["label"] == expected, entry
        labels[entry["label"]] += 1
        covered_by_label[entry["label"]].append(covered)
    check_labels(entries(ve["train"]), VE_LABELS, ve["train"])
    assert all(150 < labels[k] < 250 for k in VE_LABELS), labels
    # a cover shows in entailing pictures too, so it does not mean neutral by itself
    assert 0.3 < np.mean(covered_by_label["entailment"]) < 0.7


def test_files_are_deterministic_and_written_once(nlvr, tmp_path):
    stamp = os.stat(nlvr["train"]).st_mtime_ns
    assert write_nlvr_shapes(os.path.dirname(nlvr["train"]), **SIZES) == nlvr
    assert os.stat(nlvr["train"]).st_mtime_ns == stamp                         # not rewritten
    again = write_nlvr_shapes(str(tmp_path), train=0, dev=20, test=0)      # a sample: (seed, split, index)
    assert entries(again["dev"]) == entries(nlvr["dev"])
    name = entries(nlvr["dev"])[3]["images"][1]
    with open(os.path.join(again["image_root"], name), "rb") as a, open(os.path.join(nlvr["image_root"], name), "rb") as b:
        assert a.read() == b.read()
    other = write_nlvr_shapes(str(tmp_path / "other"), train=0, dev=20, test=0, seed=1)
    assert entries(other["dev"]) != entries(nlvr["dev"])


def test_shuffled_baseline_keeps_sentences_and_labels_and_moves_every_image(nlvr, ve, tmp_path):
    for corpus, key in ((nlvr, "images"), (ve, "image")):
        original = entries(corpus["train"])
        shuffled = entries(write_shuffled_images(corpus["train"], str(tmp_path / f"{key}.json")))
        assert [(e["sentence"], e["label"]) for e in shuffled] == [(e["sentence"], e["label"]) for e in original]
        assert all(a[key] != b[key] for a, b in zip(original, shuffled))
        assert sorted(map(str, (e[key] for e in shuffled))) == sorted(map(str, (e[key] for e in original)))


def test_the_generator_prints_the_overrides_that_point_the_tiny_recipes_at_its_corpora(tmp_path, capsys):
    """tools/make_shapes_tasks.py prints, per corpus, the overrides that train its tiny recipe on the
    corpus it wrote (and on the shuffled-images train file); the shipped tiny_nlvr2 / tiny_snli_ve
    configs' own paths are those overrides for --out output/shapes_tasks."""
    import shlex

    from helpers import tool

    from albef_ds.config import load_config

    make = tool("make_shapes_tasks")
    assert make.main(["--out", str(tmp_path), "--train", "4", "--heldout", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    for name, config in (("nlvr", "tiny_nlvr2"), ("ve", "tiny_snli_ve")):
        files = printed[name]["files"]
        for key, train in (("train_overrides", files["train"]), ("shuffled_train_overrides", files["train_shuffled"])):
            cfg = load_config(config, shlex.split(printed[name][key]))
            assert [(c.annotations, c.image_root) for c in cfg.data.corpora] == [([train], files["image_root"])]
            assert (cfg.eval.data, cfg.eval.image_root) == ([files["dev"], files["test"]], files["image_root"])
        root = f"output/shapes_tasks/{name}"
        shipped = {"image_root": root, **{split: f"{root}/{name}_{split}.json" for split in ("train", "dev", "test")}}
        assert load_config(config, make.training_overrides(name, shipped, shipped["train"])) == load_config(config)
