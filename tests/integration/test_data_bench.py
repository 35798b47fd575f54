"""tools/bench_data.py, shortened (6 photos, 64 px, 0.3 s per measurement): its JSON holds every
figure docs/data.md ("Throughput") and docs/benchmarks.md ("Data loading") quote, for both paths,
and the figures agree with each other (ratios and rates from the times, totals from the stages, the
batch bytes from the dtype). The times themselves are not checked: they are the load's."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
IMG_SIZE, WORKERS, RUNS = 64, 1, 1


def ratio_of(before_ms, now_ms):
    """The ratio the bench computes from unrounded times: the JSON's times are rounded to 3 places."""
    return pytest.approx(before_ms / now_ms, abs=0.005 + 0.001 * (before_ms + now_ms) / now_ms ** 2)


def test_bench_data_reports_every_quoted_figure_consistently(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "tools/bench_data.py", "--photos", "6", "--img-size", str(IMG_SIZE), "--seconds",
                    "0.3", "--breakdown-samples", "4", "--workers", str(WORKERS), "--stream-runs", str(RUNS),
                    "--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    result = json.loads(out.read_text())
    # the set-up the docs state: machine, cores, load before the run, torch, photo sizes
    assert isinstance(result["machine"], str) and result["machine"] and result["cpus"] == os.cpu_count()
    assert result["load_average_before"] >= 0 and result["torch"] == torch.__version__
    assert result["jpeg_region_decoder"] is True           # the install built albef_ds/data/_jpeg.c
    assert result["img_size"] == IMG_SIZE and result["photos_per_layout"] == 6
    for layout in ("img2dataset", "640x480"):
        assert result["mean_jpeg_kb"][layout] > 0
        # per worker: ms per sample, samples per CPU second and the ratio of each transform
        for recipe in ("pretraining", "fine-tuning", "evaluation"):
            r = result["per_worker"][layout][recipe]
            assert r["samples"] > 0 and r["reference_ms"] > 0 and r["today_ms"] > 0
            assert r["ratio"] == ratio_of(r["reference_ms"], r["today_ms"]), (layout, recipe, r)
            for path in ("reference", "today"):
                ms = r[f"{path}_ms"]       # rounded to 3 places: 1000 / ms moves by up to 0.5 / ms**2
                assert r[f"{path}_per_cpu_s"] == pytest.approx(1000 / ms, abs=0.05 + 1.0 / ms ** 2)
            assert 0 <= r["pixel_mad_mean"] <= r["pixel_mad_max"] and r["pixel_mad_p99"] <= r["pixel_mad_max"]
        # where the time goes: decode (today: only the crop's region), crop + resize (today: resize),
        # flip, each RandAugment op, and the float32 + normalisation that only the old path does in
        # the worker ("on the device" now)
        breakdown = result["breakdown"][layout]
        for path, resize in (("reference", "crop_resize"), ("today", "resize")):
            stages = breakdown[path]["ms_per_sample"]
            assert stages["decode"] > 0 and stages[resize] > 0
            assert ("to_float_normalise" in stages) == (path == "reference"), (path, stages)
            assert breakdown[path]["total_ms"] == pytest.approx(sum(stages.values()), abs=0.001 * len(stages))
            ops = {name[3:] for name in stages if name.startswith("op_")}
            assert set(breakdown[path]["ms_per_op_application"]) == ops
            assert all(v > 0 for v in breakdown[path]["ms_per_op_application"].values())
        assert 0.0 <= breakdown["dct_half_size_share"] <= 1.0
    # the stream: worker CPU per sample of both paths and their ratio, rates, memory, batch bytes
    stream = result["stream_img2dataset_pretraining"]
    assert stream["workers"] == WORKERS and stream["runs"] == RUNS
    for path, dtype, element_bytes in (("reference", "float32", 4), ("today", "uint8", 1)):
        s = stream[path]
        assert len(stream["all_runs"][path]) == RUNS and s in stream["all_runs"][path]    # the median run
        assert s["image_dtype"] == dtype
        assert s["batch_image_bytes"] == s["batch_size"] * 3 * IMG_SIZE * IMG_SIZE * element_bytes
        assert s["worker_cpu_ms_per_sample"] > 0 and s["samples_per_s"] > 0
        assert s["samples_per_s_per_worker"] == pytest.approx(s["samples_per_s"] / WORKERS, abs=0.1)
        assert s["peak_rss_worker_mb"] > 0 and s["peak_rss_training_process_mb"] > 0
    assert stream["ratio"] == ratio_of(stream["reference"]["worker_cpu_ms_per_sample"],
                                       stream["today"]["worker_cpu_ms_per_sample"])
