"""Pictures of every kind: the VQA answer, raw attention (mean, one head, a panel per head),
grounding boxes and a classifier's maps are PNGs of their layout's size; the visualize command line
for VQA and raw attention, and its bad input (one line, exit 2, nothing written); each task's
pictures of its evaluation items (what the trainer logs to TensorBoard); the demo's pictures."""
import json
import os
import random

import pytest
import torch
from helpers import png_size, tiny_albef
from PIL import Image
from vqa_helpers import tiny_vqa

import albef_ds
from albef_ds.checkpoint.files import save_albef_ds
from albef_ds.checkpoint.layout import layout_of
from albef_ds.config import load_config
from albef_ds.pictures import HEAD_COLUMNS, PANEL, grid_size
from albef_ds.synthetic.shapes import ALL_ATTRIBUTES, render
from albef_ds.synthetic.vqa import answer_list as shapes_answers
from albef_ds.tasks import get_task


@pytest.fixture(autouse=True)
def one_thread():
    """Per-item maps are many tiny ops: one thread avoids a second one's synchronisation per op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save(model, cfg, path):
    layout = layout_of(model)
    save_albef_ds(str(path), {k: v for k, v in model.state_dict().items() if k in layout.keys}, load_config(cfg), layout)
    return str(path)


@pytest.fixture
def files(tmp_path):
    """A tiny ALBEF and a tiny VQA checkpoint, an image (96 x 72) and the shapes answer list."""
    image = render(ALL_ATTRIBUTES[3], 64, random.Random(0)).resize((96, 72))
    image.save(tmp_path / "shapes.png")
    (tmp_path / "answers.json").write_text(json.dumps(shapes_answers()))
    return {"albef": save(tiny_albef(), "tiny", tmp_path / "albef.pt"),
            "vqa": save(tiny_vqa(spread=0.5), "tiny_vqa", tmp_path / "vqa.pt"),
            "image": str(tmp_path / "shapes.png"), "answers": str(tmp_path / "answers.json"), "out": tmp_path / "out"}


PANEL_96x72 = (PANEL, round(72 * PANEL / 96))


def test_visualize_draws_a_vqa_answer_with_the_top_answers(files, capsys):
    from albef_ds.visualize import main

    out = files["out"]
    assert main(["--checkpoint", files["vqa"], "--image", files["image"], "--question", "Is there a red star?",
                 "--answer_list", files["answers"], "--output_dir", str(out)]) == 0
    (path,) = capsys.readouterr().out.split()
    assert path == str(out / "shapes__is_there_a_red_star_answer.png")
    # image, top answers, whole question, five words
    assert png_size(path) == grid_size(PANEL_96x72, 3 + 5)
    assert main(["--checkpoint", files["vqa"], "--image", files["image"], "--question", "is there a red star",
                 "--answer", "no", "--output_dir", str(out / "given"), "--layer", "3"]) == 0
    assert png_size(capsys.readouterr().out.split()[0]) == grid_size(PANEL_96x72, 8)


def test_visualize_draws_raw_attention_averaged_per_head_and_one_head(files, capsys):
    from albef_ds.visualize import main

    base = ["--image", files["image"], "--method", "attention"]
    out = files["out"]
    assert main(["--checkpoint", files["albef"], *base, "--text", "two red stars", "--output_dir", str(out)]) == 0
    (mean,) = capsys.readouterr().out.split()
    assert os.path.basename(mean) == "shapes__two_red_stars_attention.png"
    assert png_size(mean) == grid_size(PANEL_96x72, 1 + 4)          # image, [CLS], three words
    assert main(["--checkpoint", files["albef"], *base, "--text", "two red stars", "--output_dir", str(out),
                 "--heads", "2", "--layer", "3"]) == 0
    (head,) = capsys.readouterr().out.split()
    assert os.path.basename(head) == "shapes__two_red_stars_attention_head2.png" and png_size(head) == png_size(mean)
    assert main(["--checkpoint", files["albef"], *base, "--text", "two red stars", "--output_dir", str(out),
                 "--heads", "all"]) == 0
    per_token = capsys.readouterr().out.split()
    assert [os.path.basename(p) for p in per_token] == [f"shapes__two_red_stars_attention_{i}_{t}.png" for i, t in
                                                        enumerate(["cls", "two", "red", "stars"])]
    assert all(png_size(p) == grid_size(PANEL_96x72, 1 + 4, columns=HEAD_COLUMNS) for p in per_token)
    # a VQA checkpoint's question encoder, asked its question
    assert main(["--checkpoint", files["vqa"], *base, "--question", "how many stars", "--output_dir", str(out)]) == 0
    assert os.path.basename(capsys.readouterr().out.split()[0]) == "shapes__how_many_stars_attention.png"


@pytest.mark.parametrize("checkpoint, args, message", [
    ("albef", ["--question", "is there a star", "--answer", "yes"],
     "--question: checkpoint {albef} holds a ALBEF, not a VQA model (a caption goes in --text)"),
    ("vqa", ["--text", "a star"], "checkpoint {vqa} holds a VQAModel, which has no ITM head: ask it with --question"),
    ("vqa", ["--question", " ?! ", "--answer", "yes"], "--question ' ?! ' is empty once cleaned"),
    ("vqa", ["--question", "how many"], "VQA pictures need the answer to draw: --answer, or --answer_list"),
    ("vqa", ["--question", "how many", "--answer", "2", "--layer", "1"],
     "--layer 1: the model's fusion layers of BERT are 2..3"),
    ("albef", ["--text", "a star", "--answer", "yes"], "--answer and --answer_list go with --question"),
    ("albef", ["--text", "a star", "--method", "attention", "--layer", "4"],
     "--layer 4: the model's fusion layers of BERT are 2..3"),
    ("albef", ["--text", "a star", "--method", "attention", "--heads", "4"],
     "--heads 4: the model's cross-attention has 4 heads (0..3)"),
    ("albef", ["--text", "a star", "--method", "attention", "--heads", "some"], "--heads some: 'mean', 'all' or"),
    ("albef", ["--text", "a star", "--heads", "all"], "--heads goes with --method attention"),
    ("albef", ["--text", "a star", "--method", "attention", "--mode", "itc"], "--mode chooses ITM or ITC"),
    ("albef", ["--text", "a star", "--layer", "4"], "Grad-CAM layer 4 (mode itm): the model's fusion layers"),
    ("answers_missing", ["--question", "how many"], "answer list {answers_missing}: no such file"),
])
def test_visualize_bad_input_is_one_line_and_writes_nothing(files, capsys, checkpoint, args, message):
    from albef_ds.visualize import main

    named = dict(files, answers_missing=str(files["out"].parent / "none.json"))
    if checkpoint == "answers_missing":
        args = [*args, "--answer_list", named["answers_missing"]]
        checkpoint = "vqa"
    code = main(["--checkpoint", files[checkpoint], "--image", files["image"], "--output_dir", str(files["out"]), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert message.format(**named) in err, err
    assert not files["out"].exists()


def test_pictures_of_two_images_and_of_boxes():
    from albef_ds.pictures import class_panels, grounding_panels

    image = render(ALL_ATTRIBUTES[5], 64, random.Random(1)).resize((128, 64))
    heat = torch.rand(8, 8)
    picture = grounding_panels(image, "the red star", heat, [10, 5, 30, 20], [60, 10, 40, 40], 0.0)
    assert picture.size == grid_size((PANEL, PANEL // 2), 2)
    # the referred box in green (lime) and the picked one in red, at the panel's scale
    scale = PANEL / 128
    left = 8 + PANEL + 8                                       # the second panel's x
    pixels = picture.load()
    assert pixels[left + int(60 * scale), 32 + int(30 * scale)] == (0, 255, 0)
    assert pixels[left + int(10 * scale), 32 + int(12 * scale)] == (255, 0, 0)
    pair = class_panels([image, image.transpose(Image.FLIP_LEFT_RIGHT)], "two red stars: True 0.90", [heat, heat.t()])
    assert pair.size == grid_size((PANEL, PANEL // 2), 4)


# ---- each task's pictures of its evaluation items ------------------------------------------------

def trained_hook(task_name, overrides, model):
    """The task's evaluator built from its config, and its pictures of the first two items, twice:
    (pictures, evaluator)."""
    cfg = load_config(task_name, overrides)
    task = get_task(cfg)
    evaluator = task.evaluator("unused")
    first, again = (task.eval_pictures(evaluator, model, 2) for _ in range(2))
    assert list(first) == list(again)                       # the same items, the same names, every time
    return first, evaluator


def test_each_task_draws_its_evaluation_items(tmp_path, grounding_corpus):
    from albef_ds.config import SyntheticConfig
    from albef_ds.synthetic.nlvr import write_nlvr_shapes
    from albef_ds.synthetic.shapes import write_synthetic_corpus
    from albef_ds.synthetic.ve import write_ve_shapes
    from albef_ds.synthetic.vqa import write_vqa_corpus

    shapes = write_synthetic_corpus(str(tmp_path / "shapes"), SyntheticConfig(train_samples=0, heldout_samples=3,
                                                                               samples_per_shard=3))
    pictures, evaluator = trained_hook("tiny", [f"eval.data=[{shapes['heldout'][0]['shards'][0]}]"], tiny_albef())
    assert list(pictures) == ["caption_0", "caption_1"]
    for i, picture in enumerate(pictures.values()):          # image, sentence, a panel per word of the caption
        assert picture.size == grid_size((PANEL, PANEL), 2 + len(evaluator.data.captions[i][0].split()))

    g = grounding_corpus
    pictures, _ = trained_hook("tiny_grounding", [f"eval.data=[{g['val']}]", f"eval.image_root={g['image_root']}",
                                               f"grounding.dets={g['dets']}"], tiny_albef())
    assert list(pictures) == ["expression_0", "expression_1"]
    assert all(p.size == grid_size((PANEL, PANEL), 2) for p in pictures.values())

    vqa = write_vqa_corpus(str(tmp_path / "vqa"), train_images=0, heldout_images=1, vg_images=0)
    pictures, evaluator = trained_hook("tiny_vqa", [f"eval.data=[{vqa['heldout']}]", f"eval.image_root={vqa['vqa_root']}",
                                         f"vqa.answer_list={vqa['answer_list']}"], tiny_vqa(spread=0.5).eval())
    assert list(pictures) == ["question_0", "question_1"]
    for i, picture in enumerate(pictures.values()):          # image, answers, question, a panel per word
        assert picture.size == grid_size((PANEL, PANEL), 3 + len(evaluator.data.questions[i].split()))

    for task_name, write, model_class in (("tiny_snli_ve", write_ve_shapes, "VEClassifier"),
                                          ("tiny_nlvr2", write_nlvr_shapes, "NLVRClassifier")):
        corpus = write(str(tmp_path / task_name), train=0, dev=3, test=0)
        torch.manual_seed(0)
        model = get_task(load_config(task_name)).build_inference_model().eval()
        assert type(model).__name__ == model_class
        pictures, _ = trained_hook(task_name, [f"eval.data=[{corpus['dev']}]",
                                               f"eval.image_root={corpus['image_root']}"], model)
        assert list(pictures) == ["sample_0", "sample_1"]
        assert all(p.size == grid_size((PANEL, PANEL), 2 * model.images_per_text) for p in pictures.values())


def test_the_demo_ends_with_caption_grad_cam_and_raw_attention(tmp_path, capsys):
    from albef_ds.demo import write_demo_pictures

    cfg = albef_ds.load_config("tiny", ["data.synthetic.train_samples=4", "data.synthetic.heldout_samples=3",
                                        "data.synthetic.samples_per_shard=4"])
    paths = write_demo_pictures(tiny_albef(), cfg, str(tmp_path))
    names = [os.path.basename(p) for p in paths]
    assert len(paths) == 2 * 3 and all(png_size(p) for p in paths)
    assert all(p.startswith(str(tmp_path / "pictures" / "heldout_")) for p in paths)
    assert sum(n.endswith("_words.png") for n in names) == 2 and sum(n.endswith("_attention.png") for n in names) == 2
    last = capsys.readouterr().out.strip().splitlines()[-2:]
    assert last[0].startswith("Grad-CAM pictures of held-out images: ") and last[1].startswith("raw attention")
    assert all(p in "\n".join(last) for p in paths)


def test_the_trainer_logs_the_tasks_pictures_when_asked_and_only_then(tmp_path):
    """eval.pictures: 0 asks the task for nothing; N asks for N and the logger writes each picture
    as a TensorBoard image `pictures/<name>` at the step. A negative count is a config error."""
    from types import SimpleNamespace

    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    from albef_ds.config import ConfigError
    from albef_ds.engine.log import MetricsLogger
    from albef_ds.engine.trainer import Trainer

    asked = []

    def eval_pictures(evaluator, model, count):
        asked.append(count)
        return {"caption_0": Image.new("RGB", (40, 30), "red")}

    log = MetricsLogger(str(tmp_path), 10, enabled=True)
    trainer = SimpleNamespace(task=SimpleNamespace(eval_pictures=eval_pictures), evaluator=None, log=log,
                              state=SimpleNamespace(step=3), cfg=load_config("tiny", ["eval.pictures=0"]))
    Trainer._log_pictures(trainer, None)
    assert asked == []
    trainer.cfg = load_config("tiny", ["eval.pictures=2"])
    Trainer._log_pictures(trainer, None)
    log.close()
    assert asked == [2]
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={IMAGES: 0})
    events.Reload()
    (image,) = events.Images("pictures/caption_0")
    assert (image.step, image.width, image.height) == (3, 40, 30)
    with pytest.raises(ConfigError, match="eval.pictures is -1: it must be at least 0"):
        load_config("tiny", ["eval.pictures=-1"])
