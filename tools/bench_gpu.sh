#!/usr/bin/env bash
# One-GPU benchmark of the base model (ViT-B/16 + BERT-base, 256 px, batch 64):
#   optimised: bf16, ZeRO-2, SDPA (flash / memory-efficient kernels), DeepSpeed FusedAdam
#   baseline:  the public implementation's setting: fp32 with TF32 off, plain (math) attention,
#              torch.optim.AdamW, no ZeRO
# prints samples/s/GPU, MFU and peak memory of each and their ratio; writes JSON to $BENCH_OUT.
# Fits a 10-minute call: about 1 minute of start-up, then ~13 + ~7 steps.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${BENCH_OUT:-output/bench_gpu}
peak=${PEAK_TFLOPS:-989}          # H100 SXM dense bf16; H200 has the same compute peak
mkdir -p "$out"
python tools/bench.py --config base --stage 2 --batch 64 --warmup 3 --steps 10 --peak_tflops "$peak" \
    --json "$out/optimised.json"
python tools/bench.py --config base --stage 0 --batch 64 --warmup 2 --steps 5 --peak_tflops "$peak" \
    --baseline --json "$out/baseline.json"
python - "$out" <<'PY'
import json, sys
fast, slow = (json.load(open(f"{sys.argv[1]}/{name}.json"))[0] for name in ("optimised", "baseline"))
print(f"\nspeed-up {fast['samples_per_s'] / slow['samples_per_s']:.2f}x  "
      f"({fast['samples_per_s']:.1f} vs {slow['samples_per_s']:.1f} samples/s/GPU); "
      f"MFU {fast['mfu']:.1%} vs {slow['mfu']:.1%}; peak memory "
      f"{fast['peak_memory_bytes'] / 2**30:.1f} vs {slow['peak_memory_bytes'] / 2**30:.1f} GiB")
PY
