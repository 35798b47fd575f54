"""Pictures of what the model sees: Grad-CAM heat maps over images (the sentence's map and one panel
per word, as ALBEF's figures show them) and the top images of retrieval queries. Drawn with PIL
alone; heat maps come from albef_ds.models.gradcam.

The overlay follows ALBEF's visualisation: the map is min-max scaled, resized bicubically to the
panel, blurred (Gaussian, sigma 2% of the panel's longer side), scaled again, coloured with the
'jet' colour map and blended into the image with weight heat ** 0.7 per pixel. Every panel is
scaled on its own, so the colour bar runs from the panel's least to its greatest heat.
"""
from __future__ import annotations

import math
import os
import re
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

PANEL = 256                 # the longer side of an image panel, pixels
PAD = 8
LABEL = 24                  # the band under a panel holding its word
TITLE = 32                  # the band above the panels holding the sentence
BAR = 64                    # the colour bar's column: the bar and its labels
COLUMNS = 4                 # panels per row
BLUR = 0.02                 # Gaussian sigma as a fraction of the panel's longer side
BLEND = 0.7                 # overlay weight: heat ** BLEND
# matplotlib's 'jet': (position, value) corners of the red, green and blue channels
JET = {"r": ((0, 0), (0.35, 0), (0.66, 1), (0.89, 1), (1, 0.5)),
       "g": ((0, 0), (0.125, 0), (0.375, 1), (0.64, 1), (0.91, 0), (1, 0)),
       "b": ((0, 0.5), (0.11, 1), (0.34, 1), (0.65, 0), (1, 0))}


def _font(size: int = 15):
    return ImageFont.load_default(size=size)


def jet(values: np.ndarray) -> np.ndarray:
    """[...] values in [0, 1] -> [..., 3] uint8 colours of matplotlib's 'jet'."""
    channels = [np.interp(values, [p for p, _ in JET[c]], [v for _, v in JET[c]]) for c in "rgb"]
    return (np.stack(channels, -1) * 255).round().astype(np.uint8)


