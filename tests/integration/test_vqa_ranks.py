"""VQA over real gloo processes: 2 ranks give one process's training losses and gradients (the
model alone, and the engine under ZeRO-3 against ZeRO-2 in one process), and the same answers in
evaluation (API and `python -m albef_ds.evaluate vqa`); an unreadable image is reported, not
dropped; a checkpoint that is not a VQA model, or a missing answer list, stops the command, named."""
import contextlib
import io
import json
import os

import pytest
import torch
import torch.distributed as dist
from helpers import run_ranks
from vqa_helpers import ANSWER_LIST, TOKENIZER, codec, heldout_questions, samples, tiny_vqa

from albef_ds.checkpoint.files import save_albef_ds
from albef_ds.checkpoint.layout import layout_of
from albef_ds.config import load_config
from albef_ds.eval.vqa_answering import RESULT_FILE, evaluate_vqa, read_vqa_set
from albef_ds.evaluate import main
from albef_ds.tasks.base import StepContext

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUESTIONS = 6             # rank 0 gets 3 questions with 6 answers, rank 1 three with 9


def losses_and_grads(rank, world):
    model = tiny_vqa(0, spread=0.1)
    with torch.no_grad():
        for p in model.text_decoder_m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    b = QUESTIONS // world
    mine = samples(QUESTIONS)[rank * b:(rank + 1) * b]
    loss, metrics = model(codec().collate(mine, ["k"] * b), StepContext(3, 4))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    loss = loss.detach().clone()
    if world > 1:                       # what DeepSpeed does with the gradients of the ranks
        for value in [loss, *grads.values()]:
            dist.all_reduce(value)
            value /= world
    return loss, grads, metrics["alpha"]


def engine_losses(rank, world, out_dir, stage):
    """The losses of three steps of the engine under ZeRO `stage`, mean over the ranks."""
    from albef_ds.engine import Trainer

    cfg = load_config("tiny_vqa", [f"train.batch_size={QUESTIONS // world}", "train.max_steps=3",
                                   "train.warmup_steps=0", "train.log_every=1", "model.momentum=0.5"])
    b = QUESTIONS // world

    def batches():
        step = 0
        while True:
            mine = samples(QUESTIONS, seed=step)[rank * b:(rank + 1) * b]
            yield codec().collate(mine, ["k"] * b)
            step += 1

    trainer = Trainer(cfg, os.path.join(ROOT, "ds_configs", f"zero{stage}.json"), out_dir, batches=batches(),
                      steps_per_epoch=2)
    data, losses = iter(trainer.batches), []
    for _ in range(3):
        losses.append(trainer.train_step(data)[0]["loss"])
    losses = torch.stack(losses)
    if world > 1:                       # each rank's loss is its half's: their mean is the batch's
        dist.all_reduce(losses)
        losses /= world
    trainer.close()
    return losses.tolist()


def training_fn(rank, world, out_dir):
    """The model's loss and gradients on this rank's questions, then three steps of the engine
    (ZeRO-2 in one process, ZeRO-3 on 2 ranks; alpha ramped in) on the same global batches."""
    return losses_and_grads(rank, world), engine_losses(rank, world, out_dir, 3 if world > 1 else 2)


def test_training_over_two_ranks_equals_one_process(tmp_path):
    ((reference, ref_engine),) = run_ranks(training_fn, 1, str(tmp_path / "one"))
    loss, grads, alpha = reference
    assert alpha == pytest.approx(0.3)             # distillation on (ramped: step 3 of 4)
    for (got_loss, got_grads, _), got_engine in run_ranks(training_fn, 2, str(tmp_path / "two")):
        assert got_loss.item() == pytest.approx(loss.item(), rel=1e-5)
        assert got_grads.keys() == grads.keys()
        for name in grads:
            assert torch.allclose(got_grads[name], grads[name], atol=1e-6, rtol=1e-4), name
        assert got_engine == pytest.approx(ref_engine, rel=1e-5)
    assert len(set(ref_engine)) == 3               # the steps trained: the losses moved


def save(folder, name, model, config):
    layout = layout_of(model)
    save_albef_ds(os.path.join(folder, name), {k: v for k, v in model.state_dict().items() if k in layout.keys},
                  load_config(config), layout)


