"""A training model's state-dict layout, and fitting a state dict to it.

One layout serves every task: it is read off the task's training model (built on the meta device),
so the names, shapes, tied copies, momentum copies and buffers are the model's own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from ..config import Config, ModelConfig
from ..fileio import ConversionError
from ..models.vit import resize_pos_embed
from ..tasks import get_task
from ..tasks.momentum import NO_IMAGE_ID, momentum_parameter_pairs

# Heads that fine-tuned releases drop: missing from a file, they keep the model's initialisation.
OPTIONAL_HEADS = ("cls.",)
TEXT_ENCODERS = ("text_encoder.", "text_encoder_m.")


@dataclass
class Layout:
    """Names and shapes of an ALBEF's state dict, and which entries are what."""
    shapes: dict                 # every state-dict key -> torch.Size
    dtypes: dict                 # every state-dict key -> dtype
    aliases: dict                # tied key -> the (earlier) key whose tensor it shares
    momentum_names: list         # momentum parameters, in momentum_parameter_pairs order
    momentum_prefixes: dict      # "visual_encoder_m." -> "visual_encoder." ...
    buffers: list                # queue state: image_queue, text_queue, idx_queue, queue_ptr

    @property
    def keys(self) -> list:
        """The keys that hold a tensor of their own (tied copies left out)."""
        return [k for k in self.shapes if k not in self.aliases]

    def is_momentum(self, key: str) -> bool:
        return key.startswith(tuple(self.momentum_prefixes))

    def online_name(self, key: str) -> str:
        for momentum, online in self.momentum_prefixes.items():
            if key.startswith(momentum):
                return online + key[len(momentum):]
        return key

    def is_optional_head(self, key: str) -> bool:
        key = self.online_name(key)
        return any(key.startswith(t + h) for t in TEXT_ENCODERS for h in OPTIONAL_HEADS)


def layout_of(model: nn.Module) -> Layout:
    """The layout of a training model, or of an inference model (no momentum copies)."""
    state = model.state_dict(keep_vars=True)
    first, aliases = {}, {}
    for key, tensor in state.items():
        if id(tensor) in first:
            aliases[key] = first[id(tensor)]
        else:
            first[id(tensor)] = key
    names = {id(p): n for n, p in model.named_parameters()}
    children = {id(m): n for n, m in model.named_children()}
    training = hasattr(model, "momentum_pairs")
    prefixes = {children[id(m)] + ".": children[id(o)] + "." for o, m in (model.momentum_pairs() if training else [])
                if id(m) in children}
    momentum = momentum_parameter_pairs(model) if training else []
    return Layout(shapes={k: v.shape for k, v in state.items()}, dtypes={k: v.dtype for k, v in state.items()},
                  aliases=aliases, momentum_names=[names[id(pm)] for _, pm in momentum],
                  momentum_prefixes=prefixes, buffers=[n for n, _ in model.named_buffers()])


def model_layout(cfg: Union[Config, ModelConfig]) -> Layout:
    """The layout of the training model that `cfg` describes (its task's; a ModelConfig alone:
    pretraining), from a model built on the meta device (no memory, no initialisation, well under
    a second for the base model)."""
    cfg = cfg if isinstance(cfg, Config) else Config(model=cfg)
    with torch.device("meta"):
        return layout_of(get_task(cfg).build_model(cfg.model.architecture_only()))


@dataclass
class Report:
    """What a conversion or a load did not take over one to one."""
    missing: list = field(default_factory=list)       # model keys the checkpoint lacks
    unexpected: list = field(default_factory=list)    # checkpoint keys the model lacks (dropped)
    notes: list = field(default_factory=list)         # resized, filled, skipped ...

    def lines(self) -> list:
        out = list(self.notes)
        if self.missing:
            out.append(f"{len(self.missing)} keys absent from the checkpoint (a model loading it keeps "
                       f"its own): {some(self.missing)}")
        if self.unexpected:
            out.append(f"{len(self.unexpected)} keys of the checkpoint unknown to the model, ignored: "
                       + some(self.unexpected))
        return out

    def then(self, later: "Report") -> "Report":
        """This report (of reading) followed by a later one (of loading, which recomputes missing)."""
        return Report(missing=later.missing, unexpected=self.unexpected + later.unexpected,
                      notes=self.notes + later.notes)


