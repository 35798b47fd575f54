"""Pictures of a checkpoint: where in the image the model sees each word of a text.

    python -m albef_ds.visualize --checkpoint PATH --image photo.jpg --text "a dog holding a frisbee" \
        --output_dir DIR [--mode itm|itc] [--layer N] [--config CFG] [--device cpu|cuda] [--trust_checkpoint]
    python -m albef_ds.visualize --checkpoint VQA --image photo.jpg --question "what is the dog holding" \
        --output_dir DIR (--answer_list answer_list.json | --answer frisbee) [--layer N]
    python -m albef_ds.visualize --checkpoint PATH --image photo.jpg --text "..." --method attention \
        --output_dir DIR [--heads mean|all|N] [--layer N]

--image: an image file or a folder of them; --text: a text, or --texts FILE with one text per line
(every image is drawn with every text). Grad-CAM (the default method), for each pair:
DIR/<image>__<text>.png holds the sentence's heat map over the image and, in ITM mode (the
default), DIR/<image>__<text>_words.png one panel per word, both with a colour bar: any checkpoint
with an ITM head (pretrained, retrieval, grounding). A VQA checkpoint is asked --question instead:
DIR/<image>__<question>_answer.png holds the image, the model's top answers from --answer_list
with their probabilities, and the Grad-CAM of the answer's log-likelihood (the best ranked, or
--answer) for the whole question and per word. --method attention draws the raw cross-attention
of [CLS] and each word at a fusion layer, no gradients, for any checkpoint with fusion layers and
one image per text: DIR/<image>__<text>_attention.png averaged over the heads (--heads N: head N,
`_attention_head<N>.png`; --heads all: a panel per head, one picture per token,
`_attention_<i>_<token>.png`). A checkpoint is a training folder, a converted file or a released
ALBEF file. See docs/grounding.md and docs/vqa.md.
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
from albef_ds.data.vqa import clean_question
from albef_ds.eval.heat_maps import CLS, answer_heat_maps, attention_heat_maps, heat_maps
from albef_ds.eval.vqa_answering import QUESTION_WORDS, read_answer_list
from albef_ds.hub import load_model
from albef_ds.models import ALBEF
from albef_ds.models.gradcam import check_fusion_layer, check_gradcam, default_gradcam_layer
from albef_ds.models.vqa import VQAModel
from albef_ds.pictures import answer_panels, attention_panels, head_panels, heat_pictures, save_png, slug
from albef_ds.tokenizer import build_tokenizer, clean_caption

METHODS = ("gradcam", "attention")


def parse_args(argv=None):
    ap = ArgumentParser(description="Grad-CAM pictures: where the model sees each word")
    ap.add_argument("--checkpoint", required=True, help="a training folder, a converted file or a released ALBEF file")
    ap.add_argument("--image", required=True, help="an image file, or a folder of images")
    texts = ap.add_mutually_exclusive_group(required=True)
    texts.add_argument("--text", help="the text to draw")
    texts.add_argument("--texts", help="a file of texts, one per line")
    texts.add_argument("--question", help="a question to a VQA checkpoint")
    ap.add_argument("--answer", help="the answer whose Grad-CAM to draw (VQA; default: the best ranked)")
    ap.add_argument("--answer_list", help="ALBEF's answer_list.json: the answers a VQA checkpoint ranks "
                    "(the top ones are drawn with their probabilities)")
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--method", choices=METHODS, default="gradcam", help="Grad-CAM (default), or the raw "
                    "cross-attention of a fusion layer (no gradients)")
    ap.add_argument("--mode", choices=("itm", "itc"), default=None, help="Grad-CAM of the ITM logit at a "
                    "fusion layer (a panel per word; the default), or of ITC at a ViT block (the sentence's map only)")
    ap.add_argument("--layer", type=int, default=None, help="BERT layer (itm, VQA, attention: a fusion layer) "
                    "or ViT block (itc), 0-based; default: ALBEF's at the same relative depth (layer 8 / block 8 "
                    "of the base model)")
    ap.add_argument("--gradcam_layer", type=int, default=None, help="the same as --layer (its first name)")
    ap.add_argument("--heads", default="mean", help="raw attention: 'mean' over the heads (default), 'all' "
                    "(a panel per head), or one head's number")
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
    if args.question is not None:
        return [args.question]
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


def write_answer_pictures(model, tokenizer, image: Image.Image, question: str, output_dir: str, name: str,
                          answer: Optional[str] = None, answer_list: Optional[Sequence[str]] = None,
                          layer: Optional[int] = None) -> list[str]:
    """A VQA checkpoint's answer to `question` (the best ranked of `answer_list`, or `answer`), with
    its top answers and the answer's Grad-CAM per question word: `<name>__<question>_answer.png`."""
    maps = answer_heat_maps(model, tokenizer, image, question, answer, answer_list, layer=layer)
    picture = answer_panels(image, maps.question, maps.answer, maps.ranked, maps.maps.sentence, maps.maps.words,
                            maps.maps.word_maps)
    return [save_png(picture, os.path.join(output_dir, f"{name}__{slug(question)}_answer.png"))]


