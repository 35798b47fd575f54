"""2 gloo ranks = 1 process for NLVR2, its text-assignment pre-step and SNLI-VE: the training losses
and gradients of a global batch split over 2 ranks (the pre-step pairs images across the ranks),
the evaluator's predictions, and the Trainer's losses under ZeRO-3 (which partitions the modules a
pair of doubled layers shares) against ZeRO-2 in one process."""
import pytest
import torch
from helpers import run_ranks

from albef_ds.config import load_config
from albef_ds.tasks import get_task
from albef_ds.tasks.base import StepContext

GLOBAL = 8
TASKS = ("nlvr2_ta", "nlvr2", "snli_ve")


def global_batch(task, model, step):
    """Step `step`'s global batch; `model`: the task's model (or its class), for its shape."""
    from albef_ds.tokenizer import build_tokenizer, tokenize

    g = torch.Generator().manual_seed(100 + step)
    words = ["red circles on the left", "both images have blue stars", "two green squares",
             "neither image has purple crosses", "a small yellow triangle at the top"]
    ids, mask = tokenize(build_tokenizer("tiny_vocab.txt"), [words[(i + step) % 5] for i in range(GLOBAL)], 16)
    if task == "nlvr2_ta":
        return {"image": torch.randn(GLOBAL, 3, 64, 64, generator=g), "input_ids": ids, "attention_mask": mask}
    images = torch.randn(GLOBAL, model.images_per_text, 3, 64, 64, generator=g)
    return {"images": images, "input_ids": ids, "attention_mask": mask,
            "label": torch.randint(0, model.classes, (GLOBAL,), generator=g)}


def losses_and_gradients(rank, world, eval_data=None):
    """Per task: the loss of this rank's rows (two steps: the second after an SGD update) and the
    gradients averaged over ranks, as DeepSpeed applies them; and the evaluator's predictions."""
    import albef_ds.distributed as dist
    from albef_ds.data.labelled import NLVR_LABELS
    from albef_ds.eval.classification import predict, read_labelled_set
    from albef_ds.tokenizer import build_tokenizer

    out = {}
    for task in TASKS:
        torch.manual_seed(0)
        cfg = load_config("tiny", [f"task={task}", "model.alpha=0.4"])
        model = get_task(cfg).build_model()
        b = GLOBAL // world
        losses, grads = [], None
        for step in range(2):
            batch = {k: v[rank * b:(rank + 1) * b] for k, v in global_batch(task, model, step).items()}
            model.zero_grad()
            loss, metrics = model(batch, StepContext(step, 4, torch.Generator().manual_seed(step)))
            loss.backward()
            grads = {n: dist.all_reduce_sum(p.grad.clone()) / world for n, p in model.named_parameters()
                     if p.grad is not None}
            losses.append(dist.all_reduce_sum(loss.detach().clone()) / world)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in grads:
                        p.sub_(0.5 * grads[n])
        out[task] = {"losses": torch.stack(losses), "grads": grads}
        if task == "nlvr2" and eval_data is not None:
            data = read_labelled_set(eval_data[0], NLVR_LABELS, 2, eval_data[1],
                                     keep=lambda i: dist.owner_of(i, 3, world) == rank)
            out["predictions"] = predict(model.eval(), data, build_tokenizer("tiny_vocab.txt"), 64, 16, batch_size=3)
    return out


def model_and_trainer(rank, world, data, stage, out_dir):
    return losses_and_gradients(rank, world, data), trajectory(rank, world, stage, out_dir)


def test_two_ranks_equal_one_process(tmp_path):
    from albef_ds.synthetic.nlvr import write_nlvr_shapes

    corpus = write_nlvr_shapes(str(tmp_path / "nlvr"), train=0, dev=13, test=0)
    data = (corpus["dev"], corpus["image_root"])
    one = losses_and_gradients(0, 1, data)
    one_trainer = run_ranks(trajectory, 1, 2, str(tmp_path / "one"))[0]
    two, two_trainer = zip(*run_ranks(model_and_trainer, 2, data, 3, str(tmp_path / "two")))
    for task in TASKS:
        for rank in (0, 1):
            got = two[rank][task]
            torch.testing.assert_close(got["losses"], one[task]["losses"], rtol=1e-5, atol=1e-6, msg=task)
            assert got["grads"].keys() == one[task]["grads"].keys()
            for name, grad in one[task]["grads"].items():
                torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=f"{task} {name}")
    # 13 samples in batches of 3: the ranks evaluate 3 and 2 batches, one of them short
    assert torch.equal(two[0]["predictions"], one["predictions"]) and torch.equal(two[1]["predictions"], one["predictions"])
    assert set(one["predictions"].tolist()) <= {0, 1} and len(one["predictions"]) == 13
    for task, losses in one_trainer.items():
        assert losses[-1] != losses[0]
        # fp32 on CPU: the split changes only the order of reductions
        assert two_trainer[0][task] == pytest.approx(losses, rel=1e-4), (task, two_trainer[0][task], losses)


def trajectory(rank, world, stage, out_dir):
    """The pre-step's and NLVR2's losses over 3 steps of the Trainer (global batch 8), averaged over
    ranks: their doubled layers share modules (a pair's keys and values), which ZeRO-3 partitions
    and gathers once per use."""
    import json
    import os

    import torch.distributed as dist

    from albef_ds.engine import Trainer

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "ds_configs",
                           f"zero{stage}.json")) as f:
        ds = json.load(f)
    out = {}
    for task in ("nlvr2_ta", "nlvr2"):
        cfg = load_config("tiny", [f"task={task}", "model.alpha=0.4", f"train.batch_size={GLOBAL // world}",
                                   "train.max_steps=3", "train.warmup_steps=0", "train.lr=3e-4", "train.save_every=100"])

        def batches(model):
            b, step = GLOBAL // world, 0
            while True:
                yield {k: v[rank * b:(rank + 1) * b] for k, v in global_batch(task, model, step).items()}
                step += 1

        trainer = Trainer(cfg, ds, f"{out_dir}/{task}", batches=batches(get_task(cfg).inference_class),
                          steps_per_epoch=2)
        data = iter(trainer.batches)
        losses = []
        for _ in range(3):
            loss = trainer.train_step(data)[0]["loss"].reshape(1)
            if world > 1:
                dist.all_reduce(loss)
            losses.append(loss.item() / world)
        trainer.close()
        out[task] = losses
    return out

