"""Training of any task under DeepSpeed: pretraining, or a downstream task (`task:` in the config).

    deepspeed albef_ds/train.py --deepspeed ds_configs/zero2.json --config YAML [--output_dir DIR]
        [--max_steps N] [--resume [TAG]] [key=value ...]

Also runs under torchrun, srun (slurm/common.sh) and mpirun, or as a single plain process. The
built-in demo (the tiny model on a generated corpus) is albef_ds/demo.py, with the same arguments.
"""
from __future__ import annotations

import argparse
import sys

from albef_ds import distributed as dist
from albef_ds.cli import ArgumentParser, run_in_process_group
from albef_ds.config import Config, load_config
from albef_ds.engine import Trainer


def parse_args(argv=None, config_help: str = "project config: a yaml path or a shipped name",
               config_default=None):
    ap = ArgumentParser(description="ALBEF training with DeepSpeed ZeRO")
    ap.add_argument("--deepspeed", required=True, metavar="JSON", help="DeepSpeed config (ds_configs/zeroN.json)")
    ap.add_argument("--config", required=config_default is None, default=config_default, help=config_help)
    ap.add_argument("--output_dir", default=None, help="default: train.output_dir of the config")
    ap.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
    ap.add_argument("--resume", nargs="?", const="", default=None, metavar="TAG",
                    help="resume from TAG, or with no TAG from the latest checkpoint if there is one "
                    "(a checkpoint that fails its check: the newest older one that passes)")
    ap.add_argument("--start_over", action="store_true", help="start afresh in an output folder that holds "
                    "another run's checkpoints: its files are moved aside (previous-<time>/), not deleted")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)   # deepspeed launcher
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return ap.parse_args(argv)


def config_of(args) -> Config:
    """The config the arguments name, with their overrides (--max_steps among them)."""
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    return load_config(args.config, overrides)


def output_dir_of(args, cfg: Config) -> str:
    return args.output_dir or cfg.train.output_dir


def start(cfg: Config, args) -> Trainer:
    """The Trainer of a command line's run (every start-up check passed), announced on rank 0."""
    output_dir = output_dir_of(args, cfg)
    trainer = Trainer(cfg, args.deepspeed, output_dir, resume=args.resume, start_over=args.start_over)
    if dist.rank() == 0:
        print(f"training {cfg.task}: {trainer.total_steps} steps, global batch "
              f"{cfg.train.batch_size * cfg.train.grad_accum * dist.world_size()} on {dist.world_size()} "
              f"rank(s), ZeRO stage {trainer.ds_config['zero_optimization']['stage']}, output {output_dir}",
              flush=True)
    return trainer


def main(argv=None) -> int:
    args = parse_args(argv)

    def command() -> int:
        trainer = start(config_of(args), args)
        code = trainer.train()
        trainer.close()
        return code

    return run_in_process_group(command)


if __name__ == "__main__":
    sys.exit(main())
