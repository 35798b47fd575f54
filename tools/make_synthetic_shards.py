#!/usr/bin/env python
"""Writes the coloured-shapes corpus (train + held-out shards) used by the tiny config and tests.

    python tools/make_synthetic_shards.py --out data/shapes [--config tiny] [--train-samples 4096 ...]

The sizes come from the config's data.synthetic section, flag by flag overridable. Nothing is
written when the folder already holds the same corpus. Prints the corpora as JSON (use "train" as
data.corpora; "heldout" for evaluation with resampled: false, augment: false).
"""
import argparse
import dataclasses
import json
import sys

from albef_ds.cli import ArgumentParser, INPUT_ERRORS, report_input_error
from albef_ds.config import ConfigError, SyntheticConfig, load_config
from albef_ds.synthetic.shapes import write_synthetic_corpus


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--config", default="tiny", help="config whose data.synthetic gives the defaults")
    for field in dataclasses.fields(SyntheticConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config).data.synthetic or SyntheticConfig()
        overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticConfig)
                     if getattr(args, f.name) is not None}
        try:
            corpora = write_synthetic_corpus(args.out, dataclasses.replace(cfg, **overrides))
        except OSError as exc:
            raise ConfigError(f"cannot write the corpus into --out {args.out}: {exc.strerror or exc}") from None
    except INPUT_ERRORS as exc:
        return report_input_error(exc)
    print(json.dumps(corpora, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