def write_attention_pictures(model, tokenizer, image: Image.Image, texts: Sequence[str], output_dir: str, name: str,
                             heads: str = "mean", max_tokens: int = 30, layer: Optional[int] = None,
                             question: bool = False) -> list[str]:
    """The raw cross-attention of [CLS] and each word of each text at fusion layer `layer`: heads
    "mean" `<name>__<text>_attention.png` (averaged over the heads), a head's number
    `_attention_head<N>.png`, "all" one picture per token with a panel per head,
    `_attention_<i>_<token>.png`. `question`: the texts are VQA questions."""
    layer = default_gradcam_layer(model.cfg, "itm") if layer is None else layer
    paths = []
    for text in texts:
        maps = attention_heat_maps(model, tokenizer, [image], text, max_tokens, layer, question)
        per_head = maps.maps[0]                                            # [heads, tokens, g, g]
        stem = os.path.join(output_dir, f"{name}__{slug(text)}_attention")
        if heads == "all":
            for i, token in enumerate(maps.tokens):
                title = f"{token} in '{text}': raw attention per head, layer {layer}"
                paths.append(save_png(head_panels(image, title, per_head[:, i]),
                                      f"{stem}_{i}_{'cls' if token == CLS else slug(token)}.png"))
            continue
        chosen, suffix, which = ((per_head.mean(0), "", "mean of the heads") if heads == "mean"
                                 else (per_head[int(heads)], f"_head{int(heads)}", f"head {int(heads)}"))
        title = f"{text}: raw attention, layer {layer}, {which}"
        paths.append(save_png(attention_panels(image, title, maps.tokens, chosen), f"{stem}{suffix}.png"))
    return paths


def check_request(args, texts: Sequence[str]) -> None:
    """The arguments that need no model: combinations, the texts, the question and answer.
    ConfigError naming the option."""
    if args.question is not None:
        if not clean_question(args.question, QUESTION_WORDS):
            raise ConfigError(f"--question {args.question!r} is empty once cleaned (lower case, no punctuation)")
        if args.method == "gradcam" and args.answer is None and args.answer_list is None:
            raise ConfigError("--question: VQA pictures need the answer to draw: --answer, or --answer_list "
                              "(ALBEF's answer_list.json) for the model to rank")
        if args.answer is not None and not args.answer.strip():
            raise ConfigError("--answer is empty")
    else:
        empty = [t for t in texts if not clean_caption(t)]
        if empty:
            raise ConfigError(f"text {empty[0]!r} is empty once cleaned (lower case, no punctuation)")
        if args.answer is not None or args.answer_list is not None:
            raise ConfigError("--answer and --answer_list go with --question (a VQA checkpoint)")
    if args.mode is not None and (args.method != "gradcam" or args.question is not None):
        raise ConfigError("--mode chooses ITM or ITC Grad-CAM of a caption: not for --method attention or --question")
    if args.method != "attention" and args.heads != "mean":
        raise ConfigError("--heads goes with --method attention")
    if args.heads not in ("mean", "all") and not args.heads.isdigit():
        raise ConfigError(f"--heads {args.heads}: 'mean', 'all' or a head's number")
    if args.layer is not None and args.gradcam_layer is not None:
        raise ConfigError("--layer and --gradcam_layer name the same layer: give one")