def write_inputs(folder):
    """Checkpoints of the tiny VQA model and of a tiny pretraining model, questions with answers
    (one image missing) and the answer list."""
    from albef_ds import build_model

    save(folder, "vqa.pt", tiny_vqa(0, spread=0.3), "tiny_vqa")
    save(folder, "pretrain.pt", build_model("tiny"), "tiny")
    data = heldout_questions(folder, 7)
    entries = [{"question_id": 100 + i, "question": q, "image": os.path.basename(image), "dataset": "vqa",
                "answer": [ANSWER_LIST[i]] * 6 + [ANSWER_LIST[i + 1]] * 4, "answer_type": ["other", "number"][i % 2]}
               for i, (q, image) in enumerate(zip(data.questions, data.images))]
    entries[3]["image"] = "gone.png"
    with open(os.path.join(folder, "questions.json"), "w") as f:
        json.dump(entries, f)
    with open(os.path.join(folder, "answer_list.json"), "w") as f:
        json.dump(ANSWER_LIST, f)


def command(folder, out_dir, checkpoint="vqa.pt", answer_list="answer_list.json"):
    return ["vqa", "--checkpoint", os.path.join(folder, checkpoint), "--data", os.path.join(folder, "questions.json"),
            "--image_root", folder, "--answer_list", os.path.join(folder, answer_list),
            "--output_dir", out_dir, "--batch_size", "2", "--k_test", "4", "--max_skipped", "0.2"]


def evaluate_fn(rank, world, folder):
    model = tiny_vqa(0, spread=0.3).eval()
    data = read_vqa_set(os.path.join(folder, "questions.json"), folder)
    # one of the 7 images is gone on purpose: a share of the set allowed to be skipped
    out = evaluate_vqa(model, data, ANSWER_LIST, TOKENIZER, 64, k_test=4, batch_size=2,
                       result_file=os.path.join(folder, f"api{world}.json"), max_skipped=0.2)
    out_dir = os.path.join(folder, f"cli{world}")
    code = main(command(folder, out_dir))
    errors = None
    if world == 1:                      # bad input, once
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors):
            wrong = main(command(folder, os.path.join(folder, "bad"), "pretrain.pt"))
            no_list = main(command(folder, os.path.join(folder, "bad"), answer_list="nowhere.json"))
        errors = (wrong, no_list, errors.getvalue())
    if rank > 0:                        # rank 0 writes the files
        return out, code, None, None, errors
    with open(os.path.join(out_dir, "metrics.json")) as f, open(os.path.join(out_dir, RESULT_FILE)) as g:
        return out, code, json.load(f), json.load(g), errors


def test_two_ranks_give_one_processs_answers_and_report_an_unreadable_image(tmp_path):
    """Also: a pretraining checkpoint or a missing answer list stops the command, named."""
    folder = str(tmp_path)
    write_inputs(folder)
    ((reference, code, metrics, result, errors),) = run_ranks(evaluate_fn, 1, folder)
    assert code == 0
    wrong, no_list, messages = errors
    assert wrong == 2 and f"{folder}/pretrain.pt holds a ALBEF, not the VQAModel" in messages
    assert no_list == 2 and f"--answer_list: answer list {folder}/nowhere.json: no such file" in messages
    assert not os.path.exists(os.path.join(folder, "bad", RESULT_FILE))
    assert reference["questions"] == 7 and reference["answered"] == 6 and reference["skipped"] == 1
    assert reference["skipped_items"] == [f"question 103: image {os.path.join(folder, 'gone.png')} unreadable"]
    assert [r["question_id"] for r in result] == [100, 101, 102, 104, 105, 106]      # 103 not answered
    assert {r["answer"] for r in result} <= set(ANSWER_LIST) and len({r["answer"] for r in result}) > 1
    assert json.load(open(os.path.join(folder, "api1.json"))) == result
    assert {"acc", "acc_other", "acc_number"} <= set(metrics)
    assert {k: metrics[k] for k in reference if k != "result_file"} == {k: v for k, v in reference.items()
                                                                        if k != "result_file"}
    ranks = run_ranks(evaluate_fn, 2, folder)
    for out, code, _, _, _ in ranks:
        assert code == 0
        assert {k: v for k, v in out.items() if k != "result_file"} == {k: v for k, v in reference.items()
                                                                        if k != "result_file"}
    assert ranks[0][3] == result and json.load(open(os.path.join(folder, "api2.json"))) == result
    assert {k: v for k, v in ranks[0][2].items() if k != "result_file"} == {
        k: v for k, v in metrics.items() if k != "result_file"}
