#!/usr/bin/env python
"""ALBEF annotation JSON + image folder -> webdataset shards and sizes.json.

    python tools/make_shards.py --ann coco.json --image-root /data/coco --out /data/albef/coco \
        --prefix coco --max-samples 10000 --workers 8

Annotation files are ALBEF's pretraining lists: [{"image": path relative to --image-root,
"caption": str or [str, ...]}, ...]. One sample per image: an image listed several times gets all
its captions (json "caption" list; the stream draws one per visit). With --vqa they are ALBEF's
VQA files (vqa_train.json, vqa_val.json, vg_qa.json: one image root each): one sample per question,
the entry as its json. Images are copied as they are (jpg / png / webp). Prints a JSON summary
whose "pattern" goes into the config's data.corpora[].shards; sample counts go to sizes.json next
to the shards.
"""
import argparse
import json
import os
import sys

from albef_ds.cli import INPUT_ERRORS, ArgumentParser, check_at_least, check_writable_folder, report_input_error
from albef_ds.config import ConfigError
from albef_ds.data.annotations import CAPTIONS, VQA_TRAIN, check_entries
from albef_ds.data.shards import make_shards, read_annotations
from albef_ds.data.vqa import make_question_shards


def read_entries(paths: list[str], image_root: str, schema: dict) -> list:
    """The entries of every annotation file, each checked against `schema`; a file that cannot be
    read, a wrong entry, or an image root that is not a folder is a ConfigError naming it."""
    if not os.path.isdir(image_root):
        raise ConfigError(f"--image-root {image_root} is not a folder")
    annotations = []
    for path in paths:
        try:
            entries = read_annotations(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read annotation file {path}: {exc}") from None
        try:
            check_entries(entries, path, schema)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        annotations += entries
    return annotations


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ann", nargs="+", required=True, help="ALBEF annotation JSON file(s)")
    parser.add_argument("--image-root", required=True, help="folder the annotation image paths start from")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--prefix", required=True, help="shard name prefix: <prefix>-00000.tar, ...")
    parser.add_argument("--max-samples", type=int, default=10000, help="images per shard")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="shards written in parallel")
    parser.add_argument("--vqa", action="store_true", help="VQA files: one sample per question")
    args = parser.parse_args(argv)
    try:
        check_at_least({"--max-samples": args.max_samples, "--workers": args.workers}, 1)
        if not args.prefix or os.sep in args.prefix:
            raise ConfigError(f"--prefix {args.prefix!r} must be a file-name part (no {os.sep})")
        check_writable_folder(args.out, "--out")
        taken = sorted(n for n in os.listdir(args.out) if n.startswith(f"{args.prefix}-") and n.endswith(".tar")) \
            if os.path.isdir(args.out) else []
        if taken:
            raise ConfigError(f"--out {args.out} already holds {len(taken)} '{args.prefix}' shards ({taken[0]}, ...): "
                              "choose another --out or --prefix (nothing is overwritten)")
        annotations = read_entries(args.ann, args.image_root, VQA_TRAIN if args.vqa else CAPTIONS)
        if not annotations:
            raise ConfigError(f"--ann {' '.join(args.ann)}: the annotation files list no "
                              f"{'questions' if args.vqa else 'entries'}")
        if args.vqa:
            summary = make_question_shards(annotations, args.image_root, args.out, args.prefix, args.max_samples)
        else:
            summary = make_shards(annotations, args.image_root, args.out, args.prefix, args.max_samples,
                                  args.workers)
    except INPUT_ERRORS as exc:
        return report_input_error(exc)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
