"""What happens when things go wrong during a run (docs/failures.md), with real ranks:
- a damaged newest checkpoint: the resume falls back to the newest one that passes its check, on
  the same or another number of ranks, and trains on with the losses of an undamaged resume from it;
- a fresh start over another run's folder with --start_over moves that run's files aside;
- the checkpoint is saved before its evaluation: an evaluation that fails loses no training, and a
  resume runs the evaluation again before it trains on."""
import json
import os
import shutil

import pytest
from helpers import ds_config, engine_cfg, global_batches, run_ranks

from albef_ds.config import ConfigError
from albef_ds.engine import Trainer


def _losses(folder: str) -> dict:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return {r["step"]: (r["loss"], r["loss_itc"], r["loss_itm"], r["loss_mlm"]) for r in map(json.loads, f)
                if "loss" in r}


def _save_run(rank, world, stage, out_dir):
    cfg = engine_cfg(world, "train.max_steps=4", "train.save_every=2")
    trainer = Trainer(cfg, ds_config(stage), out_dir, batches=global_batches(cfg, rank, world))
    assert trainer.train() == 0
    trainer.close()


def _resume(rank, world, stage, out_dir, tag):
    cfg = engine_cfg(world, "train.max_steps=6", "train.save_every=2")
    trainer = Trainer(cfg, ds_config(stage), out_dir, resume=tag, batches=global_batches(cfg, rank, world, start=2))
    start = trainer.state.step
    assert trainer.train() == 0
    trainer.close()
    return start


def _damage(folder: str, kind: str) -> str:
    names = {"model states": ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"),
             "optimizer shard": ("zero_pp_rank_1_mp_rank_00_optim_states.pt",),
             "momentum partition": ("albef_rank1.pt",)}[kind]
    path = next(os.path.join(folder, n) for n in names if os.path.exists(os.path.join(folder, n)))
    with open(path, "r+b") as f:               # a block of the file overwritten: its size unchanged
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\x00" * 64)
    return path


# every damage to every file kind is found by tests/unit/test_manifest.py; here, one file kind per ZeRO
# stage, on the same and on another number of ranks, end to end
@pytest.mark.parametrize("stage,kind,resume_world", [(1, "model states", 2), (2, "optimizer shard", 1),
                                                     (3, "momentum partition", 2)])
def test_a_damaged_checkpoint_falls_back_to_the_newest_that_passes(tmp_path, stage, kind, resume_world):
    run = str(tmp_path / "run")
    run_ranks(_save_run, 2, stage, run)
    saved = _losses(run)
    intact = str(tmp_path / "intact")
    shutil.copytree(run, intact)
    _damage(os.path.join(run, "checkpoints", "step00000004"), kind)
    # the damaged run resumes from 'latest' (step 4, damaged); the intact copy from step 2 by name
    assert run_ranks(_resume, resume_world, stage, run, "") == [2] * resume_world
    assert run_ranks(_resume, resume_world, stage, intact, "step00000002") == [2] * resume_world
    fell_back, reference = _losses(run), _losses(intact)
    for step in (3, 4, 5, 6):
        assert fell_back[step] == pytest.approx(reference[step], rel=1e-6), step
    assert fell_back[1] == saved[1] and fell_back[2] == saved[2]
    damaged = os.listdir(os.path.join(run, "checkpoints", "damaged"))
    assert len(damaged) == 1 and damaged[0].startswith("step00000004-")       # moved aside, not deleted
    with open(os.path.join(run, "checkpoints", "latest")) as f:
        assert f.read() == "step00000006"


def _two_runs_into_one_folder(rank, world, out_dir):
    cfg = engine_cfg(world, "train.max_steps=2")
    first = Trainer(cfg, ds_config(2), out_dir, batches=global_batches(cfg, rank, world))
    first.train()
    first.close()
    try:
        Trainer(cfg, ds_config(2), out_dir, batches=global_batches(cfg, rank, world))
        refused = None
    except ConfigError as exc:
        refused = str(exc)
    again = Trainer(engine_cfg(world, "train.max_steps=3"), ds_config(2), out_dir,
                    batches=global_batches(cfg, rank, world), start_over=True)
    again.train()
    again.close()
    return refused


