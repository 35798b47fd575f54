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
from albef_ds.cli import ArgumentParser, check_at_least, check_writable_folder, run_in_process_group
from albef_ds.config import ConfigError
from albef_ds.eval.inputs import check_skipped
from albef_ds.fileio import atomic_write
from albef_ds.hub import load_model
from albef_ds.tasks import task_class, task_names

METRICS_FILE = "metrics.json"


def parse_args(argv=None):
    ap = ArgumentParser(description="ALBEF-DS evaluation")
    sub = ap.add_subparsers(dest="task", required=True)
    for name in task_names():
        cls = task_class(name)
        if not cls.eval_command_help:
            continue
        p = sub.add_parser(name, help=cls.eval_command_help)
        p.add_argument("--checkpoint", required=True, help="a training folder, a converted file or a released ALBEF file")
        p.add_argument("--data", required=True, help="the evaluation data: ALBEF's JSON file or shard patterns")
        p.add_argument("--image_root", default=None, help="folder the JSON's image paths are relative to")
        p.add_argument("--output_dir", required=True)
        p.add_argument("--config", default=None, help="config (shipped name or yaml) to load the checkpoint into, "
                       "and whose data.max_tokens / max_words to use (default: the checkpoint's own config)")
        p.add_argument("--batch_size", type=int, default=64)
        p.add_argument("--max_skipped", type=float, default=0.0, metavar="FRACTION", help="the share of the "
                       "set's items that may be left out (unreadable images, empty texts; default 0: none)")
        p.add_argument("--trust_checkpoint", action="store_true", help="load a checkpoint that holds objects "
                       "beyond tensors (unpickling them could run code): only files from a source you trust")
        p.add_argument("--allow_untrained_head", action="store_true", help="evaluate a checkpoint of another task "
                       "(pretraining) although this task's head was never trained on it")
        cls.add_eval_arguments(p)
        p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)   # deepspeed launcher
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_in_process_group(lambda: _evaluate_command(args))


def _evaluate_command(args) -> int:
    task = task_class(args.task)
    # the arguments and the output folder first: loading a model takes long
    check_at_least({"--batch_size": args.batch_size}, 1)
    if not 0.0 <= args.max_skipped <= 1.0:
        raise ConfigError(f"--max_skipped is {args.max_skipped}: it is a share of the set, between 0 and 1")
    task.check_eval_arguments(args)
    check_writable_folder(args.output_dir, "--output_dir")
    device = torch.device(f"cuda:{dist.local_rank()}" if torch.cuda.is_available() else "cpu")
    model = load_model(args.checkpoint, config=args.config, device=device, trusted=args.trust_checkpoint,
                       allow_untrained_head=args.allow_untrained_head)
    if not isinstance(model, task.inference_class):
        raise ConfigError(f"{args.checkpoint} holds a {type(model).__name__}, not the "
                          f"{task.inference_class.__name__} that `evaluate {args.task}` needs")
    out = task.evaluate_command(model, args)
    check_skipped(out, args.max_skipped, "--max_skipped")
    out.update(checkpoint=args.checkpoint, data=args.data)
    if dist.rank() == 0:
        path = os.path.join(args.output_dir, METRICS_FILE)
        atomic_write(path, lambda tmp: open(tmp, "w").write(json.dumps(out, indent=1)))
        print(task.format_metrics(out), flush=True)
        print(f"written {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
