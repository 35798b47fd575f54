"""Each objective against a direct loop-based computation on small random inputs."""
import math

import torch
import torch.nn.functional as F

from albef_ds.tasks import objectives


def test_alpha_ramp():
    assert objectives.alpha_at(0, 100, 0.4) == 0.0
    assert abs(objectives.alpha_at(50, 100, 0.4) - 0.2) < 1e-12
    assert objectives.alpha_at(100, 100, 0.4) == 0.4
    assert objectives.alpha_at(1000, 100, 0.4) == 0.4


def loop_soft_ce(logits, targets):
    total = 0.0
    for i in range(logits.shape[0]):
        z = max(logits[i].tolist())
        log_norm = z + math.log(sum(math.exp(v - z) for v in logits[i].tolist()))
        total += -sum(t * (l - log_norm) for t, l in zip(targets[i].tolist(), logits[i].tolist()))
    return total / logits.shape[0]


def loop_softmax(row):
    z = max(row)
    e = [math.exp(v - z) for v in row]
    return [v / sum(e) for v in e]


def test_itc_matches_loop_reference():
    torch.manual_seed(0)
    b, k, d, temp, alpha = 3, 7, 5, 0.07, 0.4
    f = lambda *s: F.normalize(torch.randn(*s, dtype=torch.float64), dim=-1)
    img, txt, img_m, txt_m, img_bank, txt_bank = f(b, d), f(b, d), f(b, d), f(b, d), f(k, d), f(k, d)
    positives = torch.zeros(b, k, dtype=torch.bool)
    positives[torch.arange(b), torch.arange(b) + 2] = True      # as if this rank's rows start at 2
    positives[0, 6] = True                                        # a second positive (same image id)
    loss, sim_i2t, _ = objectives.itc(img, txt, img_m, txt_m, img_bank, txt_bank, positives,
                                      torch.tensor(temp, dtype=torch.float64), alpha)

    def direction(q, q_m, bank):
        logits, targets = [], []
        for i in range(b):
            row = [sum(q[i, c].item() * bank[j, c].item() for c in range(d)) / temp for j in range(k)]
            row_m = [sum(q_m[i, c].item() * bank[j, c].item() for c in range(d)) / temp for j in range(k)]
            n_pos = sum(positives[i].tolist())
            soft = loop_softmax(row_m)
            targets.append([alpha * soft[j] + (1 - alpha) * positives[i, j].item() / n_pos for j in range(k)])
            logits.append(row)
        return loop_soft_ce(torch.tensor(logits), torch.tensor(targets)), torch.tensor(logits)

    l_i2t, ref_sim = direction(img, img_m, txt_bank)
    l_t2i, _ = direction(txt, txt_m, img_bank)
    assert abs(loss.item() - (l_i2t + l_t2i) / 2) < 1e-5
    assert torch.allclose(sim_i2t, ref_sim.to(sim_i2t.dtype), atol=1e-9)


def test_hard_negatives_never_pick_positive_or_same_id():
    torch.manual_seed(0)
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4])
    positives = ids[:, None] == ids[None, :]
    sim = torch.randn(8, 8) * 5
    sim[positives] = 50.0          # positives most similar: the worst case for a bug
    weights, valid = objectives.negative_weights(sim, positives)
    assert valid.all()
    draws = torch.stack([objectives.sample_negatives(weights, torch.rand(8)) for _ in range(2000)], 1)
    chosen_ids = ids[draws]
    assert (chosen_ids != ids[:, None]).all()


def test_hard_negatives_finite_in_bf16_and_for_batch_of_one():
    sim = torch.tensor([[400.0, -400.0, -300.0]], dtype=torch.bfloat16) / 0.001
    positives = torch.tensor([[True, False, False]])
    weights, valid = objectives.negative_weights(sim, positives)
    assert torch.isfinite(weights).all() and weights[0, 0] == 0 and weights.sum() > 0 and valid.all()
    assert objectives.sample_negatives(weights, torch.rand(1)).item() in (1, 2)
    assert objectives.sample_negatives(weights, torch.ones(1)).item() in (1, 2)    # u at the top edge

    weights, valid = objectives.negative_weights(torch.tensor([[3.0]]), torch.tensor([[True]]))
    assert not valid.any() and objectives.sample_negatives(weights, torch.rand(1)).item() == 0
    logits = torch.randn(3, 2, requires_grad=True)
    loss, acc = objectives.itm(logits, torch.cat([valid, valid]))
    assert torch.isfinite(loss)
    expected = F.cross_entropy(logits[:1], torch.tensor([1]))
    assert torch.allclose(loss, expected)
    loss.backward()
    assert (logits.grad[1:] == 0).all()


