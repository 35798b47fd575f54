"""Indexing split over real processes: the retrieval evaluator's features, the same files from 1 and
2 gloo ranks, a killed run resumed."""
import json
import os
import signal

import numpy as np
import torch
from helpers import run_ranks
from search_helpers import BATCH, HELDOUT, files_of, heldout_corpus, index_args, run_command

from albef_ds.index import main

PRETRAINED = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "tiny_pretrained.safetensors")


def _index_on_ranks(rank, world, argv):
    return main(argv)


def _evaluator_features(shards):
    import albef_ds
    from albef_ds.eval.retrieval import encode_set, read_retrieval_set
    from albef_ds.tokenizer import build_tokenizer

    model = albef_ds.load_model(PRETRAINED, config="tiny")
    data = read_retrieval_set(shards, None, 30)
    encoded = encode_set(model, data, build_tokenizer(model.cfg.text.tokenizer), 64, 16, batch_size=BATCH)
    return data, encoded["image_feats"], encoded["text_feats"]


def test_features_are_the_evaluators_and_the_same_files_from_one_and_two_ranks(tmp_path):
    shards = heldout_corpus(str(tmp_path / "corpus"))
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    code, out, err = run_command(main, index_args(PRETRAINED, shards, one))
    assert code == 0, err
    assert f"indexed {HELDOUT} images and {HELDOUT} captions" in out
    assert run_ranks(_index_on_ranks, 2, index_args(PRETRAINED, shards, two)) == [0, 0]
    assert files_of(one) == files_of(two)                 # every byte; the parts are gone
    assert not os.path.exists(os.path.join(one, "parts"))

    data, image_feats, text_feats = _evaluator_features(shards)
    stored = np.load(os.path.join(one, "image_features.npy"))
    assert stored.dtype == np.float16 and stored.shape == (HELDOUT, 64)
    # the evaluator's features rounded to half precision, exactly; so within fp16's rounding of them
    assert np.array_equal(stored, image_feats.half().numpy())
    assert np.allclose(stored.astype(np.float32), image_feats.numpy(), rtol=1e-3, atol=1e-3)
    assert np.allclose(np.linalg.norm(stored.astype(np.float32), axis=1), 1, atol=1e-3)
    texts = np.load(os.path.join(one, "text_features.npy")).astype(np.float32)
    assert np.allclose(texts, text_feats.numpy(), atol=1e-3)
    rows = [json.loads(line) for line in open(os.path.join(one, "images.jsonl"))]
    assert [r["name"] for r in rows] == data.names
    assert [r["captions"] for r in rows] == data.captions
    assert [json.loads(line)["text"] for line in open(os.path.join(one, "texts.jsonl"))] == data.texts
    manifest_ = json.load(open(os.path.join(one, "index.json")))
    assert manifest_["ann"]["images"] == {"kind": "exact"} and manifest_["counts"]["unreadable"] == 0
    # a rerun finds the index whole and touches nothing
    code, out, _ = run_command(main, index_args(PRETRAINED, shards, one))
    assert code == 0 and "already holds this index" in out and files_of(one) == files_of(two)


def _index_then_die(argv, parts):
    """The index command, killed (SIGKILL) right after it has written `parts` parts."""
    from albef_ds.search import store

    write_part = store.write_part
    written = []

    def write_then_maybe_die(*args):
        write_part(*args)
        written.append(1)
        if len(written) == parts:
            os.kill(os.getpid(), signal.SIGKILL)

    store.write_part = write_then_maybe_die
    torch.set_num_threads(1)
    main(argv)


def test_a_killed_run_resumed_encodes_only_the_missing_parts_and_gives_the_same_files(tmp_path):
    import multiprocessing

    shards = heldout_corpus(str(tmp_path / "corpus"))
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    assert run_command(main, index_args(PRETRAINED, shards, whole))[0] == 0
    process = multiprocessing.get_context("spawn").Process(target=_index_then_die,
                                                            args=(index_args(PRETRAINED, shards, resumed), 1))
    process.start()
    process.join(120)
    assert process.exitcode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(resumed, "index.json"))
    assert sorted(n for n in os.listdir(os.path.join(resumed, "parts")) if not n.startswith(".")) == \
        ["000000.json", "000000.npz", "plan.json"]
    code, out, err = run_command(main, index_args(PRETRAINED, shards, resumed))
    assert code == 0, err
    assert "1 of 3 parts already written, 2 to go" in out
    assert [line.split("(")[1].split(")")[0] for line in out.splitlines() if " done: " in line] == \
        ["heldout-00001.tar", "heldout-00002.tar"]
    assert files_of(resumed) == files_of(whole)
