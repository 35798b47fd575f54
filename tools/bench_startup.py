#!/usr/bin/env python
"""How long the commands that do not train take from a fresh process, each tree's code run
alternately under the same load: `evaluate retrieval` on 8 generated images and `visualize` of
one image and caption (the whole command, as a user times it: start-up dominates), and the
import of both modules with a process group of one (the start-up alone). Prints the median of
each and whether DeepSpeed was imported or printed a line; writes --json.

    python tools/bench_startup.py --trees . ../before --runs 5 --json output/bench_startup.json

Each tree is run with its root as the working directory and on PYTHONPATH; the checkpoint is
this tree's tests/data/tiny_pretrained.safetensors."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from albef_ds.cli import ArgumentParser, check_at_least, report_input_error  # noqa: E402
from albef_ds.config import ConfigError  # noqa: E402

CHECKPOINT = os.path.join(ROOT, "tests", "data", "tiny_pretrained.safetensors")
IMPORT = ("import time, sys; t = time.perf_counter(); import albef_ds.evaluate, albef_ds.visualize\n"
          "from albef_ds import distributed; distributed.init_distributed()\n"
          "print(f'{time.perf_counter() - t:.3f}', 'deepspeed' in sys.modules)")


def write_images(folder: str) -> tuple[str, str]:
    """8 rendered shapes with their captions (ALBEF's retrieval JSON) under `folder`."""
    import random

    from albef_ds.synthetic.shapes import ALL_ATTRIBUTES, caption, render

    rng = random.Random(0)
    entries = []
    for i, attrs in enumerate(rng.sample(ALL_ATTRIBUTES, 8)):
        render(attrs, 64, rng).save(os.path.join(folder, f"{i}.png"))
        entries.append({"image": f"{i}.png", "caption": [caption(attrs, rng)]})
    with open(os.path.join(folder, "test.json"), "w") as f:
        json.dump(entries, f)
    return os.path.join(folder, "test.json"), entries[0]["caption"][0]


def commands(folder: str, data: str, text: str, run: int) -> dict:
    out = lambda name: os.path.join(folder, f"{name}{run}")     # noqa: E731
    return {
        "evaluate retrieval": [sys.executable, "-m", "albef_ds.evaluate", "retrieval", "--checkpoint", CHECKPOINT,
                               "--data", data, "--image_root", folder, "--output_dir", out("eval"), "--k_test", "4"],
        "visualize": [sys.executable, "-m", "albef_ds.visualize", "--checkpoint", CHECKPOINT, "--image",
                      os.path.join(folder, "0.png"), "--text", text, "--output_dir", out("pictures")],
        "import + process group": [sys.executable, "-c", IMPORT],
    }


def time_command(tree: str, argv: list, port: int) -> dict:
    env = {**os.environ, "PYTHONPATH": tree, "MASTER_PORT": str(port), "OMP_WAIT_POLICY": "PASSIVE"}
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{tree}: {' '.join(argv)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    text = done.stdout + done.stderr
    return {"s": wall, "deepspeed_lines": sum("deepspeed" in line.lower() or "[real_accelerator" in line
                                              for line in text.splitlines()),
            "deepspeed_imported": done.stdout.strip().endswith("True") if argv[1] == "-c" else None}


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--trees", nargs="+", default=[ROOT], help="repository roots whose code is timed (default: this one)")
    ap.add_argument("--runs", type=int, default=5, help="runs of each command per tree (alternating)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    try:
        trees = [os.path.abspath(t) for t in args.trees]
        for tree in trees:
            if not os.path.isfile(os.path.join(tree, "albef_ds", "evaluate.py")):
                raise ConfigError(f"--trees: {tree} holds no albef_ds/evaluate.py")
        check_at_least({"--runs": args.runs}, 1)
    except ConfigError as exc:
        return report_input_error(exc)
    seen = {tree: {} for tree in trees}
    with tempfile.TemporaryDirectory() as folder:
        data, text = write_images(folder)
        for run in range(args.runs):
            for i, tree in enumerate(trees):
                for name, command in commands(folder, data, text, f"{run}_{i}").items():
                    seen[tree].setdefault(name, []).append(time_command(tree, command, 29700 + run * 10 + i))
    results = {"load_average_after": os.getloadavg()[0], "runs": args.runs, "trees": {}}
    for tree in trees:
        results["trees"][tree] = rows = {}
        for name, runs in seen[tree].items():
            rows[name] = {"median_s": statistics.median(r["s"] for r in runs), "s": [round(r["s"], 3) for r in runs],
                          "deepspeed_lines": max(r["deepspeed_lines"] for r in runs)}
            if name == "import + process group":
                rows[name]["deepspeed_imported"] = any(r["deepspeed_imported"] for r in runs)
            print(f"{tree}  {name:24s} median {rows[name]['median_s']:.2f} s  "
                  f"({' / '.join(f'{s:.2f}' for s in rows[name]['s'])})  DeepSpeed lines {rows[name]['deepspeed_lines']}"
                  + (f", imported {rows[name]['deepspeed_imported']}" if "deepspeed_imported" in rows[name] else ""))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