def _layer_option(args) -> tuple[str, Optional[int]]:
    """(the option the user named the layer with, the layer or None)."""
    return ("--gradcam_layer", args.gradcam_layer) if args.gradcam_layer is not None else ("--layer", args.layer)


def check_model(args, model) -> Optional[int]:
    """The arguments against the loaded model: its kind, the layer, the head (ConfigError naming
    them); returns the layer to draw (None: the default of the kind of map)."""
    kind = type(model).__name__
    if args.question is not None and not isinstance(model, VQAModel):
        raise ConfigError(f"--question: checkpoint {args.checkpoint} holds a {kind}, not a VQA model "
                          "(a caption goes in --text)")
    if args.question is None and isinstance(model, VQAModel):
        raise ConfigError(f"checkpoint {args.checkpoint} holds a {kind}, which has no ITM head: ask it with "
                          "--question")
    option, layer = _layer_option(args)
    if args.method == "attention":
        encoder = getattr(model, "text_encoder", None)
        if not hasattr(encoder, "fuse"):
            raise ConfigError(f"checkpoint {args.checkpoint} holds a {kind}, which has no fusion layers")
        if encoder.images_per_text != 1:
            raise ConfigError(f"checkpoint {args.checkpoint} holds a {kind}, which reads {encoder.images_per_text} "
                              "images per text: visualize draws models of one image per text")
        if args.heads.isdigit() and int(args.heads) >= model.cfg.text.heads:
            raise ConfigError(f"--heads {args.heads}: the model's cross-attention has {model.cfg.text.heads} heads "
                              f"(0..{model.cfg.text.heads - 1})")
    elif not isinstance(model, (ALBEF, VQAModel)):
        raise ConfigError(f"checkpoint {args.checkpoint} holds a {kind}, which has no ITM head "
                          "(--method attention draws its raw attention)")
    if args.method == "gradcam" and isinstance(model, ALBEF):
        mode = args.mode or "itm"
        layer = default_gradcam_layer(model.cfg, mode) if layer is None else layer
        try:
            check_gradcam(model.cfg, mode, layer)
        except ValueError as exc:
            raise ConfigError(f"{option} {layer}: {exc}") from None
    elif layer is not None:
        try:
            check_fusion_layer(model.cfg, layer, option)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return layer


def run(args) -> list[str]:
    """Every input is checked (the texts or the question, the answer list, every image decoded, the
    output folder, the checkpoint, the layer and head) before the first picture is drawn: a mistake
    writes nothing."""
    texts = _texts(args)
    check_request(args, texts)
    answer_list = None
    if args.answer_list is not None:
        try:
            answer_list = read_answer_list(args.answer_list)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--answer_list: {exc}") from None
    decoded = []
    for path in _images(args.image):
        try:
            decoded.append((path, decode_image(path)))
        except Exception as exc:              # PIL raises many types on broken files
            raise ConfigError(f"image {path} cannot be read: {exc}") from None
    check_writable_folder(args.output_dir, "--output_dir")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.checkpoint, config=args.config, device=device, trusted=args.trust_checkpoint)
    layer = check_model(args, model)
    vqa = isinstance(model, VQAModel)
    max_tokens = model.cfg.text.max_position if vqa else eval_text_lengths(args.config, model)[0]
    tokenizer = build_tokenizer(model.cfg.text.tokenizer)
    paths = []
    for path, image in decoded:
        name = os.path.splitext(os.path.basename(path))[0]
        if args.method == "attention":
            paths += write_attention_pictures(model, tokenizer, image, texts, args.output_dir, name, args.heads,
                                              max_tokens, layer, question=vqa)
        elif vqa:
            paths += write_answer_pictures(model, tokenizer, image, args.question, args.output_dir, name,
                                           args.answer, answer_list, layer)
        else:
            paths += write_heat_pictures(model, tokenizer, image, texts, args.output_dir, name, args.mode or "itm",
                                         max_tokens, layer)
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
