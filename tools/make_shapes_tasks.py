#!/usr/bin/env python
"""Writes the generated corpora of the classification tasks in ALBEF's annotation formats:
NLVR-shapes (albef_ds/synthetic/nlvr.py) and VE-shapes (albef_ds/synthetic/ve.py), each
with a copy of its train file whose images are shuffled between entries (the text-only baseline).

    python tools/make_shapes_tasks.py --out output/shapes_tasks

-> output/shapes_tasks/nlvr/{nlvr_train,nlvr_dev,nlvr_test,nlvr_train_shuffled}.json + images/,
   output/shapes_tasks/ve/{ve_train,ve_dev,ve_test,ve_train_shuffled}.json + images/
(each folder is its corpus' image root). Prints the files and, per corpus, the overrides that
point its tiny recipe (tiny_nlvr2 / tiny_snli_ve) at them: `train_overrides`, and
`shuffled_train_overrides` for the train file with shuffled images. Nothing is rewritten when the
folder already holds the same corpus.
"""
import json
import os
import shlex

from albef_ds.cli import ArgumentParser, report_input_error
from albef_ds.config import ConfigError
from albef_ds.synthetic.labelled import write_shuffled_images
from albef_ds.synthetic.nlvr import write_nlvr_shapes
from albef_ds.synthetic.ve import write_ve_shapes


def write_shapes_tasks(out: str, train: int = 4000, heldout: int = 400, seed: int = 0) -> dict:
    corpora = {}
    for name, write in (("nlvr", write_nlvr_shapes), ("ve", write_ve_shapes)):
        paths = write(os.path.join(out, name), train=train, dev=heldout, test=heldout, seed=seed)
        paths["train_shuffled"] = write_shuffled_images(
            paths["train"], paths["train"].replace("_train.json", "_train_shuffled.json"), seed)
        corpora[name] = paths
    return corpora


def training_overrides(name: str, paths: dict, train: str) -> list[str]:
    """The overrides that train the tiny recipe of corpus `name` ("nlvr" or "ve"; paths: its entry
    of write_shapes_tasks) on the train file `train` and evaluate it on the corpus' dev and test
    files (the corpus named as in the shipped tiny_nlvr2 / tiny_snli_ve configs)."""
    root = paths["image_root"]
    return [f"data.corpora=[{{name: {name}_shapes, annotations: [{train}], image_root: {root}}}]",
            f"eval.data=[{paths['dev']}, {paths['test']}]", f"eval.image_root={root}"]


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="output/shapes_tasks")
    p.add_argument("--train", type=int, default=4000, help="training samples per corpus")
    p.add_argument("--heldout", type=int, default=400, help="dev and test samples per corpus")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        corpora = write_shapes_tasks(args.out, args.train, args.heldout, args.seed)
    except OSError as exc:
        return report_input_error(ConfigError(f"cannot write the corpora into --out {args.out}: {exc.strerror or exc}"))
    print(json.dumps({name: {"files": paths, "train_overrides": shlex.join(training_overrides(name, paths, paths["train"])),
                             "shuffled_train_overrides": shlex.join(training_overrides(name, paths, paths["train_shuffled"]))}
                      for name, paths in corpora.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
