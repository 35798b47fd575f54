"""Retrieval evaluation: recall arithmetic, ITM re-ranking bookkeeping, data readers, and a
2-rank evaluation against one process."""
import io
import json

import pytest
import torch
from helpers import shapes_set, tiny_model

from albef_ds.eval.inputs import load_images
from albef_ds.eval.recall import RECALL_KEYS, retrieval_metrics
from albef_ds.eval.retrieval import NOT_RERANKED, RETRIEVAL_METRICS, evaluate_retrieval, read_retrieval_set
from albef_ds.tokenizer import build_tokenizer


def scores_from_orders(orders, n_cols):
    """Score rows that rank the columns in the given order (best first)."""
    scores = torch.zeros(len(orders), n_cols)
    for row, order in enumerate(orders):
        assert sorted(order) == list(range(n_cols))
        for position, col in enumerate(order):
            scores[row, col] = float(n_cols - position)
    return scores


def order_with(gt_first_at, gts, n_cols):
    """An order with the first ground truth after gt_first_at other candidates, the others last."""
    others = [c for c in range(n_cols) if c not in gts]
    return others[:gt_first_at] + [gts[0]] + others[gt_first_at:] + list(gts[1:])


def test_recall_hand_computed_several_captions_per_image():
    # 5 images, 14 captions: images 0-2 have three captions, image 3 one, image 4 four.
    img2txt = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9], [10, 11, 12, 13]]
    txt2img = [i for i, texts in enumerate(img2txt) for _ in texts]
    # Text retrieval: the best caption of each image at rank 0, 4, 7, 12 and 1.
    text_ranks = [0, 4, 7, 12, 1]
    score_i2t = scores_from_orders([order_with(r, img2txt[i], 14) for i, r in enumerate(text_ranks)], 14)
    # image 2's other captions come last: only its best one counts.
    assert score_i2t[2, 7] < score_i2t[2, 6] < score_i2t[2, 0]
    # Image retrieval: texts 0-6 find their image first, 7-10 second, 11-13 fifth (last).
    image_ranks = [0] * 7 + [1] * 4 + [4] * 3
    score_t2i = scores_from_orders([order_with(r, [txt2img[t]], 5) for t, r in enumerate(image_ranks)], 5)

    got = retrieval_metrics(score_i2t, score_t2i, txt2img, img2txt)
    assert list(got) == list(RECALL_KEYS)
    # txt: R@1 = {0}/5, R@5 = {0, 1, 4}/5, R@10 = {0, 1, 2, 4}/5 (image 3 is at rank 12)
    # img: R@1 = 7/14, R@5 = R@10 = 14/14
    expected = {"txt_r1": 20.0, "txt_r5": 60.0, "txt_r10": 80.0, "txt_r_mean": 160 / 3,
                "img_r1": 50.0, "img_r5": 100.0, "img_r10": 100.0, "img_r_mean": 250 / 3}
    expected["r_mean"] = (expected["txt_r_mean"] + expected["img_r_mean"]) / 2
    assert got == pytest.approx(expected)


def test_recall_ties_count_against_the_query():
    # Constant scores: every non-ground-truth candidate ties with the ground truth.
    img2txt = [[0, 1], [2], [3]]
    txt2img = [0, 0, 1, 2]
    got = retrieval_metrics(torch.zeros(3, 4), torch.zeros(4, 3), txt2img, img2txt)
    assert got["txt_r1"] == got["img_r1"] == 0.0
    assert got["txt_r5"] == got["img_r5"] == 100.0      # at most 3 candidates above
    # A ground truth list for a text (several correct images) is accepted too: text 1 finds
    # image 1 first, which counts; texts 2 and 3 score their image 0 with two others at 0.
    got = retrieval_metrics(torch.eye(3, 4), torch.eye(3, 4).t(), [0, [0, 1], 1, 2], img2txt)
    assert got["img_r1"] == 50.0 and got["img_r5"] == 100.0


