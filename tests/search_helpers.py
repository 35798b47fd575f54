"""Inputs of the search tests: a small held-out shapes corpus in several shards, a VQA checkpoint,
and the command lines run in-process with their exit status and printed lines."""
from __future__ import annotations

import contextlib
import io
import os

import torch

from albef_ds.config import SyntheticConfig, load_config

HELDOUT = 96                   # held-out images, in shards of 32: three parts
SHARD = 32
BATCH = 16


def heldout_corpus(folder: str) -> str:
    """The shard pattern of a corpus with only a held-out split: HELDOUT images."""
    from albef_ds.synthetic.shapes import write_synthetic_corpus

    corpora = write_synthetic_corpus(folder, SyntheticConfig(train_samples=0, heldout_samples=HELDOUT,
                                                             samples_per_shard=SHARD, image_size=64, seed=0))
    (pattern,) = corpora["heldout"][0]["shards"]
    return pattern


def index_args(checkpoint: str, data: str, output_dir: str, *extra) -> list:
    return ["--checkpoint", checkpoint, "--data", data, "--output_dir", output_dir, "--config", "tiny",
            "--batch_size", str(BATCH), "--workers", "0", *extra]


def run_command(main, argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a command line's main() run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def save_model(path: str, model, config: str) -> str:
    from albef_ds.checkpoint.files import save_albef_ds
    from albef_ds.checkpoint.layout import layout_of

    layout = layout_of(model)
    save_albef_ds(path, {k: v for k, v in model.state_dict().items() if k in layout.keys}, load_config(config), layout)
    return path


def vqa_checkpoint(path: str) -> str:
    """An untrained tiny VQA model whose decoder weights are spread enough to rank answers apart."""
    from albef_ds.tasks.vqa import VQATrainingModel

    torch.manual_seed(0)
    model = VQATrainingModel(load_config("tiny_vqa").model)
    with torch.no_grad():
        for p in model.text_decoder.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return save_model(path, model, "tiny_vqa")


def other_albef(path: str) -> str:
    """A tiny ALBEF with other (random) weights than the shipped pretrained one."""
    from albef_ds import build_model

    torch.manual_seed(1)
    return save_model(path, build_model("tiny"), "tiny")


def files_of(folder: str) -> dict:
    """{name: bytes} of every file in a folder."""
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}
