"""BERT text encoder and fusion encoder for ALBEF, in plain PyTorch.

One stack of BERT layers: layers [0, fusion_start) encode text alone; layers [fusion_start, layers)
add cross-attention from the text states (queries) to the image tokens (keys/values). For a text
about two images (NLVR2) the fusion layers are doubled, as in ALBEF's NLVR model: each pretrained
fusion layer becomes a pair, the first attending image 0 and the second image 1, the pair's
cross-attention keys and values shared (`images_per_text=2`, double_fusion_layers). Module names
follow transformers' BertForMaskedLM (`bert.embeddings...`, `bert.encoder.layer.N.attention.self.query`,
`crossattention`, `cls.predictions...`), so pretrained BERT weights and released ALBEF checkpoints
load by name. Attention runs through `F.scaled_dot_product_attention`, which picks the fused flash /
memory-efficient kernels on GPU.
"""
from __future__ import annotations

import os
import re
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import TextConfig
from ..fileio import hub_cache_only


class QKV(nn.Module):
    def __init__(self, hidden: int, kv_width: int):
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)


class ResidualOutput(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual), BERT's post-norm output block."""

    def __init__(self, width_in: int, hidden: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(width_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, kv_width: int):
        super().__init__()
        self.heads = cfg.heads
        self.dropout = cfg.attention_dropout
        self.self = QKV(cfg.hidden, kv_width)
        self.output = ResidualOutput(cfg.hidden, cfg.hidden, cfg.layer_norm_eps, cfg.hidden_dropout)
        # Set (by albef_ds.models.gradcam) only while a heat map is asked for: attend() then
        # computes the attention probabilities explicitly and hands them to this callable, since
        # the fused kernels return none. None: the fused path, which training keeps.
        self.probs_hook = None

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def key_value(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split_heads(self.self.key(source)), self.split_heads(self.self.value(source))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: Optional[torch.Tensor]) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        if self.probs_hook is not None:
            return self.attend_explicitly(q, k, v, mask, p)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return out.transpose(1, 2).flatten(2)

    def attend_explicitly(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mask: Optional[torch.Tensor], p: float) -> torch.Tensor:
        """attend() with the probabilities [B, heads, queries, keys] formed, passed to probs_hook
        before dropout (where ALBEF's Grad-CAM takes them and their gradient) and then used."""
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(-1)
        self.probs_hook(probs)
        out = F.dropout(probs, p, training=p > 0) @ v
        return out.transpose(1, 2).flatten(2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Self-attention; `mask` is boolean [B, 1, 1, L], True where a key may be attended."""
        k, v = self.key_value(x)
        return self.output(self.attend(self.split_heads(self.self.query(x)), k, v, mask), x)

    def cross(self, x: torch.Tensor, images: Sequence[torch.Tensor],
              segments: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Cross-attention of text rows to image tokens.

        `segments` splits the text rows into consecutive runs (n_rows, group): row i of a run
        attends to row i of `images[group]`. Each image group's keys and values are projected
        once and shared by every run that uses it (MLM and the ITM positives and text negatives
        all look at the same images), and no run copies another group's keys and values.
        """
        q = self.split_heads(self.self.query(x))
        kv = [self.key_value(img) for img in images]
        outs, start = [], 0
        for n, group in segments:
            k, v = kv[group]
            outs.append(self.attend(q[start:start + n], k, v, None))
            start += n
        return self.output(torch.cat(outs) if len(outs) > 1 else outs[0], x)

    def read(self, x: torch.Tensor, states: torch.Tensor, states_mask: torch.Tensor,
             rows: Optional[torch.Tensor]) -> torch.Tensor:
        """Cross-attention of row i of `x` to the encoder states of row rows[i] (None: row i),
        keys where states_mask [S, L] is set. The keys and values are projected once per row of
        `states`, however many rows of `x` read it (a question's answers, VQA)."""
        q = self.split_heads(self.self.query(x))
        k, v = self.key_value(states)
        mask = states_mask.bool()[:, None, None, :]
        if rows is not None:
            k, v, mask = k.index_select(0, rows), v.index_select(0, rows), mask.index_select(0, rows)
        return self.output(self.attend(q, k, v, mask), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: TextConfig, image_width: Optional[int]):
        super().__init__()
        self.attention = Attention(cfg, cfg.hidden)
        if image_width is not None:
            self.crossattention = Attention(cfg, image_width)
        self.intermediate = Intermediate(cfg)
        self.output = ResidualOutput(cfg.intermediate, cfg.hidden, cfg.layer_norm_eps, cfg.hidden_dropout)

    def forward(self, x, mask, images=None, segments=None, memory=None):
        """`images` and `segments`: the fusion layers' cross-attention (Attention.cross); `memory`:
        a decoder's, (states, states_mask, rows) (Attention.read)."""
        x = self.attention(x, mask)
        if images is not None:
            x = self.crossattention.cross(x, images, segments)
        elif memory is not None:
            x = self.crossattention.read(x, *memory)
        return self.output(self.intermediate(x), x)


class Embeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position, cfg.hidden)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # ALBEF feeds one segment, so every token has token type 0.
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings.weight[0])
        return self.dropout(self.LayerNorm(x))


