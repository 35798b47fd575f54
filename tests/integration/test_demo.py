"""The built-in demo (`make demo`: albef_ds/demo.py on 2 ranks under the deepspeed launcher), end to
end on a shortened run: it writes the generated corpus, trains, evaluates the held-out split and
draws its pictures (the caption's Grad-CAM per word, raw attention), naming them in its last lines."""
import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import png_size

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["data.synthetic.train_samples=64", "data.synthetic.heldout_samples=16", "data.synthetic.samples_per_shard=32",
         "data.epoch_samples=64", "data.workers=0", "train.batch_size=4", "train.log_every=1"]


def test_the_demo_on_two_ranks_ends_with_its_evaluation_and_pictures(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", "29817",
                          "albef_ds/demo.py", "--deepspeed", "ds_configs/zero2.json", "--max_steps", "3",
                          "--output_dir", str(out), *SHORT], cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    assert "training pretrain: 3 steps, global batch 8 on 2 rank(s)" in log, log[-3000:]
    # the corpus the demo wrote and trained on, and its held-out split as the evaluation set
    manifest = json.loads((out / "synthetic_data" / "synthetic.json").read_text())
    assert manifest["config"]["train_samples"] == 64 and manifest["config"]["heldout_samples"] == 16
    heldout = json.loads((out / "heldout_eval.json").read_text())
    assert heldout["images"] == 16 and 0.0 <= heldout["r_mean"] <= 100.0 and "itm_acc" in heldout
    assert "held-out retrieval: 16 images" in log
    lines = log.strip().splitlines()
    gradcam = [line for line in lines if line.startswith("Grad-CAM pictures of held-out images: ")]
    attention = [line for line in lines if line.startswith("raw attention pictures of held-out images ")]
    assert len(gradcam) == 1 and len(attention) == 1, log[-3000:]
    paths = gradcam[0].split(": ", 1)[1].split(", ")
    assert len(paths) == 4 and all(p.startswith(str(out / "pictures" / "heldout_")) for p in paths)
    drawn = attention[0].split(": ", 1)[1].split(", ")
    assert len(drawn) == 2 and all(p.endswith("_attention.png") for p in drawn)
    assert all(png_size(p) for p in paths + drawn)
