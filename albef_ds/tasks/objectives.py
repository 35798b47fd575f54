"""ALBEF's objectives (pretraining, fine-tuning, VQA) as pure functions on tensors.

Nothing here knows about modules, ranks or queues: callers pass the (possibly all-gathered)
features and get losses back, so the same functions serve one process and a whole cluster.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

IGNORE = -100


def alpha_at(step: int, steps_per_epoch: int, alpha: float) -> float:
    """Distillation weight: ramped linearly from 0 to `alpha` over the first epoch."""
    return alpha * min(1.0, step / max(1, steps_per_epoch))


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum(targets * log_softmax(logits))."""
    return -(F.log_softmax(logits.float(), dim=-1) * targets).sum(-1).mean()


def itc(image_feat: torch.Tensor, text_feat: torch.Tensor,
        image_feat_m: torch.Tensor, text_feat_m: torch.Tensor,
        image_bank: torch.Tensor, text_bank: torch.Tensor,
        positives: torch.Tensor, temp: torch.Tensor, alpha: float):
    """Image-text contrastive loss with momentum distillation.

    image_feat, text_feat: online features of the local rows [b, d] (L2-normalised).
    image_feat_m, text_feat_m: momentum features of the same rows [b, d].
    image_bank, text_bank: momentum features to contrast against [K, d]: the global batch
        followed by the queue.
    positives: bool [b, K], the positive columns of each local row (the row's own column in the
        global batch, plus for retrieval every column with the same image id).
    Returns (loss, sim_i2t, sim_t2i), the similarities [b, K] for hard-negative mining.
    """
    sim_i2t = image_feat @ text_bank.t() / temp
    sim_t2i = text_feat @ image_bank.t() / temp
    with torch.no_grad():
        hard = positives.float() / positives.sum(1, keepdim=True)
        target_i2t = alpha * F.softmax((image_feat_m @ text_bank.t() / temp).float(), 1) + (1 - alpha) * hard
        target_t2i = alpha * F.softmax((text_feat_m @ image_bank.t() / temp).float(), 1) + (1 - alpha) * hard
    loss = (soft_cross_entropy(sim_i2t, target_i2t) + soft_cross_entropy(sim_t2i, target_t2i)) / 2
    return loss, sim_i2t, sim_t2i


def negative_weights(sim: torch.Tensor, positives: torch.Tensor):
    """Sampling weights for hard negatives: softmax(sim) with every positive at zero.

    Computed in fp32 (bf16 softmax underflows to all-zero rows, torch.multinomial's "invalid
    multinomial distribution"). A row with no usable negative (a global batch of one, or every
    item sharing the image id) gets uniform weights and valid=False, so the draw succeeds and the
    caller drops that negative from the loss. Returns (weights [b, N], valid [b]).
    """
    weights = F.softmax(torch.nan_to_num(sim.float(), nan=0.0), dim=1).masked_fill(positives, 0.0)
    valid = (~positives).any(1)
    # softmax can underflow to 0 for every negative while negatives exist: fall back to uniform
    # over the negatives, which is what softmax tends to as the similarities flatten.
    # (torch.where rather than boolean-mask assignment: no host sync on GPU)
    underflow = valid & (weights.sum(1) <= 0)
    weights = torch.where(underflow[:, None], (~positives).float(), weights)
    weights = torch.where(valid[:, None], weights, torch.ones_like(weights))
    return weights, valid


