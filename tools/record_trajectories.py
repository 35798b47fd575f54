#!/usr/bin/env python
"""Records the loss trajectories that a change of structure must keep, step by step.

    deepspeed --num_gpus 2 tools/record_trajectories.py --work_dir /tmp/traj \
        --output tests/data/trajectories.json

Two runs of the tiny config on a small generated corpus, 2 ranks, ZeRO-2, fixed seed, 30 steps each:
pretraining (ITC + ITM + MLM, momentum distillation on) and retrieval fine-tuning (ITC + ITM with
image ids). Writes every step's losses (rank 0). tests/integration/test_trajectories.py runs this command and
compares its output with the recorded file: a restructuring that changes any number fails it.
Re-record only in a commit of its own that says which change of behaviour moved the numbers.
"""
import argparse
import json
import os
import sys

from albef_ds import distributed as dist
from albef_ds.cli import ArgumentParser, check_writable_file, check_writable_folder, report_input_error
from albef_ds.config import ConfigError, load_config
from albef_ds.engine import Trainer
from albef_ds.synthetic.shapes import with_generated_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 30
COMMON = ["data.synthetic.train_samples=512", "data.synthetic.heldout_samples=16",
          "data.synthetic.samples_per_shard=128", "data.epoch_samples=160", "data.workers=1",
          "data.augment=true", "model.alpha=0.4", "model.queue_size=64", f"train.max_steps={STEPS}",
          "train.warmup_steps=5", "train.log_every=1", "train.save_every=1000"]
RUNS = {"pretrain": [], "retrieval": ["task=retrieval"]}
RECORDED = ("loss", "loss_itc", "loss_itm", "loss_mlm")


def record(name: str, work_dir: str) -> list:
    out = os.path.join(work_dir, name)
    cfg = with_generated_corpus(load_config("tiny", COMMON + RUNS[name]), out)
    trainer = Trainer(cfg, os.path.join(ROOT, "ds_configs", "zero2.json"), out)
    code = trainer.train()
    trainer.close()
    if code != 0:
        raise RuntimeError(f"run {name} exited with {code}")
    if dist.rank() != 0:
        return []
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: row[k] for k in ("step", *RECORDED) if k in row} for row in rows if "loss" in row]


def main() -> int:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work_dir", required=True, help="folder for the runs' outputs (the same on every rank)")
    ap.add_argument("--output", required=True, help="JSON file to write (rank 0)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    try:                        # before any rank starts: a bad path is one line, not a run's traceback
        check_writable_folder(args.work_dir, "--work_dir")
        check_writable_file(args.output, "--output")
    except ConfigError as exc:
        return report_input_error(exc)
    started = dist.init_distributed()
    try:
        results = {name: record(name, args.work_dir) for name in RUNS}
        if dist.rank() == 0:
            command = "deepspeed --num_gpus 2 tools/record_trajectories.py --work_dir DIR --output FILE"
            with open(args.output, "w") as f:
                json.dump({"command": command, "world_size": dist.world_size(), "steps": STEPS,
                           "overrides": {n: COMMON + RUNS[n] for n in RUNS}, "runs": results}, f, indent=1)
    finally:
        if started:
            dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
