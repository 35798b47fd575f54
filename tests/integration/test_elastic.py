"""Elastic resume: a checkpoint saved on 2 ranks continues on 1 and on 4 (ZeRO-2 and ZeRO-3), with the
weights, Adam moments and momentum model as saved, and the same global batches then give the
uninterrupted 2-rank run's losses and weights; bad checkpoints stop before anything is built."""
import shutil

import pytest
import torch
from helpers import GLOBAL_BATCH, ds_config, engine_cfg, global_batches, run_ranks

from albef_ds.checkpoint.elastic import plan_batch
from albef_ds.config import ConfigError

SAVED_AT = 3
STEPS = 6


def tiny_cfg(world, *extra):
    return engine_cfg(world, "model.momentum=0.9", *extra)


def snapshot(trainer):
    """Every rank: the fp32 masters, Adam moments and momentum weights, whole (collectives)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    optimizer = trainer.engine.optimizer
    if hasattr(optimizer, "_hp_optimizer_states_linked"):
        # DeepSpeed (0.19) links each parameter to its slice of the Adam moments once, after the
        # first group's first step, before the second group has moments: link again to read them
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    out = {"master": {}, "exp_avg": {}, "exp_avg_sq": {}, "momentum": {}}
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            out["master"][name] = safe_get_full_fp32_param(p).clone()
            out["exp_avg"][name] = safe_get_full_optimizer_state(p, "exp_avg").clone()
            out["exp_avg_sq"][name] = safe_get_full_optimizer_state(p, "exp_avg_sq").clone()
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for _, pm in trainer.momentum.pairs:
        with deepspeed.zero.GatheredParameters([pm]):
            out["momentum"][names[id(pm)]] = pm.detach().float().clone()
    out["queue"] = trainer.model.image_queue.clone()
    return out


def saved_run(rank, world, stage, out_dir):
    """2 ranks: SAVED_AT steps, a save, then on to STEPS; the state at the save and the losses after."""
    from albef_ds.engine import Trainer

    cfg = tiny_cfg(world)
    trainer = Trainer(cfg, ds_config(stage), out_dir, batches=global_batches(cfg, rank, world, 0))
    data = iter(trainer.batches)
    for _ in range(SAVED_AT):
        trainer.train_step(data)
    trainer.save()
    at_save = snapshot(trainer)
    losses = [trainer.train_step(data)[0]["loss"].item() for _ in range(STEPS - SAVED_AT)]
    end = snapshot(trainer)
    trainer.close()
    return {"at_save": at_save, "losses": losses, "end": end}


def resumed_run(rank, world, stage, out_dir):
    """`world` ranks resume the 2-rank checkpoint and take the same global batches on."""
    import torch.distributed as dist

    from albef_ds.engine import Trainer

    cfg = tiny_cfg(2)                    # the run's config as saved: batch 4 on 2 ranks
    trainer = Trainer(cfg, ds_config(stage), out_dir, resume=f"step{SAVED_AT:08d}",
                      batches=global_batches(cfg, rank, world, SAVED_AT))
    assert trainer.state.step == SAVED_AT and trainer.cfg.train.batch_size == GLOBAL_BATCH // world
    after_resume = snapshot(trainer)
    data = iter(trainer.batches)
    losses = []
    for _ in range(STEPS - SAVED_AT):
        loss = trainer.train_step(data)[0]["loss"].detach().clone()
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
    end = snapshot(trainer)
    trainer.close()
    return {"after_resume": after_resume, "losses": losses, "end": end}


@pytest.mark.parametrize("stage", [2, 3])
def test_a_two_rank_checkpoint_continues_on_one_and_on_four_ranks(tmp_path, stage):
    saved = run_ranks(saved_run, 2, stage, str(tmp_path / "run"))
    reference = saved[0]
    # the 2-rank run's mean loss per step (each rank's loss is its share of the global batch's)
    ref_losses = [(a + b) / 2 for a, b in zip(saved[0]["losses"], saved[1]["losses"])]
    for world in (1, 4):
        folder = tmp_path / f"on{world}"
        shutil.copytree(tmp_path / "run", folder)
        # what a conversion cut off halfway leaves: the next resume converts afresh
        leftover = folder / "checkpoints" / f"step{SAVED_AT:08d}" / ".universal.tmp"
        leftover.mkdir()
        (leftover / "half_written.pt").write_bytes(b"not a checkpoint")
        got = run_ranks(resumed_run, world, stage, str(folder))[0]
        for kind in ("master", "exp_avg", "exp_avg_sq", "momentum"):
            for name, want in reference["at_save"][kind].items():
                assert torch.equal(got["after_resume"][kind][name], want), (world, kind, name)
        assert torch.equal(got["after_resume"]["queue"], reference["at_save"]["queue"])
        assert got["losses"] == pytest.approx(ref_losses, rel=1e-4), (world, got["losses"], ref_losses)
        for kind in ("master", "momentum"):
            for name, want in reference["end"][kind].items():
                torch.testing.assert_close(got["end"][kind][name], want, rtol=1e-4, atol=1e-6,
                                           msg=f"{world} ranks, {kind} {name}")
        assert (folder / "checkpoints" / f"step{SAVED_AT:08d}" / "universal").is_dir()   # kept beside


def test_the_batch_plan_keeps_the_global_batch_or_says_why_not():
    saved = {"world_size": 8, "batch_size": 64, "grad_accum": 1}
    assert plan_batch(tiny_cfg(1), saved, 4)[:2] == (128, 1)                 # fewer ranks: bigger micro batch
    assert plan_batch(tiny_cfg(1), saved, 16)[:2] == (32, 1)
    micro, accum, notes = plan_batch(tiny_cfg(1, "train.max_micro_batch=64"), saved, 4)
    assert (micro, accum) == (64, 2) and "differ from the old run's" in notes[-1]   # memory: accumulation
    assert plan_batch(tiny_cfg(1, "train.elastic_batch=per_rank"), saved, 4)[:2] == (64, 1)
    with pytest.raises(ConfigError, match=r"global micro-batch of 512 .* on 3 ranks: .*\(1, 2, 4, 8, 16"):
        plan_batch(tiny_cfg(1), saved, 3)


def refused_fn(rank, world, folder, overrides, tag):
    from albef_ds.engine import Trainer

    cfg = tiny_cfg(2, *overrides)
    with pytest.raises(ConfigError) as error:
        Trainer(cfg, ds_config(2), folder, resume=tag, batches=global_batches(cfg, rank, world, 0))
    return str(error.value)


def test_incomplete_other_shape_or_other_task_checkpoints_are_refused(tmp_path):
    run_ranks(saved_run, 2, 2, str(tmp_path / "run"))
    tag = f"step{SAVED_AT:08d}"
    folder = tmp_path / "run" / "checkpoints" / tag
    other_shape = run_ranks(refused_fn, 1, str(tmp_path / "run"), ["model.embed_dim=32"], tag)[0]
    assert "holds another model: " in other_shape and "(32," in other_shape
    other_task = run_ranks(refused_fn, 1, str(tmp_path / "run"), ["task=retrieval"], tag)[0]
    assert "is of task 'pretrain', this run trains 'retrieval'" in other_task
    (folder / "albef_rank1.pt").unlink()
    incomplete = run_ranks(refused_fn, 1, str(tmp_path / "run"), [], tag)[0]
    assert "passes its check" in incomplete and f"{folder / 'albef_rank1.pt'}: missing" in incomplete
    (folder / "run.json").unlink()
    assert "run.json" in run_ranks(refused_fn, 1, str(tmp_path / "run"), [], tag)[0]
