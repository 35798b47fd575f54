"""The DeepSpeed engine on real gloo ranks: ZeRO stages against one process, sharded momentum,
exact resume, config checks, non-finite losses and signals."""
import json
import os
import signal

import pytest
import torch
import torch.distributed as dist
from helpers import GLOBAL_BATCH, ds_config, engine_cfg, global_batches, run_ranks

from albef_ds.config import ConfigError, load_config
from albef_ds.engine import EXIT_REQUEUE, Trainer, resolve_ds_config
from albef_ds.engine.preflight import check_select_metric
from albef_ds.models import transformer_layers
from albef_ds.synthetic.shapes import with_generated_corpus
from albef_ds.tasks import get_task


def mean_over_ranks(value):
    t = torch.tensor([float(value)])
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def trajectory_fn(rank, world, stage, steps, out_dir):
    cfg = engine_cfg(world)
    trainer = Trainer(cfg, ds_config(stage), out_dir, batches=global_batches(cfg, rank, world))
    data = iter(trainer.batches)
    losses = [mean_over_ranks(trainer.train_step(data)[0]["loss"]) for _ in range(steps)]
    optimizer = type(getattr(trainer.engine.optimizer, "optimizer", trainer.engine.optimizer)).__name__
    trainer.close()
    return losses, optimizer


def test_zero_stages_on_two_ranks_follow_one_process(tmp_path):
    """ZeRO-1, 2, 3 and the shipped ZeRO-3 with the optimizer and the parameters offloaded to the
    CPU (ds_configs/zero3_offload.json: DeepSpeed's CPU Adam steps the offloaded fp32 masters)."""
    steps = 5
    reference, _ = run_ranks(trajectory_fn, 1, 2, steps, str(tmp_path / "ref"))[0]
    assert reference[-1] < reference[0]
    for stage in (1, 2, 3, "3_offload"):
        got, optimizer = run_ranks(trajectory_fn, 2, stage, steps, str(tmp_path / f"z{stage}"))[0]
        # fp32 on CPU: the split changes only the order of reductions. Tolerance 1e-4 relative.
        assert got == pytest.approx(reference, rel=1e-4), (stage, got, reference)
        assert (optimizer == "DeepSpeedCPUAdam") == (stage == "3_offload"), (stage, optimizer)


def momentum_fn(rank, world, steps, out_dir):
    import deepspeed

    cfg = engine_cfg(world, "model.momentum=0.9")
    trainer = Trainer(cfg, ds_config(3), out_dir, batches=global_batches(cfg, rank, world))
    pairs = trainer.momentum.pairs
    online = [p for p, _ in pairs]
    momentum = [pm for _, pm in pairs]

    def gathered(params):
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().double().clone() for p in params]

    reference = gathered(online)                 # the momentum model starts as a copy
    assert all(torch.equal(a, b) for a, b in zip(reference, gathered(momentum)))
    data = iter(trainer.batches)
    for _ in range(steps):
        trainer.train_step(data)
        reference = [0.9 * r + 0.1 * o for r, o in zip(reference, gathered(online))]
    got = gathered(momentum)
    worst = max((g - r).abs().max().item() for g, r in zip(got, reference))
    total = sum(r.numel() for r in reference)
    result = {"worst": worst, "local": trainer.momentum.local_elements(), "total": total,
              "moved": max((g - o).abs().max().item() for g, o in zip(got, gathered(online)))}
    trainer.close()
    return result


def test_momentum_model_is_sharded_under_zero3_and_equals_fp32_ema(tmp_path):
    results = run_ranks(momentum_fn, 2, 4, str(tmp_path))
    for r in results:
        assert r["worst"] < 1e-6, r
        assert r["moved"] > 0                      # the online model trained away from the EMA
        assert 0.45 * r["total"] <= r["local"] <= 0.55 * r["total"], r


def resume_fn(rank, world, stage, corpus, out_dir):
    extra = [f"data.corpora={json.dumps(corpus)}", "data.workers=1", "train.save_every=3"]
    full = Trainer(engine_cfg(world, "train.max_steps=6", *extra), ds_config(stage), f"{out_dir}/full")
    assert full.train() == 0
    full.close()
    first = Trainer(engine_cfg(world, "train.max_steps=3", *extra), ds_config(stage), f"{out_dir}/split")
    assert first.train() == 0
    first.close()
    second = Trainer(engine_cfg(world, "train.max_steps=6", *extra), ds_config(stage), f"{out_dir}/split", resume="")
    assert second.state.step == 3
    assert second.train() == 0
    second.close()

    def losses(folder):
        with open(f"{folder}/metrics.jsonl") as f:
            return [(r["step"], r["loss"], r["loss_itc"], r["loss_mlm"]) for r in map(json.loads, f)]

    return (losses(f"{out_dir}/full"), losses(f"{out_dir}/split")) if rank == 0 else None


