"""VQA model: the answer decoder against transformers' BertLMHeadModel, the training loss and the
answer ranking against loops written here (one question and one answer at a time, no padding),
the start from a pretraining checkpoint, and the released ALBEF VQA layout both ways."""
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertLMHeadModel
from vqa_helpers import ANSWER_LIST, TOKENIZER, codec, heldout_questions, samples, tiny_vqa

from albef_ds import build_model, load_model
from albef_ds.checkpoint.files import convert, save_albef_ds
from albef_ds.checkpoint.layout import layout_of
from albef_ds.config import TextConfig, load_config
from albef_ds.data.vqa import answer_tokens
from albef_ds.eval.vqa_answering import answer_questions
from albef_ds.fileio import torch_load
from albef_ds.models.bert import BertTextFusion
from albef_ds.tasks.base import StepContext
from albef_ds.tasks.vqa import VQATrainingModel

CLS, SEP = TOKENIZER.cls_token_id, TOKENIZER.sep_token_id


def word_ids(text):
    return TOKENIZER.encode([text])[0].ids


def states_of(encoders, image, question):
    """One question's states, encoded alone and unpadded."""
    visual, text = encoders
    ids = torch.tensor([[CLS, *word_ids(question)]])
    ones = torch.ones_like(ids)
    return text.fuse(text.encode_text(ids, ones), ones, [visual(image[None])])


def token_logits(decoder, states, answer):
    """[len + 1, V]: the decoder's logits predicting `answer`'s words and [SEP], unpadded."""
    ids = torch.tensor([[CLS, *word_ids(answer), SEP]])
    hidden = decoder.decode(ids, torch.ones_like(ids), states, torch.ones(states.shape[:2], dtype=torch.long))
    return decoder.cls(hidden)[0, :-1], ids[0, 1:]


def test_decoder_matches_transformers_bert_lm_head_model():
    torch.manual_seed(3)
    hf_cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, is_decoder=True, add_cross_attention=True)
    hf_cfg._attn_implementation = "eager"
    hf = BertLMHeadModel(hf_cfg).eval()
    ours = BertTextFusion(TextConfig(vocab_size=120, hidden=32, layers=2, fusion_start=0, heads=4, intermediate=64,
                                     max_position=40, hidden_dropout=0.0, attention_dropout=0.0), image_width=32).eval()
    result = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    ids = torch.randint(5, 120, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    states, states_mask = torch.randn(3, 9, 32), torch.ones(3, 9, dtype=torch.long)
    states_mask[0, 6:] = 0                      # padded question states: the key mask matters
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, encoder_hidden_states=states, encoder_attention_mask=states_mask).logits
        got = ours.cls(ours.decode(ids, mask, states, states_mask))
        # rows: answer i reads question rows[i], the question's keys and values projected once
        rows = torch.tensor([2, 0, 0, 1])
        repeated = ours.cls(ours.decode(ids[[0, 0, 1, 2]], mask[[0, 0, 1, 2]], states[rows], states_mask[rows]))
        indexed = ours.cls(ours.decode(ids[[0, 0, 1, 2]], mask[[0, 0, 1, 2]], states, states_mask, rows))
    keep = mask.bool()
    assert (got - expected)[keep].abs().max() <= 1e-5
    assert torch.allclose(indexed, repeated, atol=1e-6)
    with torch.no_grad():       # causal: a later token does not change an earlier position
        changed = ids.clone()
        changed[:, -1] = 9
        assert torch.allclose(ours.cls(ours.decode(changed, mask, states, states_mask))[:, :-1], got[:, :-1], atol=1e-6)


