"""Progress line, metrics.jsonl, TensorBoard scalars and the evaluation's pictures, written by rank
0, for whatever metrics and pictures a task reports (by convention its losses are named `loss_*`
and its accuracies `*_acc`, which the progress line shows)."""
from __future__ import annotations

import collections
import json
import os
import time

import numpy as np

# The progress line's rate and ETA: over the last RATE_WINDOW_S seconds of steps (at least the last
# logged interval), so a busy moment on a shared machine does not swing the ETA; the last line of a
# run says the whole run's time and mean rate.
RATE_WINDOW_S = 120.0


class MetricsLogger:
    def __init__(self, output_dir: str, total_steps: int, enabled: bool, global_batch: int = 0):
        self.enabled = enabled
        self.total_steps, self.global_batch = total_steps, global_batch
        self.started = time.time()
        self.start_step = None
        self.recent = collections.deque()     # (time, step) of the logged steps in the rate window
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(output_dir, exist_ok=True)
            self.jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a")
            self.tb = SummaryWriter(os.path.join(output_dir, "tb"))

    def log(self, step: int, scalars: dict) -> None:
        """Writes one record; `step` is the number of optimizer steps done."""
        if not self.enabled:
            return
        now = time.time()
        if self.start_step is None:
            self.start_step, self.started = step - 1, now - scalars.get("step_time_s", 0.0)
            self.recent.append((self.started, self.start_step))
        record = self._write(step, scalars)
        self.recent.append((now, step))
        while len(self.recent) > 2 and now - self.recent[1][0] >= RATE_WINDOW_S:
            self.recent.popleft()
        since, first_step = self.recent[0]
        steps_per_s = (step - first_step) / max(now - since, 1e-9)
        rate, eta = steps_per_s * self.global_batch, (self.total_steps - step) / max(steps_per_s, 1e-9)
        losses = " ".join(f"{k[5:]} {v:.3f}" for k, v in record.items() if k.startswith("loss_"))
        accuracies = "".join(f"  {k} {v:.3f}" for k, v in record.items() if k.endswith("_acc"))
        print(f"step {step}/{self.total_steps}  loss {record['loss']:.4f}" + (f" ({losses})" if losses else "")
              + f"{accuracies}  lr {record['lr']:.2e}  {rate:.1f} samples/s  eta {_duration(eta)}", flush=True)

    def log_eval(self, step: int, metrics: dict, headline=None) -> None:
        """Evaluation results: one metrics.jsonl record of `eval/<name>` keys, TensorBoard, and a
        line of the `headline` metrics (default all)."""
        if not self.enabled:
            return
        self._write(step, {f"eval/{k}": v for k, v in metrics.items()})
        shown = [k for k in (headline or metrics) if k in metrics]
        print(f"eval at step {step}: " + "  ".join(f"{k} {float(metrics[k]):.2f}" for k in shown), flush=True)

    def _write(self, step: int, scalars: dict) -> dict:
        """One metrics.jsonl line and the TensorBoard scalars of a step."""
        record = {"step": step, **{k: float(v) for k, v in scalars.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in scalars.items():
            self.tb.add_scalar(key, float(value), step)
        self.tb.flush()
        return record

    def log_images(self, step: int, pictures: dict) -> None:
        """TensorBoard images `pictures/<name>` of PIL images by name, at `step`."""
        if not self.enabled or not pictures:
            return
        for name, picture in pictures.items():
            self.tb.add_image(f"pictures/{name}", np.asarray(picture.convert("RGB")), step, dataformats="HWC")
        self.tb.flush()

    def note(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if self.enabled:
            if self.start_step is not None and self.recent[-1][1] > self.start_step:
                last, seconds = self.recent[-1][1], self.recent[-1][0] - self.started
                print(f"trained steps {self.start_step + 1}-{last} in {_duration(seconds)}, "
                      f"{(last - self.start_step) * self.global_batch / max(seconds, 1e-9):.1f} samples/s on "
                      f"average", flush=True)
            self.jsonl.close()
            self.tb.close()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