@pytest.fixture(scope="module")
def shapes_corpus(tmp_path_factory):
    from albef_ds.config import SyntheticConfig
    from albef_ds.synthetic.shapes import write_synthetic_corpus

    cfg = SyntheticConfig(train_samples=256, heldout_samples=16, samples_per_shard=64, image_size=64, seed=5)
    return write_synthetic_corpus(str(tmp_path_factory.mktemp("shapes")), cfg)["train"]


@pytest.mark.parametrize("stage", [2, 3])
def test_stop_and_resume_gives_the_uninterrupted_losses(tmp_path, stage, shapes_corpus):
    full, split = run_ranks(resume_fn, 2, stage, shapes_corpus, str(tmp_path))[0]
    assert [s for s, *_ in split] == [1, 2, 3, 4, 5, 6]         # the step counter continues
    assert [s for s, *_ in full] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full[3:], split[3:]):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7), (a, b)


def test_batch_sizes_that_disagree_with_the_world_size_fail_before_training():
    cfg = engine_cfg(2)
    ds = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4}
    with pytest.raises(ConfigError, match=r"train_batch_size=16 but micro batch 4 x accumulation 1 x world size 2 = 8"):
        resolve_ds_config(ds, cfg, 2)
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=8 disagrees"):
        resolve_ds_config({"train_micro_batch_size_per_gpu": 8}, cfg, 2)
    with pytest.raises(ConfigError, match="global batch 128 .* larger than model.queue_size 64"):
        get_task(engine_cfg(1, "train.batch_size=64")).check(2)
    resolved = resolve_ds_config(ds_config(2), cfg, 2)
    assert resolved["train_batch_size"] == 8 and resolved["optimizer"]["params"]["weight_decay"] == 0.02


def unknown_metric_fn(rank, world, out_dir):
    cfg = engine_cfg(world, "eval.every_epochs=1", "eval.select_metric=r_meen")
    with pytest.raises(ConfigError) as error:
        Trainer(cfg, ds_config(2), out_dir, batches=global_batches(cfg, rank, world))
    return str(error.value)


def test_an_unknown_selection_metric_fails_before_training(tmp_path):
    def check(*overrides):
        cfg = engine_cfg(1, *overrides)
        check_select_metric(cfg, get_task(cfg))

    check("eval.every_epochs=1", "eval.select_metric=itc_img_r1")
    check("eval.select_metric=r_meen")                                  # never evaluated: unused
    with pytest.raises(ConfigError, match="eval.select_metric 'r_meen' is not a reported metric"):
        check("eval.every_epochs=1", "eval.select_metric=r_meen")
    # and the Trainer checks it when it starts
    message = run_ranks(unknown_metric_fn, 1, str(tmp_path))[0]
    assert message.startswith("eval.select_metric 'r_meen' is not a reported metric")
    assert not (tmp_path / "checkpoints").exists()                      # stopped before any output


def bad_eval_data_fn(rank, world, out_dir):
    with open(f"{out_dir}/broken.json", "w") as f:
        f.write('[{"image": "a.jpg", "caption": ["a red circle"]')          # cut short
    errors = []
    for data in (f"{out_dir}/missing.json", f"{out_dir}/broken.json", f"{out_dir}/missing-{{0..1}}.tar"):
        cfg = engine_cfg(world, "eval.every_epochs=1", f"eval.data=['{data}']")
        with pytest.raises(ConfigError) as error:
            Trainer(cfg, ds_config(2), out_dir, batches=global_batches(cfg, rank, world))
        errors.append(str(error.value))
    cfg = engine_cfg(world)
    with pytest.raises(ConfigError) as error:          # an output_dir where a file is
        Trainer(cfg, ds_config(2), f"{out_dir}/broken.json", batches=global_batches(cfg, rank, world))
    errors.append(str(error.value))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL      # the failed starts gave their handlers back
    return errors


