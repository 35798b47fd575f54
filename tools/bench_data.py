#!/usr/bin/env python
"""Data throughput: decoded-and-augmented samples per second, per worker and through the stream.

    python tools/bench_data.py [--img-size 256] [--workers 2] [--seconds 20] [--out bench_data.json]

Writes --images photo-like 640x480 JPEGs (quality 90) into one shard, then measures
1. per worker: decode + the paper's train transform (crop, flip, RandAugment, CLIP norm) in this
   process on one thread, as one DataLoader worker runs it, per wall and per CPU second (the
   second is what a worker with a core of its own makes, whatever else the machine runs);
2. stream: the pretraining ShardStream with --workers processes (tar reading, decode, augment, tokenize, collate,
   hand-over to the main process): samples/s in total and per worker, and the workers' CPU time
   per sample (which other load on the machine does not change).
Prints the results as JSON and writes them to --out.
"""
import argparse
import io
import itertools
import json
import os
import platform
import random
import resource
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from albef_ds.config import DataConfig
from albef_ds.data import CaptionCodec, ShardStream, TrainTransform
from albef_ds.data.samples import decode_image
from albef_ds.data.shards import write_shard
from albef_ds.tokenizer import build_tokenizer


def photo_like_jpeg(seed: int, width: int = 640, height: int = 480) -> bytes:
    """Smooth colour gradients, a few blobs and sensor-like noise: compresses like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([rng.uniform(0, 255) + rng.uniform(-0.3, 0.3) * x + rng.uniform(-0.3, 0.3) * y
                      for _ in range(3)], axis=-1)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 120)
        image += (((x - cx) ** 2 + (y - cy) ** 2) < r * r)[..., None] * rng.uniform(-80, 80, 3)
    image += rng.normal(0, 6, image.shape)
    out = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def per_worker_rate(jpegs: list[bytes], img_size: int, seconds: float) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second) of decode + train transform on one thread."""
    torch.set_num_threads(1)                     # as in a DataLoader worker
    transform = TrainTransform(img_size)
    rng = random.Random(0)
    count, start, cpu_start = 0, time.perf_counter(), time.process_time()
    for data in itertools.cycle(jpegs):
        transform(decode_image(data), rng)
        count += 1
        if time.perf_counter() - start > seconds:
            return count / (time.perf_counter() - start), count / (time.process_time() - cpu_start)


def stream_rate(shard: str, samples: int, img_size: int, workers: int, seconds: float) -> tuple[float, float]:
    """(samples/s of the stream, worker CPU milliseconds per sample); the second does not depend
    on how many cores the machine lends the workers while other work runs."""
    cfg = DataConfig(corpora=[{"name": "bench", "shards": [shard], "samples": samples}], workers=workers,
                     augment=True, epoch_samples=10**9)
    codec = CaptionCodec(build_tokenizer("tiny_vocab.txt"), TrainTransform(img_size), cfg.max_words, cfg.max_tokens)
    stream = ShardStream(cfg, codec, 32, 0, 1, 0)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    batches = iter(stream)
    next(batches)                                # worker start-up is not throughput
    count, start = 0, time.perf_counter()
    for batch in batches:
        count += len(batch["keys"])
        if time.perf_counter() - start > seconds:
            break
    rate = count / (time.perf_counter() - start)
    batches.close()                              # joins the workers: their CPU time is counted
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return rate, 1000 * cpu / (count + 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="distinct JPEGs in the shard")
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring time of each part")
    parser.add_argument("--out", default="bench_data.json")
    args = parser.parse_args()
    if args.workers < 1:
        parser.error("--workers must be at least 1: the stream part measures worker processes")
    jpegs = [photo_like_jpeg(i) for i in range(args.images)]
    with tempfile.TemporaryDirectory() as folder:
        shard = os.path.join(folder, "bench-00000.tar")
        write_shard(shard, [{"__key__": f"{i:06d}", "jpg": data, "txt": b"a photo of a red circle"}
                            for i, data in enumerate(jpegs)])
        worker, worker_cpu = per_worker_rate(jpegs, args.img_size, args.seconds)
        total, cpu_ms = stream_rate(shard, len(jpegs), args.img_size, args.workers, args.seconds)
    result = {
        "input": "640x480 JPEG q90", "img_size": args.img_size,
        "mean_jpeg_bytes": int(np.mean([len(j) for j in jpegs])),
        "per_worker_samples_per_s": round(worker, 1),
        "per_worker_samples_per_cpu_s": round(worker_cpu, 1),
        "stream_workers": args.workers, "stream_samples_per_s": round(total, 1),
        "stream_samples_per_s_per_worker": round(total / max(1, args.workers), 1),
        "stream_worker_cpu_ms_per_sample": round(cpu_ms, 2),
        "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
