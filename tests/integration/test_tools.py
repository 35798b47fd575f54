"""The data tools' and the benchmarks' command lines, run as processes, as a user runs them."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import annotation_dataset

from albef_ds.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = build_tokenizer("tiny_vocab.txt")


def test_make_shards_cli(tmp_path):
    ann = annotation_dataset(tmp_path)
    run = subprocess.run([sys.executable, "tools/make_shards.py", "--ann", str(ann), "--image-root",
                          str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--prefix", "coco",
                          "--max-samples", "10"], cwd=ROOT, capture_output=True, text=True, check=True)
    summary = json.loads(run.stdout)
    assert summary["samples"] == 3 and summary["pattern"] == str(tmp_path / "out" / "coco-00000.tar")


def test_make_synthetic_shards_cli(tmp_path):
    run = subprocess.run([sys.executable, "tools/make_synthetic_shards.py", "--out", str(tmp_path),
                          "--train-samples", "8", "--heldout-samples", "4", "--samples-per-shard", "8"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(run.stdout)["train"][0]["shards"] == [str(tmp_path / "train-00000.tar")]


def test_bench_pictures_cli():
    run = subprocess.run([sys.executable, "tools/bench_pictures.py", "--count", "1", "--repeats", "1", "--tasks",
                          "grounding", "snli_ve"], cwd=ROOT, capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]   # beside the loading notes
    assert [(r["task"], r["pictures"]) for r in rows] == [("grounding", 1), ("snli_ve", 1)]
    assert all(r["seconds_per_evaluation"] > 0 for r in rows)


@pytest.mark.parametrize("script,args,said", [
    ("bench.py", ["--config", "nosuch", "--stage", "0"], "config 'nosuch' is neither a file nor a shipped config"),
    ("bench_vqa.py", ["--config", "nosuch"], "config 'nosuch' is neither a file nor a shipped config"),
    ("bench_data.py", ["--photos", "many"], "argument --photos: invalid int value: 'many'"),
    ("bench_search.py", ["--queries", "many"], "argument --queries: invalid int value: 'many'"),
    ("bench_pictures.py", ["--count", "many"], "argument --count: invalid int value: 'many'"),
    ("bench_startup.py", ["--runs", "0"], "--runs is 0: it must be at least 1"),
    ("bench_startup.py", ["--trees", "docs"], "holds no albef_ds/evaluate.py"),
    ("doc_proofs.py", ["docs/vqa.md", "--out", "output/never", "--runs", "2-42"], "--runs 2-42: expected THREADS:SEED"),
    ("doc_proofs.py", ["docs/data.md", "--out", "output/never"], "no proof reader for docs/data.md"),
    ("compare_nlvr_ta.py", ["--out", "output/never", "--threads", "0"], "--threads is 0: it must be at least 1"),
    ("doc_proofs.py", ["docs/vqa.md", "--out", "output/never", "--threads", "0"], "--threads is 0: it must be at least 1"),
    ("doc_proofs.py", ["docs/vqa.md", "--out", "README.md/runs"], "is a file, not a folder"),
    ("make_photo_shards.py", ["--out", "output/never", "--count", "0"], "--count is 0: it must be at least 1"),
    ("make_photo_shards.py", ["--out", "README.md/photos"], "is a file, not a folder"),
    ("record_trajectories.py", ["--work_dir", "output/never", "--output", "docs"], "is a folder, not a file name"),
    ("record_trajectories.py", ["--work_dir", "README.md/runs", "--output", "output/never.json"], "is a file, not a folder")])
def test_the_benchmarks_and_proof_tools_say_a_mistake_in_one_line(script, args, said):
    run = subprocess.run([sys.executable, f"tools/{script}", *args], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and run.stdout == "", (run.stdout, run.stderr)
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: ") and said in run.stderr, run.stderr
