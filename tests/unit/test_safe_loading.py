"""Checkpoints come from the internet: files are unpickled weights-only. A file that would run code
when unpickled is refused, naming the file and the opt-in flag, and runs nothing; a released
ALBEF file with its usual contents (the official scripts' save_obj) loads without the flag."""
import pathlib

import pytest
import torch
from helpers import tool

import albef_ds
from albef_ds.checkpoint.files import read_checkpoint
from albef_ds.config import load_config
from albef_ds.fileio import ConversionError


class Trap:
    """Unpickling it touches a marker file: what a crafted checkpoint could do instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def crafted(tmp_path):
    marker = tmp_path / "unpickled.marker"
    path = tmp_path / "crafted.pth"
    model = albef_ds.build_model("tiny")
    torch.save({"model": model.state_dict(), "extra": Trap(str(marker))}, path)
    return str(path), marker


def test_a_file_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    path, marker = crafted(tmp_path)
    for load in (lambda: read_checkpoint(path), lambda: albef_ds.load_model(path)):
        with pytest.raises(ConversionError) as error:
            load()
        message = str(error.value)
        assert path in message and "--trust_checkpoint" in message and "trusted=True" in message
        assert "\n" not in message
    cfg = load_config("tiny", [f"model.init_checkpoint={path}"])
    with pytest.raises(ConversionError, match="model.trust_init_checkpoint=true"):
        albef_ds.build_model(cfg)
    assert not marker.exists()
    read_checkpoint(path, config="tiny", trusted=True)      # the opt-in loads it (and the trap fires)
    assert marker.exists()


def test_the_command_lines_refuse_it_too(tmp_path, capsys):
    path, marker = crafted(tmp_path)
    cli = tool("convert_checkpoint")
    assert cli.main(["--input", path, "--output", str(tmp_path / "out.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and path in err and "--trust_checkpoint" in err
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


def test_the_opt_in_loads_it_through_every_entry_point(tmp_path):
    """--trust_checkpoint (convert_checkpoint.py, `evaluate`) and model.trust_init_checkpoint=true
    load the crafted file (its trap fires each time: the opt-in really unpickles it) and give the
    file's weights: the converted file holds them, the evaluation is that of the model they make, and
    the initialised model carries them."""
    import json

    from helpers import shapes_set

    from albef_ds.eval.retrieval import evaluate_retrieval
    from albef_ds.evaluate import main as evaluate_main
    from albef_ds.tokenizer import build_tokenizer

    path, marker = crafted(tmp_path)
    want = torch.load(path, weights_only=False)["model"]
    marker.unlink()
    cli = tool("convert_checkpoint")
    converted = tmp_path / "converted.pt"
    assert cli.main(["--input", path, "--output", str(converted), "--config", "tiny", "--trust_checkpoint"]) == 0
    assert marker.exists()
    model = albef_ds.load_model(str(converted)).eval()       # our file: loads without the flag
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items() if k in got)
    assert torch.equal(got["visual_encoder.pos_embed"], want["visual_encoder.pos_embed"])

    marker.unlink()
    data = shapes_set(6)
    for i, png in enumerate(data.images):
        (tmp_path / f"{i}.png").write_bytes(png)
    (tmp_path / "test.json").write_text(json.dumps([{"image": f"{i}.png", "caption": c}
                                                    for i, c in enumerate(data.captions)]))
    out = tmp_path / "eval"
    assert evaluate_main(["retrieval", "--checkpoint", path, "--config", "tiny", "--data", str(tmp_path / "test.json"),
                          "--image_root", str(tmp_path), "--output_dir", str(out), "--k_test", "4",
                          "--batch_size", "8", "--trust_checkpoint"]) == 0
    assert marker.exists()
    metrics = json.loads((out / "metrics.json").read_text())
    reference = evaluate_retrieval(model, data, build_tokenizer(model.cfg.text.tokenizer), 64, 30, k_test=4,
                                   batch_size=8)
    assert {k: metrics[k] for k in reference} == json.loads(json.dumps(reference))

    marker.unlink()
    initialised = albef_ds.build_model(load_config("tiny", [f"model.init_checkpoint={path}",
                                                            "model.trust_init_checkpoint=true"]))
    assert marker.exists()
    assert torch.equal(initialised.state_dict()["visual_encoder.pos_embed"], want["visual_encoder.pos_embed"])
    assert torch.equal(initialised.state_dict()["temp"], want["temp"])


def test_a_released_file_with_its_usual_contents_loads_without_the_flag(tmp_path):
    """What the official Pretrain.py / Retrieval.py save: the model's state dict, the optimizer's
    and the lr scheduler's state dicts, the config dict and the epoch."""
    model = albef_ds.build_model("tiny")
    state = {k: v for k, v in model.state_dict().items() if "position_ids" not in k}
    state["temp"] = state["temp"].reshape(())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999))
    model.temp.grad = torch.ones_like(model.temp)
    optimizer.step()
    scheduler = {"param_group_field": "lr", "base_values": [1e-4], "metric": None, "t_in_epochs": True,
                 "noise_range_t": None, "noise_pct": 0.67, "noise_std": 1.0, "noise_seed": 42,
                 "t_initial": 30, "lr_min": 1e-5, "warmup_t": 20, "warmup_lr_init": 1e-5,
                 "warmup_prefix": False, "cycle_limit": 1, "warmup_steps": [4.5e-6]}
    config = {"image_res": 256, "batch_size": 64, "queue_size": 65536, "optimizer": {"opt": "adamW", "lr": 1e-4},
              "schedular": {"sched": "cosine", "epochs": 30}, "alpha": 0.4, "distill": True}
    path = tmp_path / "checkpoint_29.pth"
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler,
                "config": config, "epoch": 29}, path)
    ckpt = read_checkpoint(str(path), config="tiny")
    assert ckpt.kind == "albef"
    assert torch.equal(ckpt.state_dict["visual_encoder.pos_embed"], state["visual_encoder.pos_embed"])
