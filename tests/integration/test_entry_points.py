"""A configuration or input a user did not get right: every command line says what to fix in one
line naming the file, key or value, exits with status 2 and prints no traceback, once (rank 0)."""
import json
import os
import subprocess
import sys
from pathlib import Path

from albef_ds.config import load_config

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(args, tmp_path):
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error: ")]
    assert done.returncode == 2, (done.returncode, (done.stdout + done.stderr)[-3000:])
    assert "Traceback" not in done.stdout + done.stderr, (done.stdout + done.stderr)[-3000:]
    assert len(errors) == 1, done.stdout + done.stderr
    return errors[0]


def train(tmp_path, config: dict, launcher=False):
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps({"base": "tiny", **config}))
    args = [str(ROOT / "albef_ds" / "train.py"), "--deepspeed", "ds_configs/zero2.json", "--config", str(path),
            "--output_dir", str(tmp_path / "out")]
    if launcher:
        return run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29813", *args], tmp_path)
    return run([sys.executable, *args], tmp_path)


def test_a_single_shard_pattern_is_one_pattern_not_its_characters(tmp_path):
    pattern = str(tmp_path / "cc3m" / "{00000..00331}.tar")
    cfg = load_config("tiny", [f"data.corpora=[{{name: cc3m, shards: '{pattern}', samples: 10}}]"])
    assert cfg.data.corpora[0].shards == [pattern]
    line = train(tmp_path, {"data": {"corpora": [{"name": "cc3m", "shards": pattern, "samples": 10}]}})
    assert f"shard pattern '{pattern}' matches no file" in line and "data.corpora" in line


def test_a_yaml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("base: tiny\ntrain:\n  lr: [1e-4\n")
    line = run([sys.executable, str(ROOT / "albef_ds" / "train.py"), "--deepspeed", "ds_configs/zero2.json",
                "--config", str(path)], tmp_path)
    assert str(path) in line and "line" in line


def test_unreadable_annotations_and_a_missing_image_root(tmp_path):
    corpus = {"name": "coco", "annotations": [str(tmp_path / "coco_train.json")], "image_root": str(tmp_path)}
    line = train(tmp_path, {"data": {"corpora": [corpus]}})
    assert "coco_train.json" in line and "No such file" in line
    (tmp_path / "coco_train.json").write_text(json.dumps([{"image": "a.jpg", "caption": "a red circle"}]))
    corpus["image_root"] = str(tmp_path / "images")
    line = train(tmp_path, {"data": {"corpora": [corpus]}})
    assert f"image_root {tmp_path / 'images'} is not a folder" in line


def test_two_ranks_say_it_once(tmp_path):
    """Under the deepspeed launcher both ranks meet the mistake (each rank's output in a file of its
    own): rank 0 says it, rank 1 only stops."""
    pattern = str(tmp_path / "nothing-{0..3}.tar")
    (tmp_path / "run.yaml").write_text(json.dumps({"base": "tiny", "data": {"corpora": [
        {"name": "x", "shards": [pattern], "samples": 10}]}}))
    logs = tmp_path / "ranks"
    done = subprocess.run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29813",
                           "--enable_each_rank_log", str(logs), str(ROOT / "albef_ds" / "train.py"), "--deepspeed",
                           "ds_configs/zero2.json", "--config", str(tmp_path / "run.yaml"), "--output_dir",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    ranks = {int(p.name.split("rank")[-1].split(".")[0]): p.read_text() for p in logs.iterdir() if "rank" in p.name}
    assert sorted(ranks) == [0, 1], sorted(logs.iterdir())
    said = {r: [line for line in text.splitlines() if line.startswith("error: ")] for r, text in ranks.items()}
    assert len(said[0]) == 1 and pattern in said[0][0] and said[1] == [], said
    assert not any("Traceback" in text for text in ranks.values())
    assert not (tmp_path / "out").exists()


def test_evaluate_and_the_data_tools(tmp_path):
    line = run([sys.executable, "-m", "albef_ds.evaluate", "retrieval", "--checkpoint", str(tmp_path / "none.pt"),
                "--data", str(tmp_path / "test.json"), "--output_dir", str(tmp_path / "eval")], tmp_path)
    assert str(tmp_path / "none.pt") in line
    (tmp_path / "ann.json").write_text("[{\"image\": ")
    line = run([sys.executable, "tools/make_shards.py", "--ann", str(tmp_path / "ann.json"), "--image-root",
                str(tmp_path), "--out", str(tmp_path / "shards"), "--prefix", "x"], tmp_path)
    assert "ann.json" in line
    line = run([sys.executable, "tools/make_shards.py", "--ann", str(tmp_path / "ann.json"), "--image-root",
                str(tmp_path / "images"), "--out", str(tmp_path / "shards"), "--prefix", "x"], tmp_path)
    assert f"--image-root {tmp_path / 'images'} is not a folder" in line
    (tmp_path / "empty.json").write_text("[]")
    line = run([sys.executable, "tools/make_shards.py", "--ann", str(tmp_path / "empty.json"), "--image-root",
                str(tmp_path), "--out", str(tmp_path / "shards"), "--prefix", "x"], tmp_path)
    assert "empty.json: the annotation files list no entries" in line
    (tmp_path / "taken").write_text("a file, not a folder")
    line = run([sys.executable, "tools/make_synthetic_shards.py", "--out", str(tmp_path / "taken"),
                "--train-samples", "8", "--heldout-samples", "4"], tmp_path)
    assert str(tmp_path / "taken") in line
    line = run([sys.executable, "tools/make_shapes_tasks.py", "--out", str(tmp_path / "taken"), "--train", "4",
                "--heldout", "2"], tmp_path)
    assert str(tmp_path / "taken") in line