def test_unreadable_evaluation_data_or_an_unwritable_output_fails_before_training(tmp_path):
    missing, broken, shards, output = run_ranks(bad_eval_data_fn, 1, str(tmp_path))[0]
    assert "eval.data" in missing and "missing.json" in missing and "No such file" in missing
    assert "broken.json" in broken and "line 1" in broken                       # the JSON error's place
    assert "missing-{0..1}.tar' matches no file" in shards
    assert f"output_dir {tmp_path}/broken.json/checkpoints: {tmp_path}/broken.json is a file, not a folder" in output
    assert not (tmp_path / "checkpoints").exists()               # nothing trained, saved or even made


def test_zero2_reduction_settings_follow_the_world_size():
    """One rank has nothing to reduce: no overlap (a wait for the device per backward pass) and no
    contiguous buffer (a copy per gradient); several ranks: DeepSpeed's setting. Explicit values stay."""
    def reduction(world, **zero):
        ds = json.load(open(ds_config(2)))
        ds["zero_optimization"].update(zero)
        z = resolve_ds_config(ds, engine_cfg(world), world)["zero_optimization"]
        return z["overlap_comm"], z["contiguous_gradients"]

    assert reduction(1) == (False, False) and reduction(2) == (True, True)
    assert reduction(1, contiguous_gradients=True) == (False, True)


def nan_fn(rank, world, out_dir, poison):
    cfg = engine_cfg(world, "train.max_bad_steps=3")

    def batches():
        for i, batch in enumerate(global_batches(cfg, rank, world)):
            if i in poison:
                batch["image"][0, 0, 0, 0] = float("nan")
            yield batch

    trainer = Trainer(cfg, ds_config(2), out_dir, batches=batches())
    data = iter(trainer.batches)
    try:
        losses = [trainer.train_step(data)[0]["loss"].item() for _ in range(4)]
    except RuntimeError as exc:
        return {"error": str(exc), "skipped": trainer.state.bad_total}
    finally:
        trainer.close()
    return {"losses": losses, "skipped": trainer.state.bad_total, "step": trainer.state.step, "drawn": trainer.state.micro_seen}


def test_non_finite_loss_is_skipped_and_counted_and_too_many_stop_the_run(tmp_path):
    result = run_ranks(nan_fn, 1, str(tmp_path / "a"), {1})[0]
    assert result["skipped"] == 1 and result["step"] == 4 and result["drawn"] == 5
    assert all(map(lambda x: x == x, result["losses"]))            # no NaN reached a step
    stopped = run_ranks(nan_fn, 1, str(tmp_path / "b"), {1, 2, 3})[0]
    assert "3 non-finite losses in a row" in stopped["error"] and "last good checkpoint" in stopped["error"]


def signal_fn(rank, world, out_dir):
    cfg = engine_cfg(world, "train.max_steps=6")

    def batches():
        for i, batch in enumerate(global_batches(cfg, rank, world)):
            if i == 2:
                os.kill(os.getpid(), signal.SIGUSR1)       # as Slurm does before the time limit
            yield batch

    stopped = Trainer(cfg, ds_config(2), out_dir, batches=batches())
    code = stopped.train()
    stopped.close()
    resumed = Trainer(cfg, ds_config(2), out_dir, batches=global_batches(cfg, rank, world), resume="")
    start = resumed.state.step
    final = resumed.train()
    resumed.close()
    return code, start, final, sorted(os.listdir(f"{out_dir}/checkpoints"))


def test_sigusr1_saves_and_exits_for_requeue_then_resumes(tmp_path):
    code, start, final, listing = run_ranks(signal_fn, 1, str(tmp_path))[0]
    assert code == EXIT_REQUEUE and start == 3 and final == 0
    assert "step00000003" in listing and "step00000006" in listing and "latest" in listing
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5, 6]


def save_twice_fn(rank, world, out_dir):
    cfg = engine_cfg(world)
    trainer = Trainer(cfg, ds_config(2), out_dir, batches=global_batches(cfg, rank, world))
    trainer.train_step(iter(trainer.batches))
    tag = trainer.save()
    written = os.stat(os.path.join(trainer.ckpt_dir, tag, "albef_rank0.pt")).st_mtime_ns
    again = trainer.save()      # as a best evaluation on a save step asks
    unchanged = os.stat(os.path.join(trainer.ckpt_dir, tag, "albef_rank0.pt")).st_mtime_ns == written
    trainer.close()
    return tag, again, unchanged


def test_a_step_is_saved_once_however_often_asked(tmp_path):
    assert run_ranks(save_twice_fn, 1, str(tmp_path)) == [("step00000001", "step00000001", True)]


