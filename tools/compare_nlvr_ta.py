#!/usr/bin/env python
"""NLVR2 on NLVR-shapes with and without the text-assignment pre-step, per seed: the tiny recipes
(albef_ds/configs/tiny_nlvr2_ta.yaml, tiny_nlvr2.yaml) from the tiny pretrained checkpoint that
reads positions, on the corpus of docs/classification.md's proof (2,000 / 300 / 300, seed 0).

    python tools/compare_nlvr_ta.py --out output/spread_classification --seeds 42 0 1 --threads 2

Variants, each trained by albef_ds/demo.py / train.py (one CPU process at a time, ZeRO-2):
  pre-step + NLVR2   the proof's commands: the pre-step (one epoch of the shapes pretraining
                     corpus), then NLVR2 from it
  NLVR2 alone        NLVR2 from the pretrained checkpoint, the same 1,000 steps
The runs of a seed lie in <out>/threads<T>_seed<S>/ (tiny_nlvr2_ta, tiny_nlvr2, nlvr2_alone), the
folders of `tools/doc_proofs.py docs/classification.md --out <out> --seeds ... --threads ...`: a
run whose folder holds a finished run is read, not trained again. train.seed 42 is the configs'
own. Prints dev / test accuracy after the last epoch per seed, the pre-step's gain, and their mean
and spread (max - min); writes <out>/nlvr_ta_comparison.json.
"""
import json
import os
import statistics
import subprocess
import sys

from albef_ds.cli import ArgumentParser, check_at_least, report_input_error
from albef_ds.config import ConfigError
from albef_ds.fileio import atomic_write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAINED = os.path.join(ROOT, "tests", "data", "tiny_pretrained_positions.safetensors")


def train(script: str, config: str, out_dir: str, overrides: list, threads) -> dict:
    """Trains one run (unless its folder holds a finished one); returns its last evaluation (none
    for the pre-step, which evaluates nothing)."""
    if not os.path.isfile(os.path.join(out_dir, "checkpoints", "latest")):
        command = [sys.executable, script, "--deepspeed", "ds_configs/zero2.json", "--config", config,
                   "--output_dir", out_dir, *overrides]
        # idle OpenMP threads sleep rather than spin: the same numbers, far faster on a busy machine
        env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        with open(f"{out_dir}.log", "w") as log:
            subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True, env=env)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "eval/acc" in r]
    if not evals:
        return {}
    return {"dev": evals[-1]["eval/acc"], "test": evals[-1]["eval/nlvr_test_acc"], "step": evals[-1]["step"]}


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="output/nlvr_ta_comparison")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 0, 1])
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of every run (default: the environment's)")
    args = p.parse_args(argv)
    try:
        check_at_least({"--threads": args.threads}, 1)
    except ConfigError as exc:
        return report_input_error(exc)
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from make_shapes_tasks import training_overrides, write_shapes_tasks

    out = os.path.abspath(args.out)
    nlvr = write_shapes_tasks(os.path.join(out, "shapes_tasks"), 2000, 300)["nlvr"]
    corpus = training_overrides("nlvr", nlvr, nlvr["train"])
    results = {}
    for seed in args.seeds:
        folder = os.path.join(out, f"threads{args.threads or 'default'}_seed{seed}")
        os.makedirs(folder, exist_ok=True)
        seeded = [f"train.seed={seed}"]
        ta = os.path.join(folder, "tiny_nlvr2_ta")
        train("albef_ds/demo.py", "tiny_nlvr2_ta", ta, seeded, args.threads)
        results[seed] = {
            "pre-step + NLVR2": train("albef_ds/train.py", "tiny_nlvr2", os.path.join(folder, "tiny_nlvr2"),
                                      corpus + [f"model.init_checkpoint={ta}"] + seeded, args.threads),
            "NLVR2 alone": train("albef_ds/train.py", "tiny_nlvr2", os.path.join(folder, "nlvr2_alone"),
                                 corpus + [f"model.init_checkpoint={PRETRAINED}"] + seeded, args.threads)}
        print(f"seed {seed}: {results[seed]}", flush=True)
    atomic_write(os.path.join(out, "nlvr_ta_comparison.json"),
                 lambda tmp: open(tmp, "w").write(json.dumps({"threads": args.threads, "runs": results}, indent=1)))
    print(f"| NLVR2, {args.threads or 'default'} threads | " + " | ".join(f"seed {s}: dev / test" for s in args.seeds)
          + " | mean dev / test | spread dev / test |")
    print("| --- " * (len(args.seeds) + 3) + "|")
    rows = {name: {s: results[s][name] for s in args.seeds} for name in ("pre-step + NLVR2", "NLVR2 alone")}
    rows["gain of the pre-step"] = {s: {k: results[s]["pre-step + NLVR2"][k] - results[s]["NLVR2 alone"][k]
                                        for k in ("dev", "test")} for s in args.seeds}
    for name, per_seed in rows.items():
        cells = [f"{v['dev']:.1f} / {v['test']:.1f}" for v in per_seed.values()]
        stats = {k: [v[k] for v in per_seed.values()] for k in ("dev", "test")}
        print(f"| {name} | " + " | ".join(cells)
              + f" | {statistics.mean(stats['dev']):.1f} / {statistics.mean(stats['test']):.1f}"
              + f" | {max(stats['dev']) - min(stats['dev']):.1f} / {max(stats['test']) - min(stats['test']):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
