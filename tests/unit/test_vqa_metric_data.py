"""VQA: the accuracy metric against hand-worked cases, ALBEF's question cleaning and answer weights,
the codec's batches, bad input in training (skipped and counted), the generated corpus."""
import io
import json
import os

import pytest
from PIL import Image

from albef_ds.config import ConfigError, load_config
from albef_ds.data.stream import ShardStream
from albef_ds.data.transforms import EvalTransform
from albef_ds.data.vqa import VG_WEIGHT, VQACodec, answer_tokens, answer_weights, clean_question
from albef_ds.eval.vqa import accuracy_metrics, normalize_prediction, process_punctuation, question_accuracy
from albef_ds.eval.vqa_answering import read_answer_list, read_vqa_set
from albef_ds.synthetic.vqa import QUESTIONS, answer_list, shuffle_images, write_vqa_corpus
from albef_ds.tasks.vqa import VQATask
from albef_ds.tokenizer import build_tokenizer

TOKENIZER = build_tokenizer("tiny_vocab.txt")


# ---- the accuracy ------------------------------------------------------------------------------

@pytest.mark.parametrize("matches, expected", [
    # leaving out one of the m matching annotators leaves m - 1, leaving out another leaves m:
    # (m * min(1, (m - 1) / 3) + (10 - m) * min(1, m / 3)) / 10
    (0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_accuracy_is_the_ten_leave_one_out_average(matches, expected):
    annotators = ["red"] * matches + ["blue"] * (10 - matches)
    assert question_accuracy("red", annotators) == pytest.approx(expected)


def test_accuracy_normalises_the_prediction():
    # number words become digits, articles go, a final period goes, case goes
    assert normalize_prediction("Two") == "2" and normalize_prediction("A Dog.") == "dog"
    assert normalize_prediction("none") == "0" and normalize_prediction("the man's hat") == "man's hat"
    assert normalize_prediction("dont") == "don't" and normalize_prediction("3.5") == "3.5"
    assert normalize_prediction(" yes\n") == "yes"
    assert question_accuracy("two", ["2"] * 10) == 1.0
    assert question_accuracy("dont", ["don't"] * 3 + ["no"] * 7) == pytest.approx(0.9)


def test_punctuation_is_the_official_step():
    # a symbol touching a space is deleted, else it becomes a space; a digit-comma-digit anywhere
    # deletes every symbol; periods go unless a digit follows
    assert process_punctuation("t-shirt") == "t shirt"
    assert process_punctuation("t - shirt") == "t  shirt"
    assert process_punctuation("1,000") == "1000" and process_punctuation("a,b") == "a b"
    assert process_punctuation("mr. smith") == "mr smith" and process_punctuation("2.5") == "2.5"
    # the annotators' answers get it only when they disagree (the official files are normalised):
    # two "t-shirt" of ten match the prediction once both are normalised ...
    assert question_accuracy("t-shirt", ["t-shirt"] * 2 + ["shirt"] * 8) == pytest.approx(0.6)
    # ... but ten identical "t-shirt" are compared as they are, as the official code does
    assert question_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0
    assert question_accuracy(None, ["x"] * 10) == 0.0


def test_accuracy_overall_and_per_answer_type():
    predictions = ["yes", "2", "red", None]
    annotators = [["yes"] * 10, ["2"] * 2 + ["3"] * 8, ["blue"] * 10, ["red"] * 10]
    out = accuracy_metrics(predictions, annotators, ["yes/no", "number", "other", "other"],
                           ["is there", "how many", "what colour", "what colour"])
    assert out.pop("per_question_type") == pytest.approx({"is there": 100.0, "how many": 60.0, "what colour": 0.0})
    assert out == pytest.approx({"acc": 100 * (1 + 0.6 + 0 + 0) / 4, "acc_yes_no": 100.0,
                                 "acc_number": 60.0, "acc_other": 0.0})
    assert set(accuracy_metrics(predictions, annotators)) == {"acc"}


# ---- ALBEF's training inputs ---------------------------------------------------------------------

def test_questions_are_cleaned_as_albef_does():
    assert clean_question("What's the man's shirt colour?", 30) == "whats the mans shirt colour"
    assert clean_question("Is it black/white or red-ish?  ", 30) == "is it black white or red ish"
    assert clean_question("one two three four", 2) == "one two"
    assert clean_question("(#*~;:)", 30) == ""


def test_answer_weights_are_the_annotators_shares_and_vg_gets_half():
    answers, weights = answer_weights({"answer": ["2", "two", "2", "3", "2", "2", "two", "2", "2", "2"]})
    assert answers == ["2", "two", "3"]              # first appearance
    assert weights == pytest.approx([0.7, 0.2, 0.1])
    assert answer_weights({"answer": "tree", "dataset": "vg"}) == (["tree"], [VG_WEIGHT])
    with pytest.raises(TypeError):
        answer_weights({"answer": ["a", "b"], "dataset": "vg"})
    with pytest.raises(TypeError):
        answer_weights({"answer": []})


def test_answer_tokens_end_with_sep_and_pad_to_the_longest():
    ids, mask = answer_tokens(TOKENIZER, ["red", "yes", "two red"], 64)
    cls, sep = TOKENIZER.cls_token_id, TOKENIZER.sep_token_id
    assert ids.shape == (3, 5)                      # "yes" is y ##e ##s
    assert ids[0].tolist() == [cls, TOKENIZER.convert_tokens_to_ids(["red"])[0], sep, 0, 0]
    assert mask.sum(1).tolist() == [3, 5, 4] and (ids[mask.bool()] != 0).all()
    assert ids[2, 3].item() == sep


def test_codec_batches_flatten_the_answers_with_their_question():
    codec = VQACodec(TOKENIZER, EvalTransform(32), 30, 20, 64)
    png = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(png, format="PNG")
    raws = [{"__key__": "a", "png": png.getvalue(),
             "json": json.dumps({"question": "What colour?", "answer": ["red"] * 9 + ["orange"]}).encode()},
            {"__key__": "b", "png": png.getvalue(),
             "json": json.dumps({"question": "Is it red?", "answer": "yes", "dataset": "vg"}).encode()}]
    samples = [codec.decode(raw, raw["__key__"], None) for raw in raws]
    batch = codec.collate(samples, ["a", "b"])
    assert batch["image"].shape == (2, 3, 32, 32) and batch["input_ids"].shape == (2, 20)
    assert batch["answer_question"].tolist() == [0, 0, 1]
    assert batch["answer_weight"].tolist() == pytest.approx([0.9, 0.1, 0.5])
    assert batch["answer_ids"].shape[0] == 3
    words = TOKENIZER.convert_ids_to_tokens(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert words[0] == "[CLS]" and "?" not in words and "[SEP]" not in words


def write_image(path, colour=(0, 200, 0)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (24, 24), colour).save(path)


def test_bad_training_questions_are_skipped_and_counted(tmp_path):
    root = tmp_path / "images"
    for name in ("good0.png", "good1.png", "good2.png"):
        write_image(str(root / name))
    (root / "corrupt.png").write_bytes(b"\x89PNG not an image")
    entries = [{"question": "what colour", "answer": ["green"] * 10, "image": "good0.png"},
               {"question": "what colour", "answer": ["green"] * 10, "image": "gone.png"},
               {"question": "what colour", "answer": ["green"] * 10, "image": "corrupt.png"},
               {"question": "?!", "answer": ["green"] * 10, "image": "good1.png"},
               {"question": "what colour", "answer": [], "image": "good1.png"},
               {"question": "what colour", "answer": ["green"] * 10, "image": "good2.png"}]
    (tmp_path / "train.json").write_text(json.dumps(entries))
    cfg = load_config("tiny_vqa", [f"data.corpora=[{{name: t, annotations: [{tmp_path / 'train.json'}], "
                                   f"image_root: {root}}}]", "data.workers=0", "data.resampled=false"])
    codec = VQATask(cfg).codec(TOKENIZER, train=True)
    stream = ShardStream(cfg.data, codec, 2, 0, 1, 0)
    keys = [k for batch in stream for k in batch["keys"]]
    assert sorted(keys) == ["t/train-00000/000000000", "t/train-00000/000000005"]
    stats = stream.stats()
    assert {k: v for k, v in stats.items() if v} == {"missing_image": 1, "corrupt_image": 1,
                                                       "empty_question": 1, "no_answer": 1}


def test_annotation_files_with_missing_keys_stop_naming_file_and_key(tmp_path):
    path = tmp_path / "vqa_train.json"
    path.write_text(json.dumps([{"question": "q", "answer": ["a"], "image": "x.png"}, {"question": "q", "image": "y"}]))
    cfg = load_config("tiny_vqa", [f"data.corpora=[{{name: t, annotations: [{path}], image_root: {tmp_path}}}]"])
    with pytest.raises(ConfigError, match=rf"{path}: entry 1 has no 'answer'"):
        VQATask(cfg).check_annotations()
    with pytest.raises(ConfigError, match="train.compile is not supported for vqa"):
        VQATask(load_config("tiny_vqa", ["train.compile=true"])).check(1)
    test = tmp_path / "vqa_test.json"
    test.write_text(json.dumps([{"question_id": 1, "image": "x.png"}]))
    with pytest.raises(ValueError, match=rf"{test}: entry 0 has no 'question'"):
        read_vqa_set(str(test))


def test_answer_list_missing_or_empty_stops_naming_the_file_and_key(tmp_path):
    with pytest.raises(ValueError, match="answer list /nowhere/answers.json: no such file"):
        read_answer_list("/nowhere/answers.json")
    empty = tmp_path / "answer_list.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match=f"answer list {empty} is not a non-empty"):
        read_answer_list(str(empty))
    heldout = tmp_path / "heldout.json"
    heldout.write_text(json.dumps([{"question_id": 1, "question": "q", "image": "x.png", "answer": ["a"]}]))
    for value, shown in (("", "vqa.answer_list: no answer list given"), (str(empty), f"vqa.answer_list: answer list {empty}")):
        cfg = load_config("tiny_vqa", [f"eval.data=[{heldout}]", f"vqa.answer_list='{value}'"])
        with pytest.raises(ConfigError, match=shown):
            VQATask(cfg).evaluator(str(tmp_path))


# ---- the generated corpus ------------------------------------------------------------------------

def test_generated_corpus_is_in_albefs_format(tmp_path):
    paths = write_vqa_corpus(str(tmp_path), train_images=6, heldout_images=4, vg_images=3)
    train = json.loads(open(paths["train"]).read())
    heldout = read_vqa_set(paths["heldout"], paths["vqa_root"])
    vg = json.loads(open(paths["vg"]).read())
    assert len(train) == 6 * len(QUESTIONS) and len(heldout.questions) == 4 * len(QUESTIONS) and len(vg) == 3
    assert json.loads(open(paths["answer_list"]).read()) == answer_list()
    for entry in train:
        assert set(entry) == {"question_id", "question", "answer", "image", "dataset"}
        assert len(entry["answer"]) == 10 and entry["dataset"] == "vqa"
        assert os.path.isfile(os.path.join(paths["vqa_root"], entry["image"]))
    assert all(isinstance(e["answer"], str) and e["dataset"] == "vg" for e in vg)
    assert all(os.path.isfile(os.path.join(paths["vg_root"], e["image"])) for e in vg)
    every = set(answer_list())
    assert all(set(a) <= every for a in heldout.annotators)
    assert set(heldout.answer_types) == {"yes/no", "number", "other"} and set(heldout.question_types) == set(QUESTIONS)
    # annotators disagree on some questions, and most agree with each other
    counts = [max(a.count(x) for x in a) for a in heldout.annotators]
    assert min(counts) >= 8 and any(c < 10 for c in counts)
    assert len({e["question_id"] for e in train}) == len(train)
    # no word outside the tiny vocabulary is needed as a whole: every question tokenizes
    assert all(TOKENIZER.unk_token_id not in e.ids for e in TOKENIZER.encode(heldout.questions))
    shuffled = json.loads(open(shuffle_images(paths["train"], str(tmp_path / "shuffled.json"))).read())
    assert [e["question"] for e in shuffled] == [e["question"] for e in train]
    assert sorted(e["image"] for e in shuffled) == sorted(e["image"] for e in train)
    assert [e["image"] for e in shuffled] != [e["image"] for e in train]
    again = write_vqa_corpus(str(tmp_path / "again"), train_images=6, heldout_images=4, vg_images=3)
    assert open(again["train"]).read() == open(paths["train"]).read()
    image = train[0]["image"]
    assert open(os.path.join(paths["vqa_root"], image), "rb").read() == open(os.path.join(again["vqa_root"], image), "rb").read()


def test_the_codec_crops_at_the_fine_tuning_scale():
    """ALBEF's VQA recipe crops at (0.5, 1): vqa.yaml says so, and the codec's training transform
    takes data.crop_scale (null: the whole image resized); evaluation does not crop."""
    from albef_ds.data.transforms import TrainTransform

    assert load_config("vqa").data.crop_scale == [0.5, 1.0]
    assert load_config("tiny_vqa").data.crop_scale == [0.5, 1.0]
    for scale, expected in (([0.5, 1.0], (0.5, 1.0)), ([0.3, 0.9], (0.3, 0.9)), (None, None)):
        cfg = load_config("tiny_vqa", ["data.augment=true", f"data.crop_scale={scale if scale else 'null'}"])
        transform = VQATask(cfg).codec(TOKENIZER, train=True).transform
        assert isinstance(transform, TrainTransform) and transform.crop_scale == expected
        assert isinstance(VQATask(cfg).codec(TOKENIZER, train=False).transform, EvalTransform)


def test_make_shards_vqa_reports_bad_files_in_one_line(tmp_path, capsys):
    """tools/make_shards.py --vqa: an entry without a VQA key, a file that is not JSON, a missing
    image root, no questions: one line naming what to fix, exit status 2 (as without --vqa)."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("make_shards", os.path.join(root, "tools", "make_shards.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    main = tool.main

    paths = write_vqa_corpus(str(tmp_path / "corpus"), train_images=2, heldout_images=0, vg_images=0)
    entries = json.loads(open(paths["train"]).read())
    bad = tmp_path / "bad.json"
    common = ["--image-root", paths["vqa_root"], "--out", str(tmp_path / "shards"), "--prefix", "vqa", "--vqa"]
    cases = [([{k: v for k, v in e.items() if k != "answer"} for e in entries], "bad.json: entry 0 has no 'answer'"),
             ("[{\"image\": ", "cannot read annotation file " + str(bad)),
             ([], "list no questions")]
    for content, expected in cases:
        bad.write_text(content if isinstance(content, str) else json.dumps(content))
        assert main(["--ann", str(bad), *common]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert main(["--ann", paths["train"], *common[:1], str(tmp_path / "nowhere"), *common[2:]]) == 2
    assert f"--image-root {tmp_path / 'nowhere'} is not a folder" in capsys.readouterr().err
    assert main(["--ann", paths["train"], *common]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == len(entries)


def test_question_shards_hold_one_sample_per_question(tmp_path):
    from albef_ds.data.vqa import make_question_shards

    paths = write_vqa_corpus(str(tmp_path / "corpus"), train_images=3, heldout_images=0, vg_images=0)
    entries = json.loads(open(paths["train"]).read())
    entries[4] = {**entries[4], "image": "train/missing.png"}
    summary = make_question_shards(entries, paths["vqa_root"], str(tmp_path / "shards"), "vqa", max_samples=6)
    assert summary["samples"] == len(entries) - 1 and summary["skipped"] == 1 and summary["shards"] == 3
    cfg = load_config("tiny_vqa", [f"data.corpora=[{{name: s, shards: ['{summary['pattern']}']}}]", "data.workers=0",
                                   "data.resampled=false"])
    stream = ShardStream(cfg.data, VQATask(cfg).codec(TOKENIZER, train=True), 4, 0, 1, 0)
    batches = list(stream)
    assert sum(len(b["keys"]) for b in batches) == len(entries) - 1
    first = batches[0]
    assert first["answer_question"].max().item() == len(first["keys"]) - 1
    assert first["answer_weight"].sum().item() == pytest.approx(len(first["keys"]))   # VQA weights sum to 1


def test_make_vqa_corpus_reports_an_unwritable_folder_in_one_line(tmp_path, capsys):
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("make_vqa_corpus", os.path.join(root, "tools", "make_vqa_corpus.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    (tmp_path / "taken").write_text("a file, not a folder")
    assert tool.main(["--out", str(tmp_path / "taken"), "--train_images", "2", "--heldout_images", "1",
                      "--vg_images", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(tmp_path / "taken") in err[0], err
