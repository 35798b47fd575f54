"""tools/bench_data.py runs and reports what docs/data.md quotes."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_data_runs(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "tools/bench_data.py", "--images", "4", "--img-size", "64", "--seconds", "0.3",
                    "--workers", "1", "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert result["per_worker_samples_per_s"] > 0 and result["stream_samples_per_s"] > 0
    assert result["stream_worker_cpu_ms_per_sample"] > 0