def test_rerank_scores_are_the_pairs_itm_logits():
    model = tiny_model()
    data = shapes_set(5)
    tok = build_tokenizer(model.cfg.text.tokenizer)
    n_txt = len(data.texts)
    # k_test >= every count: each pair re-ranked, the same logit in both directions.
    out = evaluate_retrieval(model, data, tok, 64, 16, k_test=100, batch_size=4, return_scores=True)
    assert set(RETRIEVAL_METRICS) <= set(out)            # what eval.select_metric may name
    score_i2t, score_t2i, sims = out["scores"]
    assert torch.equal(score_i2t, score_t2i.t())
    from albef_ds.tokenizer import tokenize

    ids, mask = tokenize(tok, data.texts, 16)
    images = load_images(data.images, data.names, range(5), 64, [])
    with torch.no_grad():
        for i in range(5):
            direct = model.itm_logits(model.image_embeds(images[i:i + 1]).expand(n_txt, -1, -1), ids, mask)[:, 1]
            assert torch.allclose(score_i2t[i], direct, atol=1e-5)
            assert torch.allclose(sims[i], model.image_features(images[i:i + 1])[0] @ model.text_features(ids, mask).t(),
                                  atol=1e-5)
    # k_test = 2: the two most similar candidates of each query keep their logit, the rest -100.
    out2 = evaluate_retrieval(model, data, tok, 64, 16, k_test=2, batch_size=4, return_scores=True)
    s_i2t, s_t2i, _ = out2["scores"]
    top = sims.topk(2, dim=1).indices
    assert ((s_i2t != NOT_RERANKED).sum(1) == 2).all()
    assert torch.equal(s_i2t.gather(1, top), score_i2t.gather(1, top))
    top_t = sims.t().topk(2, dim=1).indices
    assert torch.equal(s_t2i.gather(1, top_t), score_t2i.gather(1, top_t))
    # add_sim: BLIP's score, logit + similarity
    out3 = evaluate_retrieval(model, data, tok, 64, 16, k_test=2, batch_size=4, add_sim=True, return_scores=True)
    assert torch.allclose(out3["scores"][0].gather(1, top), s_i2t.gather(1, top) + sims.gather(1, top))
    # k_test = 0: ITC only
    out0 = evaluate_retrieval(model, data, tok, 64, 16, k_test=0, return_scores=True)
    assert {k: out0[k] for k in RECALL_KEYS} == {k: out0[f"itc_{k}"] for k in RECALL_KEYS}


def test_read_json_and_shards(tmp_path):
    from PIL import Image

    from albef_ds.data.shards import write_shard

    data = shapes_set(3)
    for i, png in enumerate(data.images):
        Image.open(io.BytesIO(png)).save(tmp_path / f"{i}.png")
    # ALBEF's eval json (a list of captions), and the train style (one entry per caption).
    ann = [{"image": "0.png", "caption": ["A Red, circle!", "two squares"]}, {"image": "1.png", "caption": "x y"},
           {"image": "1.png", "caption": "z"}, {"image": "2.png", "caption": ["w"]}]
    (tmp_path / "test.json").write_text(json.dumps(ann))
    got = read_retrieval_set(str(tmp_path / "test.json"), str(tmp_path))
    assert got.captions == [["a red circle", "two squares"], ["x y", "z"], ["w"]]
    assert got.txt2img == [0, 0, 1, 1, 2] and got.img2txt == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="not found"):
        read_retrieval_set(str(tmp_path / "test.json"), str(tmp_path / "elsewhere"))
    # shards: every caption of the json list, in shard order; a sample without image is skipped
    samples = [{"__key__": f"{i:03d}", "png": png, "json": json.dumps({"caption": caps}).encode()}
               for i, (png, caps) in enumerate(zip(data.images, data.captions))]
    samples.insert(1, {"__key__": "nope", "txt": b"no image here"})
    write_shard(str(tmp_path / "s-00000.tar"), samples[:2])
    write_shard(str(tmp_path / "s-00001.tar"), samples[2:])
    got = read_retrieval_set(str(tmp_path / "s-{00000..00001}.tar"), keep=lambda i: i != 1)
    assert got.captions == data.captions
    assert got.images[0] == data.images[0] and got.images[1] is None


def test_a_text_longer_than_the_model_reads_is_noted(capsys):
    data = shapes_set(3)
    data.captions[1] = [" ".join(["red"] * 20)]          # 20 words: [CLS] + 15 pieces read at 16 tokens
    evaluate_retrieval(tiny_model(), data, build_tokenizer("tiny_vocab.txt"), 64, 16, k_test=2, batch_size=2)
    texts = len(data.texts)
    assert f"note: 1 of {texts} texts are longer than the model reads (16 tokens): 5 words in all are not read" \
        in capsys.readouterr().err
