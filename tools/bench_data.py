#!/usr/bin/env python
"""Data path throughput on real photographs: the PIL path the library used before (float32,
normalised in the workers; tools/transforms_reference.py) and today's uint8 path, side by side.

    python tools/bench_data.py [--photos 2000] [--img-size 256] [--workers 2] [--seconds 20]
                               [--data DIR] [--out bench_data.json]

Writes --photos JPEGs per layout with tools/make_photo_shards.py (img2dataset's sizes, short side
256-512, and 640x480; reused from --data when it holds them), then measures, all in CPU time
(what a worker with a core of its own spends, whatever else the machine runs):
1. per worker, per layout and transform (pretraining: crop scale 0.2; fine-tuning: 0.5;
   evaluation: resize), decode + transform on one thread, the two paths alternating over the
   same photos with the same draws: ms per sample, samples per CPU second, the ratio; and the
   difference of their pixels (mean absolute difference per sample, in levels of 255);
2. the breakdown of the pretraining transform, stage by stage, for both paths (ms per sample;
   per RandAugment op also ms per application: the old path decodes the whole JPEG, then crops
   and resizes; today's decodes only the crop's region, then resizes), and the share of draws
   whose crop is at least twice the output on both sides (where JPEG DCT scaling could decode at
   half size);
3. the pretraining stream (tar reading, decode, augment, tokenize, collate, hand-over) with
   --workers worker processes on the img2dataset shards, each path in a fresh process, the paths
   alternating --stream-runs times (the median run is reported): the workers' CPU ms per sample,
   samples/s (wall, per worker), peak memory of a worker and of the training process, and the
   bytes of one batch's images.
Prints a summary and the JSON, and writes the JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import resource
import sys
import statistics
import subprocess
import tempfile
import time

import make_photo_shards
import numpy as np
import torch
import torchvision.transforms.v2.functional as F
import transforms_reference as reference
from torchvision.transforms import InterpolationMode

from albef_ds.cli import INPUT_ERRORS, ArgumentParser, report_input_error
from albef_ds.config import DataConfig
from albef_ds.data import CaptionCodec, EvalTransform, ShardStream, TrainTransform
from albef_ds.data import transforms as today
from albef_ds.data.images import open_image, region_decoder_built, region_pixels
from albef_ds.data.samples import read_shard
from albef_ds.tokenizer import build_tokenizer, clean_caption

LAYOUTS = {"img2dataset": "img2dataset", "640x480": "640x480"}
RECIPES = {"pretraining": (0.2, 1.0), "fine-tuning": (0.5, 1.0), "evaluation": None}
MEAN = torch.tensor(reference.CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(reference.CLIP_STD).view(3, 1, 1)


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- the two paths -----------------------------------------------------------------------------

def reference_transform(recipe, img_size):
    crop = RECIPES[recipe]
    return reference.EvalTransform(img_size) if crop is None else reference.TrainTransform(img_size, crop)


def today_transform(recipe, img_size):
    crop = RECIPES[recipe]
    return EvalTransform(img_size) if crop is None else TrainTransform(img_size, crop)


def run_reference(transform, data, rng):
    return transform(reference.decode_image(data), rng)


def run_today(transform, data, rng):
    return transform(open_image(data), rng)


def as_pixels(reference_output: torch.Tensor) -> torch.Tensor:
    return (reference_output * STD + MEAN).mul(255).round().to(torch.uint8)


def per_worker(jpegs: list, recipe: str, img_size: int, seconds: float) -> dict:
    """Both paths alternating in chunks over the same photos and draws until `seconds` of CPU time
    are spent: CPU ms per sample of each, and the per-sample pixel differences."""
    old, new = reference_transform(recipe, img_size), today_transform(recipe, img_size)
    cpu = {"reference": 0.0, "today": 0.0}
    count, differences, start = 0, [], time.process_time()
    while time.process_time() - start < seconds:
        chunk = [(i % len(jpegs), i) for i in range(count, count + 32)]
        for name, run, transform in (("reference", run_reference, old), ("today", run_today, new)):
            t = time.process_time()
            outputs = [run(transform, jpegs[j], random.Random(seed)) for j, seed in chunk]
            cpu[name] += time.process_time() - t
            if name == "reference":
                previous = outputs
        differences += [(as_pixels(a).int() - b.int()).abs().float().mean().item() for a, b in zip(previous, outputs)]
        count += len(chunk)
    ms = {k: 1000 * v / count for k, v in cpu.items()}
    return {"samples": count, "reference_ms": round(ms["reference"], 3), "today_ms": round(ms["today"], 3),
            "reference_per_cpu_s": round(1000 / ms["reference"], 1), "today_per_cpu_s": round(1000 / ms["today"], 1),
            "ratio": round(ms["reference"] / ms["today"], 2),
            "pixel_mad_mean": round(float(np.mean(differences)), 4),
            "pixel_mad_p99": round(float(np.percentile(differences, 99)), 3),
            "pixel_mad_max": round(float(np.max(differences)), 3)}


# ---- the breakdown -----------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.cpu, self.calls = {}, {}

    def __call__(self, stage, fn, *args):
        t = time.process_time()
        out = fn(*args)
        self.cpu[stage] = self.cpu.get(stage, 0.0) + time.process_time() - t
        self.calls[stage] = self.calls.get(stage, 0) + 1
        return out


def reference_stages(clock, data, rng, img_size, crop):
    image = clock("decode", reference.decode_image, data)
    top, left, h, w = reference.random_resized_crop_box(rng, image.width, image.height, crop)
    image = clock("crop_resize", F.resized_crop, image, top, left, h, w, [img_size, img_size],
                  InterpolationMode.BICUBIC)
    if rng.random() < 0.5:
        image = clock("flip", F.horizontal_flip, image)
    ops = [rng.choice(reference.RAND_AUGMENT_OPS) for _ in range(reference.NUM_OPS)]
    for op in ops:
        sign = rng.choice((-1.0, 1.0))
        if rng.random() < 0.5:
            image = clock(f"op_{op}", reference.apply_op, image, op, sign)
    clock("to_float_normalise", reference.to_normalized_tensor, image)
    return (h, w)


def today_stages(clock, data, rng, img_size, crop):
    image = clock("decode", open_image, data)                    # a JPEG: its header
    top, left, h, w = today.random_resized_crop_box(rng, image.width, image.height, crop)
    image = clock("decode", region_pixels, image, left, top, w, h)      # the crop's region, into a tensor
    image = clock("resize", today.resize, image, img_size)
    if rng.random() < 0.5:
        image = clock("flip", F.horizontal_flip, image)
    ops = [rng.choice(today.RAND_AUGMENT_OPS) for _ in range(today.NUM_OPS)]
    for op in ops:
        sign = rng.choice((-1.0, 1.0))
        if rng.random() < 0.5:
            image = clock(f"op_{op}", today.apply_op, image, op, sign)
    return (h, w)


def breakdown(jpegs: list, img_size: int, samples: int) -> dict:
    """Stage by stage, the pretraining transform of both paths over the same photos and draws."""
    out, crops = {}, []
    for name, stages in (("reference", reference_stages), ("today", today_stages)):
        clock = Clock()
        for i in range(samples):
            crop = stages(clock, jpegs[i % len(jpegs)], random.Random(i), img_size, RECIPES["pretraining"])
            if name == "today":
                crops.append(crop)
        out[name] = {
            "ms_per_sample": {k: round(1000 * v / samples, 3) for k, v in sorted(clock.cpu.items())},
            "ms_per_op_application": {k[3:]: round(1000 * v / clock.calls[k], 3)
                                      for k, v in sorted(clock.cpu.items()) if k.startswith("op_")},
            "total_ms": round(1000 * sum(clock.cpu.values()) / samples, 3)}
    out["dct_half_size_share"] = round(float(np.mean([min(h, w) >= 2 * img_size for h, w in crops])), 3)
    return out


# ---- the stream --------------------------------------------------------------------------------

class ReferenceCaptionCodec(CaptionCodec):
    """The pretraining codec as it was: PIL decoding, the reference transform (float32, normalised
    in the worker); caption choice first, then the image, as CaptionCodec draws them."""

    def decode(self, raw, key, rng):
        captions = [c for c in (clean_caption(c, self.max_words) for c in self.captions(raw)) if c]
        caption = rng.choice(captions)
        return {"image": self.transform(reference.decode_image(raw["jpg"]), rng), "caption": caption}


def stream_child(path: str, shards: list, samples: int, img_size: int, workers: int, seconds: float, queue) -> None:
    torch.set_num_threads(1)
    cfg = DataConfig(corpora=[{"name": "photos", "shards": shards, "samples": samples}], workers=workers,
                     augment=True, epoch_samples=10**9)
    tokenizer = build_tokenizer("tiny_vocab.txt")
    if path == "reference":
        codec = ReferenceCaptionCodec(tokenizer, reference.TrainTransform(img_size), cfg.max_words, cfg.max_tokens)
    else:
        codec = CaptionCodec(tokenizer, TrainTransform(img_size), cfg.max_words, cfg.max_tokens)
    batch_size = 32
    stream = ShardStream(cfg, codec, batch_size, 0, 1, 0)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    batches = iter(stream)
    first = next(batches)                        # worker start-up is not throughput
    image_bytes = first["image"].numel() * first["image"].element_size()
    count, start = 0, time.perf_counter()
    for batch in batches:
        count += len(batch["keys"])
        if time.perf_counter() - start > seconds:
            break
    rate = count / (time.perf_counter() - start)
    batches.close()                              # joins the workers: their CPU time is counted
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    queue.put({"worker_cpu_ms_per_sample": round(1000 * cpu / (count + batch_size), 3),
               "samples_per_s": round(rate, 1), "samples_per_s_per_worker": round(rate / workers, 1),
               "batch_image_bytes": image_bytes, "batch_size": batch_size,
               "image_dtype": str(first["image"].dtype).replace("torch.", ""),
               "peak_rss_worker_mb": round(after.ru_maxrss / 1024, 1),
               "peak_rss_training_process_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})


def stream_rate(path, shards, samples, img_size, workers, seconds) -> dict:
    """One path's stream in a fresh process (so that peak memory is that path's own)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=stream_child, args=(path, shards, samples, img_size, workers, seconds, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def median_run(results: list) -> dict:
    """The run of median worker CPU time per sample."""
    return sorted(results, key=lambda r: r["worker_cpu_ms_per_sample"])[(len(results) - 1) // 2]


# ---- main --------------------------------------------------------------------------------------

def photo_corpus(folder: str, layout: str, count: int) -> list:
    out = os.path.join(folder, layout)
    sizes = os.path.join(out, "sizes.json")
    if not (os.path.isfile(sizes) and sum(json.load(open(sizes)).values()) == count):
        make_photo_shards.write_photo_shards(out, count, layout, seed=0 if layout == "img2dataset" else 1)
    return sorted(os.path.join(out, name) for name in json.load(open(sizes)))


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=2000, help="distinct JPEGs per layout")
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1,
                        help="stream worker processes (on a 2-core machine one leaves a core to the training process)")
    parser.add_argument("--stream-runs", type=int, default=2, help="stream runs per path, alternating; the median")
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="CPU seconds per layout and transform (both paths), and wall seconds per stream")
    parser.add_argument("--breakdown-samples", type=int, default=400)
    parser.add_argument("--data", help="folder for the photo shards (kept and reused); default: a temporary one")
    parser.add_argument("--out", default="bench_data.json")
    args = parser.parse_args()
    if min(args.workers, args.photos, args.stream_runs) < 1:
        parser.error("--workers, --photos and --stream-runs must be at least 1")
    torch.set_num_threads(1)                     # as in a DataLoader worker
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.data or scratch
        shards = {layout: photo_corpus(folder, layout, args.photos) for layout in LAYOUTS}
        result = {"img_size": args.img_size, "photos_per_layout": args.photos, "per_worker": {}, "breakdown": {}}
        for layout, paths in shards.items():
            jpegs = [sample["jpg"] for sample in read_shard(paths[0])]
            result["mean_jpeg_kb"] = result.get("mean_jpeg_kb", {})
            result["mean_jpeg_kb"][layout] = round(statistics.mean(len(j) for j in jpegs) / 1024, 1)
            result["per_worker"][layout] = {recipe: per_worker(jpegs, recipe, args.img_size, args.seconds)
                                            for recipe in RECIPES}
            result["breakdown"][layout] = breakdown(jpegs, args.img_size, args.breakdown_samples)
        runs = {"reference": [], "today": []}
        for _ in range(args.stream_runs):        # alternating, so that both meet the same load
            for path in runs:
                runs[path].append(stream_rate(path, shards["img2dataset"], args.photos, args.img_size,
                                              args.workers, args.seconds))
    streams = {path: median_run(results) for path, results in runs.items()}
    streams["ratio"] = round(streams["reference"]["worker_cpu_ms_per_sample"]
                             / streams["today"]["worker_cpu_ms_per_sample"], 2)
    result["stream_img2dataset_pretraining"] = {"workers": args.workers, "runs": args.stream_runs, **streams,
                                                "all_runs": runs}
    result.update(machine=cpu_model(), cpus=os.cpu_count(), load_average_before=round(load, 2),
                  torch=torch.__version__, jpeg_region_decoder=region_decoder_built())
    summarise(result)
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


def summarise(result: dict) -> None:
    print(f"per worker, decode + transform, CPU ms per sample at {result['img_size']} px "
          "(reference: the PIL path before; today: the uint8 path)")
    for layout, recipes in result["per_worker"].items():
        for recipe, r in recipes.items():
            print(f"  {layout:12s} {recipe:12s} {r['reference_ms']:6.2f} -> {r['today_ms']:5.2f} ms  "
                  f"x{r['ratio']:.2f}   pixel MAD mean {r['pixel_mad_mean']:.3f} max {r['pixel_mad_max']:.2f}")
    s = result["stream_img2dataset_pretraining"]
    print(f"stream (pretraining, img2dataset photos, {s['workers']} workers): worker CPU "
          f"{s['reference']['worker_cpu_ms_per_sample']:.2f} -> {s['today']['worker_cpu_ms_per_sample']:.2f} ms per "
          f"sample x{s['ratio']:.2f}; {s['reference']['samples_per_s_per_worker']} -> "
          f"{s['today']['samples_per_s_per_worker']} samples/s per worker (wall)")


if __name__ == "__main__":
    try:
        main()
    except INPUT_ERRORS as exc:          # a bad option, config or file: one line, exit 2
        sys.exit(report_input_error(exc))
