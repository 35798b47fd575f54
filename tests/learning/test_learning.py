"""Proof of learning: the tiny ALBEF, pretrained from scratch on the generated shapes corpus with
the engine (DeepSpeed ZeRO-2, one CPU process), aligns images with their captions on held-out
samples. Took 4 min 24 s on a 2-core machine shared with other jobs; see docs/retrieval.md."""
import os
import time

from helpers import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The shipped tiny recipe (3000 steps of 8 samples), without momentum distillation (see
# docs/retrieval.md: distilling from a momentum model that is itself untrained slows the from-scratch
# run down too much), with a checkpoint only at the end.
OVERRIDES = ["model.alpha=0.0", "train.save_every=1000000", "train.log_every=500"]


def _pretrain_and_evaluate(rank, world, out_dir, overrides):
    # one thread (run_ranks' setting): the data worker has the other core, and OpenMP threads
    # that wait for a descheduled sibling make a busy machine much slower
    from albef_ds.config import load_config
    from albef_ds.engine import Trainer
    from albef_ds.synthetic.probe import evaluate_heldout
    from albef_ds.synthetic.shapes import with_generated_corpus

    started, cpu = time.perf_counter(), time.process_time()
    cfg = with_generated_corpus(load_config("tiny", overrides), out_dir)      # as the demo does
    trainer = Trainer(cfg, os.path.join(ROOT, "ds_configs", "zero2.json"), out_dir)
    code = trainer.train()
    trained = time.perf_counter()
    out = evaluate_heldout(trainer.engine, trainer.cfg, out_dir)      # as the demo calls it
    out.update(exit_code=code, steps=trainer.state.step, train_s=trained - started,
               eval_s=time.perf_counter() - trained, cpu_s=time.process_time() - cpu)
    trainer.close()
    return out


def test_tiny_model_learns_from_scratch(tmp_path):
    out = run_ranks(_pretrain_and_evaluate, 1, str(tmp_path), OVERRIDES)[0]
    print({k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()})
    assert out["exit_code"] == 0
    # text -> image R@1 over the held-out images (distinct attribute sets): at least 10x chance
    chance = 100.0 / out["images"]
    assert out["img_r1"] >= 10 * chance, out
    # ITM: each image with its caption and with another image's caption, threshold 0.5
    assert out["itm_acc"] >= 80.0, out
    # the masked colour word is read from the image: far above chance (1/6) with the right image,
    # about chance with another sample's image
    colour_chance = out["mlm_colour_chance"]
    assert out["mlm_colour_acc"] >= 3 * colour_chance, out
    assert abs(out["mlm_colour_acc_shuffled"] - colour_chance) <= 10.0, out


def test_the_shipped_pretrained_checkpoint_fits_the_tiny_model_and_has_learned(tiny_pretrained, tmp_path):
    """tests/data/tiny_pretrained.safetensors (make tiny-pretrained) is the tiny architecture of
    today's config, and it aligns held-out images with their captions far above chance."""
    import dataclasses

    from albef_ds import load_model
    from albef_ds.checkpoint import read_checkpoint
    from albef_ds.config import load_config
    from albef_ds.eval.retrieval import evaluate_retrieval, read_shard_set
    from albef_ds.synthetic.shapes import write_synthetic_corpus
    from albef_ds.tokenizer import build_tokenizer

    tiny = load_config("tiny")
    stored = read_checkpoint(tiny_pretrained).config.model
    assert dataclasses.asdict(stored) == dataclasses.asdict(tiny.model.architecture_only())
    heldout = write_synthetic_corpus(str(tmp_path), dataclasses.replace(
        tiny.data.synthetic, train_samples=0, heldout_samples=64, seed=7))["heldout"]
    data = read_shard_set(heldout)
    model = load_model(tiny_pretrained)
    out = evaluate_retrieval(model, data, build_tokenizer(tiny.model.text.tokenizer), tiny.model.vision.img_size,
                             tiny.data.max_tokens, k_test=16, split_ranks=False)
    print({k: round(out[k], 2) for k in ("img_r1", "txt_r1", "r_mean")})
    assert out["img_r1"] >= 10 * 100 / 64, out


def test_the_positions_checkpoint_reads_where_things_are(tiny_pretrained, tiny_pretrained_positions, tmp_path):
    """tests/data/tiny_pretrained_positions.safetensors (make tiny-pretrained-positions) is the tiny
    architecture with the sin-cos position start, and names the position of the shapes from the
    image (masked position word), where tiny_pretrained does no better than the caption alone."""
    import dataclasses

    from albef_ds import load_model
    from albef_ds.checkpoint import read_checkpoint
    from albef_ds.config import load_config
    from albef_ds.eval.retrieval import read_shard_set
    from albef_ds.synthetic.probe import attribute_probe
    from albef_ds.synthetic.shapes import write_synthetic_corpus
    from albef_ds.tokenizer import build_tokenizer

    tiny = load_config("tiny", ["model.vision.pos_embed_init=sincos"])
    stored = read_checkpoint(tiny_pretrained_positions).config.model
    assert dataclasses.asdict(stored) == dataclasses.asdict(tiny.model.architecture_only())
    heldout = write_synthetic_corpus(str(tmp_path), dataclasses.replace(
        tiny.data.synthetic, train_samples=0, heldout_samples=128, seed=7))["heldout"]
    data, tok = read_shard_set(heldout), build_tokenizer(tiny.model.text.tokenizer)
    probe = {name: attribute_probe(load_model(path), data, tok, tiny.model.vision.img_size, tiny.data.max_tokens)
             for name, path in (("positions", tiny_pretrained_positions), ("former", tiny_pretrained))}
    print(probe)
    position = probe["positions"]["position"]
    assert position["image"] >= 60.0 and position["image"] >= 2 * position["other_image"], probe
    former = probe["former"]["position"]
    assert abs(former["image"] - former["other_image"]) <= 10.0, probe
    for checkpoint in probe.values():       # both name the colour from the image
        assert checkpoint["colour"]["image"] >= 90.0 and checkpoint["colour"]["other_image"] <= 35.0, probe