def test_negatives_follow_the_weights():
    weights = torch.tensor([[0.0, 0.2, 0.8, 0.0]]).repeat(20000, 1)
    draws = objectives.sample_negatives(weights, torch.rand(20000))
    counts = torch.bincount(draws, minlength=4).float() / 20000
    assert counts[0] == 0 and counts[3] == 0 and abs(counts[2].item() - 0.8) < 0.02


def test_split_batch_masks_and_draws_like_one_process():
    ids = torch.randint(9, 166, (6, 12))
    whole = objectives.mlm_mask(ids, 166, 8, 0, 6, generator=torch.Generator().manual_seed(3))
    for offset in (0, 3):
        part = objectives.mlm_mask(ids[offset:offset + 3], 166, 8, 0, 6,
                                   generator=torch.Generator().manual_seed(3), rows=(offset, 6))
        assert torch.equal(part[0], whole[0][offset:offset + 3]) and torch.equal(part[1], whole[1][offset:offset + 3])


def test_itm_matches_loop_reference():
    torch.manual_seed(0)
    logits = torch.randn(6, 2, dtype=torch.float64)
    loss, acc = objectives.itm(logits, torch.ones(4, dtype=torch.bool))
    labels = [1, 1, 0, 0, 0, 0]
    ref = sum(-(logits[i, labels[i]] - torch.logsumexp(logits[i], 0)).item() for i in range(6)) / 6
    assert abs(loss.item() - ref) < 1e-6
    assert abs(acc.item() - sum(int(logits[i].argmax()) == labels[i] for i in range(6)) / 6) < 1e-6


def test_mlm_loss_matches_loop_reference():
    torch.manual_seed(0)
    m, v, alpha = 4, 9, 0.4
    logits, logits_m = torch.randn(m, v, dtype=torch.float64), torch.randn(m, v, dtype=torch.float64)
    labels = torch.tensor([1, 5, 8, 0])
    loss, acc = objectives.mlm(logits, labels, logits_m, alpha)
    ce = loop_soft_ce(logits, F.one_hot(labels, v).double())
    distill = loop_soft_ce(logits, torch.tensor([loop_softmax(r) for r in logits_m.tolist()]))
    assert abs(loss.item() - ((1 - alpha) * ce + alpha * distill)) < 1e-5
    loss0, _ = objectives.mlm(logits, labels, logits_m, 0.0)
    assert abs(loss0.item() - ce) < 1e-5


def test_mlm_masking_rules():
    g = torch.Generator().manual_seed(0)
    pad, cls, mask_id, vocab = 0, 6, 8, 166
    ids = torch.randint(9, vocab, (400, 30), generator=g)
    ids[:, 0] = cls
    ids[:, 20:] = pad
    masked, labels = objectives.mlm_mask(ids, vocab, mask_id, pad, cls, probability=0.15, generator=g)
    chosen = labels != objectives.IGNORE
    assert not chosen[:, 0].any() and not chosen[:, 20:].any()          # never CLS or PAD
    assert (labels[chosen] == ids[chosen]).all()
    assert (masked[~chosen] == ids[~chosen]).all()                      # unchosen tokens untouched
    rate = chosen[:, 1:20].float().mean().item()
    assert 0.13 < rate < 0.17
    to_mask = (masked[chosen] == mask_id).float().mean().item()
    same = (masked[chosen] == ids[chosen]).float().mean().item()
    assert 0.76 < to_mask < 0.84 and 0.07 < same < 0.14                  # 80 / 10 / 10
    _, labels50 = objectives.mlm_mask(ids, vocab, mask_id, pad, cls, probability=0.5, generator=g)
    assert 0.46 < (labels50[:, 1:20] != objectives.IGNORE).float().mean().item() < 0.54
