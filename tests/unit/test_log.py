"""The progress line: rate and ETA over a window of recent steps (a slow moment does not swing the
ETA), and a last line with the run's time and mean rate."""
import time

from albef_ds.engine import log as progress
from albef_ds.engine.log import MetricsLogger


def test_the_eta_is_averaged_over_the_window_and_the_last_line_sums_up(tmp_path, monkeypatch, capsys):
    clock = [1000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    monkeypatch.setattr(progress, "RATE_WINDOW_S", 300.0)
    logger = MetricsLogger(str(tmp_path), total_steps=100, enabled=True, global_batch=8)
    # nine steps of 10 s, then one of 100 s (a busy moment), then five of 10 s; logged every step
    for step, seconds in enumerate([10.0] * 9 + [100.0] + [10.0] * 5, start=1):
        clock[0] += seconds
        logger.log(step, {"loss": 1.0, "lr": 1e-4, "samples_per_s": 8 / seconds, "step_time_s": seconds})
    lines = capsys.readouterr().out.strip().splitlines()
    assert "0.8 samples/s" in lines[8] and "eta 0h15m10s" in lines[8]          # 9 steps in 90 s
    # after the slow step: 10 steps in the window's 190 s (the last step alone would say 0.1 samples/s
    # and 2h30m)
    assert "0.4 samples/s" in lines[9] and "eta 0h28m30s" in lines[9]
    # at step 15 (t = 1240): the window (300 s) still holds every step: 15 in 240 s
    assert "0.5 samples/s" in lines[14] and "eta 0h22m40s" in lines[14]
    logger.close()
    assert capsys.readouterr().out.strip() == "trained steps 1-15 in 0h04m00s, 0.5 samples/s on average"
