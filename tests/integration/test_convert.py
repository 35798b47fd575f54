"""Checkpoint conversion: ZeRO-1/2/3 checkpoints of 2 gloo ranks become one file whose model gives
the training engine's outputs and weights; the released ALBEF layout both ways (the base model's
844 keys); model.init_checkpoint; bad inputs fail, named, with no output file."""
import importlib.util
import os
import shutil
import warnings

import pytest
import torch
from helpers import run_ranks, tiny_batch

from albef_ds import build_model, load_model
from albef_ds.checkpoint.files import BASE_RELEASE_OVERRIDES, read_checkpoint
from albef_ds.checkpoint.layout import model_layout
from albef_ds.checkpoint.manifest import write_manifest
from albef_ds.config import load_config
from albef_ds.models.vit import resize_pos_embed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GLOBAL_BATCH = 8
STAGES = (1, 2, 3)
TAG = "step00000002"

_spec = importlib.util.spec_from_file_location("convert_checkpoint",
                                               os.path.join(ROOT, "tools", "convert_checkpoint.py"))
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


def train_cfg(world):
    return load_config("tiny", ["model.queue_size=64", f"train.batch_size={GLOBAL_BATCH // world}",
                                "train.save_every=1000", "train.warmup_steps=2", "train.lr=0.001",
                                "train.max_steps=2", "model.momentum=0.9"])


def batches(cfg, rank, world):
    b, step = GLOBAL_BATCH // world, 0
    while True:
        images, ids, mask = tiny_batch(cfg.model, GLOBAL_BATCH, seed=step)
        part = slice(rank * b, (rank + 1) * b)
        yield {"image": images[part], "input_ids": ids[part], "attention_mask": mask[part]}
        step += 1


def probe():
    return tiny_batch(train_cfg(1).model, 4, seed=123)


def outputs(model, images, ids, mask):
    with torch.no_grad():
        return {"image_features": model.image_features(images), "text_features": model.text_features(ids, mask),
                "itm_scores": model.itm_scores(images, ids, mask), "mlm_logits": model.mlm_logits(images, ids, mask)}


def train_fn(rank, world, out_dir):
    """Trains 2 steps under each ZeRO stage; returns the engine's outputs on the probe batch and
    its gathered weights (online and momentum, fp32) and queues. Then ZeRO-3 in bf16, where the
    module (and DeepSpeed's copy of the frozen momentum) is bf16: returns the fp32 masters and the
    EMA's fp32 partitions."""
    import json

    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    from albef_ds.engine import Trainer

    results = {}
    for stage in STAGES:
        cfg = train_cfg(world)
        trainer = Trainer(cfg, os.path.join(ROOT, "ds_configs", f"zero{stage}.json"), f"{out_dir}/zero{stage}",
                          batches=batches(cfg, rank, world))
        assert trainer.train() == 0
        model = trainer.model.eval()
        params = dict(model.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            weights = {k: p.detach().clone() for k, p in params.items()}
        results[stage] = {"outputs": outputs(model, *probe()), "weights": weights,
                          "buffers": {k: v.detach().clone() for k, v in model.named_buffers()}}
        trainer.close()

    with open(os.path.join(ROOT, "ds_configs", "zero3.json")) as f:
        ds = json.load(f)
    ds["bf16"] = {"enabled": True}
    cfg = train_cfg(world)
    trainer = Trainer(cfg, ds, f"{out_dir}/zero3_bf16", batches=batches(cfg, rank, world))
    assert trainer.train() == 0
    masters = {k: safe_get_full_fp32_param(p).clone() for k, p in trainer.model.named_parameters() if p.requires_grad}
    parts = [None] * world
    dist.all_gather_object(parts, trainer.momentum.local_state())
    results["bf16"] = {"masters": masters, "ema_parts": parts,
                       "module_dtype": trainer.model.visual_encoder_m.pos_embed.dtype}
    trainer.close()
    return results if rank == 0 else None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    return str(out), run_ranks(train_fn, 2, str(out))[0]


@pytest.mark.parametrize("stage", STAGES)
def test_converted_model_gives_the_training_engines_outputs_and_weights(trained, tmp_path, stage):
    out, results = trained
    ref = results[stage]
    target = str(tmp_path / ("albef.safetensors" if stage == 3 else "albef.pt"))
    assert cli.main(["--input", f"{out}/zero{stage}", "--output", target]) == 0
    model = load_model(target)                    # the inference model: online weights only
    assert not model.training and not hasattr(model, "visual_encoder_m")
    got = outputs(model, *probe())
    for key, want in ref["outputs"].items():
        torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-6, msg=f"stage {stage}: {key}")
    for key, value in model.named_parameters():
        assert torch.equal(value, ref["weights"][key]), f"stage {stage}: {key}"
    state = read_checkpoint(target).state_dict    # the training layout: momentum model and queues too
    for key, want in {**ref["weights"], **ref["buffers"]}.items():
        if key in state:                          # tied copies are stored once
            assert torch.equal(state[key], want), f"stage {stage}: {key}"     # exact: fp32, not rounded
    assert set(state) == set(model_layout(train_cfg(1)).keys)
    assert not torch.equal(state["visual_encoder_m.blocks.0.attn.qkv.weight"],
                           state["visual_encoder.blocks.0.attn.qkv.weight"])   # the EMA lags the online model
    assert read_checkpoint(target).config.model.queue_size == 64            # the config travels with the file


