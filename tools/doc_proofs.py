#!/usr/bin/env python
"""The proofs of learning as their docs give them. Each doc's proof is the fenced bash block after the
line `<!-- proof: commands -->` and the markdown tables after `<!-- proof: numbers -->`: the
commands are run as written, one after another from the repository root, with `output/` moved to a
folder of one's choosing; the numbers of the table are read from the files the commands write (the
numbers they print), by the doc's reader below.

    python tools/doc_proofs.py docs/grounding.md --out output/proof_grounding
        runs the doc's commands as written; prints the table of their numbers beside the doc's
    python tools/doc_proofs.py docs/grounding.md --out output/spread_grounding --seeds 42 0 1 --threads 2 1
        runs them for every seed (train.seed=S added to each training command; 42 is the shipped
        configs' seed, so its commands are the doc's) and thread count (OMP_NUM_THREADS=T; or the
        runs named one by one: --runs 2:42 2:0 2:1 1:42); prints each number's value per run,
        mean, min, max and spread (max - min). A run whose folder holds its numbers already is not
        run again.

The proofs of learning (tests/learning/: test_learning.py for docs/retrieval.md's pretraining,
test_grounding_learning.py, test_classification_learning.py, test_vqa_learning.py) run the first
form and compare the numbers with the doc's tables.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from albef_ds.cli import ArgumentParser, check_at_least, check_writable_folder, report_input_error  # noqa: E402
from albef_ds.config import ConfigError  # noqa: E402

COMMANDS_MARK, NUMBERS_MARK = "<!-- proof: commands -->", "<!-- proof: numbers -->"
DEFAULT_SEED = 42                  # train.seed of the shipped configs
TRAINING = re.compile(r"albef_ds/(train|demo)\.py")
NUMBERS_FILE = "proof_numbers.json"


# ---- the doc ----------------------------------------------------------------------------------

def _after(lines: list, mark: str, doc: str) -> int:
    for i, line in enumerate(lines):
        if line.strip() == mark:
            return i + 1
    raise ValueError(f"{doc}: no line '{mark}'")


def commands(doc: str) -> list[str]:
    """The command lines of the doc's proof block: continuation lines joined, comments and blank
    lines left out."""
    lines = open(doc).read().splitlines()
    i = _after(lines, COMMANDS_MARK, doc)
    while not lines[i].startswith("```"):
        i += 1
    out, current = [], ""
    for line in lines[i + 1:]:
        if line.startswith("```"):
            break
        code = line.split(" #")[0].rstrip() if not line.lstrip().startswith("#") else ""
        if code.endswith("\\"):
            current += code[:-1]
            continue
        current += code
        if current.strip():
            out.append(current.strip())
        current = ""
    return out


def table(doc: str) -> dict:
    """The doc's tables of numbers (each the first table after a line `<!-- proof: numbers -->`),
    as one: {row label: {column header: number}} (cells that hold no number are left out; a
    trailing % and thousands commas are read through)."""
    lines = open(doc).read().splitlines()
    starts = [i + 1 for i, line in enumerate(lines) if line.strip() == NUMBERS_MARK]
    if not starts:
        raise ValueError(f"{doc}: no line '{NUMBERS_MARK}'")
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]   # noqa: E731
    out = {}
    for i in starts:
        while not lines[i].startswith("|"):
            i += 1
        header = cells(lines[i])
        for line in lines[i + 2:]:
            if not line.startswith("|"):
                break
            row = cells(line)
            values = out.setdefault(row[0], {})
            for name, cell in zip(header[1:], row[1:]):
                try:
                    values[name] = float(cell.rstrip("%").replace(",", ""))
                except ValueError:
                    continue
    return out


# ---- running ----------------------------------------------------------------------------------

def as_run(command: str, out: str, seed: int) -> str:
    """The command with output/ moved to `out` and, for a training command and a seed other than
    the configs' own, train.seed=<seed> added."""
    command = re.sub(r"(?<![\w/.])output/", out.rstrip("/") + "/", command)
    if seed != DEFAULT_SEED and TRAINING.search(command):
        command += f" train.seed={seed}"
    return command


