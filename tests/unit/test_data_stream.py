"""Stream order: equal batches per rank in resampled mode, exactly-once passes, exact resume."""
import itertools
import json
import random

import numpy as np
import pytest
import torch
from helpers import caption_stream
from helpers import random_jpeg as tiny_jpeg

from albef_ds.config import DataConfig
from albef_ds.data import codec, shards
from albef_ds.data.shards import write_shard
from albef_ds.tokenizer import build_tokenizer

TOKENIZER = build_tokenizer("tiny_vocab.txt")




def write_corpus(folder, sizes, prefix="s"):
    """Shards of the given sizes; returns (corpus dict, all sample keys)."""
    keys = []
    for shard, size in enumerate(sizes):
        name = f"{prefix}-{shard:05d}"
        samples = [{"__key__": f"{shard:03d}{i:04d}", "jpg": tiny_jpeg(shard * 1000 + i),
                    "txt": f"a red circle {i}".encode()} for i in range(size)]
        write_shard(str(folder / f"{name}.tar"), samples)
        keys += [f"c/{name}/{s['__key__']}" for s in samples]
    pattern = str(folder / f"{prefix}-{{00000..{len(sizes) - 1:05d}}}.tar")
    return {"name": "c", "shards": [pattern], "samples": sum(sizes)}, keys


def stream(corpus, batch_size=3, rank=0, world_size=1, seed=0, **data):
    cfg = DataConfig(corpora=[corpus], **{"augment": False, "workers": 2, **data})
    return caption_stream(cfg, 16, TOKENIZER, batch_size, rank, world_size, seed)


def take_keys(s, n):
    return [batch["keys"] for batch in itertools.islice(s, n)]


def test_one_shard_two_ranks_two_workers_same_batches_per_epoch(tmp_path):
    corpus, keys = write_corpus(tmp_path, [7])          # 1 shard < 2 ranks x 2 workers
    per_rank = []
    for rank in range(2):
        s = stream(corpus, batch_size=2, rank=rank, world_size=2, epoch_samples=20)
        assert s.steps_per_epoch == 5                   # 20 // (2 x 2), odd: workers make 3 and 2
        batches = take_keys(s, s.steps_per_epoch)
        fresh = {"lanes": [], "next_draw": 0, "taken": 0, "batches": 0}
        assert s.state_dict()["epoch"] == 1 and s.state_dict()["positions"] == [fresh, fresh]
        batches += take_keys(s, s.steps_per_epoch)
        assert s.state_dict()["epoch"] == 2
        assert all(len(b) == 2 and set(b) <= set(keys) for b in batches)
        per_rank.append(batches)
    assert len(per_rank[0]) == len(per_rank[1]) == 10
    assert per_rank[0] != per_rank[1]                   # ranks draw with their own seeds


def test_non_resampled_pass_covers_each_sample_once(tmp_path):
    corpus, keys = write_corpus(tmp_path, [3, 9, 1, 6, 4, 8, 5])
    ranks = [stream(corpus, batch_size=4, rank=rank, world_size=2, resampled=False, shuffle_buffer=4)
             for rank in range(2)]
    passes = []
    for _ in range(2):                                  # iterating again makes the next epoch's pass
        seen = [key for s in ranks for batch in s for key in batch["keys"]]
        assert sorted(seen) == sorted(keys)
        passes.append(seen)
    assert passes[0] != passes[1]                       # shards dealt and shuffled anew


def test_same_seed_same_batches_with_augmentation(tmp_path):
    corpus, _ = write_corpus(tmp_path, [5, 5])
    a, b = (list(itertools.islice(stream(corpus, augment=True, epoch_samples=30), 6)) for _ in range(2))
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"] and torch.equal(x["image"], y["image"])
        assert torch.equal(x["input_ids"], y["input_ids"])


def keys_after(s, resampled, n):
    """The next n batches' keys in resampled mode; the rest of the pass otherwise."""
    return take_keys(s, n) if resampled else [batch["keys"] for batch in s]


@pytest.mark.parametrize("resampled", [True, False])
def test_exact_resume_with_two_workers(tmp_path, resampled):
    corpus, _ = write_corpus(tmp_path, [5, 8, 3, 7])
    # 7 batches an epoch (odd, so epochs start on either worker), draws that end inside batches,
    # a shuffle buffer smaller than the shards.
    options = dict(batch_size=3, epoch_samples=21, shuffle_buffer=3, resampled=resampled)
    reference = keys_after(stream(corpus, **options), resampled, 17)
    for k in (1, 4, 7, 8, len(reference) - 1):
        first = stream(corpus, **options)
        assert take_keys(first, k) == reference[:k]
        state = json.loads(json.dumps(first.state_dict()))        # as stored in a checkpoint
        resumed = stream(corpus, **options)
        resumed.load_state_dict(state)
        assert keys_after(resumed, resampled, len(reference) - k) == reference[k:], f"after {k} batches"


