"""One typed configuration for model, data and training.

Loaded from a yaml file (a path, or the name of a file in `albef_ds/configs/`), from a dict, or
from one of those plus `dotted.key=value` overrides. Unknown keys are errors that name the key, so a
typo stops the run before anything is built.
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A configuration that cannot be trained with; the message names the key and the numbers."""


@dataclass
class VisionConfig:
    timm_name: str = "deit_base_patch16_224"
    # None: random init; True: timm's hub weights for `timm_name`; a path: a local weights file.
    pretrained: Union[bool, str, None] = None
    img_size: int = 256
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    grad_checkpointing: bool = False
    # Position embeddings of a randomly initialised ViT: "timm" (truncated normal, std 0.02) or
    # "sincos" (a 2D sin-cos table as the starting value, still learned: MAE's with its halves
    # swapped, models/vit.py). Trained from scratch on little data, a ViT started from timm's small
    # values does not learn where things are (docs/retrieval.md); pretrained weights replace either.
    pos_embed_init: str = "timm"


@dataclass
class TextConfig:
    # None: random init; a hub name (`bert-base-uncased`) or a local folder of a transformers BERT.
    pretrained: Optional[str] = None
    tokenizer: str = "bert-base-uncased"
    vocab_size: int = 30522
    hidden: int = 768
    layers: int = 12
    fusion_start: int = 6
    heads: int = 12
    intermediate: int = 3072
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0            # special token ids: bert-base-uncased's; checked against
    cls_token_id: int = 101          # the tokenizer before training starts
    sep_token_id: int = 102
    mask_token_id: int = 103
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    grad_checkpointing: bool = False


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256
    temp: float = 0.07
    queue_size: int = 65536
    momentum: float = 0.995
    alpha: float = 0.4
    mlm_probability: float = 0.15
    # How ITM's negatives are drawn from the batch: "hard", in proportion to the softmax of the ITC
    # similarity (ALBEF), or "random", uniformly among the batch's other images / texts (the tiny
    # grounding recipe: docs/grounding.md says why).
    itm_negatives: str = "hard"
    # A checkpoint to start from: our single-file format, a released ALBEF file or a training folder.
    init_checkpoint: Optional[str] = None
    # Load it even if it holds objects beyond tensors and plain containers (that could run code).
    trust_init_checkpoint: bool = False
    # Parameters of the model (a name, or a module's name for all of its parameters) that keep the
    # model's own initialisation instead of init_checkpoint's values: [temp] starts the temperature
    # at model.temp (the tiny grounding recipe: docs/grounding.md).
    init_fresh: list = field(default_factory=list)

    def architecture_only(self) -> "ModelConfig":
        """The same architecture with no pretrained weights to fetch and no checkpoint to load."""
        return dataclasses.replace(self, vision=dataclasses.replace(self.vision, pretrained=None),
                                   text=dataclasses.replace(self.text, pretrained=None), init_checkpoint=None)


@dataclass
class CorpusConfig:
    name: str = ""
    shards: list[str] = field(default_factory=list)
    samples: int = 0
    weight: Optional[float] = None
    # instead of shards: ALBEF annotation files read directly, images under image_root
    annotations: list[str] = field(default_factory=list)
    image_root: str = ""


@dataclass
class SyntheticConfig:
    """The generated corpus of coloured shapes used by the built-in demo and the tests."""
    train_samples: int = 4096
    heldout_samples: int = 256
    samples_per_shard: int = 512
    image_size: int = 64
    seed: int = 0


@dataclass
class DataConfig:
    corpora: list[CorpusConfig] = field(default_factory=list)
    synthetic: Optional[SyntheticConfig] = None
    epoch_samples: int = 0           # samples per epoch over all ranks; 0: sum of corpus sizes
    workers: int = 2
    resampled: bool = True
    # shard draws each data worker keeps open and interleaves sample by sample: a batch of 64 spans
    # about min(64, open_shards) shards and mixes the corpora by weight (docs/data.md)
    open_shards: int = 16
    shuffle_buffer: int = 1000       # shared by the open draws
    max_words: int = 30
    max_tokens: int = 30
    augment: bool = True
    # RandomResizedCrop's area fraction: ALBEF pretrains with (0.2, 1) and fine-tunes with (0.5, 1);
    # null: resize the whole image (the grounding recipe, whose boxes must stay where they are)
    crop_scale: Optional[list[float]] = field(default_factory=lambda: [0.2, 1.0])


