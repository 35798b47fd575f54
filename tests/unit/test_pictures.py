"""Pictures: heat-map pictures of the layout's size and content, the visualize command line and its
bad inputs. (The demo's pictures: test_task_pictures.py.)"""
import os

import pytest
import torch
from helpers import png_size, tiny_albef

import albef_ds
from albef_ds.data.transforms import EvalTransform
from albef_ds.models.gradcam import itc_maps, itm_token_maps, sentence_maps
from albef_ds.tokenizer import build_tokenizer, tokenize


def test_pictures_are_pngs_of_the_layout_size(grounding_corpus, tmp_path):
    from PIL import Image

    from albef_ds.eval.heat_maps import heat_maps
    from albef_ds.pictures import PANEL, grid_size, jet
    from albef_ds.visualize import write_heat_pictures

    assert jet([0.0])[0].tolist() == [0, 0, 128] and jet([1.0])[0].tolist() == [128, 0, 0]
    model = tiny_albef()
    tok = build_tokenizer(model.cfg.text.tokenizer)
    image = Image.open(os.path.join(grounding_corpus["image_root"], "images/000020.png")).resize((120, 90))
    got = heat_maps(model, tok, image, "The red-circle, zebra!")
    sentence, words, maps = got.sentence, got.words, got.word_maps
    assert got.mode == "itm" and got.dropped == 0
    assert words == ["the", "red", "circle", "zebra"] and len(maps) == 4     # "zebra": 4 word pieces, one map
    ids, mask = tokenize(tok, ["the red circle zebra"], 30)
    pixels = EvalTransform(64)(image)[None]
    tokens, _ = itm_token_maps(model, pixels, ids, mask, 2)
    assert torch.allclose(maps[3], tokens[0, 4:8].mean(0)) and torch.allclose(sentence, sentence_maps(tokens, mask)[0])
    itc_maps_of_text = heat_maps(model, tok, image, "the red circle", "itc")
    itc, none = itc_maps_of_text.sentence, itc_maps_of_text.words
    assert torch.allclose(itc, itc_maps(model, pixels, ids[:, :4], mask[:, :4], 2)[0]) and none == []
    paths = write_heat_pictures(model, tok, image, ["the red circle"], str(tmp_path), "photo")
    assert [os.path.basename(p) for p in paths] == ["photo__the_red_circle.png", "photo__the_red_circle_words.png"]
    panel = (PANEL, round(90 * PANEL / 120))
    assert png_size(paths[0]) == grid_size(panel, 1)
    assert png_size(paths[1]) == grid_size(panel, 2 + 3)          # image, sentence, three words
    (itc_path,) = write_heat_pictures(model, tok, image, ["the red circle"], str(tmp_path), "photo", "itc")
    assert os.path.basename(itc_path) == "photo__the_red_circle_itc.png" and png_size(itc_path) == grid_size(panel, 1)
    with pytest.raises(ValueError, match="empty once cleaned"):
        heat_maps(model, tok, image, " ?! ")


def test_visualize_command_line_and_its_errors(grounding_corpus, tmp_path, capsys):
    from albef_ds.checkpoint.files import save_albef_ds
    from albef_ds.checkpoint.layout import layout_of
    from albef_ds.visualize import main

    model = tiny_albef()
    layout = layout_of(model)
    save_albef_ds(str(tmp_path / "tiny.pt"), {k: v for k, v in model.state_dict().items() if k in layout.keys},
                  albef_ds.load_config("tiny"), layout)
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("000020.png", "000021.png"):
        (folder / name).write_bytes(open(os.path.join(grounding_corpus["image_root"], "images", name), "rb").read())
    (tmp_path / "texts.txt").write_text("the red circle\n\na blue square\n")
    out = tmp_path / "out"
    assert main(["--checkpoint", str(tmp_path / "tiny.pt"), "--image", str(folder), "--texts",
                 str(tmp_path / "texts.txt"), "--output_dir", str(out)]) == 0
    assert len(os.listdir(out)) == 2 * 2 * 2                      # images x texts x (sentence, words)
    assert all(png_size(out / name) for name in os.listdir(out))
    capsys.readouterr()

    def error(*args):
        assert main(["--checkpoint", str(tmp_path / "tiny.pt"), "--output_dir", str(out), *args]) == 2
        return capsys.readouterr().err

    (folder / "broken.png").write_bytes(b"not a png")
    assert "image " + str(folder / "broken.png") + " cannot be read" in error("--image", str(folder), "--text", "a")
    assert "empty once cleaned" in error("--image", str(folder / "000020.png"), "--text", "?")
    assert "no such file" in error("--image", str(tmp_path / "none.png"), "--text", "a")
    assert "nothing.pt" in error("--checkpoint", str(tmp_path / "nothing.pt"), "--image", str(folder / "000020.png"),
                                 "--text", "a")


def test_visualize_refuses_a_model_without_an_itm_head(monkeypatch, tmp_path, grounding_corpus):
    from albef_ds import visualize

    monkeypatch.setattr(visualize, "load_model", lambda *a, **k: torch.nn.Linear(2, 2))
    args = visualize.parse_args(["--checkpoint", "vqa.pth", "--image", os.path.join(grounding_corpus["image_root"], "images"),
                                 "--text", "a", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="checkpoint vqa.pth holds a Linear, which has no ITM head"):
        visualize.run(args)


class _Trap:
    """Unpickling it touches a marker file (what a crafted checkpoint could do instead)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_visualize_loads_checkpoints_weights_only(monkeypatch, tmp_path, grounding_corpus, capsys):
    """As every command line: a file that would run code is refused on one line naming it and the
    opt-in; --trust_checkpoint passes trusted=True."""
    from albef_ds import visualize

    marker, path = tmp_path / "unpickled.marker", str(tmp_path / "crafted.pth")
    torch.save({"model": tiny_albef().state_dict(), "extra": _Trap(str(marker))}, path)
    image = os.path.join(grounding_corpus["image_root"], "images", "000020.png")
    argv = ["--checkpoint", path, "--image", image, "--text", "a", "--output_dir", str(tmp_path / "out")]
    assert visualize.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and path in err and "--trust_checkpoint" in err and not marker.exists()
    seen = {}
    monkeypatch.setattr(visualize, "load_model", lambda *a, **k: seen.update(k) or torch.nn.Linear(2, 2))
    assert visualize.main(argv + ["--trust_checkpoint"]) == 2 and seen["trusted"] is True