def test_zero3_momentum_comes_from_our_fp32_partitions(trained, tmp_path):
    """Not DeepSpeed's copy of the frozen momentum parameters (module precision, bf16 on GPU): the
    partitions of our albef_rank<R>.pt files, merged. Shifting them shows in the output."""
    out, results = trained
    folder = tmp_path / "run"
    shutil.copytree(f"{out}/zero3", folder)
    for rank in (0, 1):
        path = folder / "checkpoints" / TAG / f"albef_rank{rank}.pt"
        state = torch.load(path, weights_only=False)
        state["momentum"] = [t + 0.25 for t in state["momentum"]]
        torch.save(state, path)
    write_manifest(str(folder / "checkpoints" / TAG))      # edited on purpose: sealed again
    merged = read_checkpoint(str(folder)).state_dict
    ref = results[3]["weights"]
    layout = model_layout(train_cfg(1))
    for key in layout.momentum_names:
        assert torch.equal(merged[key], ref[key] + 0.25), key
    assert torch.equal(merged["visual_encoder.pos_embed"], ref["visual_encoder.pos_embed"])


def test_bf16_training_converts_to_its_fp32_masters_and_fp32_ema(trained):
    """Under bf16 the module, and DeepSpeed's checkpointed copy of the frozen momentum weights, are
    bf16; the converted file has the optimizer's fp32 masters and the EMA's fp32 values, unrounded."""
    out, results = trained
    ref = results["bf16"]
    assert ref["module_dtype"] == torch.bfloat16
    assert any(n.startswith("bf16_") for n in os.listdir(f"{out}/zero3_bf16/checkpoints/{TAG}"))
    state = read_checkpoint(f"{out}/zero3_bf16").state_dict
    for key, want in ref["masters"].items():
        assert state[key].dtype == torch.float32 and torch.equal(state[key], want), key
    layout = model_layout(train_cfg(1))
    rounded = 0
    for i, key in enumerate(layout.momentum_names):
        shape = layout.shapes[key]
        want = torch.cat([part[i] for part in ref["ema_parts"]])[:shape.numel()].view(shape)
        assert state[key].dtype == torch.float32 and torch.equal(state[key], want), key
        rounded += not torch.equal(want.bfloat16().float(), want)
    assert rounded > len(layout.momentum_names) // 2         # bf16 would have changed these


def test_ours_to_released_to_ours_is_lossless(trained, tmp_path):
    out, _ = trained
    first, released, again = (str(tmp_path / n) for n in ("a.pt", "released.pth", "b.safetensors"))
    assert cli.main(["--input", f"{out}/zero2", "--output", first]) == 0
    assert cli.main(["--input", first, "--output", released, "--to", "albef"]) == 0
    assert cli.main(["--input", released, "--output", again]) == 0

    raw = torch.load(released)
    sd = raw["model"]
    assert sd["temp"].dim() == 0 and sd["queue_ptr"].shape == (1,)
    assert torch.equal(sd["text_encoder.bert.embeddings.position_ids"], torch.arange(64)[None])
    assert "text_encoder_m.bert.embeddings.position_ids" in sd and "idx_queue" not in sd
    a, b = read_checkpoint(first), read_checkpoint(again)
    assert a.state_dict.keys() == b.state_dict.keys()
    for key, value in a.state_dict.items():
        assert value.dtype == b.state_dict[key].dtype and torch.equal(value, b.state_dict[key]), key
    assert a.config.to_dict() == b.config.to_dict()
    full = torch.load(first)["state_dict"]
    assert set(sd) == (set(full) - {"idx_queue"}) | {"text_encoder.bert.embeddings.position_ids",
                                                      "text_encoder_m.bert.embeddings.position_ids"}