def test_resume_skips_without_decoding_or_opening(tmp_path, monkeypatch):
    corpus, _ = write_corpus(tmp_path, [4] * 12)
    options = dict(batch_size=3, workers=0, shuffle_buffer=8, open_shards=4, epoch_samples=400)
    first = stream(corpus, **options)
    take_keys(first, 30)
    state = first.state_dict()
    position = state["positions"][0]
    assert position["next_draw"] >= 20                   # 90 samples in: some 20 draws consumed
    assert len(position["lanes"]) == 4 and any(offset > 0 for _, offset in position["lanes"])
    expected = take_keys(first, 1)

    decoded, opened = [], []
    decode, read = codec.open_image, shards.read_shard
    monkeypatch.setattr(codec, "open_image", lambda data: decoded.append(1) or decode(data))
    monkeypatch.setattr(shards, "read_shard", lambda url: opened.append(url) or read(url))
    resumed = stream(corpus, **options)
    resumed.load_state_dict(state)
    assert take_keys(resumed, 1) == expected
    assert len(decoded) == 3                        # only the samples handed out are decoded
    # the four open draws, and at most one new draw per sample taken; none of the consumed ones
    assert 4 <= len(opened) <= 4 + 3


def test_batches_mix_the_corpora_by_weight_and_span_many_shards(tmp_path):
    """Two corpora weighted 3:1: each batch of 32 holds samples of both, 3:1 over 640 samples
    (the binomial standard deviation of the share is 0.017; lanes make samples of one draw come
    in runs, so the tolerance is 0.08), and spans many shards (the old stream: one)."""
    a, _ = write_corpus(tmp_path, [10] * 20, prefix="a")
    b, _ = write_corpus(tmp_path, [10] * 20, prefix="b")
    corpora = [{**a, "name": "a", "weight": 3.0}, {**b, "name": "b", "weight": 1.0}]
    cfg = DataConfig(corpora=corpora, augment=False, workers=2, epoch_samples=640)
    batches = take_keys(caption_stream(cfg, 16, TOKENIZER, 32), 20)
    share = sum(key.startswith("a/") for batch in batches for key in batch) / 640
    assert abs(share - 0.75) < 0.08, share
    assert sum(any(k.startswith("b/") for k in batch) for batch in batches) >= 18
    shards_per_batch = [len({key.rsplit("/", 1)[0] for key in batch}) for batch in batches]
    print(shards_per_batch)
    assert sum(shards_per_batch) / len(shards_per_batch) >= 8 and min(shards_per_batch) >= 6, shards_per_batch


def test_state_is_checked_on_load(tmp_path):
    corpus, _ = write_corpus(tmp_path, [12])
    state = stream(corpus, rank=0, world_size=2).state_dict()
    stream(corpus, rank=0, world_size=2).load_state_dict(state)
    for other in (stream(corpus, rank=1, world_size=2), stream(corpus, rank=0, world_size=2, workers=1),
                  stream(corpus, rank=0, world_size=2, seed=1), stream(corpus, rank=0, world_size=1)):
        with pytest.raises(ValueError, match="cannot resume"):
            other.load_state_dict(state)


@pytest.mark.parametrize("workers", [0, 2])
def test_global_rngs_are_left_alone(tmp_path, workers):
    # The training process' RNG states go into checkpoints; reading data must not move them.
    corpus, _ = write_corpus(tmp_path, [6])
    def states():
        return torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1]

    before = states()
    take_keys(stream(corpus, workers=workers, augment=True, epoch_samples=12), 5)
    after = states()
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2])


def test_a_stream_continues_on_another_number_of_ranks(tmp_path):
    """Two ranks' positions become one rank's: the same epoch, as many of its samples consumed,
    the skip counts kept, and fresh draws (not the epoch's start replayed)."""
    corpus, _ = write_corpus(tmp_path, [6] * 8)
    options = dict(batch_size=2, epoch_samples=40, shuffle_buffer=4)     # 10 steps of 2 x 2 a epoch
    ranks = [stream(corpus, rank=r, world_size=2, **options) for r in range(2)]
    for s in ranks:
        take_keys(s, 13)                                                 # into the second epoch
    states = [json.loads(json.dumps(s.state_dict())) for s in ranks]
    one = stream(corpus, batch_size=4, rank=0, world_size=1, epoch_samples=40, shuffle_buffer=4)
    one.resume_from(states)
    state = one.state_dict()
    assert state["epoch"] == 1 and sum(p["batches"] for p in state["positions"]) == 3    # 12 of 40 samples
    fresh = stream(corpus, batch_size=4, rank=0, world_size=1, epoch_samples=40, shuffle_buffer=4)
    epoch1 = take_keys(fresh, 20)[10:]                                   # a one-rank run's epoch 1
    resumed = take_keys(one, 7)
    # not a replay of its start: the first batch of each worker holds other samples
    assert len(resumed) == 7 and sorted(resumed[0] + resumed[1]) != sorted(epoch1[0] + epoch1[1])
    assert one.state_dict()["epoch"] == 2                                # 3 + 7 batches: the epoch is done
    assert one.stats() == {k: sum(s["stats"][k] for s in states) for k in one.stats()}
    with pytest.raises(ValueError, match="seed"):
        stream(corpus, batch_size=4, world_size=1, seed=5, epoch_samples=40).resume_from(states)