def reference_loss(model, batch_samples, alpha):
    """ALBEF's VQA loss by loops: per question, per answer, token by token."""
    total = torch.zeros(())
    for s in batch_samples:
        states = states_of((model.visual_encoder, model.text_encoder), s["image"], s["question"])
        states_m = states_of((model.visual_encoder_m, model.text_encoder_m), s["image"], s["question"])
        for answer, weight in zip(s["answers"], s["weights"]):
            logits, targets = token_logits(model.text_decoder, states, answer)
            logits_m, _ = token_logits(model.text_decoder_m, states_m, answer)
            answer_loss = torch.zeros(())
            for t in range(len(targets)):
                log_p = F.log_softmax(logits[t], -1)
                ce = -log_p[targets[t]]
                soft = -(F.softmax(logits_m[t], -1) * log_p).sum()
                answer_loss = answer_loss + (1 - alpha) * ce + alpha * soft
            total = total + weight * answer_loss
    return total / len(batch_samples)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_training_loss_equals_the_loop_reference(alpha):
    model = tiny_vqa()
    with torch.no_grad():       # momentum weights apart from the online ones: distillation is seen
        for p in model.text_decoder_m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch_samples = samples(4)
    batch = codec().collate(batch_samples, ["k"] * 4)
    assert batch["attention_mask"].sum(1).unique().numel() == 4      # the questions are padded
    loss, metrics = model(batch, StepContext(0, 1), alpha=alpha)
    with torch.no_grad():
        expected = reference_loss(model, batch_samples, alpha)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["loss_vqa"] is loss and metrics["alpha"] == alpha
    loss.backward()
    assert model.text_decoder.bert.encoder.layer[0].crossattention.self.key.weight.grad.abs().sum() > 0
    assert model.visual_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.text_decoder_m.parameters())


def test_alpha_ramps_over_the_first_epoch():
    model = tiny_vqa()
    batch = codec().collate(samples(2), ["k"] * 2)
    assert model(batch, StepContext(5, 10))[1]["alpha"] == pytest.approx(0.2)
    assert model(batch, StepContext(25, 10))[1]["alpha"] == pytest.approx(0.4)


def reference_ranking(model, image, question, answers, k):
    """(indices, probabilities): ALBEF's ranking by a loop over the answers."""
    states = states_of((model.visual_encoder, model.text_encoder), image, question)
    first = model.text_decoder.cls(model.text_decoder.decode(
        torch.tensor([[CLS]]), torch.ones(1, 1, dtype=torch.long), states, torch.ones(states.shape[:2])))[0, 0]
    p_first = F.softmax(first, -1)
    first_prob = [p_first[word_ids(a)[0]].item() for a in answers]
    kept = sorted(range(len(answers)), key=lambda a: -first_prob[a])[:k]
    scores = {}
    for a in kept:
        logits, targets = token_logits(model.text_decoder, states, answers[a])
        log_likelihood = sum(F.log_softmax(logits[t], -1)[targets[t]].item() for t in range(len(targets)))
        scores[a] = torch.tensor(first_prob[a]).log().item() + log_likelihood
    order = sorted(kept, key=lambda a: -scores[a])
    probs = F.softmax(torch.tensor([scores[a] for a in order]), -1)
    return order, probs, kept


def ranked(model, batch_samples, answers, k):
    batch = codec().collate(batch_samples, ["k"] * len(batch_samples))
    ids, mask = answer_tokens(TOKENIZER, answers, 64)
    with torch.no_grad():
        states = model.question_states(batch["image"], batch["input_ids"], batch["attention_mask"])
        return model.rank_answers(states, batch["attention_mask"], ids, mask, k)


def test_answer_ranking_equals_the_loop_reference_with_the_k_test_cut():
    model = tiny_vqa(0, spread=0.3).eval()
    assert len({word_ids(a)[0] for a in ANSWER_LIST}) == len(ANSWER_LIST)     # no tie at the cut
    batch_samples = samples(4, seed=1)
    calls = []
    decode = model.text_decoder.decode
    model.text_decoder.decode = lambda ids, *args: calls.append(tuple(ids.shape)) or decode(ids, *args)
    top, probs = ranked(model, batch_samples, ANSWER_LIST, 4)
    # [CLS] once per question, then only the k kept answers of each go through the decoder
    assert calls[0] == (4, 1) and calls[1][0] == 4 * 4 and len(calls) == 2
    reranked = False
    with torch.no_grad():
        for i, s in enumerate(batch_samples):
            order, expected, kept = reference_ranking(model, s["image"], s["question"], ANSWER_LIST, 4)
            assert top[i].tolist() == order
            assert torch.allclose(probs[i], expected, atol=1e-5)
            reranked |= order != kept
    assert reranked                  # the whole answer moved some candidate past a likelier first token


