"""ALBEF for visual question answering: the image encoder, the question encoder (ALBEF's text and
fusion layers: the question is encoded with the image fused in) and an answer decoder (BERT layers
with causal self-attention and cross-attention to the question states, and an LM head).

Plain PyTorch, as models/albef.py: no momentum copies and no losses (albef_ds.tasks.vqa trains it).
The inference API: question states, the decoder's logits at an answer's predicted positions, the
log-likelihood of answers, and ALBEF's ranking of an answer list.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, TextConfig
from .bert import BertTextFusion, load_hf_bert
from .vit import build_vit


def decoder_config(text: TextConfig) -> TextConfig:
    """The answer decoder: as many layers as the fusion encoder (ALBEF's recipe starts them from the
    fusion layers), every one with cross-attention; no pretrained BERT of its own."""
    return dataclasses.replace(text, layers=text.layers - text.fusion_start, fusion_start=0, pretrained=None)


def question_encoder(text: TextConfig, image_width: int) -> BertTextFusion:
    """ALBEF's text and fusion layers, without the MLM head (as the released VQA models)."""
    return BertTextFusion(text, image_width=image_width, mlm_head=False)


def build_decoder(text: TextConfig) -> BertTextFusion:
    return BertTextFusion(decoder_config(text), image_width=text.hidden)


def encode_question(visual_encoder: nn.Module, text_encoder: BertTextFusion, images: torch.Tensor,
                    input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The question encoded with the image fused in [B, L, H]: the text layers on the question,
    then the fusion layers attending to all image tokens."""
    text = text_encoder.encode_text(input_ids, attention_mask)
    return text_encoder.fuse(text, attention_mask, [visual_encoder(images)])


def predicted_positions(answer_mask: torch.Tensor) -> torch.Tensor:
    """Flat indices into [N, La - 1] of the positions that predict an answer token: position p
    predicts token p + 1, so each answer's words and its [SEP] (found once: a boolean-mask index
    is a host sync each time)."""
    return answer_mask[:, 1:].bool().flatten().nonzero().squeeze(1)


def decoder_logits(text_decoder: BertTextFusion, states: torch.Tensor, states_mask: torch.Tensor,
                   answer_ids: torch.Tensor, answer_mask: torch.Tensor, rows: torch.Tensor,
                   positions: torch.Tensor) -> torch.Tensor:
    """The decoder's vocabulary logits [T, V] at `positions` (predicted_positions): answer i
    (`[CLS] answer [SEP]` and padding) reads the question states of row rows[i]; only those
    positions go through the LM head."""
    hidden = text_decoder.decode(answer_ids, answer_mask, states, states_mask, rows)
    return text_decoder.cls(hidden[:, :-1].flatten(0, 1).index_select(0, positions))


def predicted_tokens(answer_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets [T], answer [T]): the token each position predicts and the answer it belongs to."""
    targets = answer_ids[:, 1:].flatten().index_select(0, positions)
    return targets, torch.div(positions, answer_ids.shape[1] - 1, rounding_mode="floor")


class VQAModel(nn.Module):
    """visual_encoder, text_encoder (the question encoder) and text_decoder, named as ALBEF's VQA
    model (albef_ds.checkpoint.released maps the released file's BERT naming)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        v, t = cfg.vision, cfg.text
        self.visual_encoder = build_vit(v)
        self.text_encoder = question_encoder(t, v.width)
        if t.pretrained:
            load_hf_bert(self.text_encoder, t.pretrained)
        self.text_decoder = build_decoder(t)

    def question_states(self, images: torch.Tensor, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor:
        """The question encoded with the image fused in [B, L, H] (encode_question)."""
        return encode_question(self.visual_encoder, self.text_encoder, images, input_ids, attention_mask)

    def answer_logits(self, states: torch.Tensor, states_mask: torch.Tensor, answer_ids: torch.Tensor,
                      answer_mask: torch.Tensor, rows: torch.Tensor):
        """Where the decoder predicts a token of an answer: (logits [T, V], targets [T], answer [T]).
        answer_ids [N, La]: `[CLS] answer [SEP]` and padding; answer i reads the question states
        of row rows[i] (states [B, Lq, H], states_mask [B, Lq])."""
        positions = predicted_positions(answer_mask)
        logits = decoder_logits(self.text_decoder, states, states_mask, answer_ids, answer_mask, rows, positions)
        return (logits, *predicted_tokens(answer_ids, positions))

    def answer_log_likelihood(self, states: torch.Tensor, states_mask: torch.Tensor, answer_ids: torch.Tensor,
                              answer_mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """log p(answer words, [SEP] | [CLS], question) of each answer [N] (see answer_logits)."""
        logits, targets, answer = self.answer_logits(states, states_mask, answer_ids, answer_mask, rows)
        token = F.log_softmax(logits.float(), -1).gather(1, targets[:, None]).squeeze(1)
        return torch.zeros(answer_ids.shape[0], device=token.device).index_add_(0, answer, token)

    @torch.no_grad()
    def rank_answers(self, states: torch.Tensor, states_mask: torch.Tensor, answer_ids: torch.Tensor,
                     answer_mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ALBEF's answer ranking for each question (states [B, Lq, H]) over an answer list
        (answer_ids [A, La], each `[CLS] answer [SEP]`).

        The decoder reads [CLS] once per question; the k answers whose first token is likeliest
        are kept (only those go through the whole decoder) and scored by log p(first token) +
        log p(whole answer): ALBEF's score, which counts the first token twice. Returns
        (answer indices [B, k'], their softmax over the k' candidates), best first;
        k' = min(k, A)."""
        b, device = states.shape[0], states.device
        start = answer_ids[:1, :1].expand(b, 1)
        first = self.text_decoder.decode(start, torch.ones_like(start), states, states_mask)[:, 0]
        first_probs = F.softmax(self.text_decoder.cls(first).float(), -1).index_select(1, answer_ids[:, 1])
        k = min(k, answer_ids.shape[0])
        top_probs, top = first_probs.topk(k, dim=1)                  # [B, k]
        picked = top.flatten()
        ids, mask = answer_ids.index_select(0, picked), answer_mask.index_select(0, picked)
        longest = int(mask.sum(1).max())                             # the list is padded to its longest
        rows = torch.arange(b, device=device).repeat_interleave(k)
        log_likelihood = self.answer_log_likelihood(states, states_mask, ids[:, :longest], mask[:, :longest], rows)
        scores = top_probs.log() + log_likelihood.view(b, k)
        order = scores.argsort(dim=1, descending=True, stable=True)
        return top.gather(1, order), F.softmax(scores, -1).gather(1, order)
