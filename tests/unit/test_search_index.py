"""python -m albef_ds.index in-process: unreadable images counted and listed, and bad input stopped
in one line before any work (tests/integration/test_search_ranks.py: ranks and resume)."""
import json
import os

import numpy as np
import torch
from search_helpers import BATCH, heldout_corpus, index_args, other_albef, run_command, vqa_checkpoint

from albef_ds.index import main

PRETRAINED = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "tiny_pretrained.safetensors")


def test_unreadable_images_are_counted_and_listed_and_the_rest_indexed(tmp_path):
    from PIL import Image

    import albef_ds
    from albef_ds.data.transforms import EvalTransform

    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    colours = {"a.png": (200, 30, 30), "b.jpg": (30, 200, 30), "sub/c.png": (30, 30, 200)}
    for name, colour in colours.items():
        Image.new("RGB", (40, 30), colour).save(photos / name)
    (photos / "a.txt").write_text("a red picture\n")
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (photos / "notes.md").write_text("not an image: not indexed")
    code, out, err = run_command(main, index_args(PRETRAINED, str(photos), str(tmp_path / "index"),
                                                  "--part_size", str(BATCH)))
    assert code == 0, err
    assert "indexed 3 images and 1 captions" in out and "1 unreadable" in out
    rows = [json.loads(line) for line in open(tmp_path / "index" / "images.jsonl")]
    assert [r["name"] for r in rows] == ["a.png", "b.jpg", "sub/c.png"]
    assert rows[0]["captions"] == ["a red picture"] and rows[1]["captions"] == []
    unreadable = [json.loads(line) for line in open(tmp_path / "index" / "unreadable.jsonl")]
    assert [u["name"] for u in unreadable] == ["broken.png"] and unreadable[0]["error"]
    model = albef_ds.load_model(PRETRAINED, config="tiny")
    pixels = torch.stack([EvalTransform(64)(Image.open(photos / n).convert("RGB")) for n in colours])
    with torch.no_grad():
        direct = model.image_features(pixels).numpy()
    assert np.allclose(np.load(tmp_path / "index" / "image_features.npy").astype(np.float32), direct, atol=1e-3)
    # an annotation file: a missing image is listed too
    ann = [{"image": "a.png", "caption": "red"}, {"image": "gone.png", "caption": ["x"]}, {"image": "a.png",
                                                                                         "caption": "crimson"}]
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    code, out, err = run_command(main, index_args(PRETRAINED, str(tmp_path / "ann.json"), str(tmp_path / "ann"),
                                                  "--image_root", str(photos)))
    assert code == 0, err
    assert [json.loads(line)["captions"] for line in open(tmp_path / "ann" / "images.jsonl")] == [["red", "crimson"]]
    assert [json.loads(line)["name"] for line in open(tmp_path / "ann" / "unreadable.jsonl")] == ["gone.png"]
    # shards: a sample without an image and a shard cut short are listed, what could be read is kept
    from albef_ds.data.shards import write_shard

    png = (photos / "a.png").read_bytes()
    samples = [{"__key__": f"{i:03d}", "png": png, "json": json.dumps({"caption": f"red {i}",
                                                                       "url": f"http://x/{i}"}).encode()}
               for i in range(4)]
    samples.insert(1, {"__key__": "no_image", "txt": b"a caption alone"})
    write_shard(str(tmp_path / "s-0.tar"), samples)
    whole = (tmp_path / "s-0.tar").read_bytes()
    (tmp_path / "s-1.tar").write_bytes(whole[:len(whole) * 2 // 3])
    code, out, err = run_command(main, index_args(PRETRAINED, str(tmp_path / "s-{0..1}.tar"), str(tmp_path / "shards")))
    assert code == 0, err
    rows = [json.loads(line) for line in open(tmp_path / "shards" / "images.jsonl")]
    assert [r["name"] for r in rows][:4] == [f"s-0.tar/{i:03d}" for i in range(4)]
    assert rows[3]["url"] == "http://x/3" and rows[3]["source"]["size"] == len(png)
    assert whole[rows[3]["source"]["offset"]:][:len(png)] == png
    problems = {json.loads(line)["name"]: json.loads(line)["error"] for line in open(tmp_path / "shards" /
                                                                                       "unreadable.jsonl")}
    assert "s-0.tar/no_image" in problems and "s-1.tar/no_image" in problems
    assert problems["s-1.tar"].startswith("shard read to sample") and 4 < len(rows) < 8
    # cut right before a member's header, which tarfile alone takes for the end of the archive
    (tmp_path / "s-2.tar").write_bytes(whole[:rows[3]["source"]["offset"] - 512])
    code, _, err = run_command(main, index_args(PRETRAINED, str(tmp_path / "s-2.tar"), str(tmp_path / "cut")))
    assert code == 0, err
    problems = {json.loads(line)["name"]: json.loads(line)["error"] for line in open(tmp_path / "cut" /
                                                                                       "unreadable.jsonl")}
    assert "truncated" in problems["s-2.tar"]


def test_bad_input_stops_in_one_line_and_touches_no_file(tmp_path):
    shards = heldout_corpus(str(tmp_path / "corpus"))
    index = str(tmp_path / "index")
    assert run_command(main, index_args(PRETRAINED, shards, index, "--part_size", str(BATCH)))[0] == 0
    before = {n: os.stat(os.path.join(index, n)).st_mtime_ns for n in os.listdir(index)}
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no image here")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "x.jpg").write_bytes(b"not a jpeg")
    cases = {
        "missing data": (index_args(PRETRAINED, str(tmp_path / "nowhere.json"), str(tmp_path / "o1")),
                         "--data"),
        "no image in the folder": (index_args(PRETRAINED, str(empty), str(tmp_path / "o2")), "no image"),
        "no readable image": (index_args(PRETRAINED, str(garbage), str(tmp_path / "o3")), "could be read"),
        "missing checkpoint": (index_args(str(tmp_path / "none.pt"), shards, str(tmp_path / "o4")),
                               "none.pt"),
        "no ITM head": (["--checkpoint", vqa_checkpoint(str(tmp_path / "vqa.pt")), "--data", shards,
                         "--output_dir", str(tmp_path / "o5")], "holds a VQAModel, which has no ITM head"),
        "another model's index": (index_args(other_albef(str(tmp_path / "other.pt")), shards, index),
                                  "another model"),
        "a folder of something else": (index_args(PRETRAINED, shards, str(garbage)), "not empty"),
        "a part size off the batch": (index_args(PRETRAINED, shards, str(tmp_path / "o6"), "--part_size", "20"),
                                      "--part_size 20"),
    }
    for case, (argv, named) in cases.items():
        code, out, err = run_command(main, argv)
        assert code == 2, case
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and named in err, (case, err)
        assert "Traceback" not in err + out
    assert {n: os.stat(os.path.join(index, n)).st_mtime_ns for n in os.listdir(index)} == before
    assert os.listdir(garbage) == ["x.jpg"]
    for made in ("o1", "o2", "o4", "o5", "o6"):             # stopped before any work: no folder made
        assert not os.path.exists(tmp_path / made), made
