"""Pictures of what the model sees, drawn from what they are given: heat maps over images (the
sentence's map and one panel per word, as ALBEF's figures show them; a VQA answer's map with the
model's top answers; raw attention per head; a grounding map with its boxes; a classifier's map per
image; the maps come from albef_ds.eval.heat_maps) and labelled grids of images (retrieval
results). Drawn with PIL alone; this module reads no data set and runs no model.

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
HEAD_COLUMNS = 7            # panels per row of a picture per head (the tiny model's 4 heads in one row)
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
    panels = [_plain(image), overlay(image, sentence)] + [overlay(image, m) for m in word_maps]
    return labelled_grid(panels, ["image", "whole sentence", *words], text)


def _plain(image: Image.Image) -> Image.Image:
    return image.convert("RGB").resize(panel_size(image), Image.BICUBIC)


def text_panel(size: tuple[int, int], lines: Sequence[str], marked: int = -1) -> Image.Image:
    """A white panel of `size` holding one line of text per row; row `marked` in red."""
    panel = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(panel)
    for i, line in enumerate(lines):
        draw.text((8, 8 + 22 * i), line, fill="red" if i == marked else "black", font=_font(15))
    return panel


def answer_panels(image: Image.Image, question: str, answer: str, ranked: Sequence[tuple[str, float]],
                  sentence: torch.Tensor, words: Sequence[str], word_maps: Sequence[torch.Tensor]) -> Image.Image:
    """The VQA picture: the image, the model's top answers with their probabilities (the drawn
    answer in red), the whole question's map of the answer and one panel per question word; the
    question and answer as title, a colour bar."""
    marked = next((i for i, (a, _) in enumerate(ranked) if a == answer), -1)
    lines = [f"{i + 1}. {a}  {p:.3f}" for i, (a, p) in enumerate(ranked)]
    panels = [_plain(image), text_panel(panel_size(image), lines, marked), overlay(image, sentence)]
    panels += [overlay(image, m) for m in word_maps]
    return labelled_grid(panels, ["image", "top answers (p)", f"whole question: {answer}", *words],
                         f"Q: {question}   A: {answer}")


def attention_panels(image: Image.Image, title: str, tokens: Sequence[str], maps: torch.Tensor) -> Image.Image:
    """Raw attention: the image and one panel per token (maps [tokens, g, g]), labelled, with a
    colour bar."""
    return labelled_grid([_plain(image)] + [overlay(image, m) for m in maps], ["image", *tokens], title)


def head_panels(image: Image.Image, title: str, maps: torch.Tensor) -> Image.Image:
    """One token's raw attention per head, as DINO draws its heads: the image and a panel per
    head (maps [heads, g, g])."""
    return labelled_grid([_plain(image)] + [overlay(image, m) for m in maps],
                         ["image", *(f"head {h}" for h in range(len(maps)))], title, columns=HEAD_COLUMNS)


def _boxes(panel: Image.Image, image_size: tuple[int, int], boxes: Sequence[tuple[Sequence[float], str]]) -> Image.Image:
    """The panel with [x, y, w, h] boxes in image pixels drawn in their colours."""
    scale = panel.width / image_size[0]
    draw = ImageDraw.Draw(panel)
    for (x, y, w, h), colour in boxes:
        draw.rectangle([x * scale, y * scale, (x + w) * scale - 1, (y + h) * scale - 1], outline=colour, width=2)
    return panel


def grounding_panels(image: Image.Image, text: str, heat: torch.Tensor, picked: Sequence[float],
                     truth: Sequence[float], iou: float) -> Image.Image:
    """A grounding picture: the image with the referred box (green) and the expression's map with
    the proposal it picked (red) and the referred box."""
    panels = [_boxes(_plain(image), image.size, [(truth, "lime")]),
              _boxes(overlay(image, heat), image.size, [(truth, "lime"), (picked, "red")])]
    return labelled_grid(panels, ["referred box (green)", f"picked proposal (red), IoU {iou:.2f}"], text)


def class_panels(images: Sequence[Image.Image], title: str, heats: Sequence[torch.Tensor]) -> Image.Image:
    """A classifier's picture: each image beside its map."""
    panels, labels = [], []
    for j, (image, heat) in enumerate(zip(images, heats)):
        name = f"image {j}" if len(images) > 1 else "image"
        panels += [_plain(image), overlay(image, heat)]
        labels += [name, f"{name}: map"]
    return labelled_grid(panels, labels, title)


def slug(text: str, limit: int = 40) -> str:
    """A file-name part from a text: lower-case words joined by '_'."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "text"


def save_png(picture: Image.Image, path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    picture.save(path, format="PNG")
    return path


def heat_pictures(image: Image.Image, text: str, maps) -> dict[str, Image.Image]:
    """The pictures of one text's heat maps over an image (`maps`: albef_ds.eval.heat_maps.HeatMaps),
    by file-name suffix: ITM mode "" (the sentence's map) and "_words" (one panel per word); ITC
    mode "_itc" (the sentence's map: ITC has no words)."""
    whole = labelled_grid([overlay(image, maps.sentence)], [f"whole sentence ({maps.mode.upper()})"], text)
    if maps.mode != "itm":
        return {f"_{maps.mode}": whole}
    return {"": whole, "_words": word_panels(image, text, maps.sentence, maps.words, maps.word_maps)}
