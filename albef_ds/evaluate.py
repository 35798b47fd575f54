"""Evaluation of a checkpoint, one command per task that has one:

    python -m albef_ds.evaluate retrieval --checkpoint PATH --data DATA --output_dir DIR
        [--image_root DIR] [--config CFG] [--batch_size 64] [task options, see --help]

PATH: a training folder, a converted file or a released ALBEF file whose model fits the command
(retrieval: any checkpoint with an ITM head). Writes DIR/metrics.json (rank 0) and prints a table.
Also runs under the deepspeed launcher, torchrun, srun or mpirun: the work is split over the ranks
and the result is the one a single process computes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from albef_ds import distributed as dist
from albef_ds.cli import run_in_process_group
from albef_ds.config import ConfigError
from albef_ds.hub import load_model
from albef_ds.tasks import task_class, task_names

METRICS_FILE = "metrics.json"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="ALBEF-DS evaluation")
    sub = ap.add_subparsers(dest="task", required=True)
    for name in task_names():
        cls = task_class(name)
        if not cls.eval_command_help:
            continue
        p = sub.add_parser(name, help=cls.eval_command_help)
        p.add_argument("--checkpoint", required=True, help="a training folder, a converted file or a released ALBEF file")
        p.add_argument("--data", required=True, help="the evaluation data: ALBEF's JSON file, shard patterns, "
                       "or a generated corpus' manifest")
        p.add_argument("--image_root", default=None, help="folder the JSON's image paths are relative to")
        p.add_argument("--output_dir", required=True)
        p.add_argument("--config", default=None, help="config (shipped name or yaml) to load the checkpoint into, "
                       "and whose data.max_tokens / max_words to use (default: the checkpoint's own config)")
        p.add_argument("--batch_size", type=int, default=64)
        p.add_argument("--trust_checkpoint", action="store_true", help="load a checkpoint that holds objects "
                       "beyond tensors (unpickling them could run code): only files from a source you trust")
        cls.add_eval_arguments(p)
        p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)   # deepspeed launcher
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_in_process_group(lambda: _evaluate_command(args))


def _evaluate_command(args) -> int:
    task = task_class(args.task)
    os.makedirs(args.output_dir, exist_ok=True)      # before the work: a bad folder fails now
    device = torch.device(f"cuda:{dist.local_rank()}" if torch.cuda.is_available() else "cpu")
    model = load_model(args.checkpoint, config=args.config, device=device, trusted=args.trust_checkpoint)
    if not isinstance(model, task.inference_class):
        raise ConfigError(f"{args.checkpoint} holds a {type(model).__name__}, not the "
                          f"{task.inference_class.__name__} that `evaluate {args.task}` needs")
    out = task.evaluate_command(model, args)
    out.update(checkpoint=args.checkpoint, data=args.data)
    if dist.rank() == 0:
        with open(os.path.join(args.output_dir, METRICS_FILE), "w") as f:
            json.dump(out, f, indent=1)
        print(task.format_metrics(out), flush=True)
        print(f"written {os.path.join(args.output_dir, METRICS_FILE)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