class Encoder(nn.Module):
    def __init__(self, cfg: TextConfig, image_width: int, images_per_text: int = 1):
        super().__init__()
        layers = stack_depth(cfg, images_per_text)
        self.layer = nn.ModuleList(
            BertLayer(cfg, image_width if i >= cfg.fusion_start else None) for i in range(layers))
        # A pair of layers attending two images shares the cross-attention key and value
        # projections (ALBEF's share_cross_attention: the first layer takes the second's), so the
        # images are projected alike and the pair adds only its queries, outputs and FFN.
        for first in range(cfg.fusion_start, layers, images_per_text):
            for other in range(first + 1, first + images_per_text):
                shared, attention = self.layer[other].crossattention.self, self.layer[first].crossattention.self
                attention.key, attention.value = shared.key, shared.value


def stack_depth(cfg: TextConfig, images_per_text: int = 1) -> int:
    """Layers of the stack: the text layers, then each of the config's fusion layers once per image."""
    return cfg.fusion_start + images_per_text * (cfg.layers - cfg.fusion_start)


class Bert(nn.Module):
    def __init__(self, cfg: TextConfig, image_width: int, images_per_text: int = 1):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg, image_width, images_per_text)


class MLMTransform(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.hidden)
        self.LayerNorm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class MLMPredictions(nn.Module):
    def __init__(self, cfg: TextConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = MLMTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden, cfg.vocab_size)
        self.decoder.weight = word_embeddings.weight    # tied to the input embeddings
        self.bias = self.decoder.bias                    # BERT's name for the output bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


class MLMHead(nn.Module):
    def __init__(self, cfg: TextConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = MLMPredictions(cfg, word_embeddings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictions(x)


class BertTextFusion(nn.Module):
    """The text encoder (layers below fusion_start), the fusion encoder (the rest) and the MLM head.
    `images_per_text=2`: every fusion layer doubled, fusing a text with two images (see fuse).
    Built with fusion_start 0 (every layer cross-attends), it is a decoder: `decode`, and the
    head as its LM head (transformers' BertLMHeadModel)."""

    def __init__(self, cfg: TextConfig, image_width: int, images_per_text: int = 1, mlm_head: bool = True):
        super().__init__()
        self.cfg = cfg
        self.images_per_text = images_per_text
        self.bert = Bert(cfg, image_width, images_per_text)
        if mlm_head:        # without: an encoder whose MLM head a task never uses (VQA's questions)
            self.cls = MLMHead(cfg, self.bert.embeddings.word_embeddings)
        self.grad_checkpointing = cfg.grad_checkpointing
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def _run(self, layers, x, *args):
        for layer in layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, *args, use_reentrant=False)
            else:
                x = layer(x, *args)
        return x

    @staticmethod
    def key_mask(attention_mask: torch.Tensor) -> torch.Tensor:
        return attention_mask.bool()[:, None, None, :]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text-only states [B, L, H] from the text layers."""
        x = self.bert.embeddings(input_ids)
        return self._run(self.bert.encoder.layer[:self.cfg.fusion_start], x, self.key_mask(attention_mask))

    def fuse(self, text_states: torch.Tensor, attention_mask: torch.Tensor,
             images: Sequence[torch.Tensor], segments: Optional[Sequence[tuple[int, int]]] = None) -> torch.Tensor:
        """Multimodal states [N, L, H] from the fusion layers (see Attention.cross for `segments`).
        With images_per_text=2, `images` is [image 0 tokens, image 1 tokens] of every text (N rows
        each) and fusion layer j attends images[j % 2]."""
        layers = self.bert.encoder.layer[self.cfg.fusion_start:]
        if self.images_per_text == 1:
            if segments is None:
                segments = [(text_states.shape[0], 0)]
            return self._run(layers, text_states, self.key_mask(attention_mask), list(images), list(segments))
        if segments is not None or len(images) != self.images_per_text:
            raise ValueError(f"a text fused with {self.images_per_text} images takes one tensor of image "
                             f"tokens per image ({len(images)} given) and no segments")
        x, mask, rows = text_states, self.key_mask(attention_mask), [(text_states.shape[0], 0)]
        for j, layer in enumerate(layers):
            x = self._run([layer], x, mask, [images[j % self.images_per_text]], rows)
        return x

    def mlm_logits(self, states: torch.Tensor) -> torch.Tensor:
        return self.cls(states)

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, states: torch.Tensor,
               states_mask: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Left-to-right states [N, L, H] through every layer: token j attends to tokens <= j
        (padding excluded) and cross-attends to the encoder states of row rows[i] (see
        Attention.read)."""
        x = self.bert.embeddings(input_ids)
        n = input_ids.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=input_ids.device).tril()
        mask = causal & self.key_mask(attention_mask)
        return self._run(self.bert.encoder.layer, x, mask, None, None, (states, states_mask, rows))