def run(doc: str, out: str, seed: int = DEFAULT_SEED, threads: int | None = None, log=sys.stdout) -> dict:
    """Runs the doc's commands (output/ -> `out`; OMP_NUM_THREADS=threads unless None: the
    environment's) and returns their numbers by the doc's reader, also written to
    out/proof_numbers.json with the wall time of each command."""
    os.makedirs(out, exist_ok=True)
    # Idle OpenMP threads sleep instead of spinning: the same sums in the same order (the numbers do
    # not move), but a thread that spins while its sibling waits for a core made each step of a
    # 2-thread run on a busy 2-core machine 10 to 40 times slower.
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    timings = []
    for n, command in enumerate(commands(doc)):
        command = as_run(command, out, seed)
        print(f"$ {command}", file=log, flush=True)
        started = time.perf_counter()
        with open(os.path.join(out, f"command{n}.log"), "w") as f:
            code = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        timings.append(round(time.perf_counter() - started, 1))
        if code != 0:
            tail = open(os.path.join(out, f"command{n}.log")).read()[-4000:]
            raise RuntimeError(f"{doc}: command {n} exited {code}:\n{command}\n{tail}")
    numbers = READERS[os.path.basename(doc)](out)
    with open(os.path.join(out, NUMBERS_FILE), "w") as f:
        json.dump({"numbers": numbers, "seconds": timings, "seed": seed, "threads": threads}, f, indent=1)
    return numbers


def last_evaluation(folder: str) -> dict:
    """The last evaluation a training run logged ({metric: value} without the eval/ prefix)."""
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    evals = [{k[5:]: v for k, v in r.items() if k.startswith("eval/")} for r in rows]
    return [e for e in evals if e][-1]


def training_rows(folder: str) -> list[dict]:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def read_json(*parts: str) -> dict:
    with open(os.path.join(*parts)) as f:
        return json.load(f)


# ---- the docs' readers: {row: {column: number}} as the doc's table has them ---------------------

def grounding_numbers(out: str) -> dict:
    rows = {}
    for when in ("pretrained", "fine-tuned"):
        for mode in ("itm", "itc"):
            m = read_json(out, "grounding_eval", f"{when.replace('-', '')}_{mode}", "metrics.json")
            rows[f"{when}, {mode.upper()} Grad-CAM"] = {"accuracy": m["acc"], "testA": m["acc_testA"],
                                                         "testB": m["acc_testB"], "heat on the referred box": m["heat_on_box"]}
    baselines = m["baselines"]
    rows["a random proposal (expected)"] = {"accuracy": baselines["random"]}
    rows["the largest proposal"] = {"accuracy": baselines["largest"]}
    return rows


def classification_numbers(out: str) -> dict:
    rows = {}
    for name, run, test_key in (("NLVR2", "tiny_nlvr2", "nlvr_test_acc"), ("SNLI-VE", "tiny_snli_ve", "ve_test_acc")):
        for suffix, label in (("", ""), ("_shuffled", ", images shuffled")):
            e = last_evaluation(os.path.join(out, run + suffix))
            rows[name + label] = {"dev": e["acc"], "test": e[test_key]}
    steps = training_rows(os.path.join(out, "tiny_nlvr2_ta"))
    first, last = steps[:4], steps[-4:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)      # noqa: E731
    rows["pre-step, first 4 logged steps"] = {"loss": mean(first, "loss_ta"), "batch accuracy": 100 * mean(first, "ta_acc")}
    rows["pre-step, last 4 logged steps"] = {"loss": mean(last, "loss_ta"), "batch accuracy": 100 * mean(last, "ta_acc")}
    rows["NLVR2, released layout, evaluate"] = {"test": read_json(out, "nlvr2_eval", "metrics.json")["acc"]}
    return rows


def vqa_numbers(out: str) -> dict:
    rows = {}
    for run, label in (("vqa_run", "fine-tuned"), ("vqa_run_shuffled", "images shuffled (prior)")):
        m = read_json(out, f"{run}_eval", "metrics.json")
        rows[label] = {"overall": m["acc"], **m["per_question_type"]}
    return rows


def retrieval_numbers(out: str) -> dict:
    m = read_json(out, "pretrain_scratch", "heldout_eval.json")
    return {"pretrained from scratch": {
        "text -> image R@1": m["img_r1"], "image -> text R@1": m["txt_r1"], "ITM accuracy": m["itm_acc"],
        "masked colour word": m["mlm_colour_acc"], "masked colour word, images shuffled": m["mlm_colour_acc_shuffled"],
        "masked shape word": m["mlm_shape_acc"], "masked shape word, images shuffled": m["mlm_shape_acc_shuffled"]}}