def sample_negatives(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One negative column per row, drawn in proportion to `weights` by inverting the row's CDF at
    the row's uniform number in [0, 1). Unlike torch.multinomial, row i's draw depends on row i
    alone, so a batch split over ranks draws what one process draws for the whole batch."""
    cdf = weights.cumsum(1)
    target = (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(1)
    index = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=weights.shape[1] - 1)
    # a uniform that rounds onto the total can land past the last non-zero weight
    landed_on_zero = weights.gather(1, index[:, None]).squeeze(1) <= 0
    return torch.where(landed_on_zero, weights.argmax(1), index)


def batch_uniforms(count: int, b: int, rows: tuple[int, int], generator: Optional[torch.Generator],
                   device: torch.device) -> torch.Tensor:
    """[count, b] uniform numbers in [0, 1) for this rank's rows [offset, offset + b) of a global
    batch of `total` rows, rows=(offset, total): drawn for the whole batch from `generator` (on its
    device) and sliced, so every split of a batch over ranks draws what one process draws."""
    offset, total = rows
    return torch.rand(count, total, generator=generator, device=generator.device if generator
                      else device)[:, offset:offset + b].to(device)


def itm(logits: torch.Tensor, valid: torch.Tensor, normalizer: Optional[torch.Tensor] = None):
    """Image-text matching loss on [positives (b) | negatives (2b)] rows of 2-way logits.

    valid: bool [2b], negatives to keep (see negative_weights). normalizer: what the summed loss
    is divided by (default: the rows kept here; a caller splitting a batch over ranks passes the
    global count / world size so that the ranks' mean equals the whole batch's). Returns (loss, accuracy).
    """
    b = logits.shape[0] // 3
    labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)]).to(logits.device)
    keep = torch.cat([torch.ones(b, dtype=torch.bool, device=logits.device), valid])
    per_row = F.cross_entropy(logits.float(), labels, reduction="none")
    loss = (per_row * keep).sum() / (keep.sum() if normalizer is None else normalizer)
    acc = ((logits.argmax(1) == labels) & keep).sum().float() / keep.sum()
    return loss, acc


def mlm_mask(input_ids: torch.Tensor, vocab_size: int, mask_token_id: int, pad_token_id: int,
             cls_token_id: int, probability: float = 0.15,
             generator: Optional[torch.Generator] = None, rows: Optional[tuple[int, int]] = None):
    """BERT masking: each token except PAD and CLS is chosen with `probability`; of the chosen,
    80% become [MASK], 10% a random token, 10% stay. Returns (masked_ids, labels) with labels
    IGNORE where nothing is predicted.

    rows=(offset, total): these rows are rows [offset, offset + b) of a batch of `total` rows split
    over ranks; the random numbers are drawn for the whole batch and sliced, so every split of a
    batch masks it as one process would.
    """
    b, length = input_ids.shape
    offset, total = rows or (0, b)

    def draw(fn, *args):
        return fn(*args, (total, length), generator=generator, device=generator.device if generator
                  else input_ids.device)[offset:offset + b].to(input_ids.device)

    chosen = (draw(torch.rand) < probability) & (input_ids != pad_token_id) & (input_ids != cls_token_id)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    kind = draw(torch.rand)
    random_ids = draw(torch.randint, vocab_size)
    masked = torch.where(chosen & (kind < 0.8), torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(chosen & (kind >= 0.8) & (kind < 0.9), random_ids, masked)
    return masked, labels


def distilled_token_loss(logits: torch.Tensor, targets: torch.Tensor, logits_m: Optional[torch.Tensor],
                         alpha: float) -> torch.Tensor:
    """Per token [M]: cross entropy of logits [M, V] with targets [M], and with momentum distillation
    (1 - alpha) * CE + alpha * soft-CE against softmax(logits_m)."""
    log_probs = F.log_softmax(logits.float(), -1)          # once, for both terms: [M, vocabulary]
    per_token = F.nll_loss(log_probs, targets, reduction="none")
    if logits_m is not None and alpha > 0:
        soft = -(log_probs * F.softmax(logits_m.float(), -1)).sum(-1)
        per_token = (1 - alpha) * per_token + alpha * soft
    return per_token


def mlm(logits: torch.Tensor, labels: torch.Tensor, logits_m: Optional[torch.Tensor], alpha: float,
        normalizer: Optional[torch.Tensor] = None):
    """Masked language modelling with momentum distillation, on the predicted positions only.

    logits, logits_m: [M, V] at the M masked positions; labels [M].
    loss = (1 - alpha) * CE(logits, labels) + alpha * soft-CE(logits, softmax(logits_m)), summed
    over positions and divided by `normalizer` (default M; see itm). Returns (loss, accuracy).
    With no masked token the loss is a graph-connected zero.
    """
    if labels.numel() == 0:
        zero = logits.sum() * 0.0
        return zero, zero.detach()
    per_token = distilled_token_loss(logits, labels, logits_m, alpha)
    loss = per_token.sum() / (labels.numel() if normalizer is None else normalizer)
    acc = (logits.argmax(-1) == labels).float().mean()
    return loss, acc


def answer_losses(logits: torch.Tensor, targets: torch.Tensor, answer: torch.Tensor, num_answers: int,
                  logits_m: Optional[torch.Tensor] = None, alpha: float = 0.0) -> torch.Tensor:
    """The decoder's loss of each answer [num_answers]: the next-token cross entropy summed over the
    answer's predicted tokens (its words and [SEP]); with momentum distillation each token's loss is
    (1 - alpha) * CE + alpha * soft-CE against softmax(logits_m).

    logits, logits_m: [T, V] at the T predicted tokens of all answers; targets [T]; answer [T], the
    answer each token belongs to."""
    per_token = distilled_token_loss(logits, targets, logits_m, alpha)
    return per_token.new_zeros(num_answers).index_add(0, answer, per_token)


def vqa_loss(per_answer: torch.Tensor, weights: torch.Tensor, num_questions: int) -> torch.Tensor:
    """ALBEF's VQA loss: each answer's loss weighted (the share of the annotators who gave it; 0.5
    for a Visual Genome answer), summed and divided by the number of questions."""
    return (weights.to(per_answer.dtype) * per_answer).sum() / num_questions


def classification(logits: torch.Tensor, labels: torch.Tensor, logits_m: Optional[torch.Tensor] = None,
                   alpha: float = 0.0):
    """Cross-entropy with momentum distillation (ALBEF's NLVR2 and SNLI-VE heads):
    (1 - alpha) * CE(logits, labels) + alpha * soft-CE(logits, softmax(logits_m)), means over
    rows (the soft targets are the momentum model's plain softmax, no temperature). Returns
    (loss, accuracy)."""
    loss = F.cross_entropy(logits.float(), labels)
    if logits_m is not None and alpha > 0:
        loss = (1 - alpha) * loss + alpha * soft_cross_entropy(logits, F.softmax(logits_m.float(), -1))
    acc = (logits.argmax(-1) == labels).float().mean()
    return loss, acc


# Text assignment's classes: the caption belongs to the image in slot 0, in slot 1, or to neither.
SLOT0, SLOT1, NEITHER = 0, 1, 2


def assign_text(sim: torch.Tensor, own: torch.Tensor, uniforms: torch.Tensor):
    """The image pairs of NLVR2's text-assignment pre-step, for rows of the global batch.

    sim: [b, N] similarities of each row's image to the N images of the global batch; own: [b] the
    column of each row's own image; uniforms: [4, b] numbers in [0, 1) per row. As ALBEF draws
    them: with probability 2/3 (uniforms[0] >= 1/3) the row's own image goes to slot 0 or slot 1
    (uniforms[1]: >= 0.5 slot 0), the other slot holding another image drawn by similarity
    (softmax over the others); else both slots hold two distinct other images so drawn, and the
    caption belongs to neither. Draws invert each row's CDF (sample_negatives), so a batch split
    over ranks draws what one process draws. Needs N >= 3. Returns (slot0, slot1, labels), [b] each
    (slots as global columns)."""
    columns = torch.arange(sim.shape[1], device=sim.device)
    mine = columns[None, :] == own[:, None]
    weights, _ = negative_weights(sim, mine)
    first = sample_negatives(weights, uniforms[2])
    second = sample_negatives(weights.masked_fill(columns[None, :] == first[:, None], 0.0), uniforms[3])
    matched, own_first = uniforms[0] >= 1 / 3, uniforms[1] >= 0.5
    slot0 = torch.where(matched & own_first, own, first)
    slot1 = torch.where(matched, torch.where(own_first, first, own), second)
    labels = torch.where(matched, torch.where(own_first, SLOT0, SLOT1), NEITHER)
    return slot0, slot1, labels
