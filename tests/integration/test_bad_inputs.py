"""A user's mistake stops before any work: every command line given a bad input (over 80 of them,
through the command lines' own main()) exits with status 2 and says it in one line on stderr that
names the key, file or value, with no traceback, and every file that existed before is
byte-identical after (nothing is created either). tests/integration/test_entry_points.py runs a few
of them as processes and under the deepspeed launcher (said once by two ranks)."""
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import run_ranks, shapes_set

import albef_ds
from albef_ds.checkpoint.files import save_albef_ds
from albef_ds.checkpoint.layout import layout_of
from albef_ds.config import SyntheticConfig, load_config
from albef_ds.evaluate import main as evaluate_main
from albef_ds.fileio import ConversionError
from albef_ds.synthetic.grounding import write_grounding_corpus
from albef_ds.synthetic.nlvr import write_nlvr_shapes
from albef_ds.synthetic.shapes import write_synthetic_corpus
from albef_ds.synthetic.ve import write_ve_shapes
from albef_ds.synthetic.vqa import write_vqa_corpus
from albef_ds.train import main as train_main
from albef_ds.visualize import main as visualize_main

ROOT = Path(__file__).resolve().parents[2]
PRETRAINED = str(ROOT / "tests" / "data" / "tiny_pretrained.safetensors")
ZERO2 = str(ROOT / "ds_configs" / "zero2.json")


