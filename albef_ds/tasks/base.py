"""The task protocol: everything the trainer, the data stream, evaluation and the checkpoint tools
need to know about one objective, in one object.

A task is a module of albef_ds.tasks named as the task (`task: vqa` -> albef_ds/tasks/vqa.py) that
defines `TASK`, a subclass of `Task`. It declares:
  - its options (`Options`, a dataclass: the config section named after the task) and start-up checks;
  - its model: `build_model()` returns a `TrainingModel` (encoders, heads, momentum copies, queues),
    and `initial_state()` says which weights it takes from a pretrained checkpoint of another task;
  - its samples: `codec()` decodes a raw sample and collates a batch (its batch keys);
  - its training forward (`TrainingModel.forward(batch, ctx) -> (loss, metrics)`), what runs once a
    micro-batch was trained on (`after_micro_batch`: queue writes), the momentum pairs and the
    clamped parameters the trainer updates after an applied optimizer step, the buffers a training
    checkpoint keeps (queues);
  - its evaluator (`evaluator()`: metric names, the one that selects the best checkpoint).
The trainer's loop knows none of them by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from ..config import Config, ConfigError, ModelConfig, build_section
from ..data.annotations import check_entries
from ..data.shards import check_corpus_annotations


@dataclass
class StepContext:
    """What a training forward needs from the loop besides the batch."""
    step: int                       # optimizer steps applied before this one
    steps_per_epoch: int
    # Seeded by the micro-batch index: random numbers drawn from it for the GLOBAL batch and
    # sliced (masks, negatives) make a run's numbers independent of the number of ranks.
    generator: Optional[torch.Generator] = None


class TrainingModel(nn.Module):
    """What the trainer wraps in DeepSpeed. Subclasses define forward(batch, ctx) -> (loss, metrics):
    the loss to back-propagate and a dict of scalar tensors (or floats) to log, averaged over ranks
    and accumulation steps. Every rank must run the same collectives in the same order."""

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online part, momentum copy) pairs: the trainer's EMA updates them after each applied step."""
        return []

    def clamped_parameters(self) -> dict[str, tuple[float, float]]:
        """Parameters held in a range after each applied step (the optimizer's fp32 master is clamped)."""
        return {}

    def checkpoint_buffers(self) -> tuple[str, ...]:
        """Buffers a training checkpoint keeps in fp32 beside DeepSpeed's state (the queues)."""
        return ()

    def after_micro_batch(self) -> None:
        """The last forward's micro-batch was trained on (its loss was finite on every rank): commit
        what it leaves behind, such as queue writes. Not called for a skipped micro-batch."""


class Task:
    name: ClassVar[str] = ""
    # The dataclass of the config section named after the task (None: the task takes none).
    Options: ClassVar[Optional[type]] = None
    # The inference model (albef_ds.models) whose weights the training model holds under the same
    # names: what load_model() returns and evaluation runs.
    inference_class: ClassVar[type] = nn.Module

    # The released ALBEF layout of this task: its BERT parts, each with whether the release names
    # it with the `bert.` infix (BertForMaskedLM / BertLMHeadModel) or without (BertModel), and
    # new heads (prefixes) a checkpoint of another task does not have.
    released_text_parts: ClassVar[dict] = {}
    fresh_parts: ClassVar[tuple] = ()
    # What only a checkpoint of this task holds trained (prefixes): started from another task's
    # checkpoint they are random or derived, so evaluating, converting or loading such a model as
    # this task's is refused unless asked for (retrieval and grounding take a pretrained model as
    # it is: zero-shot, as the paper evaluates them).
    fine_tuned_parts: ClassVar[tuple] = ()
    # What an entry of the task's training annotation files holds (albef_ds.data.annotations), and
    # how many images it names (0: not checked).
    annotation_schema: ClassVar[dict] = {}
    annotation_images: ClassVar[int] = 0
    # What the evaluator reports and which metric selects the best checkpoint by default.
    eval_metrics: ClassVar[tuple] = ()
    select_metric: ClassVar[str] = ""

    def __init__(self, cfg: Config):
        """Raises ConfigError for options of the wrong name or type (the task's section of the config)."""
        self.cfg = cfg
        self.options = build_options(type(self), cfg.options, self.name)

    @classmethod
    def is_release(cls, keys: set) -> bool:
        """Whether a released ALBEF state dict with these keys is this task's (the tasks' checks
        exclude each other)."""
        return False

    # ---- start-up ------------------------------------------------------------------------------
    def check(self, world_size: int) -> None:
        """Task-specific checks of the config for a run on `world_size` ranks, before anything is
        built (raise ConfigError naming the key and the numbers)."""

    def check_annotations(self) -> None:
        """Every entry of the annotation files data.corpora reads directly, before anything is built:
        a wrong one is a ConfigError naming the file, the entry and the key."""
        if self.annotation_schema:
            check_corpus_annotations(self.cfg.data.corpora, lambda entries, path: check_entries(
                entries, path, self.annotation_schema, self.annotation_images))

    # ---- model ---------------------------------------------------------------------------------
    def build_model(self, model_cfg: Optional[ModelConfig] = None) -> TrainingModel:
        """A fresh training model (pretrained encoder weights fetched if the config names them)."""
        raise NotImplementedError

    def build_inference_model(self, model_cfg: Optional[ModelConfig] = None) -> nn.Module:
        return self.inference_class(model_cfg or self.cfg.model)

    def initial_state(self, state: dict, source_task: str) -> dict:
        """The weights this task takes from a checkpoint of `source_task` (our key names, the
        source's layout): by default every key, by name (conform() drops what the model lacks)."""
        return state

    # ---- data ----------------------------------------------------------------------------------
    def codec(self, tokenizer, train: bool):
        """The SampleCodec (albef_ds.data.codec) that turns raw samples into this task's batches."""
        raise NotImplementedError

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluator(self, output_dir: str):
        """The evaluator run every eval.every_epochs: constructed, it has read its data (a bad set is
        a ConfigError then); called with the inference model on every rank, it returns the same
        metrics everywhere. None: the task has no evaluation."""
        return None

    def eval_pictures(self, evaluator, model: nn.Module, count: int) -> dict:
        """Pictures (PIL images by name) of the first `count` items of `evaluator`'s data, drawn with
        `model` as the evaluation had it (albef_ds.tasks.eval_pictures): what the engine logs to
        TensorBoard after every evaluation of a training run (`eval.pictures`; rank 0 alone calls
        it, so it runs no collective). {}: the task draws none."""
        return {}

    # `python -m albef_ds.evaluate <task>`: the subcommand's help (empty: no subcommand), its own
    # arguments beyond --checkpoint, --data, --image_root, --output_dir, --config, --batch_size,
    # and the evaluation of a loaded inference model (metrics, written to metrics.json).
    eval_command_help: ClassVar[str] = ""

    @classmethod
    def add_eval_arguments(cls, parser) -> None:
        pass

    @classmethod
    def check_eval_arguments(cls, args) -> None:
        """The task's own rules for its evaluation command's arguments (ConfigError naming the
        option), checked before the model is loaded."""

    @classmethod
    def evaluate_command(cls, model: nn.Module, args) -> dict:
        raise NotImplementedError

    @classmethod
    def format_metrics(cls, metrics: dict) -> str:
        return "  ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float))


def build_options(task_cls: type, values: Any, where: str):
    """The task's options from its config section (unknown keys are errors naming them)."""
    if task_cls.Options is None:
        if values:
            raise ConfigError(f"task '{task_cls.name}' takes no '{where}' section")
        return None
    return build_section(task_cls.Options, values or {}, where)

