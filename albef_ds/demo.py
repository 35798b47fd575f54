"""The built-in demo, and training on the generated corpora: train.py's arguments and run, with the
shapes corpus of the config's data.synthetic section written first when the config names no corpus.

    deepspeed --num_gpus 2 albef_ds/demo.py --deepspeed ds_configs/zero2.json   # make demo
    deepspeed albef_ds/demo.py --deepspeed ds_configs/zero2.json --config tiny_nlvr2_ta [...]

With no --config it trains the tiny model on the shapes corpus (configs/tiny.yaml) and ends with its
held-out evaluation and the pictures it can draw of held-out images (OUTPUT_DIR/pictures): the
caption's Grad-CAM per word and the raw cross-attention of each word, named in its last lines. The corpus is
written (by rank 0) into OUTPUT_DIR/synthetic_data; its held-out split is the run's evaluation set
unless eval.data names one. Part of the demo wing: nothing in the library imports this module.
"""
from __future__ import annotations

import os
import sys

from albef_ds import distributed as dist
from albef_ds.cli import run_in_process_group
from albef_ds.config import Config, ConfigError
from albef_ds.data.samples import decode_image
from albef_ds.engine.zero import inference_model
from albef_ds.eval.retrieval import read_shard_set
from albef_ds.synthetic.probe import evaluate_heldout
from albef_ds.synthetic.shapes import shared_synthetic_corpus, with_generated_corpus
from albef_ds.tasks import get_task
from albef_ds.tokenizer import build_tokenizer
from albef_ds.train import config_of, output_dir_of, parse_args, start
from albef_ds.visualize import write_attention_pictures, write_heat_pictures


def main(argv=None) -> int:
    args = parse_args(argv, config_help="project config (default: tiny, the built-in demo); with no "
                      "data.corpora, the shapes corpus of its data.synthetic section", config_default="tiny")
    builtin = args.config == "tiny"

    def command() -> int:
        if dist.rank() == 0 and builtin:
            print("ALBEF-DS built-in demo: tiny ALBEF on a generated corpus of coloured shapes", flush=True)
        cfg = config_of(args)
        output_dir = output_dir_of(args, cfg)
        try:
            cfg = with_generated_corpus(cfg, output_dir)
        except OSError as exc:
            raise ConfigError(f"cannot write the generated corpus into {os.path.join(output_dir, 'synthetic_data')} "
                              f"(output_dir {output_dir}): {exc}") from None
        trainer = start(cfg, args)
        code = trainer.train()
        if code == 0 and builtin:
            # What the model learned: held-out retrieval, ITM and attribute MLM, and pictures of
            # held-out images (every rank: ZeRO-3 gathers; rank 0 draws them).
            evaluate_heldout(trainer.engine, trainer.cfg, output_dir)
            write_demo_pictures(trainer.engine, trainer.cfg, output_dir)
        trainer.close()
        return code

    return run_in_process_group(command)


def write_demo_pictures(model, cfg: Config, output_dir: str, count: int = 2) -> list[str]:
    """The built-in demo's pictures of the first `count` held-out shapes images with their captions,
    in `<output_dir>/pictures`: every kind a pretrained checkpoint gives, the ITM Grad-CAM (the
    sentence's map and one panel per word) and the raw cross-attention of [CLS] and each word in the
    last fusion layer (mean of the heads; there the tiny model's colour words attend their shapes,
    docs/grounding.md). Call on every rank after training (a DeepSpeed engine or a module; the
    corpus is read from `<output_dir>/synthetic_data`, where the demo writes it, and under ZeRO-3
    the weights are gathered on every rank); rank 0 draws, prints (its last two lines) and returns
    the paths, the other ranks return []."""
    corpora = shared_synthetic_corpus(os.path.join(output_dir, "synthetic_data"), cfg.data.synthetic)["heldout"]
    model = inference_model(model, get_task(cfg))
    if dist.rank() != 0:
        return []
    data = read_shard_set(corpora, cfg.data.max_words)
    tokenizer = build_tokenizer(cfg.model.text.tokenizer)
    folder = os.path.join(output_dir, "pictures")
    gradcam, attention = [], []
    last_fusion_layer = cfg.model.text.layers - 1
    for i in range(min(count, len(data.images))):
        image, texts, name = decode_image(data.images[i]), data.captions[i][:1], f"heldout_{i}"
        gradcam += write_heat_pictures(model, tokenizer, image, texts, folder, name, max_tokens=cfg.data.max_tokens)
        attention += write_attention_pictures(model, tokenizer, image, texts, folder, name,
                                              max_tokens=cfg.data.max_tokens, layer=last_fusion_layer)
    print("Grad-CAM pictures of held-out images: " + ", ".join(gradcam), flush=True)
    print(f"raw attention pictures of held-out images (fusion layer {last_fusion_layer}, mean of the heads): "
          + ", ".join(attention), flush=True)
    return gradcam + attention


if __name__ == "__main__":
    sys.exit(main())
