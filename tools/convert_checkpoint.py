#!/usr/bin/env python
"""Converts ALBEF checkpoints: a training checkpoint folder (any ZeRO stage, any world size), one
of our single files or a released ALBEF file -> our single file or the released ALBEF layout.

    python tools/convert_checkpoint.py --input output/run1 --output albef_run1.safetensors
    python tools/convert_checkpoint.py --input output/run1/checkpoints --tag step00010000 \\
        --output albef_run1.pth --to albef
    python tools/convert_checkpoint.py --input ALBEF_14M.pth --output albef_14m.pt --no-momentum --dtype bf16

Output: our format (safetensors when FILE ends with .safetensors, else torch.save) holds the state
dict and the model config; the released layout is {"model": state_dict} with ALBEF's key names.
Nothing is written unless the whole input reads correctly. See docs/convert.md.
"""
import argparse
import os
import sys

from albef_ds.checkpoint.files import DTYPES, FORMAT, RELEASED, convert
from albef_ds.cli import INPUT_ERRORS, ArgumentParser, check_writable_file, report_input_error
from albef_ds.config import ConfigError, load_config


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True,
                   help="training output folder (DIR, DIR/checkpoints or DIR/checkpoints/<tag>), "
                        "an albef_ds file or a released ALBEF file")
    p.add_argument("--output", required=True, help="file to write (.safetensors: safetensors, else torch.save)")
    p.add_argument("--to", choices=[FORMAT, RELEASED], default=FORMAT,
                   help=f"{FORMAT}: our single file with its config (default); {RELEASED}: the released layout")
    p.add_argument("--tag", help="checkpoint tag of a training folder (default: the one 'latest' names)")
    p.add_argument("--no-momentum", action="store_true",
                   help="leave out the momentum model and the queues (inference-only file)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="bf16 casts the online weights; momentum weights and queues stay fp32")
    p.add_argument("--config", help="model config (shipped name or yaml) instead of the stored one; "
                                    "released files without one default to 'base'")
    p.add_argument("--trust_checkpoint", action="store_true",
                   help="read an input that holds objects beyond tensors (unpickling them could run code): "
                        "only files from a source you trust")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides for --config, e.g. model.vision.img_size=384")
    p.add_argument("--allow_untrained_head", action="store_true",
                   help="write a checkpoint of another task (pretraining) as this config's task although "
                        "its head was never trained")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if os.path.realpath(args.input) == os.path.realpath(args.output):
            raise ConfigError(f"--input and --output are the same file ({args.output}): write the conversion "
                              "elsewhere (the input is read whole before anything is written, but then replaced)")
        check_writable_file(args.output, "--output")
        config = None
        if args.config or args.set:
            if not args.config:
                raise ConfigError("--set needs --config (the config it overrides)")
            config = load_config(args.config, args.set)
        ckpt = convert(args.input, args.output, to=args.to, tag=args.tag, momentum=not args.no_momentum,
                       dtype=args.dtype, config=config, trusted=args.trust_checkpoint,
                       allow_untrained_head=args.allow_untrained_head)
    except INPUT_ERRORS as exc:
        return report_input_error(exc)
    for line in ckpt.report.lines():
        print(f"note: {line}", file=sys.stderr)
    size = os.path.getsize(args.output) / 2**20
    print(f"wrote {args.output} ({args.to}, {size:.1f} MiB{', no momentum' if args.no_momentum else ''}, "
          f"{args.dtype}) from {ckpt.kind} {ckpt.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
