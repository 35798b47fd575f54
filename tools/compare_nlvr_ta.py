#!/usr/bin/env python
"""NLVR2 on NLVR-shapes with and without the text-assignment pre-step: the tiny recipes
(albef_ds/configs/tiny_nlvr2_ta.yaml, tiny_nlvr2.yaml) from the tiny pretrained checkpoint, per seed.

    python tools/compare_nlvr_ta.py --out output/nlvr_ta_comparison --seeds 0 1 2 [--ta_lr 1e-4 3e-4]

Variants, each trained by albef_ds/train.py (one CPU process, ZeRO-2, --workers at a time):
  pre-step (lr X) + NLVR2   the pre-step (one epoch of the shapes pretraining corpus), then NLVR2
                            from it: the recipe (X = each --ta_lr, the shipped one is 3e-4)
  NLVR2 alone               NLVR2 from the pretrained checkpoint, the same steps
  NLVR2 alone, longer       NLVR2 from the pretrained checkpoint, as many more steps as the
                            pre-step took (1,255 = 5 epochs of 251 instead of 4 of 250)
Writes <out>/results.json and prints a table of dev / test-P accuracy after each epoch.
"""
import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from albef_ds.fileio import atomic_write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAINED = os.path.join(ROOT, "tests", "data", "tiny_pretrained.safetensors")


def train(config: str, out_dir: str, overrides: list) -> list:
    """Trains one run (unless its folder holds a finished one); returns its evaluations."""
    metrics = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(os.path.join(out_dir, "checkpoints", "latest")):
        command = [sys.executable, "albef_ds/train.py", "--deepspeed", "ds_configs/zero2.json", "--config", config,
                   "--output_dir", out_dir, *overrides]
        with open(f"{out_dir}.log", "w") as log:
            subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    with open(metrics) as f:
        rows = [json.loads(line) for line in f]
    return [{"step": r["step"], **{k[5:]: v for k, v in r.items() if k in ("eval/acc", "eval/nlvr_test_acc")}}
            for r in rows if "eval/acc" in r]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="output/nlvr_ta_comparison")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ta_lr", type=float, nargs="+", default=[3e-4], help="learning rates of the pre-step to compare")
    p.add_argument("--workers", type=int, default=2, help="runs at a time (one CPU thread each)")
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from make_shapes_tasks import write_shapes_tasks

    out = os.path.abspath(args.out)
    nlvr = write_shapes_tasks(os.path.join(out, "shapes_tasks"))["nlvr"]
    corpus = [f"data.corpora=[{{name: shapes, annotations: [{nlvr['train']}], image_root: {nlvr['image_root']}}}]",
              f"eval.data=[{nlvr['dev']}, {nlvr['test']}]", f"eval.image_root={nlvr['image_root']}"]

    def with_pre_step(seed, lr):
        ta = os.path.join(out, f"ta_lr{lr:g}_seed{seed}")
        train("tiny_nlvr2_ta", ta, [f"model.init_checkpoint={PRETRAINED}", f"train.seed={seed}", f"train.lr={lr}",
                                    f"train.min_lr={lr}"])
        return train("tiny_nlvr2", f"{ta}_nlvr2", corpus + [f"model.init_checkpoint={ta}", f"train.seed={seed}"])

    def alone(seed, longer):
        extra = ["data.epoch_samples=4016", "train.epochs=5"] if longer else []
        return train("tiny_nlvr2", os.path.join(out, f"alone{'_longer' if longer else ''}_seed{seed}"),
                     corpus + [f"model.init_checkpoint={PRETRAINED}", f"train.seed={seed}", *extra])

    jobs = {}
    with ThreadPoolExecutor(args.workers) as pool:
        for seed in args.seeds:
            for lr in args.ta_lr:
                jobs[(f"pre-step (lr {lr:g}) + NLVR2", seed)] = pool.submit(with_pre_step, seed, lr)
            jobs[("NLVR2 alone", seed)] = pool.submit(alone, seed, False)
            jobs[("NLVR2 alone, longer", seed)] = pool.submit(alone, seed, True)
        results = [{"variant": variant, "seed": seed, "evals": job.result()} for (variant, seed), job in jobs.items()]
    atomic_write(os.path.join(out, "results.json"), lambda tmp: open(tmp, "w").write(json.dumps(results, indent=1)))
    print("| variant | seed | dev / test-P accuracy after each epoch (step) |\n| --- | --- | --- |")
    for r in sorted(results, key=lambda r: (r["variant"], r["seed"])):
        cells = ", ".join(f"{e['acc']:.1f} / {e['nlvr_test_acc']:.1f} ({e['step']})" for e in r["evals"])
        print(f"| {r['variant']} | {r['seed']} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
