"""tools/bench_data.py runs and reports what docs/data.md quotes, for both paths."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_data_runs(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "tools/bench_data.py", "--photos", "6", "--img-size", "64", "--seconds", "0.3",
                    "--breakdown-samples", "4", "--workers", "1", "--stream-runs", "1", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True)
    result = json.loads(out.read_text())
    for layout in ("img2dataset", "640x480"):
        for recipe in ("pretraining", "fine-tuning", "evaluation"):
            r = result["per_worker"][layout][recipe]
            assert r["reference_ms"] > 0 and r["today_ms"] > 0 and r["ratio"] > 0 and r["pixel_mad_max"] >= 0
        for path in ("reference", "today"):
            assert result["breakdown"][layout][path]["ms_per_sample"]["decode"] > 0
    stream = result["stream_img2dataset_pretraining"]
    assert stream["reference"]["image_dtype"] == "float32" and stream["today"]["image_dtype"] == "uint8"
    assert stream["reference"]["batch_image_bytes"] == 4 * stream["today"]["batch_image_bytes"]
    assert stream["today"]["worker_cpu_ms_per_sample"] > 0 and stream["today"]["samples_per_s_per_worker"] > 0
