#!/usr/bin/env bash
# The CPU rows of docs/benchmarks.md: the tiny model under ZeRO-0/1/2/3 on 2 ranks, and how the
# cross-rank costs (ITC gather, hard-negative exchange, queue) grow with 1, 2 and 4 ranks at a
# fixed micro batch. Gloo ranks through the deepspeed launcher, one thread each; JSON per row in
# $BENCH_OUT (default output/bench). The base-model rows need ~7 GB per rank: see the doc.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${BENCH_OUT:-output/bench}
mkdir -p "$out"
bench() {   # ranks, name, bench.py arguments...
    local ranks=$1 name=$2
    shift 2
    deepspeed --num_gpus "$ranks" --master_port "$((29600 + RANDOM % 1000))" tools/bench.py --config tiny \
        --threads 1 --json "$out/$name.json" "$@" 2>&1 | grep -A8 "^tiny ZeRO"
}
for stage in 0 1 2 3; do
    bench 2 "tiny_z${stage}_x2" --stage "$stage" --batch 8 --warmup 3 --steps 20
done
for ranks in 1 4; do     # (2 ranks: tiny_z2_x2 above)
    bench "$ranks" "tiny_z2_x${ranks}" --stage 2 --batch 8 --warmup 3 --steps 20
done
