"""python -m albef_ds.search: on the held-out shapes it reproduces `evaluate retrieval`'s recalls
(text -> image through the command line, image -> text through the library) with the exact index
and re-ranking depth k_test; the compressed index keeps recall@10 of exact search on 100,000
features; bad input stops in one line."""
import json
import os

import numpy as np
import pytest
import torch
from search_helpers import BATCH, heldout_corpus, index_args, other_albef, run_command, vqa_checkpoint

from albef_ds.evaluate import main as evaluate_main
from albef_ds.index import main as index_main
from albef_ds.search import ann
from albef_ds.search.__main__ import main as search_main

PRETRAINED = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "tiny_pretrained.safetensors")
K_TEST = 16


def recalls(ranks: list) -> dict:
    ranks = np.array(ranks)
    return {k: 100.0 * float((ranks < k).mean()) for k in (1, 5, 10)}


@pytest.fixture(scope="module")
def heldout_index(tmp_path_factory):
    torch.set_num_threads(1)           # the 2-core machine is shared: one thread is faster
    folder = tmp_path_factory.mktemp("heldout")
    shards = heldout_corpus(str(folder / "corpus"))
    code, _, err = run_command(index_main, index_args(PRETRAINED, shards, str(folder / "index")))
    assert code == 0, err
    code, _, err = run_command(evaluate_main, ["retrieval", "--checkpoint", PRETRAINED, "--data", shards,
                                               "--output_dir", str(folder / "eval"), "--config", "tiny",
                                               "--batch_size", str(BATCH), "--k_test", str(K_TEST)])
    assert code == 0, err
    metrics = json.load(open(folder / "eval" / "metrics.json"))
    return folder, shards, metrics


def test_search_reproduces_evaluate_retrievals_recalls(heldout_index):
    from albef_ds.data.samples import decode_image
    from albef_ds.eval.retrieval import read_retrieval_set
    from albef_ds.search.loading import load_for_index
    from albef_ds.search.query import Searcher
    from albef_ds.search.store import open_index

    folder, shards, metrics = heldout_index
    data = read_retrieval_set(shards, None, 30)
    queries = folder / "queries.txt"
    queries.write_text("\n".join(data.texts) + "\n")
    for rerank, prefix in ((K_TEST, ""), (0, "itc_")):
        code, out, err = run_command(search_main, ["--index", str(folder / "index"), "--texts", str(queries),
                                                   "--k", "10", "--rerank", str(rerank), "--json", "--workers", "0"])
        assert code == 0, err
        records = [json.loads(line) for line in out.splitlines()]
        assert len(records) == 10 * len(data.texts)
        found = {}
        for r in records:
            found.setdefault(r["query"], []).append(r["row"])
            assert (r["itm"] is None) == (rerank == 0 or r["rank"] > rerank)
        ranks = [found[t].index(i) if i in found[t] else 10 for t, i in zip(data.texts, data.txt2img)]
        assert recalls(ranks) == {k: metrics[f"{prefix}img_r{k}"] for k in (1, 5, 10)}, prefix
    assert metrics["img_r1"] != metrics["itc_img_r1"]           # re-ranking changed the ranking
    # image -> text: each held-out image finds its own caption as the evaluator's text retrieval does
    index = open_index(str(folder / "index"))
    searcher = Searcher(index, load_for_index(index, "index", "cpu"), BATCH, workers=0)
    ranks = []
    for i, image in enumerate(data.images):
        hits = searcher.texts_for_image(decode_image(image), k=10, rerank=K_TEST).hits
        owners = [index.texts[h.row]["row"] for h in hits]
        ranks.append(owners.index(i) if i in owners else 10)
    assert recalls(ranks) == {k: metrics[f"txt_r{k}"] for k in (1, 5, 10)}


def clustered(n: int, dim: int, rng: np.random.Generator, centers: np.ndarray) -> np.ndarray:
    """L2-normalised points around random centres, with noise of 1.5x a centre's norm per axis: the
    top-1 inner product of a query is ~0.42, its 10th ~0.37, as ALBEF's text-image similarities."""
    x = centers[rng.integers(0, len(centers), n)] + 1.5 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_the_compressed_index_keeps_recall_at_10_of_exact_search():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((1000, 256)).astype(np.float32)
    features = clustered(100_000, 256, rng, centers).astype(np.float16)
    queries = clustered(200, 256, rng, centers)
    truth = np.argsort(-(features.astype(np.float32) @ queries.T), axis=0, kind="stable")[:10].T
    assert ann.choose(100_000) == {"kind": "exact"} and ann.choose(300_000)["kind"] == "ivf_sq8"
    spec = ann.choose(len(features), "ivf_sq8")
    assert spec == {"kind": "ivf_sq8", "nlist": 1024, "nprobe": 16, "train": 40960}
    sims, rows = ann.search(ann.build(features, spec), features, queries, 10, spec)
    recall = np.mean([len(set(r) & set(t)) / 10 for r, t in zip(rows, truth)])
    assert recall >= 0.95, recall
    assert np.allclose(sims, np.take_along_axis(features.astype(np.float32) @ queries.T, rows.T, 0).T, atol=1e-5)
    exact = ann.choose(len(features), "exact")
    _, exact_rows = ann.search(ann.build(features, exact), features, queries, 10, exact)
    assert np.mean([len(set(r) & set(t)) / 10 for r, t in zip(exact_rows, truth)]) > 0.99   # ties aside


def test_bad_input_stops_in_one_line(heldout_index, tmp_path):
    folder, shards, _ = heldout_index
    index = str(folder / "index")
    unfinished = tmp_path / "unfinished"
    (unfinished / "parts").mkdir(parents=True)
    (unfinished / "parts" / "plan.json").write_text("{}")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG nothing")
    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(photos / "red.png")
    assert run_command(index_main, index_args(PRETRAINED, str(photos), str(tmp_path / "no_captions")))[0] == 0
    cases = {
        "missing index": (["--index", str(tmp_path / "nowhere"), "--text", "a red circle"], "no such folder"),
        "not an index": (["--index", str(tmp_path), "--text", "a red circle"], "not an index"),
        "unfinished index": (["--index", str(unfinished), "--text", "a red circle"], "unfinished"),
        "another model": (["--index", index, "--text", "a red circle", "--checkpoint",
                           other_albef(str(tmp_path / "other.pt"))], "made by another model"),
        "no ITM head": (["--index", index, "--text", "a red circle", "--checkpoint",
                         vqa_checkpoint(str(tmp_path / "vqa.pt")), "--config", "tiny_vqa"], "no ITM head"),
        "empty query": (["--index", index, "--text", "?!"], "empty once cleaned"),
        "unreadable image": (["--index", index, "--image", str(tmp_path / "broken.png")], "cannot be read"),
        "no captions": (["--index", str(tmp_path / "no_captions"), "--image", str(photos / "red.png")],
                        "holds no captions"),
        "bad k": (["--index", index, "--text", "a red circle", "--k", "0"], "--k 0"),
    }
    for case, (argv, named) in cases.items():
        code, out, err = run_command(search_main, argv)
        assert code == 2, case
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and named in err, (case, err)
        assert "Traceback" not in err + out and not out, case
    code, out, err = run_command(search_main, ["--index", index, "--text", "three red circles", "--k", "3"])
    assert code == 0 and len(out.strip().splitlines()) == 5, err          # title, header, 3 rows