def test_start_over_moves_the_previous_runs_files_aside(tmp_path):
    (refused,) = run_ranks(_two_runs_into_one_folder, 1, str(tmp_path))
    assert "holds the checkpoints of a pretrain run (latest checkpoint step00000002, step 2" in refused
    previous = [n for n in os.listdir(tmp_path) if n.startswith("previous-")]
    assert len(previous) == 1
    moved = tmp_path / previous[0]
    assert sorted(os.listdir(moved)) == ["checkpoints", "metrics.jsonl", "tb"]
    assert sorted(_losses(str(moved))) == [1, 2] and sorted(_losses(str(tmp_path))) == [1, 2, 3]
    assert os.listdir(moved / "checkpoints" / "step00000002")                 # nothing deleted


def _evaluated_run(rank, world, out_dir, data, break_image_at):
    """Retrieval fine-tuning, 2 steps an epoch, evaluated every epoch on `data`; at
    `break_image_at` (a step) an evaluation image is overwritten with garbage, so the evaluation
    after it fails; with None the run is the uninterrupted reference."""
    cfg = engine_cfg(world, "task=retrieval", "train.max_steps=6", "train.save_every=100", "eval.every_epochs=1",
                     f"eval.data=[{data['json']}]", f"eval.image_root={data['root']}", "eval.k_test=2",
                     "eval.batch_size=4")

    def batches(start=0):
        for i, batch in enumerate(global_batches(cfg, rank, world, start)):
            if start + i == break_image_at:
                with open(data["image"], "wb") as f:
                    f.write(b"garbage")
            yield batch

    trainer = Trainer(cfg, ds_config(2), out_dir, batches=batches(), steps_per_epoch=2)
    try:
        trainer.train()
        failure = None
    except ConfigError as exc:
        failure = str(exc)
    trainer.close()
    if failure is None:
        return None
    with open(data["image"], "wb") as f:              # the user mends the image, then resumes
        f.write(data["bytes"])
    resumed = Trainer(cfg, ds_config(2), out_dir, resume="", batches=batches(4), steps_per_epoch=2)
    start = resumed.state.step
    resumed.train()
    resumed.close()
    return failure, start


def test_the_checkpoint_is_saved_before_its_evaluation_and_a_resume_evaluates_it(tmp_path):
    from helpers import shapes_set

    data = shapes_set(4)
    root = tmp_path / "images"
    root.mkdir()
    for i, png in enumerate(data.images):
        (root / f"{i}.png").write_bytes(png)
    ann = tmp_path / "val.json"
    ann.write_text(json.dumps([{"image": f"{i}.png", "caption": c} for i, c in enumerate(data.captions)]))
    inputs = {"json": str(ann), "root": str(root), "image": str(root / "1.png"), "bytes": data.images[1]}
    assert run_ranks(_evaluated_run, 1, str(tmp_path / "reference"), inputs, None) == [None]
    ((failure, start),) = run_ranks(_evaluated_run, 1, str(tmp_path / "broken"), inputs, 3)
    # the evaluation after step 4 failed; step 4 was saved first and the resume began there
    assert "the evaluation at step 4 failed, after its checkpoint step00000004 was saved" in failure
    assert "1 evaluation images could not be read" in failure and start == 4

    def records(folder):
        with open(folder / "metrics.jsonl") as f:
            rows = [json.loads(line) for line in f]
        return ({r["step"]: r["loss"] for r in rows if "loss" in r},
                {r["step"]: r["eval/r_mean"] for r in rows if "eval/r_mean" in r})

    losses, evals = records(tmp_path / "broken")
    want_losses, want_evals = records(tmp_path / "reference")
    assert evals == pytest.approx(want_evals, rel=1e-6) and sorted(evals) == [2, 4, 6]
    assert losses == pytest.approx(want_losses, rel=1e-6)
    evaluation = json.loads((tmp_path / "broken" / "checkpoints" / "step00000004" / "evaluation.json").read_text())
    assert evaluation["r_mean"] == pytest.approx(want_evals[4], rel=1e-6)
    best = json.loads((tmp_path / "broken" / "checkpoints" / "best.json").read_text())
    want_best = max(want_evals, key=lambda s: (want_evals[s], -s))
    assert best["tag"] == f"step{want_best:08d}"
