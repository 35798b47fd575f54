"""Training benchmark: throughput, step-time split, per-rank memory, FLOPs and MFU.

One rank:   python tools/bench.py --config base --stage 2 --batch 4   (--stage 0: no ZeRO, fp32 on CPU)
N ranks:    deepspeed --num_gpus N tools/bench.py --config base --stage 3 --batch 4
GPU:        python tools/bench.py --config base --stage 2 --batch 64 --peak_tflops 989
Baseline:   ... --baseline   (the public implementation's setting: fp32, TF32 off, plain (math)
            attention, torch.optim.AdamW instead of DeepSpeed's fused Adam)

Runs the real Trainer, with the DeepSpeed config train.py reads (ds_configs/), on two random
in-memory batches (the data loader has its own benchmark,
tools/bench_data.py): `--warmup` steps, then `--steps` of the Trainer's training steps, as
train.py runs them (samples/s, peak memory, bytes exchanged), then `--split_steps` of the same
steps with the device synchronised at each phase boundary (Trainer.train_step's phases: the step
split, time in collectives, per-rank bytes), then with `--profile` two training steps under
torch.profiler. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time

import torch
import torch.distributed as tdist

from albef_ds import distributed as dist
from albef_ds.cli import INPUT_ERRORS, ArgumentParser, report_input_error
from albef_ds.config import apply_overrides, load_config
from albef_ds.distributed import traffic
from albef_ds.engine import Trainer
from albef_ds.flops import train_flops_per_sample
from albef_ds.synthetic.batches import random_batch
from albef_ds.tasks.momentum import local_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    ap = ArgumentParser(description="ALBEF-DS training benchmark")
    ap.add_argument("--config", default="base")
    ap.add_argument("--stage", type=int, default=2, choices=[0, 1, 2, 3])
    ap.add_argument("--batch", type=int, default=4, help="micro batch per rank")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="measured steps (throughput, memory)")
    ap.add_argument("--split_steps", type=int, default=2, choices=range(1, 1000), metavar="N",
                    help="further steps timed phase by phase; they also read the per-rank bytes (>= 1)")
    ap.add_argument("--profile", default=None, help="write a torch.profiler table of 2 more steps here")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads per rank (0: keep)")
    ap.add_argument("--baseline", action="store_true", help="optimisations off (see module doc)")
    ap.add_argument("--torch_fused_adam", action="store_true",
                    help="torch's fused AdamW instead of DeepSpeed's (where its JIT build is impossible)")
    ap.add_argument("--deepspeed", default=None, metavar="JSON",
                    help="DeepSpeed config (default: ds_configs/zero<stage>.json, what train.py runs with)")
    ap.add_argument("--ds", action="append", default=[], metavar="KEY=VALUE",
                    help="set a DeepSpeed config entry, e.g. bf16.check_grad_overflow=true (repeatable)")
    ap.add_argument("--peak_tflops", type=float, default=0.0, help="the accelerator's dense bf16 peak, for MFU")
    ap.add_argument("--json", default=None)
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    return ap.parse_args()


def ds_config(args, client_optimizer: bool) -> dict:
    """The DeepSpeed config a user trains with: --deepspeed (default ds_configs/zero<stage>.json;
    stage 0 reads zero1.json at stage 0), with the --ds entries set by the config's own override
    code (values in YAML, which JSON is part of)."""
    path = args.deepspeed or os.path.join(ROOT, "ds_configs", f"zero{max(args.stage, 1)}.json")
    with open(path) as f:
        ds = json.load(f)
    entries = [f"zero_optimization.stage={args.stage}"]
    if args.baseline:
        entries.append("bf16.enabled=false")
    if client_optimizer:
        entries.append("zero_allow_untested_optimizer=true")
    ds = apply_overrides(ds, entries + args.ds)
    if client_optimizer:
        ds.pop("optimizer", None)
    return ds


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Timer:
    def __init__(self, gpu: bool):
        self.gpu, self.totals, self.on = gpu, {}, False

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

    def make_batch(g):
        batch = random_batch(cfg, args.batch, g)
        # pinned, as a DataLoader with pin_memory hands them over, so the copy to the GPU is async
        return {k: v.pin_memory() for k, v in batch.items()} if gpu else batch

    # Two distinct batches made up front and cycled: the step is measured, not the random
    # number generator (the data loader has its own benchmark).
    g = torch.Generator().manual_seed(dist.rank())
    fixed = [make_batch(g), make_batch(g)]

    def batches():
        while True:
            yield from fixed

    def torch_adamw(groups):
        return torch.optim.AdamW(groups, lr=cfg.train.lr, fused=args.torch_fused_adam or None)

    client_optimizer = torch_adamw if args.baseline or args.torch_fused_adam else None
    ds = ds_config(args, client_optimizer is not None)
    trainer = Trainer(cfg, ds, os.path.join(ROOT, "output", "bench"), batches=batches(),
                      client_optimizer=client_optimizer)
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
        if not timer.on:     # only in the split phase: the throughput phase measures the step alone
            return original_step(*a, **k)
        masters = [p for g in inner.param_groups for p in g["params"] if id(p) not in module_ids]
        grads = seen.setdefault("grads", {})
        for p in trainable + masters:
            if p.grad is not None:
                grads[id(p)] = p.grad.numel() * p.grad.element_size()
        seen.setdefault("masters", {}).update({id(p): p.numel() * p.element_size() for p in masters})
        return original_step(*a, **k)

    inner.step = measuring_step
    timer = Timer(gpu)

    # Time inside collectives (waiting included), by wrapping torch.distributed's entry points.
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

    data = iter(trainer.batches)
    attention = (torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH) if args.baseline
                 else contextlib.nullcontext())
    def training_step() -> dict:
        return trainer.train_step(data)[0]

    def synchronize():
        if gpu:
            torch.cuda.synchronize()

    with attention:
        for _ in range(args.warmup):
            training_step()
        # Throughput: the Trainer's own step (train.py's), whose one wait for the device is the
        # agreement on the loss after the forward pass; otherwise the host runs ahead.
        synchronize()
        traffic.update(fetch_bytes=0, gather_bytes=0)
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        host_step_s = []      # when the host is the bottleneck, these are the step times
        for _ in range(args.steps):
            t = time.perf_counter()
            losses = training_step()
            host_step_s.append(time.perf_counter() - t)
        synchronize()
        losses = {k: float(v) for k, v in losses.items()}     # last measured step: finite?
        elapsed = time.perf_counter() - started
        hard_negative_bytes, itc_gather_bytes = traffic["fetch_bytes"], traffic["gather_bytes"]
        # Step split: the Trainer's step with the device synchronised at every phase boundary.
        comm_time["s"] = 0.0
        timer.on = True
        for _ in range(args.split_steps):
            trainer.train_step(data, phase=timer)
        timer.on = False
        if args.profile:
            write_profile(args.profile, gpu, lambda: [training_step() for _ in range(2)])

    comm_s = comm_time["s"] / max(1, args.split_steps)
    state = [t for st in inner.state.values() for t in st.values() if torch.is_tensor(t)]
    samples_per_s = args.batch * world * args.steps / elapsed
    caption_tokens = fixed[0]["attention_mask"].sum(1).float().mean().item()
    mlm = getattr(trainer.model, "mlm", False)
    flops = train_flops_per_sample(cfg.model, length, args.batch * world, mlm=mlm,
                                   masked_tokens=cfg.model.mlm_probability * (caption_tokens - 1))   # [CLS] never masked
    momentum_bytes = nbytes([local_data(pm) for _, pm in trainer.momentum.pairs]) + nbytes(
        [a for a in trainer.momentum.fp32 if a is not None])
    peak = (torch.cuda.max_memory_allocated() if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result = {
        "config": args.config, "stage": args.stage, "world_size": world, "micro_batch": args.batch,
        "baseline": args.baseline, "ds_entries": args.ds, "overrides": args.overrides,
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "dtype": "bf16" if engine.bfloat16_enabled() else "fp32", "optimizer": type(inner).__name__,
        "threads": torch.get_num_threads(),
        "samples_per_s": samples_per_s, "samples_per_s_per_rank": samples_per_s / world,
        "step_s": elapsed / args.steps,
        "split_s_per_step": {k: v / max(1, args.split_steps) for k, v in timer.totals.items()},
        "communication_s_per_step": comm_s,
        "hard_negative_bytes_per_step": hard_negative_bytes / args.steps,
        "itc_gather_bytes_per_step": itc_gather_bytes / args.steps,
        "itc_columns": args.batch * world + cfg.model.queue_size,     # similarities per row
        "rank_bytes": {"parameters": nbytes([local_data(p) for p in trainable]),
                       "gradients": sum(seen.get("grads", {}).values()),
                       "optimizer_state": nbytes(state),
                       "master_weights": sum(seen.get("masters", {}).values()),
                       "momentum_model": momentum_bytes},
        "peak_memory_bytes": peak,
        # CUDA-graph private pools drop out of the allocated count once recorded; reserved keeps them
        "peak_reserved_bytes": torch.cuda.max_memory_reserved() if gpu else None,
        "last_step_losses": losses,
        "host_step_s": host_step_s,
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
    trainer.close()
    dist.shutdown()


def write_profile(path: str, gpu: bool, run) -> None:
    """Operators by device time (GPU) or CPU time, and how busy the device was over the steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    if gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        run()
        if gpu:
            torch.cuda.synchronize()
    wall = time.perf_counter() - start
    events = prof.key_averages()
    sort = "self_cuda_time_total" if gpu else "self_cpu_time_total"
    # kernels only: an operator's row repeats the time of the kernels it launched
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]
    busy = sum(e.self_device_time_total for e in kernels) / 1e6 if gpu else float("nan")
    with open(path, "w") as f:
        f.write(f"wall {wall:.4f} s for 2 steps (profiler on); device busy {busy:.4f} s\n\n")
        f.write(events.table(sort_by=sort, row_limit=40))
        f.write("\n\nby CPU time including children (where the host spends the step):\n")
        f.write(events.table(sort_by="cpu_time_total", row_limit=60))
    print(f"profile written to {path}: device busy {busy:.3f} s of {wall:.3f} s wall")


