#!/usr/bin/env python
"""What a pretrained model reads from the image, per attribute of the shapes corpus
(albef_ds.synthetic.probe.attribute_probe): for each held-out caption, the word of one attribute
(colour, shape, count, size, position) is masked and the MLM head picks among that attribute's
words; once with the caption's own image, once with another held-out image. The second is what
the caption's words alone tell; the gap is what the model sees.

    python tools/probe_attributes.py --checkpoint tests/data/tiny_pretrained.safetensors

Prints and (with --output) writes {attribute: {"image": %, "other_image": %, "captions": n}}.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from albef_ds import load_model
from albef_ds.cli import INPUT_ERRORS, report_input_error
from albef_ds.config import SyntheticConfig
from albef_ds.eval.retrieval import read_shard_set
from albef_ds.fileio import atomic_write
from albef_ds.synthetic.probe import attribute_probe
from albef_ds.synthetic.shapes import write_synthetic_corpus
from albef_ds.tokenizer import build_tokenizer


def probe(args) -> dict:
    model = load_model(args.checkpoint, trusted=args.trust_checkpoint)
    corpus = write_synthetic_corpus(args.corpus_dir, SyntheticConfig(train_samples=0, heldout_samples=args.images))
    cfg = model.cfg
    return attribute_probe(model, read_shard_set(corpus["heldout"]), build_tokenizer(cfg.text.tokenizer),
                           cfg.vision.img_size, args.max_tokens)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a pretraining checkpoint (file or training folder)")
    ap.add_argument("--images", type=int, default=256, help="held-out images (distinct attribute sets up to 900)")
    ap.add_argument("--corpus_dir", default="/tmp/albef_ds_probe_shapes")
    ap.add_argument("--max_tokens", type=int, default=16, help="caption length in tokens (the tiny recipe's)")
    ap.add_argument("--output", help="also write the result as json")
    ap.add_argument("--trust_checkpoint", action="store_true", help="unpickle a .pth file in full (trusted files only)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    try:
        result = probe(args)
        if args.output:
            atomic_write(args.output, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    except (ValueError, OSError) + INPUT_ERRORS as exc:
        return report_input_error(exc)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