def test_answer_ranking_of_the_whole_list_with_shared_first_tokens():
    model = tiny_vqa(2, spread=0.3).eval()
    answers = ["red", "red circle", "red square", "yes", "no", "two"]       # three share "red"
    batch_samples = samples(3, seed=2)
    top, probs = ranked(model, batch_samples, answers, 128)
    assert top.shape == (3, len(answers))
    with torch.no_grad():
        for i, s in enumerate(batch_samples):
            order, expected, _ = reference_ranking(model, s["image"], s["question"], answers, len(answers))
            assert top[i].tolist() == order and torch.allclose(probs[i], expected, atol=1e-5)


def pretrain_file(folder):
    """A tiny pretraining model (its momentum copies apart from it), saved as our file."""
    torch.manual_seed(5)
    cfg = load_config("tiny")
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.text_encoder_m.parameters():
            p.add_(1.0)
    layout = layout_of(model)
    path = os.path.join(folder, "pretrain.pt")
    save_albef_ds(path, {k: v for k, v in model.state_dict().items() if k in layout.keys}, cfg, layout)
    return path, model


def test_start_from_pretraining_takes_the_decoder_from_the_fusion_layers(tmp_path):
    path, pretrained = pretrain_file(str(tmp_path))
    cfg = load_config("tiny_vqa", [f"model.init_checkpoint={path}", "model.vision.img_size=96"])
    model = build_model(cfg)
    assert isinstance(model, VQATrainingModel)
    source, start = pretrained.state_dict(), cfg.model.text.fusion_start
    state = model.state_dict()
    for suffix in ("", "_m"):
        for key, value in state.items():
            prefix = f"text_decoder{suffix}."
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            if rest.startswith("bert.encoder.layer."):
                i = int(rest.split(".")[3])
                rest = rest.replace(f"layer.{i}.", f"layer.{i + start}.", 1)
            assert torch.equal(value, source[f"text_encoder{suffix}.{rest}"]), key
        for key in source:                  # the question encoder: every layer, no MLM head
            if key.startswith(f"text_encoder{suffix}.bert."):
                assert torch.equal(state[key], source[key]), key
    assert not any(k.startswith("text_encoder.cls.") for k in state)
    assert not torch.equal(state["text_decoder.bert.embeddings.word_embeddings.weight"],
                           state["text_decoder_m.bert.embeddings.word_embeddings.weight"])
    assert state["visual_encoder.pos_embed"].shape == (1, 1 + 12 * 12, 64)      # resized to 96 px
    assert model.text_decoder.cls.predictions.decoder.weight is model.text_decoder.bert.embeddings.word_embeddings.weight


def released_layout(model):
    """The state dict ALBEF's VQA model would save, written out here: BertModel question encoders
    (no `bert.`, no MLM head), BertLMHeadModel decoders, and transformers' position_ids."""
    out = {}
    for key, value in model.state_dict().items():
        part = next((p for p in ("text_encoder.", "text_encoder_m.") if key.startswith(p)), None)
        if part is not None:
            if key.startswith(part + "cls."):
                continue
            key = part + key[len(part) + len("bert."):]
        out[key] = value.clone()
    for part in ("text_encoder.", "text_encoder_m.", "text_decoder.bert.", "text_decoder_m.bert."):
        out[part + "embeddings.position_ids"] = torch.arange(64)[None]
    return out


def test_released_vqa_layout_round_trip_and_answers(tmp_path):
    model = tiny_vqa(4, spread=0.3)
    released = released_layout(model)
    source = str(tmp_path / "vqa_released.pth")
    torch.save({"model": released}, source)
    cfg = load_config("tiny_vqa")
    ours = str(tmp_path / "ours.safetensors")
    convert(source, ours, config=cfg)
    back = str(tmp_path / "back.pth")
    convert(ours, back, to="albef")
    written = torch_load(back)["model"]         # weights-only: what any reader of a released file gets
    assert written.keys() == released.keys()
    assert all(torch.equal(written[k], released[k]) for k in released)
    # the released file loads with the weights it holds, and answers as our converted copy
    from_release = load_model(source, config="tiny_vqa")
    from_ours = load_model(ours)
    for name, value in from_release.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
    data = heldout_questions(str(tmp_path))
    got = [answer_questions(m, data, ANSWER_LIST, TOKENIZER, 64, 4, 4) for m in (from_release, from_ours)]
    assert got[0] == got[1] and len(set(got[0])) > 1