def print_table(results) -> None:
    r = results[0]
    print(f"\n{r['config']} ZeRO-{r['stage']} x{r['world_size']} micro batch {r['micro_batch']} {r['dtype']} "
          f"on {r['device']}{' (baseline)' if r['baseline'] else ''}, {r['optimizer']}: {r['samples_per_s']:.2f} samples/s, "
          f"{r['step_s']:.2f} s/step, {r['model_tflops_per_sample'] * 1e3:.1f} GFLOP/sample, "
          f"{r['achieved_tflops_per_rank']:.3f} TFLOP/s per rank" + (f", MFU {r['mfu']:.1%}" if "mfu" in r else ""))
    print("step split (s): " + "  ".join(f"{k} {v:.3f}" for k, v in r["split_s_per_step"].items())
          + f"  (time in collectives, inside the above: {r['communication_s_per_step']:.3f})")
    print(f"cross-rank per step and rank: ITC gather {r['itc_gather_bytes_per_step']:,.0f} B, hard negatives "
          f"{r['hard_negative_bytes_per_step']:,.0f} B; ITC columns (global batch + queue) {r['itc_columns']:,}")
    unit, scale = ("GB", 2**30) if r["rank_bytes"]["parameters"] > 2**27 else ("MB", 2**20)
    columns = ("parameters", "gradients", "optimizer_state", "master_weights", "momentum_model")
    print(f"{'rank':>4} " + " ".join(f"{c + ' ' + unit:>18}" for c in columns) + f" {'peak memory GB':>15}")
    for i, x in enumerate(results):
        print(f"{i:>4} " + " ".join(f"{x['rank_bytes'][c] / scale:>18.3f}" for c in columns)
              + f" {x['peak_memory_bytes'] / 2**30:>15.2f}")


if __name__ == "__main__":
    try:
        main()
    except INPUT_ERRORS as exc:          # a bad option, config or file: one line, exit 2
        sys.exit(report_input_error(exc))