READERS = {"retrieval.md": retrieval_numbers, "grounding.md": grounding_numbers, "classification.md": classification_numbers,
           "vqa.md": vqa_numbers}


# ---- comparing --------------------------------------------------------------------------------

def differences(got: dict, doc: dict, tolerance: dict, floor: float) -> list[str]:
    """Every cell of the doc's table that the run's numbers miss by more than the number's
    tolerance (tolerance[(row, column)], at least `floor`), and every number of the run the table
    lacks."""
    out = []
    for row, values in got.items():
        for column, value in values.items():
            written = doc.get(row, {}).get(column)
            allowed = max(floor, tolerance.get((row, column), 0.0))
            if written is None:
                out.append(f"{row} / {column}: {value:.2f} measured, not in the doc's table")
            elif abs(written - value) > allowed:
                out.append(f"{row} / {column}: the doc says {written}, the run gave {value:.2f} "
                           f"(allowed: {allowed:.2f} either way)")
    return out


def format_rows(numbers: dict) -> str:
    return "\n".join(f"| {row} | " + " | ".join(f"{k} {v:.2f}" for k, v in values.items()) + " |"
                     for row, values in numbers.items())


def spread(runs: dict) -> dict:
    """{row: {column: {"runs": {run: value}, "mean", "min", "max", "spread"}}} over the runs' numbers."""
    out = {}
    first = next(iter(runs.values()))
    for row, values in first.items():
        for column in values:
            seen = {name: numbers[row][column] for name, numbers in runs.items()}
            v = list(seen.values())
            out.setdefault(row, {})[column] = {"runs": seen, "mean": statistics.mean(v), "min": min(v),
                                               "max": max(v), "spread": max(v) - min(v)}
    return out


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("doc", help="a doc with a proof reader: " + ", ".join(f"docs/{name}" for name in READERS))
    ap.add_argument("--out", required=True, help="where output/ goes (a folder per run with --seeds / --threads)")
    ap.add_argument("--seeds", type=int, nargs="+", help="train.seed of each run (42: the doc's commands)")
    ap.add_argument("--threads", type=int, nargs="+", help="OMP_NUM_THREADS of each run")
    ap.add_argument("--runs", nargs="+", metavar="THREADS:SEED", help="the runs one by one instead of every "
                    "seed at every thread count: 2:42 2:0 2:1 1:42")
    args = ap.parse_args(argv)
    try:
        if os.path.basename(args.doc) not in READERS:
            raise ConfigError(f"no proof reader for {args.doc} (one of {', '.join(READERS)})")
        if not os.path.isfile(args.doc):
            raise ConfigError(f"{args.doc}: no such file")
        for value in args.runs or []:
            if not re.fullmatch(r"[1-9]\d*:\d+", value):
                raise ConfigError(f"--runs {value}: expected THREADS:SEED, for example 2:42")
        for threads in args.threads or []:
            check_at_least({"--threads": threads}, 1)
        check_writable_folder(args.out, "--out")
    except ConfigError as exc:
        return report_input_error(exc)
    if args.runs:
        pairs = [tuple(int(v) for v in r.split(":")) for r in args.runs]
    else:
        pairs = [(t, seed) for t in args.threads or [None] for seed in args.seeds or [DEFAULT_SEED]]
    if not args.seeds and not args.threads and not args.runs:
        got = run(args.doc, args.out)
        print(format_rows(got))
        problems = differences(got, table(args.doc), {}, 0.005)
        print("\n".join(problems) if problems else "the doc's table holds these numbers")
        return 0
    runs = {}
    for threads, seed in pairs:
        name = f"threads{threads or 'default'}_seed{seed}"
        folder = os.path.join(args.out, name)
        done = os.path.join(folder, NUMBERS_FILE)
        runs[name] = read_json(done)["numbers"] if os.path.isfile(done) else run(args.doc, folder, seed, threads)
        print(f"{name}: done", flush=True)
    result = spread(runs)
    with open(os.path.join(args.out, "spread.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("| number | " + " | ".join(runs) + " | mean | min | max | spread |")
    print("| --- " * (len(runs) + 5) + "|")
    for row, columns in result.items():
        for column, s in columns.items():
            print(f"| {row}: {column} | " + " | ".join(f"{v:.2f}" for v in s["runs"].values())
                  + f" | {s['mean']:.2f} | {s['min']:.2f} | {s['max']:.2f} | {s['spread']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