def _scaled(x: torch.Tensor) -> torch.Tensor:
    low, high = x.min(), x.max()
    return (x - low) / (high - low) if high > low else torch.zeros_like(x)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [H, W], edges reflected (as scipy's gaussian_filter)."""
    radius = max(1, int(4 * sigma + 0.5))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    out = x[None, None]
    for dim in (2, 3):
        pad = (0, 0, radius, radius) if dim == 2 else (radius, radius, 0, 0)
        shape = (1, 1, -1, 1) if dim == 2 else (1, 1, 1, -1)
        out = F.conv2d(F.pad(out, pad, mode="reflect"), kernel.view(shape))
    return out[0, 0]


def panel_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an image's panel: its longer side PANEL, the aspect kept."""
    scale = PANEL / max(image.size)
    return max(1, round(image.width * scale)), max(1, round(image.height * scale))


def overlay(image: Image.Image, heat: torch.Tensor) -> Image.Image:
    """The image at panel size with the [g, g] heat map blended in (see the module doc)."""
    width, height = panel_size(image)
    base = np.asarray(image.convert("RGB").resize((width, height), Image.BICUBIC), dtype=np.float64) / 255
    a = _scaled(heat.double())
    a = F.interpolate(a[None, None], size=(height, width), mode="bicubic", align_corners=False)[0, 0]
    a = _scaled(_blur(_scaled(a), BLUR * max(width, height))).numpy()
    weight = (a ** BLEND)[..., None]
    mixed = (1 - weight) * base + weight * jet(a) / 255
    return Image.fromarray((mixed * 255).round().astype(np.uint8))


def colour_bar(height: int) -> Image.Image:
    """A BAR-wide column: the 'jet' scale from the panel's least heat (bottom) to its greatest."""
    bar = Image.new("RGB", (BAR, height), "white")
    top, bottom = 18, height - 18
    strip = jet(np.linspace(1, 0, max(1, bottom - top)))[:, None, :].repeat(16, 1)
    bar.paste(Image.fromarray(strip), (4, top))
    draw = ImageDraw.Draw(bar)
    font = _font(12)
    draw.text((24, top - 2), "max", fill="black", font=font)
    draw.text((24, bottom - 12), "min", fill="black", font=font)
    draw.text((2, 2), "heat", fill="black", font=font)
    return bar


def grid_size(panel: tuple[int, int], count: int, bar: bool = True, columns: int = COLUMNS) -> tuple[int, int]:
    """(width, height) of a picture of `count` labelled panels in rows of `columns`, with a title
    (and a colour bar)."""
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    return (columns * (panel[0] + PAD) + PAD + (BAR if bar else 0), TITLE + rows * (panel[1] + LABEL + PAD) + PAD)


def labelled_grid(panels: Sequence[Image.Image], labels: Sequence[str], title: str, bar: bool = True,
                  outlines: Optional[Sequence[Optional[str]]] = None, columns: int = COLUMNS) -> Image.Image:
    """Panels (drawn at the first one's size) in rows of `columns`, each with its label under it,
    the title above, and the colour bar at the right (if `bar`). `outlines`: a frame colour per
    panel (None: none)."""
    size = panels[0].size
    width, height = grid_size(size, len(panels), bar, columns)
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    draw.text((PAD, 8), title, fill="black", font=_font(16))
    columns = min(columns, len(panels))
    for i, (panel, label) in enumerate(zip(panels, labels)):
        x = PAD + (i % columns) * (size[0] + PAD)
        y = TITLE + (i // columns) * (size[1] + LABEL + PAD)
        picture.paste(panel.resize(size), (x, y))
        if outlines and outlines[i]:
            draw.rectangle([x - 3, y - 3, x + size[0] + 2, y + size[1] + 2], outline=outlines[i], width=3)
        draw.text((x + size[0] // 2, y + size[1] + 4), label, fill="black", font=_font(15), anchor="ma")
    if bar:
        picture.paste(colour_bar(height - TITLE - PAD), (width - BAR, TITLE))
    return picture


def word_panels(image: Image.Image, text: str, sentence: torch.Tensor, words: Sequence[str],
                word_maps: Sequence[torch.Tensor]) -> Image.Image:
    """The figure of ALBEF's paper: the image, the sentence's heat map and one panel per word, with
    the sentence as title and a colour bar."""
    plain = image.convert("RGB").resize(panel_size(image), Image.BICUBIC)
    panels = [plain, overlay(image, sentence)] + [overlay(image, m) for m in word_maps]
    return labelled_grid(panels, ["image", "whole sentence", *words], text)


def slug(text: str, limit: int = 40) -> str:
    """A file-name part from a text: lower-case words joined by '_'."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "text"


def save_png(picture: Image.Image, path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    picture.save(path, format="PNG")
    return path


# ---- heat maps of a model ----------------------------------------------------------------------

def heat_maps(model, tokenizer, image: Image.Image, text: str, mode: str = "itm", max_tokens: int = 30,
              layer: Optional[int] = None) -> tuple[torch.Tensor, list[str], list[torch.Tensor]]:
    """(the sentence's Grad-CAM map [g, g], the words of the cleaned text, a map per word: the mean
    of its word pieces' maps) of a model with an ITM head. ITC mode has one map per image-text
    pair: no words then. ValueError for a text that is empty once cleaned, or a bad mode / layer."""
    from .data.transforms import EvalTransform
    from .eval.inputs import model_device
    from .models.gradcam import check_gradcam, default_gradcam_layer, itc_maps, itm_token_maps, sentence_maps
    from .tokenizer import clean_caption, tokenize

    cleaned = clean_caption(text)
    if not cleaned:
        raise ValueError(f"text {text!r} is empty once cleaned (lower case, no punctuation)")
    layer = default_gradcam_layer(model.cfg, mode) if layer is None else layer
    check_gradcam(model.cfg, mode, layer)
    device = model_device(model)
    ids, mask = tokenize(tokenizer, [cleaned], max_tokens)
    pixels = EvalTransform(model.cfg.vision.img_size)(image.convert("RGB"))[None].to(device)
    was_training = model.training
    model.eval()
    try:
        if mode == "itc":
            return itc_maps(model, pixels, ids.to(device), mask.to(device), layer)[0].cpu(), [], []
        maps, _ = itm_token_maps(model, pixels, ids.to(device), mask.to(device), layer)
    finally:
        model.train(was_training)
    maps = maps.cpu()
    pieces = tokenizer(cleaned, add_special_tokens=False, truncation=True, max_length=max_tokens - 1,
                       return_offsets_mapping=True)
    positions: dict[int, list[int]] = {}
    for position, word in enumerate(pieces.word_ids(), start=1):        # position 0 is [CLS]
        positions.setdefault(word, []).append(position)
    offsets = pieces["offset_mapping"]
    words = [cleaned[offsets[p[0] - 1][0]:offsets[p[-1] - 1][1]] for p in positions.values()]
    return sentence_maps(maps, mask)[0], words, [maps[0, p].mean(0) for p in positions.values()]


def write_heat_pictures(model, tokenizer, image: Image.Image, texts: Sequence[str], output_dir: str,
                        name: str, mode: str = "itm", max_tokens: int = 30, layer: Optional[int] = None) -> list[str]:
    """For each text, in output_dir: ITM mode `<name>__<text>.png` (the sentence's heat map over the
    image) and `<name>__<text>_words.png` (one panel per word); ITC mode `<name>__<text>_itc.png`
    (the sentence's map). Returns the paths."""
    paths = []
    for text in texts:
        sentence, words, maps = heat_maps(model, tokenizer, image, text, mode, max_tokens, layer)
        stem = os.path.join(output_dir, f"{name}__{slug(text)}")
        whole = labelled_grid([overlay(image, sentence)], [f"whole sentence ({mode.upper()})"], text)
        paths.append(save_png(whole, f"{stem}.png" if mode == "itm" else f"{stem}_itc.png"))
        if mode == "itm":
            paths.append(save_png(word_panels(image, text, sentence, words, maps), f"{stem}_words.png"))
    return paths


def write_demo_pictures(model, cfg, output_dir: str, count: int = 2) -> list[str]:
    """The built-in demo's pictures: the word heat maps of the first `count` held-out shapes images
    with their captions, in `<output_dir>/pictures`. Call on every rank after training (a DeepSpeed
    engine or a module; the corpus is read from `<output_dir>/synthetic_data`, where the trainer
    writes it, and under ZeRO-3 the weights are gathered on every rank); rank 0 draws, prints and
    returns the paths, the other ranks return []."""
    from . import distributed as dist
    from .data import shared_synthetic_corpus
    from .data.samples import decode_image
    from .engine.zero import inference_model
    from .eval.retrieval import read_shard_set
    from .tasks import get_task
    from .tokenizer import build_tokenizer

    corpora = shared_synthetic_corpus(os.path.join(output_dir, "synthetic_data"), cfg.data.synthetic)["heldout"]
    model = inference_model(model, get_task(cfg))
    if dist.rank() != 0:
        return []
    data = read_shard_set(corpora, cfg.data.max_words)
    tokenizer = build_tokenizer(cfg.model.text.tokenizer)
    folder = os.path.join(output_dir, "pictures")
    paths = []
    for i in range(min(count, len(data.images))):
        paths += write_heat_pictures(model, tokenizer, decode_image(data.images[i]), data.captions[i][:1],
                                     folder, f"heldout_{i}", max_tokens=cfg.data.max_tokens)
    print("Grad-CAM pictures of held-out images: " + ", ".join(paths), flush=True)
    return paths