def finetune_fn(rank, world, out_dir):
    cfg = load_config("tiny", [
        "task=retrieval", "model.queue_size=64", "train.batch_size=16",
        "data.synthetic.train_samples=128", "data.synthetic.heldout_samples=48",
        "data.synthetic.samples_per_shard=64", "data.epoch_samples=64", "data.workers=0",
        "train.epochs=3", "train.max_steps=0", "train.keep_last=1", "train.save_every=1000", "train.log_every=1",
        "train.lr=0.002", "eval.every_epochs=1", "eval.k_test=8"])
    trainer = Trainer(with_generated_corpus(cfg, out_dir), ds_config(2), out_dir)
    assert trainer.train() == 0
    trainer.close()
    with open(f"{out_dir}/metrics.jsonl") as f:
        evals = [r for r in map(json.loads, f) if "eval/r_mean" in r]
    with open(f"{out_dir}/checkpoints/best.json") as f:
        best = json.load(f)
    return evals, best, sorted(os.listdir(f"{out_dir}/checkpoints"))


def test_retrieval_finetuning_keeps_the_checkpoint_with_the_best_val_r_mean(tmp_path):
    evals, best, listing = run_ranks(finetune_fn, 1, str(tmp_path))[0]
    assert [r["step"] for r in evals] == [4, 8, 12]                   # after every epoch
    top = max(evals, key=lambda r: r["eval/r_mean"])
    first_best = next(r for r in evals if r["eval/r_mean"] == top["eval/r_mean"])
    assert best["tag"] == f"step{first_best['step']:08d}" and best["value"] == pytest.approx(top["eval/r_mean"])
    assert best["tag"] in listing and "step00000012" in listing         # best kept despite keep_last=1
    assert all(r["eval/images"] == 48 for r in evals)


def accumulation_fn(rank, world, out_dir):
    cfg = engine_cfg(world, "train.grad_accum=2")
    trainer = Trainer(cfg, ds_config(2), out_dir, batches=global_batches(cfg, rank, world))
    updates = []
    update = trainer.momentum.update
    trainer.momentum.update = lambda: (updates.append(trainer.state.step), update())
    data = iter(trainer.batches)
    for _ in range(3):
        trainer.train_step(data)
    trainer.close()
    return {"ema_updates": len(updates), "queue_ptr": int(trainer.model.queue_ptr),
            "micro": trainer.state.micro_seen, "optimizer_steps": trainer.engine.global_steps}


def test_gradient_accumulation_steps_once_and_queues_every_micro_batch(tmp_path):
    for r in run_ranks(accumulation_fn, 2, str(tmp_path)):
        assert r["micro"] == 6 and r["optimizer_steps"] == 3 and r["ema_updates"] == 3
        assert r["queue_ptr"] == 6 * GLOBAL_BATCH % 64                # every micro-batch enqueued


def compile_fn(rank, world, compile_layers, out_dir):
    """Three ZeRO-2 steps; for each transformer layer, how often it was entered through its
    compiled callable (nn.Module.compile's `_compiled_call_impl`, wrapped here) and how often its
    Python forward ran eagerly. The second count comes from a forward pre-hook that counts only
    when dynamo is not tracing: dynamo traces the hook into the layer's graph, where the count
    folds away, so a layer that runs its compiled code never counts, and a layer that falls back
    to eager (a recompile limit hit, a frame dynamo skips) counts every call. (Checked by hand:
    with torch._dynamo.config.recompile_limit = 1 the momentum layers, called under no_grad, fall
    back and count 3 calls each.)"""
    cfg = engine_cfg(world, f"train.compile={compile_layers}")
    trainer = Trainer(cfg, ds_config(2), out_dir, batches=global_batches(cfg, rank, world))
    names = {id(m): n for n, m in trainer.engine.module.named_modules()}
    compiled_calls, eager_calls = {}, {}
    for layer in transformer_layers(trainer.engine.module):
        name = names[id(layer)]
        compiled_calls[name] = eager_calls[name] = 0

        def count_eager(module, args, name=name):
            if not torch.compiler.is_compiling():
                eager_calls[name] += 1
        layer.register_forward_pre_hook(count_eager)
        if layer._compiled_call_impl is not None:
            def enter_compiled(*args, compiled=layer._compiled_call_impl, name=name, **kwargs):
                compiled_calls[name] += 1
                return compiled(*args, **kwargs)
            layer._compiled_call_impl = enter_compiled
    data = iter(trainer.batches)
    losses = [trainer.train_step(data)[0]["loss"].item() for _ in range(3)]
    trainer.close()
    return losses, compiled_calls, eager_calls


