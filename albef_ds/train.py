"""Training of any task under DeepSpeed: pretraining, or a downstream task (`task:` in the config).

    deepspeed albef_ds/train.py --deepspeed ds_configs/zero2.json [--config YAML] [--output_dir DIR]
        [--max_steps N] [--resume [TAG]] [key=value ...]

With no --config it runs the built-in demo: the tiny model pretrained on a generated corpus of
shapes, ending with its held-out evaluation. Also runs under torchrun, srun (slurm/common.sh) and
mpirun, or as a single plain process.
"""
from __future__ import annotations

import argparse
import sys

from albef_ds import distributed as dist
from albef_ds.cli import INPUT_ERRORS, report_input_error
from albef_ds.config import load_config


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="ALBEF training with DeepSpeed ZeRO")
    ap.add_argument("--deepspeed", required=True, metavar="JSON", help="DeepSpeed config (ds_configs/zeroN.json)")
    ap.add_argument("--config", default=None, help="project config: a yaml path or a shipped name; "
                    "omitted: the built-in demo (tiny model, generated corpus)")
    ap.add_argument("--output_dir", default=None, help="default: train.output_dir of the config")
    ap.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
    ap.add_argument("--resume", nargs="?", const="", default=None, metavar="TAG",
                    help="resume from TAG, or with no TAG from the latest checkpoint if there is one")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)   # deepspeed launcher
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = dist.init_distributed()
    try:
        return _run(args, demo=args.config is None)
    except INPUT_ERRORS as exc:       # every rank meets it; rank 0 says it
        return report_input_error(exc)
    finally:
        if started:
            dist.shutdown()


def _run(args, demo: bool) -> int:
    from albef_ds.engine import Trainer

    if dist.rank() == 0 and demo:
        print("ALBEF-DS built-in demo: tiny ALBEF on a generated corpus of coloured shapes "
              "(pass --config for real training)", flush=True)
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    cfg = load_config("tiny" if demo else args.config, overrides)
    output_dir = args.output_dir or cfg.train.output_dir
    trainer = Trainer(cfg, args.deepspeed, output_dir, resume=args.resume)
    if dist.rank() == 0:
        print(f"training {cfg.task}: {trainer.total_steps} steps, global batch "
              f"{cfg.train.batch_size * cfg.train.grad_accum * dist.world_size()} on {dist.world_size()} "
              f"rank(s), ZeRO stage {trainer.ds_config['zero_optimization']['stage']}, output {output_dir}",
              flush=True)
    code = trainer.train()
    if code == 0 and demo:
        # The demo ends with what the model learned: held-out retrieval, ITM and attribute MLM.
        from albef_ds.eval.shapes_probe import evaluate_heldout

        evaluate_heldout(trainer.engine, trainer.cfg, output_dir)
    trainer.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
