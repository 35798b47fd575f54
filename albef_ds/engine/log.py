"""Progress line, metrics.jsonl, TensorBoard scalars and the evaluation's pictures, written by rank
0, for whatever metrics and pictures a task reports (by convention its losses are named `loss_*` and its accuracies `*_acc`, which the
progress line shows)."""
from __future__ import annotations

import json
import os
import time


class MetricsLogger:
    def __init__(self, output_dir: str, total_steps: int, enabled: bool):
        self.enabled = enabled
        self.total_steps = total_steps
        self.started = time.time()
        self.start_step = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(output_dir, exist_ok=True)
            self.jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a")
            self.tb = SummaryWriter(os.path.join(output_dir, "tb"))

    def log(self, step: int, scalars: dict) -> None:
        """Writes one record; `step` is the number of optimizer steps done."""
        if not self.enabled:
            return
        if self.start_step is None:
            self.start_step, self.started = step - 1, time.time() - scalars.get("step_time_s", 0.0)
        record = self._write(step, scalars)
        done = step - self.start_step
        eta = (time.time() - self.started) / max(1, done) * (self.total_steps - step)
        losses = " ".join(f"{k[5:]} {v:.3f}" for k, v in record.items() if k.startswith("loss_"))
        accuracies = "".join(f"  {k} {v:.3f}" for k, v in record.items() if k.endswith("_acc"))
        print(f"step {step}/{self.total_steps}  loss {record['loss']:.4f}" + (f" ({losses})" if losses else "")
              + f"{accuracies}  lr {record['lr']:.2e}  {record['samples_per_s']:.1f} samples/s  "
              f"eta {_duration(eta)}", flush=True)

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
        import numpy as np

        for name, picture in pictures.items():
            self.tb.add_image(f"pictures/{name}", np.asarray(picture.convert("RGB")), step, dataformats="HWC")
        self.tb.flush()

    def note(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
