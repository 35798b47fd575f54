"""Bad input is skipped and counted, never crashes or hangs the stream."""
import json
import os

import pytest
from helpers import caption_stream
from helpers import random_jpeg as jpeg

from albef_ds.config import DataConfig
from albef_ds.data import SKIP_COUNTERS
from albef_ds.data.shards import write_shard
from albef_ds.tokenizer import build_tokenizer

TOKENIZER = build_tokenizer("tiny_vocab.txt")




def good(key: str, seed: int) -> dict:
    return {"__key__": key, "jpg": jpeg(seed), "txt": b"a green square"}


def bad_shards(folder):
    """Returns (corpus, keys of the good samples, expected counts)."""
    samples = [
        good("good0", 0),
        {"__key__": "corrupt", "jpg": b"\xff\xd8\xff\xe0 not really a jpeg", "txt": b"a red circle"},
        {"__key__": "cut", "jpg": jpeg(1)[:60], "txt": b"a red circle"},              # truncated file
        {"__key__": "noimage", "txt": b"a red circle"},
        {"__key__": "nocaption", "jpg": jpeg(2)},
        {"__key__": "emptytxt", "jpg": jpeg(3), "txt": b"  ?! ...  "},                 # empty once cleaned
        {"__key__": "emptylist", "jpg": jpeg(4), "json": json.dumps({"caption": ["", "  "]}).encode()},
        {"__key__": "latin1", "jpg": jpeg(5), "txt": "caf\xe9 au lait".encode("latin-1")},
        {"__key__": "badjson", "jpg": jpeg(6), "json": b"{not json"},
        good("good1", 7),
        {**good("good2", 8), "json": b"[1, 2]"},      # json without a caption: txt is used
    ]
    write_shard(str(folder / "bad-00000.tar"), samples)
    write_shard(str(folder / "bad-00001.tar"), [good(f"tail{i}", 10 + i) for i in range(6)])
    data = (folder / "bad-00001.tar").read_bytes()
    (folder / "bad-00001.tar").write_bytes(data[:len(data) // 2])                  # truncated tar
    write_shard(str(folder / "bad-00002.tar"), [good("gone", 20)])
    corpus = {"name": "b", "shards": [str(folder / "bad-{00000..00002}.tar")], "samples": 18}
    expected = {"corrupt_image": 2, "missing_image": 1, "empty_caption": 3, "bad_text": 2,
                "truncated_tar": 1, "shard_error": 1}
    return corpus, expected


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_skipped_and_counted(tmp_path, workers):
    corpus, expected = bad_shards(tmp_path)
    cfg = DataConfig(corpora=[corpus], workers=workers, resampled=False, augment=True)
    stream = caption_stream(cfg, 16, TOKENIZER, 2, 0, 1, 0)
    os.remove(tmp_path / "bad-00002.tar")             # vanishes after the start: unreadable
    keys = sorted(k for batch in stream for k in batch["keys"])
    # What the truncated tar held before the cut is still read.
    tail = [k for k in keys if "/bad-00001/" in k]
    assert 1 <= len(tail) < 6
    assert sorted(set(keys) - set(tail)) == ["b/bad-00000/good0", "b/bad-00000/good1", "b/bad-00000/good2"]
    assert stream.stats() == expected and set(expected) == set(SKIP_COUNTERS)


def test_resampled_stream_over_bad_shards_keeps_going(tmp_path):
    corpus, _ = bad_shards(tmp_path)
    cfg = DataConfig(corpora=[corpus], workers=2, augment=False, epoch_samples=40)
    stream = caption_stream(cfg, 16, TOKENIZER, 2, 0, 1, 0)
    batches = [b for _, b in zip(range(2 * stream.steps_per_epoch), stream)]
    assert len(batches) == 40 and all(len(b["keys"]) == 2 for b in batches)
    assert stream.state_dict()["epoch"] == 2 and stream.stats()["corrupt_image"] > 0


def test_unusable_data_raises_instead_of_hanging(tmp_path):
    write_shard(str(tmp_path / "x-00000.tar"), [{"__key__": "a", "jpg": b"broken", "txt": b"a star"}])
    cfg = DataConfig(corpora=[{"name": "x", "shards": [str(tmp_path / "x-00000.tar")], "samples": 8}],
                     workers=0)
    with pytest.raises(RuntimeError, match="no usable sample"):
        next(iter(caption_stream(cfg, 16, TOKENIZER, 2, 0, 1, 0)))
