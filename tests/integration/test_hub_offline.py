"""Hub names where the Hugging Face hub cannot be reached (a compute node without internet): read
from the local cache at once, or, when not there, one line naming the key before any work; never
the hub client's retries (about 30 s per file, each retry printed). The hub's endpoint is a port
that refuses connections, so these hold whether or not this machine can reach the internet."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from albef_ds.tokenizer import build_tokenizer
from helpers import tool

ROOT = Path(__file__).resolve().parents[2]
REPO = "albef-ds-tests/tiny-bert"          # a hub repo that exists only in the test's cache
REVISION = "0123456789abcdef0123456789abcdef01234567"
FAST_SECONDS = 20                          # the hub client's retries alone take about 30 s


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hugging Face cache holding REPO: a BERT of the tiny config's shape and its tokenizer.json."""
    cache = tmp_path_factory.mktemp("hf_cache")
    repo = cache / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    torch.manual_seed(3)
    BertForMaskedLM(BertConfig(vocab_size=166, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                               intermediate_size=256, max_position_embeddings=64)).save_pretrained(snapshot)
    build_tokenizer("tiny_vocab.txt").backend.save(str(snapshot / "tokenizer.json"))
    return cache


def unreachable_hub(cache) -> dict:
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_ENDPOINT="http://127.0.0.1:9")
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)
    return env


def test_cached_hub_names_load_at_once(hub_cache):
    script = f"""
import time, torch
start = time.time()
from albef_ds import build_model
from albef_ds.tokenizer import build_tokenizer
from albef_ds.config import load_config
tokenizer = build_tokenizer({REPO!r})
cfg = load_config("tiny")
cfg.model.text.pretrained = {REPO!r}
model = build_model(cfg)
print(len(tokenizer), tokenizer.cls_token_id, time.time() - start)
torch.save(model.text_encoder.bert.embeddings.word_embeddings.weight.detach(), {str(hub_cache / "loaded.pt")!r})
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=unreachable_hub(hub_cache),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    size, cls_id, seconds = run.stdout.split()
    assert (int(size), int(cls_id)) == (len(build_tokenizer("tiny_vocab.txt")), 6)
    assert float(seconds) < FAST_SECONDS and "Retrying" not in run.stderr
    saved = BertForMaskedLM.from_pretrained(hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / REVISION)
    assert torch.equal(torch.load(hub_cache / "loaded.pt"), saved.bert.embeddings.word_embeddings.weight.detach())


# (overrides of the tiny config, the key the one line names)
MISSING = [
    (["model.text.pretrained=albef-ds-tests/absent-bert"], "model.text.pretrained"),
    (["model.vision.pretrained=true"], "model.vision.pretrained"),
    (["model.text.tokenizer=albef-ds-tests/absent-tokenizer"], "tokenizer 'albef-ds-tests/absent-tokenizer'"),
]


@pytest.mark.parametrize("overrides,named", MISSING, ids=[m[1] for m in MISSING])
def test_an_uncached_hub_name_stops_the_run_in_one_line(hub_cache, tmp_path, overrides, named):
    corpus = tool("make_photo_shards").write_photo_shards(str(tmp_path / "photos"), 4, "img2dataset")
    out = tmp_path / "run"
    start = time.time()
    run = subprocess.run([sys.executable, "albef_ds/train.py", "--deepspeed", "ds_configs/zero2.json",
                          "--config", "tiny", "--output_dir", str(out), "train.max_steps=1",
                          f"data.corpora={json.dumps([corpus])}",
                          *overrides],
                         cwd=ROOT, env=unreachable_hub(hub_cache), capture_output=True, text=True, timeout=120)
    seconds = time.time() - start
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2 and len(lines) == 1, run.stderr[-3000:]
    assert lines[0].startswith(f"error: {named}") and "cannot be reached (127.0.0.1:9 cannot be reached" in lines[0]
    assert "Traceback" not in run.stderr and "Retrying" not in run.stderr and seconds < FAST_SECONDS
    assert not out.exists()
