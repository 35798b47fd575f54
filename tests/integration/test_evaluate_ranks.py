"""Retrieval evaluation split over two real ranks equals one process, through the library and the
command line."""
import contextlib
import io
import json
import os

import torch
from helpers import run_ranks, shapes_set, tiny_model

from albef_ds.eval.recall import RECALL_KEYS
from albef_ds.eval.retrieval import NOT_RERANKED, evaluate_retrieval
from albef_ds.evaluate import main
from albef_ds.synthetic.probe import heldout_checks
from albef_ds.tokenizer import build_tokenizer


def write_inputs(folder, n_images):
    """A converted checkpoint of the tiny model and an evaluation JSON with its images."""
    from albef_ds.checkpoint.files import save_albef_ds
    from albef_ds.checkpoint.layout import layout_of
    from albef_ds.config import load_config

    os.makedirs(folder, exist_ok=True)
    model = tiny_model()
    layout = layout_of(model)
    state = {k: v for k, v in model.state_dict().items() if k in layout.keys}
    save_albef_ds(os.path.join(folder, "tiny.pt"), state, load_config("tiny"), layout)
    data = shapes_set(n_images)
    for i, png in enumerate(data.images):
        with open(os.path.join(folder, f"{i}.png"), "wb") as f:
            f.write(png)
    ann = [{"image": f"{i}.png", "caption": caps} for i, caps in enumerate(data.captions)]
    with open(os.path.join(folder, "test.json"), "w") as f:
        json.dump(ann, f)


def _eval_on_ranks(rank, world, n_images, k_test, batch_size, folder):
    model = tiny_model()
    data = shapes_set(n_images)
    if world > 1:        # a rank keeps only the image bytes it encodes
        data.images = [png if (i // batch_size) % world == rank else None for i, png in enumerate(data.images)]
    tok = build_tokenizer(model.cfg.text.tokenizer)
    out = evaluate_retrieval(model, data, tok, 64, 16, k_test=k_test, batch_size=batch_size, return_scores=True)
    full = shapes_set(n_images)           # the held-out checks need every image (shuffled pairs)
    checks = heldout_checks(model, full, tok, 64, 16, batch_size=batch_size)
    # the command line on the same model, saved as a converted file
    out_dir = os.path.join(folder, f"out{world}")
    main(["retrieval", "--checkpoint", os.path.join(folder, "tiny.pt"), "--data", os.path.join(folder, "test.json"),
          "--image_root", folder, "--output_dir", out_dir, "--k_test", str(k_test), "--config", "tiny",
          "--batch_size", str(batch_size)])
    if rank > 0:                          # rank 0 writes the result
        return out, checks, None
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return out, checks, json.load(f)


def _cli_into_a_file(rank, world, folder):
    blocker = os.path.join(folder, "taken")
    open(blocker, "w").close()
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        code = main(["retrieval", "--checkpoint", os.path.join(folder, "none.pt"), "--data",
                     os.path.join(folder, "none.json"), "--output_dir", blocker])
    # one line, exit 2, before the checkpoint is even looked for
    assert code == 2 and said.getvalue() == f"error: --output_dir {blocker}: {blocker} is a file, not a folder\n"


def test_the_command_line_checks_its_output_folder_before_the_work(tmp_path):
    run_ranks(_cli_into_a_file, 1, str(tmp_path))


def test_two_ranks_equal_one_process(tmp_path):
    # 7 images (13 captions) in batches of 2: rank 0 encodes 4 images, rank 1 three.
    args = (7, 4, 2, str(tmp_path))
    write_inputs(str(tmp_path), 7)
    ((reference, ref_checks, ref_cli),) = run_ranks(_eval_on_ranks, 1, *args)
    assert (reference["scores"][0] == NOT_RERANKED).any()
    assert {k: ref_cli[k] for k in RECALL_KEYS} == {k: reference[k] for k in RECALL_KEYS}
    ranks = run_ranks(_eval_on_ranks, 2, *args)
    for out, checks, _ in ranks:
        for got, want in zip(out.pop("scores"), reference["scores"]):
            assert torch.equal(got, want)
        assert out == {k: v for k, v in reference.items() if k != "scores"}
        assert checks == ref_checks
    assert ranks[0][2] == ref_cli
