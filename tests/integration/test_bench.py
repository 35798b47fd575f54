"""tools/bench.py on two real gloo ranks: what each rank holds under ZeRO-1 and ZeRO-3 and the
bytes exchanged (docs/benchmarks.md quotes these)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import albef_ds
from albef_ds.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def bench(tmp_path, stage):
    out = tmp_path / f"z{stage}.json"
    launcher = Path(sys.executable).parent / "deepspeed"
    run = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(29700 + stage), "tools/bench.py",
                          "--config", "tiny", "--stage", str(stage), "--batch", "4", "--warmup", "1", "--steps", "2",
                          "--split_steps", "1", "--threads", "1", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    return json.loads(out.read_text())


def test_bench_reports_per_rank_state_and_exchange(tmp_path):
    cfg = load_config("tiny")
    trainable = sum(p.numel() for p in albef_ds.build_model(cfg.model).parameters() if p.requires_grad)
    full = trainable * 4                                   # fp32 bytes of one copy
    zero1, zero3 = bench(tmp_path, 1), bench(tmp_path, 3)
    for ranks in (zero1, zero3):
        assert len(ranks) == 2 and all(r["samples_per_s"] > 0 for r in ranks)
    # Adam keeps two moments per element; ZeRO-1 partitions them and the gradients, ZeRO-3 also
    # the weights and the momentum model. Partitions are padded to equal sizes: within 1%.
    for r in zero1:
        b = r["rank_bytes"]
        assert b["parameters"] == full and abs(b["optimizer_state"] / full - 1.0) < 0.01
    for r in zero3:
        b = r["rank_bytes"]
        for key, share in (("parameters", 0.5), ("gradients", 0.5), ("optimizer_state", 1.0),
                           ("momentum_model", 0.5)):
            assert abs(b[key] / full - share) < 0.01, (key, b[key] / full)
    # the global batch's momentum features: one other rank's 4 rows x 2 x embed_dim x fp32
    assert zero1[0]["itc_gather_bytes_per_step"] == 4 * 2 * cfg.model.embed_dim * 4
    assert zero1[0]["hard_negative_bytes_per_step"] > 0
    assert zero1[0]["model_tflops_per_sample"] > 0      # the count itself: tests/unit/test_flops.py
