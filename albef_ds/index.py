"""The image features of a collection, with a nearest-neighbour index, for `albef_ds.search` and
`albef_ds.serve`:

    python -m albef_ds.index --checkpoint PATH --data DATA --output_dir INDEX [--image_root DIR]
        [--config CFG] [--batch_size 64] [--part_size 8192] [--workers 4] [--kind auto|exact|ivf_sq8]

DATA: webdataset shards (img2dataset's layout; a brace pattern), an ALBEF annotation file (with
--image_root), the synthetic.json of a generated corpus (its held-out split), or a folder of images.
PATH: any checkpoint with an ITM head. Runs under the deepspeed launcher, torchrun, srun or mpirun
like evaluation: the parts are dealt to the ranks and the files are the same as from one process.
Rerun after a failure, it encodes only the parts that are missing. See docs/search.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from albef_ds import distributed as dist
from albef_ds.cli import INPUT_ERRORS, ArgumentParser, report_input_error
from albef_ds.config import ConfigError
from albef_ds.search.ann import KINDS
from albef_ds.search.build import build_index, check_output, make_plan
from albef_ds.search.collection import read_collection
from albef_ds.search.loading import load_search_model
from albef_ds.search.store import IMAGE_ROWS, UNREADABLE


def parse_args(argv=None):
    ap = ArgumentParser(description="ALBEF-DS: index the images of a collection")
    ap.add_argument("--checkpoint", required=True, help="a training folder, a converted file or a released ALBEF "
                    "file, with an ITM head")
    ap.add_argument("--data", required=True, help="shard pattern, annotation JSON, synthetic.json, or a folder of "
                    "images")
    ap.add_argument("--image_root", default=None, help="folder the annotation file's image paths are relative to")
    ap.add_argument("--output_dir", required=True, help="the index folder")
    ap.add_argument("--config", default=None, help="config to load the checkpoint into, whose data.max_tokens / "
                    "max_words the captions and later queries use (default: the checkpoint's own; 30 / 30)")
    ap.add_argument("--batch_size", type=int, default=64, help="images encoded together")
    ap.add_argument("--part_size", type=int, default=8192, help="images of an annotation file or folder per part "
                    "(a multiple of --batch_size); a shard is one part")
    ap.add_argument("--workers", type=int, default=4, help="threads decoding images ahead of the model, per rank")
    ap.add_argument("--kind", choices=KINDS, default="auto", help="nearest-neighbour index: exact, an inverted file "
                    "with 8-bit codes, or by size (auto: exact up to 250,000)")
    ap.add_argument("--trust_checkpoint", action="store_true", help="load a checkpoint that holds objects beyond "
                    "tensors (unpickling them could run code): only files from a source you trust")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)    # deepspeed launcher
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = dist.init_distributed()
    try:
        return _index_command(args)
    except INPUT_ERRORS as exc:            # every rank meets it; rank 0 says it
        return report_input_error(exc)
    finally:
        if started:
            dist.shutdown()


def _index_command(args) -> int:

    if args.batch_size < 1 or args.part_size < args.batch_size or args.part_size % args.batch_size:
        raise ConfigError(f"--part_size {args.part_size} must be a multiple of --batch_size {args.batch_size} (>= 1)")
    if args.workers < 0:
        raise ConfigError(f"--workers {args.workers} must be >= 0")
    try:
        collection = read_collection(args.data, args.image_root, args.part_size)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--data {args.data}: {exc}") from None
    device = torch.device(f"cuda:{dist.local_rank()}" if torch.cuda.is_available() else "cpu")
    loaded = load_search_model(args.checkpoint, args.config, device, args.trust_checkpoint)
    plan = make_plan(collection, loaded.identity, loaded.model.cfg.vision.img_size, loaded.max_tokens,
                     loaded.max_words, args.batch_size, args.part_size, args.kind)
    try:
        state = check_output(args.output_dir, plan)
    except ValueError as exc:
        raise ConfigError(f"--output_dir {args.output_dir}: {exc}") from None
    if state == "done":
        if dist.rank() == 0:
            print(f"{args.output_dir} already holds this index: nothing to do", flush=True)
        return 0
    start = time.monotonic()
    manifest = build_index(loaded.model, collection, loaded.tokenizer, args.output_dir, plan, loaded.record,
                           args.workers)
    if manifest is not None:
        counts, specs = manifest["counts"], manifest["ann"]
        print(f"indexed {counts['images']} images and {counts['texts']} captions in {time.monotonic() - start:.1f} s "
              f"on {dist.world_size()} rank(s); nearest-neighbour index: {specs['images']['kind']}; "
              f"{counts['unreadable']} unreadable" + (f" (listed in {os.path.join(args.output_dir, UNREADABLE)})"
                                                       if counts["unreadable"] else "")
              + f"; rows in {os.path.join(args.output_dir, IMAGE_ROWS)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
