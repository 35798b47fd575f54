"""Shard writing and reading: round trip, ALBEF JSON -> shards, img2dataset layout, corpora."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import annotation_dataset, caption_stream, image_bytes
from PIL import Image

from albef_ds.config import CorpusConfig, DataConfig, load_config
from albef_ds.data import EvalTransform, make_shards, resolve_corpora
from albef_ds.data.shards import write_shard
from albef_ds.tokenizer import build_tokenizer, clean_caption

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = build_tokenizer("tiny_vocab.txt")


def read_all(corpora, batch_size=4, workers=0, **data):
    cfg = DataConfig(corpora=corpora, workers=workers, resampled=False, augment=False, **data)
    stream = caption_stream(cfg, 32, TOKENIZER, batch_size, rank=0, world_size=1, seed=0)
    return list(stream), stream


def words(ids) -> str:
    return TOKENIZER.decode(ids)


def test_write_read_round_trip(tmp_path):
    captions = {}
    for shard in range(2):
        samples = []
        for i in range(5):
            key = f"{shard}{i:04d}"
            captions[f"c/rt-{shard:05d}/{key}"] = f"A red circle, number {i}!"
            samples.append({"__key__": key, "jpg": image_bytes(shard * 10 + i),
                            "txt": f"A red circle, number {i}!".encode()})
        assert write_shard(str(tmp_path / f"rt-{shard:05d}.tar"), samples) == 5
    batches, stream = read_all([{"name": "c", "shards": [str(tmp_path / "rt-{00000..00001}.tar")],
                                 "samples": 10}])
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(captions)
    assert [len(b["keys"]) for b in batches] == [4, 4, 2]       # the last partial batch is kept
    first = batches[0]
    assert first["image"].shape == (4, 3, 32, 32) and first["image"].dtype == torch.uint8   # normalised on the device
    assert first["input_ids"].shape == first["attention_mask"].shape == (4, 30)
    assert first["input_ids"].dtype == torch.long
    for key, ids in zip(first["keys"], first["input_ids"]):
        assert words(ids) == clean_caption(captions[key])           # "a red circle number 3"
    # The image is exactly the eval transform of the stored bytes.
    shard, key = first["keys"][0].split("/")[1:]
    data = image_bytes(int(shard[-1]) * 10 + int(key[1:]))
    expected = EvalTransform(32)(Image.open(io.BytesIO(data)).convert("RGB"))
    assert torch.equal(first["image"][0], expected)
    assert stream.stats() == dict.fromkeys(stream.stats(), 0)


def test_make_shards_from_albef_json_with_list_captions(tmp_path):
    ann = annotation_dataset(tmp_path)
    out = tmp_path / "shards"
    result = make_shards(json.loads(ann.read_text()), str(tmp_path / "images"), str(out), "toy",
                         max_samples=2, workers=2)
    assert result == {"pattern": str(out / "toy-{00000..00001}.tar"), "samples": 3, "shards": 2,
                      "skipped": 1}
    assert json.loads((out / "sizes.json").read_text()) == {"toy-00000.tar": 2, "toy-00001.tar": 1}
    expected = {"toy/toy-00000/000000000": {"a red circle", "one red circle on the left"},
                "toy/toy-00000/000000001": {"a blue square", "the blue square"},
                "toy/toy-00001/000000002": {"green stars"}}
    seen = {key: set() for key in expected}
    for seed in range(8):             # the caption drawn per visit comes from the sample's list
        cfg = DataConfig(corpora=[{"name": "toy", "shards": [result["pattern"]]}], workers=0,
                         resampled=False, augment=False)
        for batch in caption_stream(cfg, 32, TOKENIZER, 2, 0, 1, seed):
            for key, ids in zip(batch["keys"], batch["input_ids"]):
                seen[key].add(words(ids))
    assert seen == expected


def test_img2dataset_layout_is_read(tmp_path):
    # img2dataset writes <key>.jpg / .txt / .json with url, status and the caption as a string.
    samples = [{"__key__": f"00000{i:04d}", "jpg": image_bytes(i), "txt": f"a photo {i}".encode(),
                "json": json.dumps({"url": f"http://x/{i}.jpg", "key": f"00000{i:04d}", "status": "success",
                                    "caption": f"a photo {i}", "width": 40, "height": 30}).encode()}
               for i in range(3)]
    samples.append({"__key__": "000000003", "webp": image_bytes(3, "WEBP"), "txt": b"a webp photo"})
    write_shard(str(tmp_path / "00000.tar"), samples)
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 4}))
    batches, stream = read_all([{"name": "cc3m", "shards": [str(tmp_path / "00000.tar")]}])
    keys = sorted(k for b in batches for k in b["keys"])
    assert keys == [f"cc3m/00000/00000{i:04d}" for i in range(4)]
    assert stream.steps_per_epoch == 1                             # 4 samples from sizes.json


def test_missing_pattern_raises_naming_it(tmp_path):
    pattern = str(tmp_path / "nothing-{00000..00009}.tar")
    with pytest.raises(ValueError, match="nothing-"):
        resolve_corpora([{"name": "x", "shards": [pattern], "samples": 10}])
    cfg = DataConfig(corpora=[CorpusConfig(name="x", shards=[pattern], samples=10)])
    with pytest.raises(ValueError, match=r"nothing-\{00000\.\.00009\}\.tar"):
        caption_stream(cfg, 32, TOKENIZER, 2, 0, 1, 0)


def test_corpus_mixing_weights(tmp_path):
    for name, count in [("a-00000", 50), ("a-00001", 50), ("b-00000", 300)]:
        write_shard(str(tmp_path / f"{name}.tar"), [])
    a = {"name": "a", "shards": [str(tmp_path / "a-{00000..00001}.tar")], "samples": 100}
    b = {"name": "b", "shards": [str(tmp_path / "b-00000.tar")], "samples": 300}
    sizes = np.array([50, 50, 300])

    def sample_share(corpora):
        shards, _ = resolve_corpora(corpora)
        expected = np.array([s.weight for s in shards]) * sizes
        return expected[:2].sum() / expected.sum()     # corpus a's share of the samples drawn

    assert sample_share([a, b]) == pytest.approx(0.25)                         # by size
    assert sample_share([{**a, "weight": 3.0}, {**b, "weight": 1.0}]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="weight"):
        resolve_corpora([{**a, "weight": 1.0}, b])
    pipe = resolve_corpora([{"name": "p", "shards": [f"pipe:cat {tmp_path}/a-{{00000..00001}}.tar"],
                             "samples": 100}])[0]
    assert [s.name for s in pipe] == ["p/a-00000", "p/a-00001"]           # pipe: kept, named by file


def test_mixed_corpora_stream(tmp_path):
    corpora = []
    for name in ("a", "b"):
        write_shard(str(tmp_path / f"{name}-00000.tar"),
                    [{"__key__": f"{i:03d}", "jpg": image_bytes(i), "txt": b"a shape"} for i in range(6)])
        corpora.append({"name": name, "shards": [str(tmp_path / f"{name}-00000.tar")], "samples": 6,
                        "weight": 1.0 if name == "a" else 3.0})
    cfg = DataConfig(corpora=corpora, workers=0, augment=False, epoch_samples=480)
    stream = caption_stream(cfg, 32, TOKENIZER, 4, 0, 1, 0)
    keys = [k for _, batch in zip(range(stream.steps_per_epoch), stream) for k in batch["keys"]]
    share_b = sum(k.startswith("b/") for k in keys) / len(keys)
    assert 0.6 < share_b < 0.9                                                # 0.75 expected


def test_pipe_shards_are_read(tmp_path):
    write_shard(str(tmp_path / "p-00000.tar"),
                [{"__key__": f"{i:03d}", "jpg": image_bytes(i), "txt": b"a shape"} for i in range(3)])
    batches, _ = read_all([{"name": "p", "shards": [f"pipe:cat {tmp_path}/p-00000.tar"], "samples": 3}])
    assert sorted(k for b in batches for k in b["keys"]) == [f"p/p-00000/{i:03d}" for i in range(3)]


def test_sample_counts_without_samples(tmp_path):
    write_shard(str(tmp_path / "00000.tar"), [])
    write_shard(str(tmp_path / "00001.tar"), [])
    corpus = {"name": "s", "shards": [str(tmp_path / "{00000..00001}.tar")]}
    with pytest.raises(ValueError, match="sizes.json"):
        resolve_corpora([corpus])
    # img2dataset's per-shard stats, or a sizes.json, which wins.
    for shard, successes in (("00000", 7), ("00001", 5)):
        (tmp_path / f"{shard}_stats.json").write_text(json.dumps({"count": 10, "successes": successes}))
    assert resolve_corpora([corpus])[1] == 12
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": 8}))
    assert resolve_corpora([corpus])[1] == 13


@pytest.mark.parametrize("name", ["pretrain_4m", "pretrain_14m"])
def test_pretrain_configs(name):
    data = load_config(name).data
    # An epoch is the captions of all corpora, the weights: ALBEF's per-caption annotation lists.
    assert data.epoch_samples == sum(c.weight for c in data.corpora)
    assert {c.name for c in data.corpora} >= {"coco", "vg", "sbu", "cc3m"}
    with pytest.raises(ValueError, match=r"/data/albef/coco/coco-\{00000\.\.00011\}\.tar"):
        caption_stream(data, 256, TOKENIZER, 64, 0, 8, 42)          # placeholders: no such files