def test_no_momentum_and_bf16(trained, tmp_path):
    out, results = trained
    slim, half, full = str(tmp_path / "slim.pt"), str(tmp_path / "half.pt"), str(tmp_path / "full.pt")
    assert cli.main(["--input", f"{out}/zero1", "--output", slim, "--no-momentum", "--dtype", "bf16"]) == 0
    state = torch.load(slim)["state_dict"]
    assert not any(k.startswith(("visual_encoder_m.", "text_encoder_m.", "vision_proj_m.", "text_proj_m."))
                   for k in state)
    assert not {"image_queue", "text_queue", "idx_queue", "queue_ptr"} & set(state)
    assert state["visual_encoder.pos_embed"].dtype == torch.bfloat16
    model = load_model(slim)
    assert not hasattr(model, "visual_encoder_m") and not hasattr(model, "image_queue")
    # The bf16 file is the fp32 weights rounded once each (load_model computes in fp32 with them):
    # exactly the outputs of the fp32 conversion with its weights rounded here.
    assert cli.main(["--input", f"{out}/zero1", "--output", full]) == 0
    rounded = load_model(full)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
    got, want = outputs(model, *probe()), outputs(rounded, *probe())
    for key in got:
        assert torch.equal(got[key], want[key]), key
    # Against the fp32 model. Rounding to bf16 (8 significant bits) moves each weight by at most
    # u = 2^-9 of itself, uniformly: RMS u / sqrt(3) = 1.1e-3. A feature passes about 27 rounded
    # tensors on its way (image: patch embedding, 4 blocks x 4 matmuls, 9 LayerNorm scales, the
    # projection; text: the embeddings, 2 layers x 6 matmuls and 2 LayerNorms, the projection): as
    # independent relative errors through unit-gain residual layers they add up like a random walk,
    # sqrt(27) x 1.1e-3 = 5.9e-3 on the unit-norm vector (all 27 lined up: 27 u = 0.05, the scale
    # of the rtol 0.05 / atol 0.02 this test had). Measured here, the largest over the probe's rows
    # of |bf16 - fp32|: 1.9e-3 for the image features (6.5e-4 the largest element), 3.7e-3 for the
    # text features (1.0e-3). Another CPU trains weights that differ at fp32's 1e-7 scale, which
    # flips a few roundings but not the size of the drift.
    bound = 27 ** 0.5 * 2.0 ** -9 / 3 ** 0.5
    for key in ("image_features", "text_features"):
        drift = (got[key] - results[1]["outputs"][key]).norm(dim=-1).max().item()
        assert drift <= bound, (key, drift, bound)
    assert cli.main(["--input", f"{out}/zero1", "--output", half, "--dtype", "bf16"]) == 0
    state = torch.load(half)["state_dict"]
    assert state["text_encoder.bert.embeddings.word_embeddings.weight"].dtype == torch.bfloat16
    assert state["text_encoder_m.bert.embeddings.word_embeddings.weight"].dtype == torch.float32   # EMA stays fp32
    assert state["image_queue"].dtype == torch.float32


def test_set_overrides_the_config_given_with_config(trained, tmp_path):
    """--config names the config the weights go into and --set changes entries of it: a larger image
    size (the position embeddings resized to it, bicubic) and the run's queue size."""
    out, results = trained
    target = str(tmp_path / "96px.pt")
    assert cli.main(["--input", f"{out}/zero2", "--output", target, "--config", "tiny",
                     "--set", "model.vision.img_size=96", "model.queue_size=64"]) == 0
    ckpt = read_checkpoint(target)
    assert ckpt.config.model.vision.img_size == 96 and ckpt.config.model.queue_size == 64
    assert load_config("tiny").model.vision.img_size == 64                  # what --set changed
    weights = results[2]["weights"]
    for key in ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed"):
        assert ckpt.state_dict[key].shape == (1, 12 * 12 + 1, 64)            # 8 x 8 patches -> 12 x 12
        assert torch.equal(ckpt.state_dict[key], resize_pos_embed(weights[key], 96, 8)), key
    for key, value in weights.items():
        if not key.endswith("pos_embed") and key in ckpt.state_dict:
            assert torch.equal(ckpt.state_dict[key], value), key
    assert ckpt.state_dict["image_queue"].shape == (64, 64)


