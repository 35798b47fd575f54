#!/usr/bin/env python
"""Search benchmark: query latency at a given collection size, with and without ITM re-ranking,
and the compressed index's recall on the model's own features.

    python tools/bench_search.py --images 100000 --queries 200 --work output/bench/search \
        --json output/bench/search_100k.json [--checkpoint tests/data/tiny_pretrained.safetensors]

Generates a shapes corpus of --images images (train-split samples: three captions each) in
--work, indexes it with `python -m albef_ds.index` (reused when already there: the index command
finds it whole), then times `Searcher.images_for_text` (k 10) for --queries captions of random
attribute sets after --warmup queries, at each --rerank depth: p50 / p95 / mean latency and the
mean of each stage (text encoding, nearest-neighbour search, reading + decoding the candidates,
ViT, fusion). Also builds the inverted index (ivf_sq8) over the same image features and reports
its recall@10 against exact search for the queries' own text features, and its search time.
With --base_rerank N: what re-ranking costs per candidate with the base model (ViT-B/16 at 256 px,
BERT-base; random weights), N candidates at a time, without the corpus.
Prints a table, writes JSON.

    python tools/bench_search.py --base_rerank 8 --threads 2 --json output/bench/search_base_cost.json
"""
from __future__ import annotations

import json
import os
import random
import sys
import time

import numpy as np
import torch

from albef_ds.cli import INPUT_ERRORS, ArgumentParser, report_input_error
from albef_ds.config import SyntheticConfig
from albef_ds.index import main as index_main
from albef_ds.search import ann
from albef_ds.search.loading import load_for_index
from albef_ds.search.query import Searcher
from albef_ds.search.store import open_index
from albef_ds.synthetic.shapes import ALL_ATTRIBUTES, caption, write_synthetic_corpus

CHECKPOINT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "tiny_pretrained.safetensors")


def parse_args(argv=None):
    ap = ArgumentParser(description="search latency and compressed-index recall")
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rerank", type=int, nargs="+", default=[0, 64])
    ap.add_argument("--work", default="output/bench/search", help="where the corpus and its index are kept")
    ap.add_argument("--checkpoint", default=CHECKPOINT)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--workers", type=int, default=1, help="threads decoding images (indexing and re-ranking)")
    ap.add_argument("--base_rerank", type=int, default=0, help="only time the base model's re-ranking of this "
                    "many candidates (random weights and images)")
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def base_rerank_cost(candidates: int, repeats: int = 3) -> dict:
    """ms per candidate of the base model's ViT pass and fusion pass (one text, 30 tokens)."""
    from albef_ds.config import load_config
    from albef_ds.models import ALBEF

    cfg = load_config("base", ["model.vision.pretrained=null", "model.text.pretrained=null"]).model
    model = ALBEF(cfg).eval()
    images = torch.randn(candidates, 3, cfg.vision.img_size, cfg.vision.img_size)
    ids = torch.randint(1000, 20000, (candidates, 30))
    mask = torch.ones_like(ids)
    vit, fusion = [], []
    with torch.no_grad():
        for _ in range(repeats + 1):                      # the first is a warm-up
            begin = time.perf_counter()
            embeds = model.image_embeds(images)
            vit.append(time.perf_counter() - begin)
            begin = time.perf_counter()
            model.itm_logits(embeds, ids, mask)
            fusion.append(time.perf_counter() - begin)
    per = {"vit_ms_per_candidate": 1000 * float(np.mean(vit[1:])) / candidates,
           "fusion_ms_per_candidate": 1000 * float(np.mean(fusion[1:])) / candidates}
    return {"model": "base", "candidates": candidates, "threads": torch.get_num_threads(),
            **{k: round(v, 1) for k, v in per.items()}}