def tool(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _train_one_step(rank, world, out_dir, config):
    from helpers import global_batches

    from albef_ds.engine import Trainer

    cfg = load_config(config, ["train.batch_size=4", "train.max_steps=1", "model.queue_size=8"])
    trainer = Trainer(cfg, ZERO2, out_dir, batches=global_batches(cfg, rank, world))
    trainer.train()
    trainer.close()
    return None


def write_json(path, value):
    Path(path).write_text(json.dumps(value))
    return str(path)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Every input the cases need, written once: a shapes corpus and a run config over it, a
    training folder with one checkpoint, retrieval / VQA / NLVR2 / SNLI-VE / grounding files, bad
    variants of each."""
    root = tmp_path_factory.mktemp("workspace")
    w = {"root": root}
    shapes = write_synthetic_corpus(str(root / "shapes"), SyntheticConfig(train_samples=16, heldout_samples=6,
                                                                          samples_per_shard=8, image_size=64))
    w["run_yaml"] = write_json(root / "run.yaml", {"base": "tiny", "data": {"corpora": shapes["train"]},
                                                   "model": {"queue_size": 8}, "train": {"batch_size": 4}})
    run_ranks(_train_one_step, 1, str(root / "trained"), w["run_yaml"])
    w["trained"] = str(root / "trained")
    # retrieval: a JSON over three images
    images = root / "images"
    images.mkdir()
    data = shapes_set(3)
    for i, png in enumerate(data.images):
        (images / f"{i}.png").write_bytes(png)
    w["images"] = str(images)
    w["retrieval"] = write_json(root / "test.json", [{"image": f"{i}.png", "caption": c} for i, c in enumerate(data.captions)])
    w["caption42"] = write_json(root / "caption42.json", [{"image": "0.png", "caption": 42}])
    vqa = write_vqa_corpus(str(root / "vqa"), train_images=3, heldout_images=2, vg_images=0)
    w["vqa"] = vqa
    answers = json.loads(Path(vqa["answer_list"]).read_text())
    w["answers_empty"] = write_json(root / "answers_empty.json", answers + [""])
    w["answers_dup"] = write_json(root / "answers_dup.json", answers + [answers[0]])
    heldout = json.loads(Path(vqa["heldout"]).read_text())
    w["vqa_answer5"] = write_json(root / "vqa_answer5.json", [{**heldout[0], "answer": 5}])
    w["vqa_noquestion"] = write_json(root / "vqa_noquestion.json", [{k: v for k, v in heldout[0].items()
                                                                      if k != "question"}])
    train = json.loads(Path(vqa["train"]).read_text())
    w["vqa_train_answer5"] = write_json(root / "vqa_train_answer5.json", [{**train[0], "answer": 5}])
    w["nlvr"] = write_nlvr_shapes(str(root / "nlvr"), train=6, dev=4, test=4)
    w["ve"] = write_ve_shapes(str(root / "ve"), train=6, dev=4, test=4)
    nlvr_dev = json.loads(Path(w["nlvr"]["dev"]).read_text())
    w["nlvr_one_image"] = write_json(root / "nlvr_one_image.json", [{**nlvr_dev[0], "images": nlvr_dev[0]["images"][:1]}])
    w["nlvr_label"] = write_json(root / "nlvr_label.json", [{**nlvr_dev[0], "label": "maybe"}])
    ve_train = json.loads(Path(w["ve"]["train"]).read_text())
    w["ve_label"] = write_json(root / "ve_label.json", [{**ve_train[0], "label": "perhaps"}])
    w["ve_sentence"] = write_json(root / "ve_sentence.json", [{**ve_train[0], "sentence": ["two", "words"]}])
    g = write_grounding_corpus(str(root / "grounding"), train_images=3, val_images=2, test_images=2, image_size=64)
    w["grounding"] = g
    val = json.loads(Path(g["val"]).read_text())
    w["grounding_box2"] = write_json(root / "grounding_box2.json", [{**val[0], "bbox": [1, 2]}])
    w["grounding_notext"] = write_json(root / "grounding_notext.json", [{k: v for k, v in val[0].items() if k != "text"}])
    w["grounding_train_text5"] = write_json(root / "grounding_train5.json", [{"image": val[0]["image"], "text": 5}])
    # checkpoints: an inference file of the VQA model (no ITM head), a crafted pickle, a cut file
    torch.manual_seed(0)
    from albef_ds.tasks.vqa import VQATrainingModel

    vqa_model = VQATrainingModel(load_config("tiny_vqa").model)
    layout = layout_of(vqa_model)
    save_albef_ds(str(root / "vqa.pt"), {k: v for k, v in vqa_model.state_dict().items() if k in layout.keys},
                  load_config("tiny_vqa"), layout)
    w["vqa_ckpt"] = str(root / "vqa.pt")
    data_bytes = Path(PRETRAINED).read_bytes()
    (root / "cut.safetensors").write_bytes(data_bytes[: len(data_bytes) // 3])
    w["cut"] = str(root / "cut.safetensors")
    (root / "a_file").write_text("a file where a folder is wanted")
    w["file"] = str(root / "a_file")
    (root / "empty_folder").mkdir()
    (root / "broken.png").write_bytes(b"not a png")
    (root / "texts_empty.txt").write_text("\n\n")
    (root / "shards_out").mkdir()
    (root / "shards_out" / "coco-00000.tar").write_bytes(b"an earlier shard")
    (root / "locked").mkdir()
    return w


def snapshot(root) -> dict:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            path = os.path.join(dirpath, n)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha1(f.read()).hexdigest()
    return out


def train(ws, *extra, config=None, out="out"):
    return (train_main, ["--deepspeed", ZERO2, "--config", config or ws["run_yaml"],
                         "--output_dir", str(ws["root"] / out), *extra])


def evaluate(task, ws, *extra, checkpoint=PRETRAINED, data=None, out="eval"):
    return (evaluate_main, [task, "--checkpoint", checkpoint, "--data", data or ws["retrieval"],
                            "--image_root", ws["images"], "--output_dir", str(ws["root"] / out), *extra])


def vqa(ws, *extra, checkpoint=None, data=None, answers=None, image_root=None):
    return (evaluate_main, ["vqa", "--checkpoint", checkpoint or ws["vqa_ckpt"], "--data", data or ws["vqa"]["heldout"],
                            "--answer_list", answers or ws["vqa"]["answer_list"], "--image_root",
                            image_root or ws["vqa"]["vqa_root"], "--output_dir", str(ws["root"] / "eval_vqa"), *extra])


def labelled(task, ws, data, *extra, checkpoint=PRETRAINED):
    corpus = ws["nlvr"] if task == "nlvr2" else ws["ve"]
    return (evaluate_main, [task, "--checkpoint", checkpoint, "--data", data, "--image_root", corpus["image_root"],
                            "--output_dir", str(ws["root"] / "eval_cls"), *extra])


def grounding(ws, *extra, data=None, dets=None):
    g = ws["grounding"]
    return (evaluate_main, ["grounding", "--checkpoint", PRETRAINED, "--data", data or g["val"], "--dets",
                            dets or g["dets"], "--image_root", g["image_root"], "--output_dir",
                            str(ws["root"] / "eval_g"), "--config", "tiny", *extra])


def visualize(ws, *extra, checkpoint=PRETRAINED, image=None):
    return (visualize_main, ["--checkpoint", checkpoint, "--image", image or ws["images"], "--output_dir",
                             str(ws["root"] / "pictures"), *extra])


def convert(ws, *extra, source=PRETRAINED, output=None):
    return (tool("convert_checkpoint"), ["--input", source, "--output", output or str(ws["root"] / "conv.safetensors"),
                                         *extra])


def shards(ws, *extra, ann=None, vqa=False):
    root = ws["vqa"]["vqa_root"] if vqa else ws["images"]
    return (tool("make_shards"), ["--ann", ann or ws["retrieval"], "--image-root", root, "--out",
                                  str(ws["root"] / "new_shards"), "--prefix", "coco", *extra] + (["--vqa"] if vqa else []))


def corpus(path, root):
    return f"data.corpora=[{{name: c, annotations: [{path}], image_root: {root}}}]"


# (id, the command as ws -> (main, argv), what the one line names)
CASES = [
    # ---- train.py: the config --------------------------------------------------------------------------
    ("lr-list", lambda w: train(w, "train.lr=[1,2]"), "config key 'train.lr' has value [1, 2]"),
    ("corpora-string", lambda w: train(w, "data.corpora=abc"), "config key 'data.corpora' has value 'abc'"),
    ("batch-zero", lambda w: train(w, "train.batch_size=0"), "train.batch_size is 0"),
    ("batch-fraction", lambda w: train(w, "train.batch_size=2.5"), "'train.batch_size' has value 2.5"),
    ("temp-negative", lambda w: train(w, "model.temp=-1"), "model.temp is -1.0"),
    ("unknown-key", lambda w: train(w, "train.lrr=1"), "unknown config key 'train.lrr'"),
    ("max-skipped-above-one", lambda w: train(w, "eval.max_skipped=2"), "eval.max_skipped is 2.0"),
    ("crop-scale-words", lambda w: train(w, "data.crop_scale=[a, b]"), "'data.crop_scale' has value ['a', 'b']"),
    ("crop-scale-order", lambda w: train(w, "data.crop_scale=[0.9, 0.1]"), "data.crop_scale [0.9, 0.1]"),
    ("eval-data-number", lambda w: train(w, "eval.data=[5]"), "'eval.data[0]' has value 5"),
    ("task-unknown", lambda w: train(w, "task=captioning"), "task 'captioning' is not one of"),
    ("task-number", lambda w: train(w, "task=3"), "config key 'task' has value 3"),
    ("options-key", lambda w: train(w, "options=3"), "unknown config key 'options'"),
    ("other-task-section", lambda w: train(w, "vqa.answer_list=x"), "unknown config key 'vqa'"),
    ("config-missing", lambda w: train(w, config=str(w["root"] / "nope.yaml")), "nope.yaml' is neither a file"),
    ("ds-config-missing", lambda w: (train_main, ["--deepspeed", str(w["root"] / "nope.json"), "--config",
                                                  w["run_yaml"], "--output_dir", str(w["root"] / "out")]),
     "cannot read DeepSpeed config"),
    ("option-unknown", lambda w: train(w, "--bogus"), "unrecognized arguments: --bogus"),
    ("max-steps-word", lambda w: train(w, "--max_steps", "ten"), "--max_steps: invalid int value: 'ten'"),
    ("shards-match-nothing", lambda w: train(w, f"data.corpora=[{{name: x, shards: '{w['root']}/none-{{0..3}}.tar', "
                                                f"samples: 4}}]"), "none-{0..3}.tar' matches no file"),
    ("annotations-missing", lambda w: train(w, corpus(w["root"] / "none.json", w["images"])), "none.json"),
    ("image-root-missing", lambda w: train(w, corpus(w["retrieval"], w["root"] / "nowhere")), "is not a folder"),
    ("caption-number", lambda w: train(w, corpus(w["caption42"], w["images"])), "entry 0: 'caption' is 42"),
    ("vqa-answer-number", lambda w: train(w, corpus(w["vqa_train_answer5"], w["vqa"]["vqa_root"]),
                                          config="tiny_vqa"), "entry 0: 'answer' is 5"),
    ("vqa-k-test-zero", lambda w: train(w, corpus(w["vqa"]["train"], w["vqa"]["vqa_root"]), "eval.k_test=0",
                                        "eval.every_epochs=1", f"eval.data=[{w['vqa']['heldout']}]",
                                        f"eval.image_root={w['vqa']['vqa_root']}",
                                        f"vqa.answer_list={w['vqa']['answer_list']}", config="tiny_vqa"),
     "eval.k_test is 0: VQA re-ranks"),
    ("ve-label", lambda w: train(w, corpus(w["ve_label"], w["ve"]["image_root"]), config="tiny_snli_ve"),
     "label 'perhaps' is not one of"),
    ("ve-sentence-list", lambda w: train(w, corpus(w["ve_sentence"], w["ve"]["image_root"]), config="tiny_snli_ve"),
     "entry 0: 'sentence' is ['two', 'words']"),
    ("nlvr-one-image", lambda w: train(w, corpus(w["nlvr_one_image"], w["nlvr"]["image_root"]),
                                       "model.init_checkpoint=null", config="tiny_nlvr2"),
     "entry 0: 'images' is"),
    ("grounding-text-number", lambda w: train(w, corpus(w["grounding_train_text5"], w["grounding"]["image_root"]),
                                              f"grounding.dets={w['grounding']['dets']}", config="tiny_grounding"),
     "entry 0: 'text' is 5"),
    ("grounding-option-unknown", lambda w: train(w, "grounding.detz=x", config="tiny_grounding"),
     "unknown config key 'grounding.detz'"),
    ("eval-data-missing", lambda w: train(w, "eval.every_epochs=1", f"eval.data=[{w['root']}/none.json]"),
     "none.json"),
    ("select-metric-unknown", lambda w: train(w, "eval.every_epochs=1", f"eval.data=[{w['retrieval']}]",
                                              f"eval.image_root={w['images']}", "eval.select_metric=bleu"),
     "eval.select_metric 'bleu'"),
    ("compile-zero3", lambda w: (train_main, ["--deepspeed", str(ROOT / "ds_configs" / "zero3.json"), "--config",
                                              w["run_yaml"], "--output_dir", str(w["root"] / "out"),
                                              "train.compile=true"]), "train.compile is not supported with ZeRO stage 3"),
    ("init-checkpoint-missing", lambda w: train(w, f"model.init_checkpoint={w['root']}/none.pt"),
     "model.init_checkpoint"),
    # ---- train.py: the run folder ------------------------------------------------------------------------
    ("output-under-a-file", lambda w: train(w, out="a_file/run"), "is a file, not a folder"),
    ("another-runs-folder", lambda w: train(w, out="trained"), "holds the checkpoints of a pretrain run"),
    ("start-over-and-resume", lambda w: train(w, "--start_over", "--resume", out="trained"), "--start_over and --resume"),
    ("resume-tag-missing", lambda w: train(w, "--resume", "step00000009", out="trained"), "no checkpoint 'step00000009'"),
    ("resume-another-task", lambda w: train(w, "--resume", config="tiny_nlvr2_ta", out="trained"),
     "is of task 'pretrain', this run trains 'nlvr2_ta'"),
    ("resume-another-model", lambda w: train(w, "model.embed_dim=32", "--resume", out="trained"), "holds another model"),
    ("folder-locked", lambda w: train(w, out="locked"), "another run is writing into output_dir"),
    # ---- evaluate: every task's numbers, files and models ---------------------------------------------------
    ("eval-checkpoint-missing", lambda w: evaluate("retrieval", w, checkpoint=str(w["root"] / "none.pt")), "none.pt"),
    ("eval-checkpoint-cut", lambda w: evaluate("retrieval", w, checkpoint=w["cut"]), "cut.safetensors"),
    ("eval-data-file-missing", lambda w: evaluate("retrieval", w, data=str(w["root"] / "none.json")), "none.json"),
    ("eval-batch-zero", lambda w: evaluate("retrieval", w, "--batch_size", "0"), "--batch_size is 0"),
    ("eval-k-negative", lambda w: evaluate("retrieval", w, "--k_test", "-1"), "--k_test is -1"),
    ("eval-show-negative", lambda w: evaluate("retrieval", w, "--show", "-2"), "--show is -2"),
    ("eval-max-skipped", lambda w: evaluate("retrieval", w, "--max_skipped", "1.5"), "--max_skipped is 1.5"),
    ("eval-output-under-file", lambda w: evaluate("retrieval", w, out="a_file/eval"), "is a file, not a folder"),
    ("eval-caption-number", lambda w: evaluate("retrieval", w, data=w["caption42"]), "entry 0: 'caption' is 42"),
    ("eval-image-root-wrong", lambda w: (evaluate_main, ["retrieval", "--checkpoint", PRETRAINED, "--data",
                                                         w["retrieval"], "--image_root", str(w["root"]),
                                                         "--output_dir", str(w["root"] / "eval")]), "not found"),
    ("eval-no-itm-head", lambda w: evaluate("retrieval", w, checkpoint=w["vqa_ckpt"]),
     "holds a VQAModel, not the ALBEF"),
    ("eval-option-unknown", lambda w: evaluate("retrieval", w, "--bogus"), "unrecognized arguments: --bogus"),
    ("vqa-k-zero", lambda w: vqa(w, "--k_test", "0"), "--k_test is 0"),
    ("vqa-answer-empty", lambda w: vqa(w, answers=w["answers_empty"]), "is empty"),
    ("vqa-answer-repeated", lambda w: vqa(w, answers=w["answers_dup"]), "repeats answer 0"),
    ("vqa-answer-list-missing", lambda w: vqa(w, answers=str(w["root"] / "none.json")), "none.json: no such file"),
    ("vqa-image-root-wrong", lambda w: vqa(w, image_root=str(w["root"] / "empty_folder")),
     "no item could be evaluated: all 10 skipped"),
    ("vqa-question-missing", lambda w: vqa(w, data=w["vqa_noquestion"]), "entry 0 has no 'question'"),
    ("vqa-eval-answer-number", lambda w: vqa(w, data=w["vqa_answer5"]), "entry 0: 'answer' is 5"),
    ("vqa-pretraining-checkpoint", lambda w: vqa(w, "--config", "tiny_vqa", checkpoint=PRETRAINED),
     "its vqa head (text_decoder) was never trained"),
    ("nlvr-pretraining-checkpoint", lambda w: labelled("nlvr2", w, w["nlvr"]["dev"], "--config", "tiny_nlvr2"),
     "its nlvr2 head (cls_head) was never trained"),
    ("ve-pretraining-checkpoint", lambda w: labelled("snli_ve", w, w["ve"]["dev"], "--config", "tiny_snli_ve"),
     "its snli_ve head (cls_head) was never trained"),
    ("nlvr-one-image-eval", lambda w: labelled("nlvr2", w, w["nlvr_one_image"], checkpoint=w["vqa_ckpt"]),
     "holds a VQAModel"),
    ("grounding-dets-missing", lambda w: grounding(w, dets=str(w["root"] / "none.json")), "none.json"),
    ("grounding-box-two-numbers", lambda w: grounding(w, data=w["grounding_box2"]), "bbox [1, 2] is not [x, y, w, h]"),
    ("grounding-text-missing", lambda w: grounding(w, data=w["grounding_notext"]), "lacks one of image, text, ref_id"),
    ("grounding-layer-out-of-range", lambda w: grounding(w, "--gradcam_layer", "99"), "99"),
    ("grounding-mode-unknown", lambda w: grounding(w, "--mode", "xyz"), "invalid choice: 'xyz'"),
    # ---- visualize ------------------------------------------------------------------------------------------
    ("vis-checkpoint-missing", lambda w: visualize(w, "--text", "a", checkpoint=str(w["root"] / "none.pt")), "none.pt"),
    ("vis-image-missing", lambda w: visualize(w, "--text", "a", image=str(w["root"] / "none.png")), "none.png"),
    ("vis-folder-without-images", lambda w: visualize(w, "--text", "a", image=str(w["root"] / "empty_folder")),
     "holds no image"),
    ("vis-broken-image", lambda w: visualize(w, "--text", "a", image=str(w["root"] / "broken.png")), "broken.png"),
    ("vis-text-empty", lambda w: visualize(w, "--text", "?!"), "empty once cleaned"),
    ("vis-texts-file-missing", lambda w: visualize(w, "--texts", str(w["root"] / "none.txt")), "none.txt"),
    ("vis-texts-file-empty", lambda w: visualize(w, "--texts", str(w["root"] / "texts_empty.txt")), "holds no text"),
    ("vis-layer-out-of-range", lambda w: visualize(w, "--text", "a", "--gradcam_layer", "50"), "--gradcam_layer 50"),
    ("vis-output-under-file", lambda w: (visualize_main, ["--checkpoint", PRETRAINED, "--image", w["images"], "--text",
                                                          "a", "--output_dir", str(w["root"] / "a_file" / "x")]),
     "is a file, not a folder"),
    ("vis-no-itm-head", lambda w: visualize(w, "--text", "a", checkpoint=w["vqa_ckpt"]), "has no ITM head"),
    ("vis-mode-unknown", lambda w: visualize(w, "--text", "a", "--mode", "itx"), "invalid choice: 'itx'"),
    # ---- convert_checkpoint -----------------------------------------------------------------------------------
    ("convert-same-path", lambda w: convert(w, output=PRETRAINED), "the same file"),
    ("convert-output-under-file", lambda w: convert(w, output=str(w["root"] / "a_file" / "x.pt")), "not a folder"),
    ("convert-output-a-folder", lambda w: convert(w, output=str(w["root"] / "empty_folder")), "is a folder"),
    ("convert-input-missing", lambda w: convert(w, source=str(w["root"] / "none.pt")), "none.pt"),
    ("convert-input-cut", lambda w: convert(w, source=w["cut"]), "cut.safetensors"),
    ("convert-released-safetensors", lambda w: convert(w, "--to", "albef", output=str(w["root"] / "r.safetensors")),
     "r.safetensors"),
    ("convert-set-without-config", lambda w: convert(w, "--set", "model.temp=0.1"), "--set needs --config"),
    ("convert-untrained-head", lambda w: convert(w, "--config", "tiny_nlvr2"), "its nlvr2 head (cls_head)"),
    ("convert-dtype-unknown", lambda w: convert(w, "--dtype", "fp8"), "invalid choice: 'fp8'"),
    ("convert-training-folder-tag", lambda w: convert(w, "--tag", "step9", source=w["trained"]), "step9"),
    # ---- make_shards --------------------------------------------------------------------------------------------
    ("shards-max-samples-zero", lambda w: shards(w, "--max-samples", "0"), "--max-samples is 0"),
    ("shards-workers-zero", lambda w: shards(w, "--workers", "0"), "--workers is 0"),
    ("shards-out-under-file", lambda w: (tool("make_shards"), ["--ann", w["retrieval"], "--image-root", w["images"],
                                                              "--out", str(w["root"] / "a_file" / "s"), "--prefix", "x"]),
     "is a file, not a folder"),
    ("shards-overwrite", lambda w: (tool("make_shards"), ["--ann", w["retrieval"], "--image-root", w["images"], "--out",
                                                         str(w["root"] / "shards_out"), "--prefix", "coco"]),
     "already holds 1 'coco' shards"),
    ("shards-ann-missing", lambda w: shards(w, ann=str(w["root"] / "none.json")), "none.json"),
    ("shards-caption-number", lambda w: shards(w, ann=w["caption42"]), "entry 0: 'caption' is 42"),
    ("shards-vqa-answer-number", lambda w: shards(w, ann=w["vqa_train_answer5"], vqa=True), "entry 0: 'answer' is 5"),
    ("shards-image-root-missing", lambda w: (tool("make_shards"), ["--ann", w["retrieval"], "--image-root",
                                                                  str(w["root"] / "nowhere"), "--out",
                                                                  str(w["root"] / "s"), "--prefix", "x"]),
     "is not a folder"),
    ("shards-prefix-path", lambda w: (tool("make_shards"), ["--ann", w["retrieval"], "--image-root", w["images"],
                                                           "--out", str(w["root"] / "s"), "--prefix", "a/b"]),
     "--prefix 'a/b'"),
]


def test_there_are_over_eighty_cases():
    assert len(CASES) >= 80 and len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("name,command,named", CASES, ids=[c[0] for c in CASES])
def test_a_mistake_is_one_line_and_touches_nothing(ws, name, command, named, capsys):
    main, argv = command(ws)
    lock = None
    if name == "folder-locked":               # a run that holds the folder (a job submitted twice)
        lock = open(ws["root"] / "locked" / ".albef_run.lock", "a+")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    before = snapshot(ws["root"])
    try:
        try:
            code = main(argv)
        except SystemExit as exc:             # argparse's mistakes exit through sys.exit(2)
            code = exc.code
    finally:
        if lock is not None:
            lock.close()
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, (code, out[-2000:], err[-2000:])
    assert len(errors) == 1 and named in errors[0], err[-2000:]
    assert "Traceback" not in out + err
    assert snapshot(ws["root"]) == before, "a file that existed changed, or a file was created"


def test_load_model_refuses_an_untrained_head_unless_asked(ws):
    with pytest.raises(ConversionError, match="its nlvr2 head \\(cls_head\\) was never trained"):
        albef_ds.load_model(PRETRAINED, config="tiny_nlvr2")
    model = albef_ds.load_model(PRETRAINED, config="tiny_nlvr2", allow_untrained_head=True)
    assert type(model).__name__ == "NLVRClassifier"
    with pytest.raises(ConversionError, match="none.pt"):
        albef_ds.load_model(str(ws["root"] / "none.pt"))


def test_a_text_longer_than_the_model_reads_is_noted(ws, capsys):
    out = ws["root"] / "long_text"
    text = " ".join(["red circle"] * 20)
    assert visualize_main(["--checkpoint", PRETRAINED, "--image", str(Path(ws["images"]) / "0.png"), "--text", text,
                           "--output_dir", str(out)]) == 0
    err = capsys.readouterr().err
    # 40 words: the first 30 kept by the caption cleaning, of which [CLS] + 29 word pieces are read
    assert "is longer than the model reads (30 tokens): its last 11 word(s) are not in the pictures" in err
    shutil.rmtree(out)