def released_base_keys():
    """The public ALBEF pretraining checkpoint's keys, spelled out from its layout description."""
    keys = ["temp", "image_queue", "text_queue", "queue_ptr"]
    for v in ("visual_encoder.", "visual_encoder_m."):
        keys += [v + "cls_token", v + "pos_embed", v + "patch_embed.proj.weight", v + "patch_embed.proj.bias",
                 v + "norm.weight", v + "norm.bias"]
        keys += [f"{v}blocks.{i}.{m}.{s}" for i in range(12)
                 for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for s in ("weight", "bias")]
    for t in ("text_encoder.", "text_encoder_m."):
        e = t + "bert.embeddings."
        keys += [e + "word_embeddings.weight", e + "position_embeddings.weight", e + "token_type_embeddings.weight",
                 e + "LayerNorm.weight", e + "LayerNorm.bias", e + "position_ids"]
        for i in range(12):
            blocks = ["attention"] + (["crossattention"] if i >= 6 else [])
            mods = [f"{b}.self.{x}" for b in blocks for x in ("query", "key", "value")]
            mods += [f"{b}.output.{x}" for b in blocks for x in ("dense", "LayerNorm")]
            mods += ["intermediate.dense", "output.dense", "output.LayerNorm"]
            keys += [f"{t}bert.encoder.layer.{i}.{m}.{s}" for m in mods for s in ("weight", "bias")]
        p = t + "cls.predictions."
        keys += [p + "bias", p + "transform.dense.weight", p + "transform.dense.bias", p + "transform.LayerNorm.weight",
                 p + "transform.LayerNorm.bias", p + "decoder.weight", p + "decoder.bias"]
    keys += [f"{h}.{s}" for h in ("vision_proj", "text_proj", "itm_head", "vision_proj_m", "text_proj_m")
             for s in ("weight", "bias")]
    return keys


def test_released_base_checkpoint_and_its_fine_tuned_variant_load(tmp_path, capsys):
    cfg = load_config("base", BASE_RELEASE_OVERRIDES)
    layout = model_layout(cfg)
    keys = released_base_keys()
    assert len(keys) == len(set(keys))
    assert {k for k in keys if not k.endswith("position_ids")} == set(layout.shapes) - {"idx_queue"}
    g = torch.Generator().manual_seed(0)
    released = {}
    for key in keys:
        if key == "temp":
            released[key] = torch.tensor(0.0523)
        elif key.endswith("position_ids"):
            released[key] = torch.arange(512)[None]
        elif key == "queue_ptr":
            released[key] = torch.tensor([4096])
        elif key.endswith("decoder.weight"):          # tied, as in the release
            released[key] = released[key.replace("cls.predictions.decoder", "bert.embeddings.word_embeddings")]
        elif key.endswith("decoder.bias"):
            released[key] = released[key.replace("decoder.bias", "bias")]
        else:
            released[key] = torch.rand(layout.shapes[key], generator=g)
    path = str(tmp_path / "ALBEF.pth")
    torch.save({"model": released}, path)

    ckpt = read_checkpoint(path)                   # no config stored: the shipped base config at 256 px
    assert ckpt.config.task == "pretrain"          # recognised from the keys
    state = ckpt.state_dict
    for key in keys:
        if key == "temp":
            assert state["temp"].shape == (1,) and state["temp"].item() == pytest.approx(0.0523)
        elif not key.endswith(("position_ids", "decoder.weight", "decoder.bias")):   # tied: stored once
            assert torch.equal(state[key], released[key]), key
    assert bool((state["idx_queue"] == -100).all())
    model = load_model(path)
    key = "text_encoder.bert.encoder.layer.7.crossattention.self.key.weight"
    assert torch.equal(model.text_encoder.bert.encoder.layer[7].crossattention.self.key.weight, released[key])
    assert torch.equal(model.visual_encoder.pos_embed, released["visual_encoder.pos_embed"])    # 257 -> 257
    del model, state, ckpt

    # A fine-tuned release: bare dict, no `bert.` infix, no MLM head, an idx_queue; started from
    # with model.init_checkpoint at 384 px, so its 16x16 position grid is resized to 24x24.
    tuned = {}
    for key, value in released.items():
        if ".cls." in key:
            continue
        for t in ("text_encoder.", "text_encoder_m."):
            key = key.replace(t + "bert.", t)
        tuned[key] = value
    big = resize_pos_embed(released["visual_encoder.pos_embed"], 384, 16)    # 16x16 -> 24x24, bicubic
    big_m = resize_pos_embed(released["visual_encoder_m.pos_embed"], 384, 16)
    tuned["idx_queue"] = torch.randint(0, 1000, (1, 65536), generator=g)
    del released
    torch.save(tuned, path)
    fine = load_config("base", BASE_RELEASE_OVERRIDES + ["model.vision.img_size=384", f"model.init_checkpoint={path}"])
    model = build_model(fine.model)
    assert model.visual_encoder.pos_embed.shape == (1, 577, 768)
    assert torch.equal(model.visual_encoder.pos_embed, big) and torch.equal(model.visual_encoder_m.pos_embed, big_m)
    key = "text_encoder.encoder.layer.7.crossattention.self.key.weight"
    assert torch.equal(model.text_encoder.bert.encoder.layer[7].crossattention.self.key.weight, tuned[key])
    assert torch.equal(model.idx_queue, tuned["idx_queue"])
    assert torch.equal(model.text_encoder_m.bert.embeddings.word_embeddings.weight,
                       tuned["text_encoder_m.embeddings.word_embeddings.weight"])
    report = capsys.readouterr().out
    assert "model.init_checkpoint: loaded" in report and "visual_encoder.pos_embed resized from 257 to 577" in report
    assert "absent from the checkpoint" in report and "text_encoder.cls.predictions.bias" in report
    del model


