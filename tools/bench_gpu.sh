#!/usr/bin/env bash
# One-GPU benchmark of the base model (ViT-B/16 + BERT-base, 256 px, batch 64):
#   optimised: bf16, ZeRO-2 (as ds_configs/zero2.json resolves on one GPU: no overlap_comm, no
#              contiguous gradient buffer), SDPA (flash / memory-efficient kernels), DeepSpeed
#              FusedAdam, no per-tensor overflow check (the Trainer skips non-finite losses itself)
#   baseline:  the public implementation's setting: fp32 with TF32 off, plain (math) attention,
#              torch.optim.AdamW, no ZeRO
#   compiled:  optimised + train.compile=true (torch.compile per transformer layer)
# RUNS="..." picks runs (default: optimised baseline compiled); diagnostics: overflow_checked,
# zero1, contiguous, cudagraphs, zero1_cudagraphs, engine_loop (see below).
# Prints samples/s/GPU, MFU and peak memory of each and the ratios; writes JSON and a profile of
# the optimised step to $BENCH_OUT. The per-run time limits below add up to 5.5 minutes for the
# default runs and 15.8 for all nine, plus up to 3 for FusedAdam's JIT build: choose RUNS to fit
# one 10-minute device call.
# Also read: PEAK_TFLOPS (default 989), CONFIG (default base), BATCH (default 64).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${BENCH_OUT:-output/bench_gpu}
peak=${PEAK_TFLOPS:-989}          # H100 SXM dense bf16; H200 has the same compute peak
# This card's architecture only, in the plain form DeepSpeed's op builder parses ("9.0", not "9.0a").
export TORCH_CUDA_ARCH_LIST=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export PYTHONUNBUFFERED=1
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)"

run() {   # name, time limit (s), bench.py arguments...
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    timeout "$limit" python3 tools/bench.py --config "${CONFIG:-base}" --batch "${BATCH:-64}" --peak_tflops "$peak" \
        --json "$out/$name.json" "$@" 2>&1 | grep -v -E "^\[[0-9-]+ [0-9:,]+\] \[INFO\]" \
        || echo "$name failed or ran out of time"
}
# DeepSpeed builds FusedAdam on first use; build it here so a failure is reported, not fatal.
fused=()
if ! timeout 180 python3 -c "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()" \
        > "$out/fused_adam_build.log" 2>&1; then
    tail -20 "$out/fused_adam_build.log"
    echo "DeepSpeed FusedAdam did not build: the optimised runs use torch's fused AdamW"
    fused=(--torch_fused_adam)
fi
unchecked=(--ds bf16.check_grad_overflow=false)
for name in ${RUNS:-optimised baseline compiled}; do
    case $name in
    optimised) run $name 100 --stage 2 "${fused[@]}" "${unchecked[@]}" --warmup 5 --steps 15 --split_steps 2 \
                   --profile "$out/profile_optimised.txt" ;;
    baseline) run $name 80 --stage 0 --baseline --warmup 2 --steps 4 --split_steps 1 ;;
    compiled) run $name 150 --stage 2 "${fused[@]}" "${unchecked[@]}" --warmup 6 --steps 15 --split_steps 1 \
                  train.compile=true ;;
    # diagnostics: what DeepSpeed's per-tensor overflow check and ZeRO-2's per-parameter gradient
    # hooks cost (ZeRO-1 reduces the gradients after the backward pass instead)
    overflow_checked) run $name 80 --stage 2 "${fused[@]}" --warmup 5 --steps 15 --split_steps 2 ;;
    zero1) run $name 80 --stage 1 "${fused[@]}" "${unchecked[@]}" --warmup 5 --steps 15 --split_steps 2 ;;
    # ZeRO-2 with the contiguous gradient buffer (its multi-GPU setting): a copy per gradient in
    # each per-parameter hook
    contiguous) run $name 80 --stage 2 "${fused[@]}" "${unchecked[@]}" --ds zero_optimization.contiguous_gradients=true \
                    --warmup 5 --steps 15 --split_steps 2 ;;
    # compiled layers replayed as CUDA graphs (torch.compile mode reduce-overhead)
    cudagraphs) run $name 150 --stage 2 "${fused[@]}" "${unchecked[@]}" --warmup 8 --steps 15 --split_steps 1 \
                    train.compile=true train.compile_mode=reduce-overhead ;;
    zero1_cudagraphs) run $name 150 --stage 1 "${fused[@]}" "${unchecked[@]}" --warmup 8 --steps 15 --split_steps 1 \
                          train.compile=true train.compile_mode=reduce-overhead ;;
    # the engine's calls without the Trainer's one wait per step (the agreement on the loss)
    engine_loop) run $name 80 --stage 2 "${fused[@]}" "${unchecked[@]}" --warmup 5 --steps 15 --split_steps 1 --engine_loop ;;
    *) echo "unknown run $name" ;;
    esac
done

python3 - "$out" <<'PY'
import json, os, sys
names = ("optimised", "compiled", "cudagraphs", "zero1_cudagraphs", "engine_loop", "contiguous", "overflow_checked",
         "zero1", "baseline")
runs = {n: json.load(open(f"{sys.argv[1]}/{n}.json"))[0] for n in names if os.path.exists(f"{sys.argv[1]}/{n}.json")}
print()
for name, r in runs.items():
    print(f"{name:>16}: {r['samples_per_s']:7.1f} samples/s/GPU  MFU {r.get('mfu', 0):6.1%}  "
          f"peak {r['peak_memory_bytes'] / 2**30:5.1f} GiB (reserved {r['peak_reserved_bytes'] / 2**30:5.1f})  step {r['step_s'] * 1e3:6.1f} ms  "
          f"host step median/max {sorted(r['host_step_s'])[len(r['host_step_s']) // 2] * 1e3:.0f}/"
          f"{max(r['host_step_s']) * 1e3:.0f} ms  loss {r['last_step_losses']['loss']:.3f}  {r['optimizer']} on {r['device']}")
if "baseline" in runs:
    for name in names[:-1]:
        if name in runs:
            print(f"{name} / baseline: {runs[name]['samples_per_s'] / runs['baseline']['samples_per_s']:.2f}x")
PY
