"""Behaviour kept: the tiny pretraining and retrieval runs (2 ranks, ZeRO-2, 30 steps) give the loss
trajectories recorded in tests/data/trajectories.json by the command stored in that file."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECORDED = ROOT / "tests" / "data" / "trajectories.json"


def test_the_recorded_loss_trajectories_are_reproduced(tmp_path):
    recorded = json.loads(RECORDED.read_text())
    out = tmp_path / "trajectories.json"
    launcher = Path(sys.executable).parent / "deepspeed"
    run = subprocess.run([str(launcher), "--num_gpus", str(recorded["world_size"]), "--master_port", "29811",
                          "tools/record_trajectories.py", "--work_dir", str(tmp_path / "runs"), "--output", str(out)],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    got = json.loads(out.read_text())
    assert got["overrides"] == recorded["overrides"]
    for name, steps in recorded["runs"].items():
        assert [s["step"] for s in got["runs"][name]] == list(range(1, recorded["steps"] + 1)), name
        for want, have in zip(steps, got["runs"][name]):
            assert have.keys() == want.keys()
            for key in want:
                assert have[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), (name, want["step"], key)
