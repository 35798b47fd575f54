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

from albef_ds.data.shards import make_shards
from albef_ds.data.vqa import TRAIN_KEYS, check_entries, make_question_shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ann", nargs="+", required=True, help="ALBEF annotation JSON file(s)")
    parser.add_argument("--image-root", required=True, help="folder the annotation image paths start from")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--prefix", required=True, help="shard name prefix: <prefix>-00000.tar, ...")
    parser.add_argument("--max-samples", type=int, default=10000, help="images per shard")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="shards written in parallel")
    parser.add_argument("--vqa", action="store_true", help="VQA files: one sample per question")
    args = parser.parse_args()
    annotations = []
    for path in args.ann:
        with open(path) as f:
            entries = json.load(f)
        if args.vqa:
            check_entries(entries, path, TRAIN_KEYS)
        annotations += entries
    if args.vqa:
        summary = make_question_shards(annotations, args.image_root, args.out, args.prefix, args.max_samples)
    else:
        summary = make_shards(annotations, args.image_root, args.out, args.prefix, args.max_samples, args.workers)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