def test_compiled_layers_train_like_eager_ones(tmp_path):
    """train.compile=true: every ViT block and BERT layer (online and momentum) runs its compiled
    code on every call of three ZeRO-2 steps, never its eager forward, and the losses equal eager
    execution's."""
    eager, eager_run_compiled, eager_run_eager = run_ranks(compile_fn, 1, "false", str(tmp_path / "eager"))[0]
    compiled, compiled_calls, compiled_run_eager = run_ranks(compile_fn, 1, "true", str(tmp_path / "compiled"))[0]
    model = engine_cfg(1).model
    layers = {f"{encoder}.blocks.{i}" for encoder in ("visual_encoder", "visual_encoder_m")
              for i in range(model.vision.depth)}
    layers |= {f"{encoder}.bert.encoder.layer.{i}" for encoder in ("text_encoder", "text_encoder_m")
               for i in range(model.text.layers)}
    assert set(compiled_calls) == set(eager_run_eager) == layers
    # eager: each layer's forward runs (the hook counts), nothing is compiled
    assert all(n > 0 for n in eager_run_eager.values()) and set(eager_run_compiled.values()) == {0}
    # compiled: each layer is called as often as eagerly, every call through its compiled code
    assert compiled_calls == eager_run_eager, (compiled_calls, eager_run_eager)
    assert set(compiled_run_eager.values()) == {0}, compiled_run_eager
    assert compiled == pytest.approx(eager, rel=1e-4)
    with pytest.raises(ConfigError, match="train.compile is not supported with ZeRO stage 3"):
        resolve_ds_config(ds_config(3), engine_cfg(1, "train.compile=true"), 1)


def nan_gradient_fn(rank, world, out_dir):
    cfg = engine_cfg(world)
    ds = json.load(open(ds_config(2)))
    ds["bf16"]["enabled"] = True          # as on a GPU: DeepSpeed's per-tensor overflow check is off
    trainer = Trainer(cfg, ds, out_dir, batches=global_batches(cfg, rank, world))
    data = iter(trainer.batches)
    trainer.train_step(data)
    trainer.save()
    hook = trainer.model.itm_head.weight.register_hook(lambda g: g * float("nan"))  # finite loss, NaN gradient
    trainer.train_step(data)          # applied: the norm is read at the next save or forward pass
    hook.remove()
    messages = []
    for attempt in (trainer.save, lambda: trainer.train_step(data)):
        with pytest.raises(RuntimeError, match="non-finite gradient norm .* at step 2 with a finite loss") as error:
            attempt()
        messages.append(str(error.value))
    trainer.close()
    return messages, trainer.state.step, os.listdir(trainer.ckpt_dir)


def test_a_non_finite_gradient_behind_a_finite_loss_stops_before_anything_is_saved(tmp_path):
    messages, step, saved = run_ranks(nan_gradient_fn, 1, str(tmp_path))[0]
    assert all(str(tmp_path / "checkpoints") in m and "--resume" in m for m in messages)
    assert step == 2                  # the next step stopped in its forward pass, before its update
    assert [name for name in saved if name.startswith("step")] == ["step00000001"]


def temperature_fn(rank, world, stage, out_dir):
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    from albef_ds.engine import zero

    cfg = engine_cfg(world)
    trainer = Trainer(cfg, ds_config(stage), out_dir, batches=global_batches(cfg, rank, world))
    temp = trainer.model.temp
    if stage == 2:
        safe_set_full_fp32_param(temp, torch.full(temp.shape, 5.0))      # far above ALBEF's 0.5
    else:    # DeepSpeed's setter fails for this 1-element parameter under ZeRO-3 (see the Trainer)
        fragment = temp._z3_optimizer._get_fp32_opt_state_partition(temp, release_swap_buffers=False)[0]
        with torch.no_grad():
            fragment.fill_(5.0 if rank == 0 else 0.0)                   # rank 1 holds padding
    trainer.train_step(iter(trainer.batches))
    result = float(safe_get_full_fp32_param(temp)), float(zero.master_value(temp))
    trainer.close()
    return result


@pytest.mark.parametrize("stage", [2, 3, "3_offload"])
def test_the_temperature_master_is_clamped_after_each_step(tmp_path, stage):
    """The temperature lives in one rank's slice of the fp32 masters (under zero3_offload.json, the
    slice CPU Adam steps): the clamp reaches it."""
    assert run_ranks(temperature_fn, 2, stage, str(tmp_path)) == [(0.5, 0.5), (0.5, 0.5)]