@dataclass
class TrainConfig:
    batch_size: int = 64             # per rank, per micro-step
    grad_accum: int = 1
    epochs: int = 30
    max_steps: int = 0               # 0: epochs x steps per epoch
    lr: float = 1e-4
    warmup_lr: float = 1e-5
    min_lr: float = 1e-5
    warmup_steps: int = 2000
    weight_decay: float = 0.02
    grad_clip: float = 5.0
    seed: int = 42
    log_every: int = 50
    save_every: int = 2000
    keep_last: int = 3               # newest checkpoints kept (0: every one); the best is always kept
    # Resuming on another number of ranks than saved the checkpoint: "keep" the global batch (the
    # per-rank micro batch takes the change, accumulation only beyond max_micro_batch), or keep the
    # "per_rank" micro batch (the global batch changes on purpose). docs/slurm.md.
    elastic_batch: str = "keep"
    max_micro_batch: int = 0         # the largest micro batch one rank's memory holds (0: no limit)
    max_bad_steps: int = 20          # consecutive non-finite losses before the run stops
    # torch.compile each transformer layer, ZeRO stages 0-2 (what it buys on GPU: docs/benchmarks.md);
    # compile_mode "reduce-overhead" also replays each layer's kernels as CUDA graphs (GPU only)
    compile: bool = False
    compile_mode: str = "default"
    output_dir: str = "output"


@dataclass
class EvalConfig:
    """The task's evaluation: after every `every_epochs` epochs of training (0: never) and by
    albef_ds.evaluate. `data`: the task's evaluation files (ALBEF's JSON, with image_root) or shard
    patterns (the demo sets its generated corpus' held-out split)."""
    data: list[str] = field(default_factory=list)
    image_root: str = ""
    k_test: int = 128                # candidates re-ranked per query (retrieval, VQA answers)
    batch_size: int = 64
    every_epochs: int = 0
    select_metric: str = ""          # the checkpoint kept as `best`; empty: the task's choice
    # the share of a set's items that may be left out (unreadable images...): 0, none (docs/failures.md)
    max_skipped: float = 0.0
    pictures: int = 4                # the first items drawn to tb/ at each evaluation of a run; 0: none


# The least value each number may take; a value below stops the run before anything is built
# (zero intervals divide by zero thousands of steps in, a zero batch or accumulation trains nothing).
MINIMUMS = {
    "model.embed_dim": 1, "model.queue_size": 1,
    "data.workers": 0, "data.epoch_samples": 0, "data.shuffle_buffer": 1, "data.open_shards": 1, "data.max_words": 1,
    "data.max_tokens": 2,  # [CLS] and one word
    "train.batch_size": 1, "train.grad_accum": 1, "train.epochs": 0, "train.max_steps": 0,
    "train.warmup_steps": 0, "train.warmup_lr": 0.0, "train.min_lr": 0.0, "train.weight_decay": 0.0,
    "train.grad_clip": 0.0, "train.log_every": 1, "train.save_every": 1, "train.keep_last": 0,
    "train.max_bad_steps": 1, "train.max_micro_batch": 0,
    "eval.k_test": 0, "eval.batch_size": 1, "eval.every_epochs": 0, "eval.max_skipped": 0.0, "eval.pictures": 0,
}
ABOVE_ZERO = ("model.temp", "train.lr")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ITM_NEGATIVES = ("hard", "random")
POS_EMBED_INITS = ("timm", "sincos")


@dataclass
class Config:
    # The task (albef_ds/tasks/<task>.py): pretrain, retrieval, ... Its own options, if it takes
    # any, are the config section named after it (`vqa: {answer_list: ...}`), held in `options` as
    # plain data: the task types and checks them (albef_ds.tasks.base.Task.options).
    task: str = "pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    options: Optional[dict] = None

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("options")
        if self.options is not None:
            out[self.task] = copy.deepcopy(self.options)
        return out


def build_section(cls, values: Any, where: str):
    """A config dataclass from a mapping: unknown keys and values of the wrong type are
    ConfigErrors naming the key."""
    if dataclasses.is_dataclass(values):
        values = dataclasses.asdict(values)
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{where or 'root'}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in names or (cls is Config and key == "options"):
            known = sorted(names - {"options"}) if cls is Config else sorted(names)
            raise ConfigError(f"unknown config key '{path}' (known: {', '.join(known)}"
                              + (", and the section named after the task" if cls is Config else "") + ")")
        kwargs[key] = _convert(hints[key], value, path)
    return cls(**kwargs)


def _convert(hint, value, path):
    """`value` as the type `hint` says (ints are numbers where a float is expected; a string is a
    one-item list where a list of strings is expected; yaml reads 3e-4 as a string), else a
    ConfigError naming the key, the value and what was expected."""
    if dataclasses.is_dataclass(hint):
        return build_section(hint, value, path)
    if hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return build_section(arg, value, path)          # its own error names the key inside
            try:
                return _convert(arg, value, path)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{path}' has value {value!r}: expected {_expected(hint)}")
    if hint is float and not isinstance(value, bool):
        try:
            if isinstance(value, (int, float, str)):
                return float(value)
        except ValueError:
            pass
    elif origin is list or hint is list:
        item = args[0] if args else Any
        if isinstance(value, str) and item in (str, Any):
            return [value]                # one shard pattern, annotation file or eval file
        if isinstance(value, list):
            return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    elif isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"config key '{path}' has value {value!r}: expected {_expected(hint)}")