_LAYER_KEY = re.compile(r"^(.*\bencoder\.layer\.)(\d+)(\..*)$")


def double_fusion_layers(state: dict, cfg: TextConfig, images_per_text: int = 2) -> dict:
    """A state dict of single-image text encoders (any prefix: `text_encoder.bert.encoder.layer.N.`,
    `text_encoder_m...`) for encoders whose fusion layers are repeated per image: fusion layer n
    initialises layers fs + k(n - fs) ... fs + k(n - fs) + k - 1 (k images), all its weights
    copied (ALBEF's Pretrain_nlvr.py: 6 -> 6, 7; 7 -> 8, 9; ...); text layers and every other key
    unchanged. A state that already holds the repeated layers passes unchanged."""
    indices = [int(m.group(2)) for m in map(_LAYER_KEY.match, state) if m]
    if any(i >= cfg.layers for i in indices):
        return dict(state)
    out = {}
    for key, value in state.items():
        match = _LAYER_KEY.match(key)
        n = int(match.group(2)) if match else -1
        if n < cfg.fusion_start:
            out[key] = value
            continue
        first = cfg.fusion_start + images_per_text * (n - cfg.fusion_start)
        for layer in range(first, first + images_per_text):
            out[f"{match.group(1)}{layer}{match.group(3)}"] = value
    return out


def load_hf_bert(module: BertTextFusion, name_or_path: str) -> list[str]:
    """Loads transformers' BERT weights (hub name or local folder) by name (a stack with doubled
    fusion layers: each BERT layer from fusion_start on into its pair); returns the keys that the
    checkpoint did not provide (the cross-attention layers, which ALBEF initialises afresh)."""
    from transformers import BertConfig, BertForMaskedLM

    if not os.path.isdir(name_or_path):
        hub_cache_only()          # a hub name: from the local cache alone where the hub cannot be reached
    hf_cfg = BertConfig.from_pretrained(name_or_path)
    cfg = module.cfg
    expected = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden, "num_hidden_layers": cfg.layers,
                "num_attention_heads": cfg.heads, "intermediate_size": cfg.intermediate}
    wrong = {k: (getattr(hf_cfg, k), v) for k, v in expected.items() if getattr(hf_cfg, k) != v}
    if wrong:
        raise ValueError(f"BERT weights at '{name_or_path}' do not match model.text: "
                         + ", ".join(f"{k} is {got}, config says {want}" for k, (got, want) in wrong.items()))
    state = BertForMaskedLM.from_pretrained(name_or_path).state_dict()
    state = {k: v for k, v in state.items()
             if not k.startswith("bert.pooler") and (hasattr(module, "cls") or not k.startswith("cls."))}
    if module.images_per_text > 1:
        state = double_fusion_layers(state, cfg, module.images_per_text)
    result = module.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"BERT weights at '{name_or_path}' have keys this model lacks: {result.unexpected_keys[:5]}")
    fresh = [k for k in result.missing_keys if ".crossattention." not in k]
    if fresh:
        raise ValueError(f"BERT weights at '{name_or_path}' lack keys: {fresh[:5]}")
    return result.missing_keys
