"""Small builders shared by the tests (not fixtures, so subprocess workers can import them too)."""
from __future__ import annotations

import importlib.util
import math
import os

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


def image_bytes(seed: int, fmt: str = "JPEG", size=(40, 30)) -> bytes:
    """A random image of `size` encoded as `fmt`."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def annotation_dataset(tmp_path):
    """An ALBEF annotation file over a few images of several formats (one listed twice, one missing)."""
    import json

    (tmp_path / "images" / "sub").mkdir(parents=True)
    (tmp_path / "images" / "a.jpg").write_bytes(image_bytes(1))
    (tmp_path / "images" / "sub" / "b.png").write_bytes(image_bytes(2, "PNG"))
    (tmp_path / "images" / "c.webp").write_bytes(image_bytes(3, "WEBP"))
    annotations = [
        {"image": "a.jpg", "caption": ["a red circle", "one red circle on the left"]},
        {"image": "sub/b.png", "caption": "a blue square"},
        {"image": "sub/b.png", "caption": "the blue square"},      # same image again: merged
        {"image": "c.webp", "caption": ["green stars"]},
        {"image": "missing.jpg", "caption": "a yellow star"},       # skipped
    ]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(annotations))
    return ann


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


GLOBAL_BATCH = 8        # the engine tests' global batch, split over however many ranks
DS_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs")


def ds_config(stage):
    return os.path.join(DS_CONFIGS, f"zero{stage}.json")


def engine_cfg(world, *extra):
    """The tiny config for engine tests: a small queue, GLOBAL_BATCH over `world` ranks, a log line
    every step, no periodic save."""
    return load_config("tiny", ["model.queue_size=64", f"train.batch_size={GLOBAL_BATCH // world}",
                                "train.log_every=1", "train.save_every=1000", "train.warmup_steps=2",
                                "train.lr=0.001", *extra])


def global_batches(cfg, rank, world, start=0):
    """Global batches start, start + 1, ... (the same whatever the world size); each rank its slice."""
    step, b = start, GLOBAL_BATCH // world
    while True:
        images, ids, mask = tiny_batch(cfg.model, GLOBAL_BATCH, seed=step)
        part = slice(rank * b, (rank + 1) * b)
        yield {"image": images[part], "input_ids": ids[part], "attention_mask": mask[part]}
        step += 1


def shapes_run_config(folder) -> str:
    """A yaml config over `tiny` that trains on the shapes corpus of tiny's data.synthetic section,
    written into `folder`, and evaluates on its held-out split: a corpus on disk that train.py reads
    as it reads any other (albef_ds/demo.py writes the same one into its output folder)."""
    import json

    from albef_ds.synthetic.shapes import write_synthetic_corpus

    corpora = write_synthetic_corpus(os.path.join(folder, "shapes"), load_config("tiny").data.synthetic)
    path = os.path.join(folder, "shapes.yaml")
    with open(path, "w") as f:
        json.dump({"base": "tiny", "data": {"corpora": corpora["train"]},
                   "eval": {"data": [p for corpus in corpora["heldout"] for p in corpus["shards"]]}}, f)
    return path


def shapes_set(n_images, seed=0, keep_meta=True):
    """A small in-memory retrieval set of rendered shapes, one to three captions per image."""
    import io
    import random

    from albef_ds.eval.retrieval import RetrievalSet
    from albef_ds.synthetic.shapes import ALL_ATTRIBUTES, caption, render

    rng = random.Random(seed)
    attributes = rng.sample(ALL_ATTRIBUTES, n_images)
    images, captions = [], []
    for i, attrs in enumerate(attributes):
        png = io.BytesIO()
        render(attrs, 64, rng).save(png, format="PNG")
        images.append(png.getvalue())
        captions.append([caption(attrs, rng) for _ in range(1 + i % 3)])
    meta = [{"attributes": a} for a in attributes] if keep_meta else [{} for _ in attributes]
    return RetrievalSet(images, captions, [f"img{i}" for i in range(n_images)], meta)


def tiny_model(seed=0):
    """The tiny config's pretraining model (ALBEF with its momentum copies), randomly initialised."""
    from albef_ds.hub import build_model

    torch.manual_seed(seed)
    return build_model(tiny_model_config()).eval()


def png_size(path):
    """(width, height) of a PNG file, after checking its signature and that it decodes."""
    from PIL import Image

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def tiny_albef(seed=0):
    """The tiny config's ALBEF, randomly initialised from `seed`, in eval mode."""
    from albef_ds.models import ALBEF

    torch.manual_seed(seed)
    return ALBEF(tiny_model_config()).eval()


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


def free_port() -> int:
    """A TCP port free on this machine now (for a launcher's --master_port: a fixed one collides with
    another run on the same machine)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def tool(name: str):
    """A script of tools/ as a module (tools/ is no package)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def loop_fusion_layer(block, x, key_mask, source):
    """One fusion layer of the BERT encoder written out head by head with explicit softmax
    attention (the loop reference of the maps' tests): returns its output and each head's
    cross-attention probabilities."""
    x = block.attention(x, key_mask)
    ca = block.crossattention
    q, k, v = ca.self.query(x), ca.self.key(source), ca.self.value(source)
    d = q.shape[-1] // ca.heads
    probs, outs = [], []
    for h in range(ca.heads):
        part = slice(h * d, (h + 1) * d)
        p = torch.softmax(q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(d), -1)
        probs.append(p)
        outs.append(p @ v[..., part])
    x = ca.output(torch.cat(outs, -1), x)
    return block.output(block.intermediate(x), x), probs


def write_refer_folder(folder, entries: list, first_ann_id: int) -> str:
    """A REFER folder (refs(unc).p, instances.json) holding the boxes and splits of generated
    grounding entries, as ALBEF's grounding data reads them; returns its path."""
    import json
    import pickle

    os.makedirs(folder)
    refs = [{"ref_id": e["ref_id"], "ann_id": first_ann_id + i, "image_id": e["image_id"], "split": e["split"],
             "sentences": [{"sent": e["text"]}]} for i, e in enumerate(entries)]
    with open(os.path.join(folder, "refs(unc).p"), "wb") as f:
        pickle.dump(refs, f, protocol=2)
    with open(os.path.join(folder, "instances.json"), "w") as f:
        json.dump({"annotations": [{"id": first_ann_id + i, "bbox": e["bbox"]} for i, e in enumerate(entries)]}, f)
    return str(folder)