def percentiles(values: list) -> dict:
    v = np.array(values) * 1000
    return {"p50_ms": round(float(np.percentile(v, 50)), 2), "p95_ms": round(float(np.percentile(v, 95)), 2),
            "mean_ms": round(float(v.mean()), 2)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.base_rerank:
        out = base_rerank_cost(args.base_rerank)
        print(json.dumps(out))
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return out
    corpus_dir, index_dir = os.path.join(args.work, "corpus"), os.path.join(args.work, f"index_{args.images}")
    start = time.monotonic()
    corpus = write_synthetic_corpus(corpus_dir, SyntheticConfig(train_samples=args.images, heldout_samples=0,
                                                                samples_per_shard=10_000, image_size=64, seed=1))
    corpus_s = time.monotonic() - start
    start = time.monotonic()
    code = index_main(["--checkpoint", args.checkpoint, "--data", corpus["train"][0]["shards"][0], "--output_dir",
                       index_dir, "--config", args.config, "--workers", str(args.workers)])
    assert code == 0, f"index exited {code}"
    index_s = time.monotonic() - start
    index = open_index(index_dir)
    searcher = Searcher(index, load_for_index(index, index_dir, "cpu"), workers=args.workers)
    rng = random.Random(0)
    queries = [caption(rng.choice(ALL_ATTRIBUTES), rng) for _ in range(args.warmup + args.queries)]
    out = {"images": len(index.images), "texts": index.manifest["counts"]["texts"], "queries": args.queries,
           "k": 10, "index": index.specs["images"], "threads": args.threads, "workers": args.workers,
           "corpus_s": round(corpus_s, 1), "index_s": round(index_s, 1), "latency": {}}
    for rerank in args.rerank:
        for text in queries[:args.warmup]:
            searcher.images_for_text(text, 10, rerank)
        times, stages = [], {}
        for text in queries[args.warmup:]:
            begin = time.perf_counter()
            result = searcher.images_for_text(text, 10, rerank)
            times.append(time.perf_counter() - begin)
            for stage, ms in result.timings.items():
                stages.setdefault(stage, []).append(ms)
        out["latency"][f"rerank_{rerank}"] = {**percentiles(times),
                                              **{k: round(float(np.mean(v)), 2) for k, v in stages.items()}}
    # the inverted index over the same image features, queried with the queries' own text features
    features = np.asarray(index.image_features)
    with torch.no_grad():
        from albef_ds.tokenizer import tokenize

        ids, mask = tokenize(searcher.tokenizer, [searcher.clean(q) for q in queries[args.warmup:]],
                             searcher.max_tokens)
        text_features = searcher.model.text_features(ids, mask).float().numpy()
    spec = ann.choose(len(features), "ivf_sq8")
    start = time.monotonic()
    compressed = ann.build(features, spec)
    build_s = time.monotonic() - start
    _, exact_rows = ann.search(index.image_ann, features, text_features, 10, index.specs["images"])
    begin = time.perf_counter()
    _, rows = ann.search(compressed, features, text_features, 10, spec)
    per_query = (time.perf_counter() - begin) / len(text_features)
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, exact_rows)]))
    out["ivf_sq8"] = {**spec, "build_s": round(build_s, 1), "recall_at_10": round(recall, 4),
                      "search_ms": round(per_query * 1000, 3)}
    print(f"{out['images']} images ({out['texts']} captions), index {out['index']['kind']}, k 10, "
          f"{args.queries} queries, {args.threads} torch thread(s), {args.workers} decoding thread(s)")
    print(f"{'re-rank':>8} {'p50 ms':>8} {'p95 ms':>8} {'mean':>8}  mean per stage (ms)")
    for name, row in out["latency"].items():
        stages = ", ".join(f"{k[:-3]} {v}" for k, v in row.items() if k not in ("p50_ms", "p95_ms", "mean_ms"))
        print(f"{name.split('_')[1]:>8} {row['p50_ms']:8.1f} {row['p95_ms']:8.1f} {row['mean_ms']:8.1f}  {stages}")
    c = out["ivf_sq8"]
    print(f"ivf_sq8 (nlist {c['nlist']}, nprobe {c['nprobe']}): recall@10 {c['recall_at_10']:.4f} of exact on these "
          f"queries, {c['search_ms']:.3f} ms per query, built in {c['build_s']} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"written {args.json}")
    return out


if __name__ == "__main__":
    try:
        main()
    except INPUT_ERRORS as exc:          # a bad option, config or file: one line, exit 2
        sys.exit(report_input_error(exc))
