"""The config: yaml inheritance, overrides, unknown keys, ranges, the task and its own section."""
import re

import pytest
import yaml

import albef_ds
from albef_ds.config import ConfigError, load_config


def test_build_model_from_name_path_and_dict(tmp_path):
    by_name = albef_ds.build_model("tiny")
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump({"base": "tiny", "model": {"embed_dim": 48}}))
    assert albef_ds.build_model(str(path)).vision_proj.out_features == 48
    as_dict = albef_ds.build_model(load_config("tiny").to_dict())
    assert sum(p.numel() for p in as_dict.parameters()) == sum(p.numel() for p in by_name.parameters())
    assert load_config("tiny", ["train.lr=3e-4"]).train.lr == 3e-4        # yaml's string form
    with pytest.raises(ConfigError, match="train.lr"):
        load_config("tiny", ["train.lr=fast"])
    with pytest.raises(ConfigError, match="model.vision.widht"):
        load_config("tiny", ["model.vision.widht=3"])
    with pytest.raises(ConfigError, match="train.compile_mode 'fast' is not one of default, reduce-overhead"):
        load_config("tiny", ["train.compile_mode=fast"])
    with pytest.raises(ConfigError, match="model.vision.pos_embed_init 'sin' is not one of timm, sincos"):
        load_config("tiny", ["model.vision.pos_embed_init=sin"])


@pytest.mark.parametrize("override, message", [
    ("train.save_every=0", "train.save_every is 0: it must be at least 1"),
    ("train.grad_accum=0", "train.grad_accum is 0: it must be at least 1"),
    ("train.batch_size=-2", "train.batch_size is -2: it must be at least 1"),
    ("data.max_tokens=1", "data.max_tokens is 1: it must be at least 2"),
    ("train.warmup_lr=-1e-5", "train.warmup_lr is -1e-05: it must be at least 0.0"),
    ("train.lr=0", "train.lr is 0.0: it must be above 0"),
    ("model.temp=-0.07", "model.temp is -0.07: it must be above 0"),
    ("train.max_steps=0", "train.epochs and train.max_steps are both 0"),
    ("model.alpha=1.5", "model.alpha 1.5 must lie in [0, 1]"),
])
def test_numbers_out_of_range_are_config_errors(override, message):
    extra = ["train.epochs=0"] if override.startswith("train.max_steps") else []
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("tiny", [override, *extra])


def test_the_shipped_configs_pass_the_range_checks():
    from albef_ds.config import CONFIG_DIR

    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"tiny", "base", "pretrain_4m", "pretrain_14m", "retrieval_coco", "retrieval_flickr"} <= set(names)
    for name in names:
        load_config(name)


def test_base_config_is_the_paper_model():
    cfg = load_config("base").model
    assert (cfg.vision.width, cfg.vision.depth, cfg.vision.heads, cfg.vision.img_size) == (768, 12, 12, 256)
    assert (cfg.text.hidden, cfg.text.layers, cfg.text.fusion_start) == (768, 12, 6)
    assert (cfg.embed_dim, cfg.queue_size, cfg.momentum, cfg.temp) == (256, 65536, 0.995, 0.07)




def test_the_task_chooses_its_module_and_takes_its_own_section():
    from albef_ds.tasks import get_task, task_names

    assert {"pretrain", "retrieval"} <= set(task_names())
    cfg = load_config("tiny", ["task=retrieval"])
    assert type(get_task(cfg)).__name__ == "RetrievalTask" and cfg.options is None
    assert load_config(cfg.to_dict()).to_dict() == cfg.to_dict()          # stored configs load back
    # the config keeps a task's section as plain data; the task types and checks it
    with pytest.raises(ConfigError, match="task 'captioning' is not one of .*pretrain.*retrieval"):
        get_task(load_config("tiny", ["task=captioning"]))
    with pytest.raises(ConfigError, match="task 'retrieval' takes no 'retrieval' section"):
        get_task(load_config("tiny", ["task=retrieval", "retrieval.k=3"]))
    with pytest.raises(ConfigError, match="config key 'task' has value 3"):
        load_config("tiny", ["task=3"])
    with pytest.raises(ConfigError, match="unknown config key 'pretrain'"):    # another task's section
        load_config("tiny", ["task=retrieval", "pretrain.k=3"])
