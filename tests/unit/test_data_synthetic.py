"""The coloured-shapes corpus: deterministic, idempotent, vocabulary-only captions, images that
show what their captions say."""
import dataclasses
import io
import json
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from helpers import caption_stream
from PIL import Image

from albef_ds.config import DataConfig, SyntheticConfig, load_config
from albef_ds.data.samples import read_shard
from albef_ds.data.shards import expand_pattern
from albef_ds.synthetic import shapes as synthetic
from albef_ds.synthetic.shapes import write_synthetic_corpus
from albef_ds.tokenizer import CONFIG_DIR, build_tokenizer, clean_caption

ROOT = Path(__file__).resolve().parents[2]
CFG = SyntheticConfig(train_samples=40, heldout_samples=12, samples_per_shard=16, image_size=64, seed=3)
VOCAB = set((CONFIG_DIR / "tiny_vocab.txt").read_text().split())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return out, write_synthetic_corpus(str(out), CFG)


def samples(corpora):
    return [s for c in corpora for pattern in c["shards"] for url in expand_pattern(pattern)
            for s in read_shard(url)]


def test_layout_and_returned_corpora(corpus):
    out, corpora = corpus
    assert corpora == {
        "train": [{"name": "shapes-train", "shards": [str(out / "train-{00000..00002}.tar")], "samples": 40,
                   "weight": None}],
        "heldout": [{"name": "shapes-heldout", "shards": [str(out / "heldout-00000.tar")], "samples": 12,
                     "weight": None}]}
    assert json.loads((out / "sizes.json").read_text()) == {
        "train-00000.tar": 16, "train-00001.tar": 16, "train-00002.tar": 8, "heldout-00000.tar": 12}
    assert len(samples(corpora["train"])) == 40 and len(samples(corpora["heldout"])) == 12


def test_idempotent_and_deterministic(corpus, tmp_path, monkeypatch):
    out, corpora = corpus
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert write_synthetic_corpus(str(out), CFG) == corpora
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps      # nothing rewritten
    again = write_synthetic_corpus(str(tmp_path), CFG)                           # elsewhere: same bytes
    for name in ("train-00000.tar", "train-00002.tar", "heldout-00000.tar"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()
    other = write_synthetic_corpus(str(tmp_path), dataclasses.replace(CFG, seed=4))
    assert other == again and (tmp_path / "train-00000.tar").read_bytes() != (out / "train-00000.tar").read_bytes()


def test_captions_use_only_the_tiny_vocabulary(corpus):
    _, corpora = corpus
    tokenizer = build_tokenizer("tiny_vocab.txt")
    for split, per_sample in (("train", synthetic.TRAIN_CAPTIONS), ("heldout", 1)):
        for sample in samples(corpora[split]):
            captions = json.loads(sample["json"])["caption"]
            assert len(captions) == per_sample
            for caption in captions:
                assert set(clean_caption(caption).split()) <= VOCAB, caption
                assert tokenizer.unk_token_id not in tokenizer.encode([caption])[0].ids
    phrasings = {c for s in samples(corpora["train"]) for c in json.loads(s["json"])["caption"]}
    assert len(phrasings) > 100                          # varied, not one template


def test_heldout_is_distinct(corpus):
    _, corpora = corpus
    train, heldout = samples(corpora["train"]), samples(corpora["heldout"])
    assert not {s["png"] for s in train} & {s["png"] for s in heldout}
    attributes = [json.dumps(json.loads(s["json"])["attributes"], sort_keys=True) for s in heldout]
    assert len(set(attributes)) == len(attributes)       # one held-out image per attribute set


def components(mask: np.ndarray) -> list[int]:
    """Pixel counts of the 4-connected components of a boolean mask."""
    seen, sizes = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start], queue, size = True, deque([start]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for n in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= n[0] < mask.shape[0] and 0 <= n[1] < mask.shape[1] and mask[n] and not seen[n]:
                    seen[n] = True
                    queue.append(n)
        sizes.append(size)
    return sizes


def test_images_show_what_the_captions_say(corpus):
    _, corpora = corpus
    areas = {}                                               # (shape, size) -> object areas
    for sample in samples(corpora["train"]) + samples(corpora["heldout"]):
        attributes = json.loads(sample["json"])["attributes"]
        pixels = np.asarray(Image.open(io.BytesIO(sample["png"]))).astype(int)
        assert pixels.shape == (64, 64, 3)
        background = pixels[0, 0]
        mask = np.abs(pixels - background).max(axis=-1) > 60
        parts = components(mask)
        assert len(parts) == attributes["count"], attributes
        colour = pixels[mask].mean(axis=0)
        nearest = min(synthetic.COLOURS, key=lambda c: np.abs(np.array(synthetic.COLOURS[c]) - colour).sum())
        assert nearest == attributes["colour"]
        ys, xs = np.nonzero(mask)
        cx, cy = xs.mean() / 64, ys.mean() / 64
        where = {"left": cx < 0.35, "right": cx > 0.65, "top": cy < 0.35, "bottom": cy > 0.65,
                 "center": 0.4 < cx < 0.6 and 0.4 < cy < 0.6}
        assert where[attributes["position"]], (attributes, cx, cy)
        areas.setdefault((attributes["shape"], attributes["size"]), []).extend(parts)
    for shape in synthetic.SHAPES:                           # sizes cannot be confused
        assert max(areas[shape, "small"]) * 2 < min(areas[shape, "large"]), shape


def test_stream_over_the_corpus(corpus):
    _, corpora = corpus
    cfg = load_config("tiny")
    data = DataConfig(**{**cfg.data.__dict__, "corpora": corpora["train"], "workers": 0})
    stream = caption_stream(data, cfg.model.vision.img_size, build_tokenizer(cfg.model.text.tokenizer),
                            8, 0, 1, 0)
    batch = next(iter(stream))
    assert batch["image"].shape == (8, 3, 64, 64) and batch["input_ids"].shape == (8, cfg.data.max_tokens)