def some(keys, n: int = 6) -> str:
    """The first `n` of `keys`, and how many more: for messages that name what is missing."""
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n})" if len(keys) > n else "")


def conform(state: dict, cfg: Config, source: str, layout: Optional[Layout] = None,
            fresh: tuple[str, ...] = ()) -> tuple[dict, Report]:
    """`state` (our key names) made to fit the training model of `cfg`.

    Position embeddings are resized to the configured resolution; queues of another size are
    dropped (they start afresh); a missing `idx_queue` is filled with -100 ("no image id", what a
    pretraining release implies); tied copies are folded into the key they share. Any other
    shape difference is an error naming the key. Keys the model lacks are dropped and reported;
    keys it has that the state lacks are an error, except momentum weights, buffers, the optional
    heads of fine-tuned releases and keys starting with a `fresh` prefix (a task's new heads)."""
    layout = layout or model_layout(cfg)
    report = Report()
    state = dict(state)
    vision = cfg.model.vision
    for alias, target in layout.aliases.items():
        if alias in state:
            value = state.pop(alias)
            if target not in state:
                state[target] = value
            elif value.shape != state[target].shape or not torch.equal(value, state[target]):
                report.notes.append(f"{alias} differs from {target}, which the model ties it to: using {target}")
    report.unexpected = [k for k in state if k not in layout.shapes]
    for key in report.unexpected:
        del state[key]
    grid = (vision.img_size // vision.patch_size) ** 2 + 1
    for key in [k for k in state if k.endswith("pos_embed")]:
        value, want = state[key], layout.shapes[key]
        if value.shape != want and value.dim() == 3 and value.shape[-1] == want[-1]:
            state[key] = resize_pos_embed(value.float(), vision.img_size, vision.patch_size).to(value.dtype)
            report.notes.append(f"{key} resized from {value.shape[1]} to {grid} positions "
                                f"(img_size {vision.img_size})")
    wrong_queues = [k for k in layout.buffers if k in state and state[k].shape != layout.shapes[k]]
    if wrong_queues:
        report.notes.append(f"queues of another size ({tuple(state[wrong_queues[0]].shape)}, the model has "
                            f"{tuple(layout.shapes[wrong_queues[0]])}) dropped: they start afresh")
        for key in layout.buffers:
            state.pop(key, None)
    wrong = [(k, tuple(v.shape), tuple(layout.shapes[k])) for k, v in state.items() if v.shape != layout.shapes[k]]
    if wrong:
        raise ConversionError(f"{source}: shapes differ from the model's config: "
                              + "; ".join(f"{k} is {a} in the checkpoint, {b} in the model" for k, a, b in wrong[:5])
                              + (f" (+{len(wrong) - 5} more)" if len(wrong) > 5 else ""))
    if "idx_queue" in layout.shapes and "idx_queue" not in state and "image_queue" in state:
        state["idx_queue"] = torch.full(layout.shapes["idx_queue"], NO_IMAGE_ID, dtype=layout.dtypes["idx_queue"])
    for key, value in state.items():
        # a temp of dtype long, say, would load silently rounded; the checkpoint must agree in kind
        if value.is_floating_point() != layout.dtypes[key].is_floating_point:
            raise ConversionError(f"{source}: {key} has dtype {value.dtype}, the model {layout.dtypes[key]}")
    report.missing = [k for k in layout.keys if k not in state]
    core = [k for k in report.missing
            if not (layout.is_momentum(k) or k in layout.buffers or layout.is_optional_head(k)
                    or k.startswith(fresh))]
    if core:
        raise ConversionError(f"{source} lacks {len(core)} weights of the model: {some(core)}")
    return state, report


def with_aliases(state: dict, layout: Layout) -> dict:
    """`state` plus every tied copy, as the model's own state_dict() has them."""
    out = {}
    for key in layout.shapes:
        source = layout.aliases.get(key, key)
        if source in state:
            out[key] = state[source]
    out.update({k: v for k, v in state.items() if k not in out})
    return out
