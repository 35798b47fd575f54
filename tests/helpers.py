"""Small builders shared by the tests (not fixtures, so subprocess workers can import them too)."""
from __future__ import annotations

import torch

from albef_ds.config import load_config

TINY_CAPTIONS = ["a large red circle on the left", "two small blue squares at the top",
                 "a yellow triangle in the center", "three green stars on the right",
                 "a small purple cross at the bottom", "one large orange diamond",
                 "two white rings near the top", "a big black square on the left side"]


def random_jpeg(seed: int) -> bytes:
    """A small random JPEG (20 x 24) for shard tests."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def forward(model, images, ids, mask, alpha=0.0, generator=None, image_ids=None, **kwargs) -> dict:
    """The contrastive training model's loss and metrics as one dict, its queue write committed
    (as the trainer does after a micro-batch)."""
    from albef_ds.tasks.base import StepContext

    batch = {"image": images, "input_ids": ids, "attention_mask": mask}
    if image_ids is not None:
        batch["image_id"] = image_ids
    loss, metrics = model(batch, StepContext(0, 1, generator), alpha=alpha, **kwargs)
    model.after_micro_batch()
    return {"loss": loss, **metrics}


def caption_stream(data_cfg, img_size, tokenizer, batch_size, rank=0, world_size=1, seed=0, image_ids=False):
    """The pretraining stream (image + one caption per sample) over data_cfg's corpora."""
    from albef_ds.data import CaptionCodec, ShardStream, build_transform

    codec = CaptionCodec(tokenizer, build_transform(img_size, data_cfg.augment, data_cfg.crop_scale), data_cfg.max_words,
                         data_cfg.max_tokens, image_ids=image_ids)
    return ShardStream(data_cfg, codec, batch_size, rank, world_size, seed)


def tiny_model_config(**overrides):
    """The shipped tiny config with small queue and test-friendly extras."""
    items = [f"{k}={v}" for k, v in overrides.items()]
    return load_config("tiny", items).model


def tiny_batch(cfg, batch_size: int = 8, seed: int = 0):
    from albef_ds.tokenizer import build_tokenizer, tokenize

    g = torch.Generator().manual_seed(seed)
    tok = build_tokenizer(cfg.text.tokenizer)
    captions = [TINY_CAPTIONS[i % len(TINY_CAPTIONS)] for i in range(batch_size)]
    ids, mask = tokenize(tok, captions, 16)
    images = torch.randn(batch_size, 3, cfg.vision.img_size, cfg.vision.img_size, generator=g)
    return images, ids, mask


def _rank_entry(rank, world, port, fn, args, out_dir):
    import os
    import traceback

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except Exception:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world, *args):
    """Runs fn(rank, world, *args) in `world` real processes joined by a gloo process group and
    returns their results in rank order. fn must be importable (a module-level function)."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(_rank_entry, args=(world, port, fn, args, out_dir), nprocs=world,
                               start_method="spawn")
        except Exception as exc:
            import glob
            errors = "".join(open(p).read() for p in sorted(glob.glob(f"{out_dir}/*.err")))
            raise AssertionError(f"a rank failed:\n{errors or exc}") from None
        return [torch.load(f"{out_dir}/rank{r}.pt", weights_only=False) for r in range(world)]