def test_fine_tuned_tiny_release_via_load_model_gives_the_trainers_outputs_without_a_warning(trained, tmp_path):
    out, results = trained
    ours = read_checkpoint(f"{out}/zero2")
    tuned = {k.replace("text_encoder.bert.", "text_encoder."): v
             for k, v in ours.state_dict.items() if ".cls." not in k}
    tuned["temp"] = tuned["temp"].reshape(())
    path = str(tmp_path / "tuned.pth")
    torch.save(tuned, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(path, config=train_cfg(1))
    # the MLM head a fine-tuned release drops is nothing a user can act on: no warning names it
    said = " | ".join(str(w.message) for w in caught)
    assert "absent from the checkpoint" not in said and "cls.predictions" not in said, said
    got = outputs(model, *probe())
    for key in ("image_features", "text_features", "itm_scores"):      # the MLM head is not in the file
        torch.testing.assert_close(got[key], results[2]["outputs"][key], rtol=1e-5, atol=1e-6)


def bad(capsys, tmp_path, argv, *fragments, output="converted.pt"):
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    target = out_dir / output
    assert cli.main([*argv, "--output", str(target)]) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert os.listdir(out_dir) == []              # no output, no temporary left behind
    return err


def test_bad_inputs_fail_with_a_named_cause_and_no_output(trained, tmp_path, capsys):
    out, _ = trained
    empty = tmp_path / "empty"
    empty.mkdir()
    bad(capsys, tmp_path, ["--input", str(empty)], "no training checkpoint", str(empty))
    bad(capsys, tmp_path, ["--input", str(tmp_path / "nowhere")], "no such file or folder")
    bad(capsys, tmp_path, ["--input", f"{out}/zero3", "--tag", "step00000099"],
        "no checkpoint tag 'step00000099'", TAG)

    run = tmp_path / "run"
    shutil.copytree(f"{out}/zero3", run)
    folder = run / "checkpoints" / TAG
    shard = folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    bad(capsys, tmp_path, ["--input", str(run)], "fails its check", f"{shard}: {os.path.getsize(shard)} bytes, the save wrote")
    shard.unlink()
    bad(capsys, tmp_path, ["--input", str(run)], "fails its check", f"{shard}: missing")
    shutil.copy(f"{out}/zero3/checkpoints/{TAG}/{shard.name}", shard)
    (folder / "albef_rank1.pt").unlink()
    bad(capsys, tmp_path, ["--input", str(run)], "fails its check", f"{folder / 'albef_rank1.pt'}: missing")

    other = tmp_path / "other.pt"
    torch.save({"weights": {"layer.weight": torch.ones(2)}}, other)
    bad(capsys, tmp_path, ["--input", str(other)], "neither", str(other))
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    bad(capsys, tmp_path, ["--input", str(text)], "cannot read", str(text), "neither a torch file")
    bad(capsys, tmp_path, ["--input", f"{out}/zero1", "--to", "albef"], "torch file", output="x.safetensors")
