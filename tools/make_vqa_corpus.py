#!/usr/bin/env python
"""Writes the generated VQA corpus of shapes (albef_ds.synthetic.vqa) and prints the
overrides that train and evaluate the tiny VQA recipe on it:

    python tools/make_vqa_corpus.py --out /tmp/vqa_shapes
    python albef_ds/train.py --deepspeed ds_configs/zero2.json --config tiny_vqa --output_dir /tmp/vqa_run \\
        model.init_checkpoint=tests/data/tiny_pretrained_positions.safetensors <train overrides>
    python -m albef_ds.evaluate vqa --checkpoint /tmp/vqa_run <evaluate arguments> --output_dir /tmp/vqa_eval

(docs/vqa.md's proof of learning: these commands with the overrides written out.)

`--shuffled` also writes the training files with their images shuffled among the questions (the
question-only prior of docs/vqa.md) and prints their overrides.
"""
import argparse
import json
import os
import sys

from albef_ds.cli import ArgumentParser, INPUT_ERRORS, report_input_error
from albef_ds.config import ConfigError
from albef_ds.synthetic.vqa import shuffle_images, write_vqa_corpus


def overrides(corpus: dict, train: str, vg: str) -> str:
    corpora = (f"data.corpora=[{{name: vqa, annotations: [{train}], image_root: {corpus['vqa_root']}}}, "
               f"{{name: vg, annotations: [{vg}], image_root: {corpus['vg_root']}}}]")
    return (f"'{corpora}' vqa.answer_list={corpus['answer_list']} eval.data=[{corpus['heldout']}] "
            f"eval.image_root={corpus['vqa_root']}")


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--train_images", type=int, default=400)
    ap.add_argument("--heldout_images", type=int, default=60)
    ap.add_argument("--vg_images", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shuffled", action="store_true")
    args = ap.parse_args(argv)
    try:
        try:
            corpus = write_vqa_corpus(args.out, args.train_images, args.heldout_images, args.vg_images,
                                      seed=args.seed)
        except OSError as exc:
            raise ConfigError(f"cannot write the corpus into --out {args.out}: {exc.strerror or exc}") from None
    except INPUT_ERRORS as exc:
        return report_input_error(exc)
    out = {"files": corpus, "train_overrides": overrides(corpus, corpus["train"], corpus["vg"]),
           "evaluate_arguments": f"--data {corpus['heldout']} --image_root {corpus['vqa_root']} "
                                 f"--answer_list {corpus['answer_list']} --k_test 8"}
    if args.shuffled:
        out["shuffled_train_overrides"] = overrides(
            corpus, shuffle_images(corpus["train"], os.path.join(args.out, "vqa_train_shuffled.json"), args.seed),
            shuffle_images(corpus["vg"], os.path.join(args.out, "vg_qa_shuffled.json"), args.seed))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