def _expected(hint) -> str:
    """What a type hint asks for, in words."""
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}
    if hint in words or dataclasses.is_dataclass(hint):
        return words.get(hint, "a mapping")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        return " or ".join("null" if a is type(None) else _expected(a) for a in args)
    if origin is list or hint is list:
        return f"a list of {_expected(args[0]).split(' ', 1)[1]}s" if args and args[0] in words else "a list"
    return str(hint)


def resolve_config_path(name: str) -> Path:
    """A yaml path, or the name (with or without .yaml) of a config shipped in albef_ds/configs."""
    for candidate in (Path(name), CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config '{name}' is neither a file nor a shipped config ({', '.join(shipped)})")


def _read_yaml(path: Path) -> dict:
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: " + " ".join(str(exc).split())) from None
    if not isinstance(values, dict):
        raise ConfigError(f"config {path} holds a {type(values).__name__}, not a mapping of sections")
    base = values.pop("base", None)
    if base is None:
        return values
    sibling = path.parent / base
    parent = _read_yaml(sibling if sibling.is_file() else resolve_config_path(base))
    return _merge(parent, values)


def _merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Applies `a.b.c=value` strings; values are parsed as yaml (numbers, booleans, lists, null)."""
    values = copy.deepcopy(values)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        node = values
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return values


def load_config(source: Union[str, dict, Config, None] = "tiny", overrides: Optional[list[str]] = None) -> Config:
    """A Config from a shipped config name, a yaml path, a dict or a Config, plus overrides."""
    if isinstance(source, Config):
        values = source.to_dict()
    elif isinstance(source, dict):
        values = source
    else:
        values = _read_yaml(resolve_config_path(source or "tiny"))
    values = apply_overrides(values, overrides or [])
    task = values.get("task", Config.task)
    if not isinstance(task, str) or not task.isidentifier():
        raise ConfigError(f"config key 'task' has value {task!r}: expected a task's name (pretrain, retrieval, ...)")
    section = values.pop(task, None)
    if "options" in values:
        raise ConfigError(f"unknown config key 'options': task options go in the section '{task}'")
    if section is not None and not isinstance(section, dict):
        raise ConfigError(f"config section '{task}' must be a mapping, got {section!r}")
    config = build_section(Config, values, "")
    config.options = section
    check_config(config)
    return config


def check_config(config: Config) -> None:
    """The checks a config passes before anything is built: numbers in range, a consistent model."""
    validate_model_config(config.model)
    _check_ranges(config)
    if config.train.compile_mode not in COMPILE_MODES:
        raise ConfigError(f"train.compile_mode '{config.train.compile_mode}' is not one of {', '.join(COMPILE_MODES)}")
    if config.train.elastic_batch not in ("keep", "per_rank"):
        raise ConfigError(f"train.elastic_batch '{config.train.elastic_batch}' is not one of keep, per_rank")


def _check_ranges(config: Config) -> None:
    def value(key: str):
        section, name = key.split(".")
        return getattr(getattr(config, section), name)

    for key, least in MINIMUMS.items():
        if value(key) < least:
            raise ConfigError(f"{key} is {value(key)}: it must be at least {least}")
    for key in ABOVE_ZERO:
        if not value(key) > 0:
            raise ConfigError(f"{key} is {value(key)}: it must be above 0")
    if config.eval.max_skipped > 1:
        raise ConfigError(f"eval.max_skipped is {config.eval.max_skipped}: it is a share of the set, at most 1")
    if not config.train.epochs and not config.train.max_steps:
        raise ConfigError("train.epochs and train.max_steps are both 0: nothing to train")
    scale = config.data.crop_scale
    if scale is not None and not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise ConfigError(f"data.crop_scale {scale} must be [low, high] with 0 < low <= high <= 1, or null")


def validate_model_config(m: ModelConfig) -> None:
    v, t = m.vision, m.text
    if v.img_size % v.patch_size:
        raise ConfigError(f"model.vision.img_size {v.img_size} is not a multiple of patch_size {v.patch_size}")
    if v.pos_embed_init not in POS_EMBED_INITS:
        raise ConfigError(f"model.vision.pos_embed_init '{v.pos_embed_init}' is not one of {', '.join(POS_EMBED_INITS)}")
    if v.width % v.heads or t.hidden % t.heads:
        raise ConfigError(f"widths must divide by heads: vision {v.width}/{v.heads}, text {t.hidden}/{t.heads}")
    if not 0 < t.fusion_start < t.layers:
        raise ConfigError(f"model.text.fusion_start {t.fusion_start} must lie in (0, layers={t.layers})")
    if not 0.0 < m.mlm_probability < 1.0:
        raise ConfigError(f"model.mlm_probability {m.mlm_probability} must lie in (0, 1)")
    if not 0.0 <= m.alpha <= 1.0:
        raise ConfigError(f"model.alpha {m.alpha} must lie in [0, 1]")
    if not 0.0 <= m.momentum < 1.0:
        raise ConfigError(f"model.momentum {m.momentum} must lie in [0, 1)")
    if m.itm_negatives not in ITM_NEGATIVES:
        raise ConfigError(f"model.itm_negatives '{m.itm_negatives}' is not one of {', '.join(ITM_NEGATIVES)}")
