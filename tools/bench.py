"""Training benchmark: throughput, step-time split, per-rank memory, FLOPs and MFU.

One rank:   python tools/bench.py --config base --stage 2 --batch 4
N ranks:    deepspeed --num_gpus N tools/bench.py --config base --stage 3 --batch 4
GPU:        python tools/bench.py --config base --stage 2 --batch 64 --peak_tflops 989
Baseline:   ... --baseline   (the public implementation's setting: fp32, TF32 off, plain (math)
            attention, torch.optim.AdamW instead of DeepSpeed's fused Adam)

Runs `--warmup` then `--steps` optimizer steps of the real Trainer on random in-memory batches
(the data loader has its own benchmark, tools/bench_data.py). Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from albef_ds import distributed as dist  # noqa: E402
from albef_ds.config import load_config  # noqa: E402
from albef_ds.flops import train_flops_per_sample  # noqa: E402
from albef_ds.momentum import local_data  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    ap = argparse.ArgumentParser(description="ALBEF-DS training benchmark")
    ap.add_argument("--config", default="base")
    ap.add_argument("--stage", type=int, default=2, choices=[0, 1, 2, 3])
    ap.add_argument("--batch", type=int, default=4, help="micro batch per rank")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads per rank (0: keep)")
    ap.add_argument("--baseline", action="store_true", help="optimisations off (see module doc)")
    ap.add_argument("--peak_tflops", type=float, default=0.0, help="the accelerator's dense bf16 peak, for MFU")
    ap.add_argument("--json", default=None)
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    return ap.parse_args()


def ds_config(stage: int, baseline: bool, gpu: bool) -> dict:
    ds = {"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
          "bf16": {"enabled": gpu and not baseline}, "steps_per_print": 10**9}
    if stage > 0:
        ds["zero_optimization"].update(overlap_comm=False, contiguous_gradients=True,
                                       reduce_bucket_size=5e7, allgather_bucket_size=5e7)
    if baseline:
        ds["zero_allow_untested_optimizer"] = True
    else:
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}}
    return ds


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Timer:
    def __init__(self, gpu: bool):
        self.gpu, self.totals = gpu, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.gpu:
            torch.cuda.synchronize()
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available()
    if args.baseline:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    cfg = load_config(args.config, ["model.vision.pretrained=null", "model.text.pretrained=null",
                                    f"train.batch_size={args.batch}", "train.warmup_steps=0",
                                    "train.log_every=1000000", *args.overrides])
    dist.init_distributed()
    world = dist.world_size()
    length = cfg.data.max_tokens

    def batches():
        g = torch.Generator().manual_seed(dist.rank())
        while True:
            ids = torch.randint(10, cfg.model.text.vocab_size, (args.batch, length), generator=g)
            ids[:, 0] = cfg.model.text.cls_token_id
            mask = torch.ones_like(ids)
            mask[:, length * 2 // 3:] = 0              # captions shorter than the padded length
            ids[mask == 0] = cfg.model.text.pad_token_id
            size = cfg.model.vision.img_size
            yield {"image": torch.randn(args.batch, 3, size, size, generator=g), "input_ids": ids,
                   "attention_mask": mask}

    from albef_ds.engine import Trainer

    torch_adamw = (lambda groups: torch.optim.AdamW(groups, lr=cfg.train.lr)) if args.baseline else None
    trainer = Trainer(cfg, ds_config(args.stage, args.baseline, gpu), os.path.join(ROOT, "output", "bench"),
                      batches=batches(), client_optimizer=torch_adamw)
    engine = trainer.engine
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    seen = {}

    # What this rank holds when the optimizer steps: gradients (module-side and partitioned),
    # optimizer state (the moments) and master weights (fp32 copies the optimizer keeps apart from
    # the module's parameters: ZeRO's flat partitions; none without ZeRO in fp32).
    # DeepSpeed's ZeRO optimizers step one parameter group at a time: collect over the calls.
    original_step = inner.step
    module_ids = {id(p) for p in trainable}

    def measuring_step(*a, **k):
        masters = [p for g in inner.param_groups for p in g["params"] if id(p) not in module_ids]
        grads = seen.setdefault("grads", {})
        for p in trainable + masters:
            if p.grad is not None:
                grads[id(p)] = p.grad.numel() * p.grad.element_size()
        seen.setdefault("masters", {}).update({id(p): p.numel() * p.element_size() for p in masters})
        return original_step(*a, **k)

    inner.step = measuring_step

    # Time inside collectives (waiting included), by wrapping torch.distributed's entry points.
    import torch.distributed as tdist

    comm_time = {"s": 0.0}
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                 "all_to_all_single", "broadcast", "reduce_scatter", "all_gather_object", "barrier"):
        fn = getattr(tdist, name, None)
        if fn is None:
            continue

        def timed(*a, __fn=fn, **k):
            start = time.perf_counter()
            try:
                return __fn(*a, **k)
            finally:
                comm_time["s"] += time.perf_counter() - start
        setattr(tdist, name, timed)

    timer = Timer(gpu)
    data = iter(trainer.batches)
    attention = (torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH) if args.baseline
                 else contextlib.nullcontext())
    from albef_ds.distributed import traffic

    with attention:
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                timer.totals.clear()
                comm_time["s"] = 0.0
                seen.clear()
                traffic["fetch_bytes"] = 0
                if gpu:
                    torch.cuda.reset_peak_memory_stats()
                started = time.perf_counter()
            with timer("data"):
                batch = next(data)
            images, ids, mask = trainer._to_device(batch)
            generator = torch.Generator().manual_seed(step)
            with timer("forward"):
                out = engine(images, ids, mask, alpha=0.4, generator=generator)
            with timer("backward"):
                engine.backward(out["loss"])
            with timer("optimizer"):
                engine.step()
            with timer("momentum"):
                trainer.momentum.update()
                trainer._clamp_temperature()
    elapsed = time.perf_counter() - started

    comm_s = comm_time["s"]
    state = [t for st in inner.state.values() for t in st.values() if torch.is_tensor(t)]
    samples_per_s = args.batch * world * args.steps / elapsed
    flops = train_flops_per_sample(cfg.model, length, args.batch * world,
                                   masked_tokens=cfg.model.mlm_probability * (length * 2 // 3 - 1))
    momentum_bytes = nbytes([local_data(pm) for _, pm in trainer.momentum.pairs]) + nbytes(
        [a for a in trainer.momentum.fp32 if a is not None])
    peak = (torch.cuda.max_memory_allocated() if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result = {
        "config": args.config, "stage": args.stage, "world_size": world, "micro_batch": args.batch,
        "baseline": args.baseline, "device": torch.cuda.get_device_name() if gpu else "cpu",
        "dtype": "bf16" if engine.bfloat16_enabled() else "fp32", "threads": torch.get_num_threads(),
        "samples_per_s": samples_per_s, "samples_per_s_per_rank": samples_per_s / world,
        "step_s": elapsed / args.steps,
        "split_s_per_step": {k: v / args.steps for k, v in timer.totals.items()},
        "communication_s_per_step": comm_s / args.steps,
        "hard_negative_bytes_per_step": traffic["fetch_bytes"] / args.steps,
        "rank_bytes": {"parameters": nbytes([local_data(p) for p in trainable]),
                       "gradients": sum(seen.get("grads", {}).values()),
                       "optimizer_state": nbytes(state),
                       "master_weights": sum(seen.get("masters", {}).values()),
                       "momentum_model": momentum_bytes},
        "peak_memory_bytes": peak,
        "model_tflops_per_sample": flops / 1e12,
        "achieved_tflops_per_rank": flops * samples_per_s / world / 1e12,
    }
    if args.peak_tflops:
        result["mfu"] = result["achieved_tflops_per_rank"] / args.peak_tflops
    results = [result]
    if world > 1:
        results = [None] * world
        torch.distributed.all_gather_object(results, result)
    if dist.rank() == 0:
        print_table(results)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)


def print_table(results) -> None:
    r = results[0]
    gb = 2**30
    print(f"\n{r['config']} ZeRO-{r['stage']} x{r['world_size']} micro batch {r['micro_batch']} {r['dtype']} "
          f"on {r['device']}{' (baseline)' if r['baseline'] else ''}: {r['samples_per_s']:.2f} samples/s, "
          f"{r['step_s']:.2f} s/step, {r['model_tflops_per_sample'] * 1e3:.1f} GFLOP/sample, "
          f"{r['achieved_tflops_per_rank']:.3f} TFLOP/s per rank" + (f", MFU {r['mfu']:.1%}" if "mfu" in r else ""))
    print("step split (s): " + "  ".join(f"{k} {v:.3f}" for k, v in r["split_s_per_step"].items())
          + f"  (time in collectives, inside the above: {r['communication_s_per_step']:.3f})")
    print(f"{'rank':>4} {'params GB':>10} {'grads GB':>9} {'optim GB':>9} {'master GB':>10} {'momentum GB':>12} "
          f"{'peak GB':>8}")
    for i, x in enumerate(results):
        b = x["rank_bytes"]
        print(f"{i:>4} {b['parameters'] / gb:>10.3f} {b['gradients'] / gb:>9.3f} {b['optimizer_state'] / gb:>9.3f} "
              f"{b['master_weights'] / gb:>10.3f} {b['momentum_model'] / gb:>12.3f} {x['peak_memory_bytes'] / gb:>8.2f}")


if __name__ == "__main__":
    main()
