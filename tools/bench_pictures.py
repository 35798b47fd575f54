"""The cost of the TensorBoard pictures of one evaluation (`eval.pictures` items), per task: the
task's own hook (Task.eval_pictures) on its tiny config's evaluation set, generated here, with the
shipped tiny checkpoint that reads positions (the downstream heads as the fine-tuning start builds
them). Prints one JSON line per task: seconds per evaluation (median of --repeats) and per picture.

    python tools/bench_pictures.py [--count 4] [--repeats 3] [--tasks pretrain grounding vqa snli_ve nlvr2]
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

from albef_ds import build_model, load_model
from albef_ds.cli import INPUT_ERRORS, ArgumentParser, report_input_error
from albef_ds.config import SyntheticConfig, load_config
from albef_ds.synthetic.grounding import write_grounding_corpus
from albef_ds.synthetic.nlvr import write_nlvr_shapes
from albef_ds.synthetic.shapes import write_synthetic_corpus
from albef_ds.synthetic.ve import write_ve_shapes
from albef_ds.synthetic.vqa import write_vqa_corpus
from albef_ds.tasks import get_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = os.path.join(ROOT, "tests", "data", "tiny_pretrained_positions.safetensors")
TASKS = ("pretrain", "grounding", "vqa", "snli_ve", "nlvr2")


def task_setup(name: str, folder: str, count: int) -> tuple[str, list[str]]:
    """(config, overrides) of a task's tiny config evaluating on a generated set of `count` items."""
    start = f"model.init_checkpoint={CHECKPOINT}"
    if name == "pretrain":
        shapes = write_synthetic_corpus(os.path.join(folder, "shapes"), SyntheticConfig(
            train_samples=0, heldout_samples=count, samples_per_shard=count))
        return "tiny", [f"eval.data=[{shapes['heldout'][0]['shards'][0]}]"]
    if name == "grounding":
        g = write_grounding_corpus(os.path.join(folder, "grounding"), train_images=1, val_images=count, test_images=1)
        return "tiny_grounding", [start, f"eval.data=[{g['val']}]", f"eval.image_root={g['image_root']}",
                                  f"grounding.dets={g['dets']}"]
    if name == "vqa":
        v = write_vqa_corpus(os.path.join(folder, "vqa"), train_images=0, heldout_images=count, vg_images=0)
        return "tiny_vqa", [start, f"eval.data=[{v['heldout']}]", f"eval.image_root={v['vqa_root']}",
                            f"vqa.answer_list={v['answer_list']}"]
    write = write_ve_shapes if name == "snli_ve" else write_nlvr_shapes
    corpus = write(os.path.join(folder, name), train=0, dev=count, test=0)
    return f"tiny_{name}", [start, f"eval.data=[{corpus['dev']}]", f"eval.image_root={corpus['image_root']}"]


def measure(name: str, folder: str, count: int, repeats: int) -> dict:
    config, overrides = task_setup(name, folder, count)
    cfg = load_config(config, overrides)
    task = get_task(cfg)
    evaluator = task.evaluator(folder)
    model = load_model(CHECKPOINT) if name in ("pretrain", "grounding") else build_model(cfg).eval()
    pictures, seconds = {}, []
    for _ in range(repeats + 1):                      # the first call warms up (allocations, fonts)
        started = time.perf_counter()
        pictures = task.eval_pictures(evaluator, model, count)
        seconds.append(time.perf_counter() - started)
    per_evaluation = statistics.median(seconds[1:])
    return {"task": name, "pictures": len(pictures), "seconds_per_evaluation": round(per_evaluation, 3),
            "seconds_per_picture": round(per_evaluation / max(1, len(pictures)), 3),
            "sizes": sorted({p.size for p in pictures.values()})}


def main(argv=None) -> int:
    ap = ArgumentParser(description="the cost of an evaluation's TensorBoard pictures, per task")
    ap.add_argument("--count", type=int, default=4, help="pictures per evaluation (eval.pictures)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    args = ap.parse_args(argv)
    if args.count < 1 or args.repeats < 1:
        print("error: --count and --repeats must be at least 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as folder:
        for name in args.tasks:
            print(json.dumps(measure(name, folder, args.count, args.repeats)), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except INPUT_ERRORS as exc:          # a bad option, config or file: one line, exit 2
        sys.exit(report_input_error(exc))
