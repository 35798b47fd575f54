"""Grad-CAM pictures of a checkpoint: where in the image the model sees each word of a text.

    python -m albef_ds.visualize --checkpoint PATH --image photo.jpg --text "a dog holding a frisbee" \
        --output_dir DIR [--mode itm|itc] [--gradcam_layer N] [--config CFG] [--device cpu|cuda] \
        [--trust_checkpoint]

--image: an image file or a folder of them; --text: a text, or --texts FILE with one text per line
(every image is drawn with every text). For each pair, DIR/<image>__<text>.png holds the
sentence's heat map over the image and, in ITM mode (the default), DIR/<image>__<text>_words.png
one panel per word, both with a colour bar. Works with any checkpoint that has an ITM head (pretrained, retrieval,
grounding): a training folder, a converted file or a released ALBEF file. See docs/grounding.md.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import torch
from PIL import Image

from albef_ds.cli import (INPUT_ERRORS, ArgumentParser, check_writable_folder, eval_text_lengths, read_lines,
                          report_input_error)
from albef_ds.config import ConfigError
from albef_ds.data.samples import IMAGE_EXTENSIONS, decode_image
from albef_ds.eval.heat_maps import heat_maps
from albef_ds.hub import load_model
from albef_ds.models import ALBEF
from albef_ds.models.gradcam import check_gradcam, default_gradcam_layer
from albef_ds.pictures import heat_pictures, save_png, slug
from albef_ds.tokenizer import build_tokenizer, clean_caption


def parse_args(argv=None):
    ap = ArgumentParser(description="Grad-CAM pictures: where the model sees each word")
    ap.add_argument("--checkpoint", required=True, help="a training folder, a converted file or a released ALBEF file")
    ap.add_argument("--image", required=True, help="an image file, or a folder of images")
    texts = ap.add_mutually_exclusive_group(required=True)
    texts.add_argument("--text", help="the text to draw")
    texts.add_argument("--texts", help="a file of texts, one per line")
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--mode", choices=("itm", "itc"), default="itm", help="Grad-CAM of the ITM logit at a "
                    "fusion layer (a panel per word), or of ITC at a ViT block (the sentence's map only)")
    ap.add_argument("--gradcam_layer", type=int, default=None, help="BERT layer (itm) or ViT block (itc), "
                    "0-based; default: ALBEF's at the same relative depth (layer 8 / block 8 of the base model)")
    ap.add_argument("--config", default=None, help="config to load the checkpoint into (default: its own), "
                    "whose data.max_tokens is used")
    ap.add_argument("--device", default=None, help="default: cuda when there is a GPU, else cpu")
    ap.add_argument("--trust_checkpoint", action="store_true", help="load a checkpoint that holds objects "
                    "beyond tensors (unpickling them could run code): only files from a source you trust")
    return ap.parse_args(argv)


def _images(path: str) -> list[str]:
    if os.path.isdir(path):
        found = sorted(os.path.join(path, n) for n in os.listdir(path)
                       if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
        if not found:
            raise ConfigError(f"--image {path}: the folder holds no image ({', '.join(IMAGE_EXTENSIONS)})")
        return found
    if not os.path.isfile(path):
        raise ConfigError(f"--image {path}: no such file or folder")
    return [path]


def _texts(args) -> list[str]:
    if args.text is not None:
        return [args.text]
    return read_lines(args.texts, "--texts")


def write_heat_pictures(model, tokenizer, image: Image.Image, texts: Sequence[str], output_dir: str,
                        name: str, mode: str = "itm", max_tokens: int = 30, layer: Optional[int] = None) -> list[str]:
    """For each text, in output_dir: ITM mode `<name>__<text>.png` (the sentence's heat map over the
    image) and `<name>__<text>_words.png` (one panel per word); ITC mode `<name>__<text>_itc.png`
    (the sentence's map). Returns the paths."""
    paths = []
    for text in texts:
        maps = heat_maps(model, tokenizer, image, text, mode, max_tokens, layer)
        if maps.dropped:
            print(f"note: {text!r} is longer than the model reads ({max_tokens} tokens): its last "
                  f"{maps.dropped} word(s) are not in the pictures", file=sys.stderr, flush=True)
        stem = os.path.join(output_dir, f"{name}__{slug(text)}")
        paths += [save_png(picture, f"{stem}{suffix}.png") for suffix, picture in heat_pictures(image, text, maps).items()]
    return paths


def run(args) -> list[str]:
    """Every input is checked (the texts, every image decoded, the output folder, the checkpoint,
    the layer) before the first picture is drawn: a mistake writes nothing."""
    texts = _texts(args)
    empty = [t for t in texts if not clean_caption(t)]
    if empty:
        raise ConfigError(f"text {empty[0]!r} is empty once cleaned (lower case, no punctuation)")
    decoded = []
    for path in _images(args.image):
        try:
            decoded.append((path, decode_image(path)))
        except Exception as exc:              # PIL raises many types on broken files
            raise ConfigError(f"image {path} cannot be read: {exc}") from None
    check_writable_folder(args.output_dir, "--output_dir")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.checkpoint, config=args.config, device=device, trusted=args.trust_checkpoint)
    if not isinstance(model, ALBEF):
        raise ConfigError(f"checkpoint {args.checkpoint} holds a {type(model).__name__}, which has no ITM head")
    layer = default_gradcam_layer(model.cfg, args.mode) if args.gradcam_layer is None else args.gradcam_layer
    try:
        check_gradcam(model.cfg, args.mode, layer)
    except ValueError as exc:
        raise ConfigError(f"--gradcam_layer {layer}: {exc}") from None
    max_tokens, _ = eval_text_lengths(args.config, model)
    tokenizer = build_tokenizer(model.cfg.text.tokenizer)
    paths = []
    for path, image in decoded:
        name = os.path.splitext(os.path.basename(path))[0]
        paths += write_heat_pictures(model, tokenizer, image, texts, args.output_dir, name, args.mode, max_tokens,
                                     layer)
    return paths


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        paths = run(args)
    except INPUT_ERRORS as exc:
        return report_input_error(exc)
    print("\n".join(paths), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
