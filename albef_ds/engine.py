"""The training engine: owns DeepSpeed, runs the one training loop, saves and resumes.

Flow of one optimizer step (gradient accumulation of `grad_accum` micro-batches):
    batch -> ALBEF.forward (global-batch ITC, hard negatives, MLM) -> engine.backward -> engine.step
    once the step is applied: momentum EMA (shard-local), temperature clamp, lr for the next step
    -> metrics (rank 0) -> checkpoint every save_every steps, at the end, or on SIGUSR1/SIGTERM.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import resource
import signal
import time
from typing import Iterable, Optional, Union

import torch

from . import build_model, checkpoint
from . import distributed as dist
from .config import Config, ConfigError
from .metrics import MetricsLogger
from .models.albef import TEMP_RANGE
from .momentum import MomentumEMA
from .objectives import alpha_at
from .optim import lr_at, param_groups

EXIT_REQUEUE = 124      # saved on SIGUSR1: the Slurm template requeues the job
EXIT_TERMINATED = 143   # saved on SIGTERM


def resolve_ds_config(ds: Union[str, dict], cfg: Config, world_size: int) -> dict:
    """Fills the ds config's "auto" entries from the project config and checks the two agree.

    Raises ConfigError naming the numbers before anything is built."""
    if isinstance(ds, str):
        try:
            with open(ds) as f:
                ds = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read DeepSpeed config {ds}: {exc}") from None
    ds = copy.deepcopy(ds)
    t = cfg.train

    def fill(key, value, section=ds):
        if section.get(key, "auto") == "auto":
            section[key] = value
        elif section[key] != value:
            raise ConfigError(f"ds config {key}={section[key]} disagrees with the project config ({value})")

    fill("train_micro_batch_size_per_gpu", t.batch_size)
    fill("gradient_accumulation_steps", t.grad_accum)
    expected = t.batch_size * t.grad_accum * world_size
    if ds.get("train_batch_size", "auto") == "auto":
        ds["train_batch_size"] = expected
    elif ds["train_batch_size"] != expected:
        raise ConfigError(f"ds config train_batch_size={ds['train_batch_size']} but micro batch "
                          f"{t.batch_size} x accumulation {t.grad_accum} x world size {world_size} = {expected}")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if t.compile and stage == 3:
        raise ConfigError("train.compile is not supported with ZeRO stage 3 (its parameter hooks "
                          "gather weights inside the layers): use stage 0-2 or train.compile=false")
    zero = ds.get("zero_optimization", {})
    for key in ("overlap_comm", "contiguous_gradients"):
        if zero.get(key) == "auto":
            # One rank reduces nothing: no communication to overlap (and overlap_comm makes ZeRO
            # wait for the device at the end of every backward pass), no partition for the
            # contiguous buffer to feed (it costs a copy per gradient in a Python hook: half of
            # ZeRO-2's extra step time over ZeRO-1 on one H100, docs/benchmarks.md). Several
            # ranks: DeepSpeed's recommended setting (the contiguous path reduces each gradient to
            # its owner only).
            zero[key] = world_size > 1
    global_batch = t.batch_size * world_size
    if global_batch > cfg.model.queue_size:
        raise ConfigError(f"global batch {global_batch} (micro batch {t.batch_size} x {world_size} ranks) "
                          f"is larger than model.queue_size {cfg.model.queue_size}")
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = t.grad_clip
    bf16 = ds.setdefault("bf16", {"enabled": "auto"})
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = torch.cuda.is_available()
    params = ds.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})
    fill("lr", t.warmup_lr if t.warmup_steps else t.lr, params)
    if params.get("weight_decay", "auto") == "auto":
        params["weight_decay"] = t.weight_decay
    left = [k for k, v in _flatten(ds) if v == "auto"]
    if left:
        raise ConfigError(f"ds config entries left at 'auto' that ALBEF-DS does not fill: {left}")
    return ds


def check_eval_config(cfg: Config) -> None:
    """Before training: the metric that picks the best checkpoint is one the evaluation reports."""
    from .evaluate import RETRIEVAL_METRICS

    name = cfg.eval.select_metric
    if cfg.eval.every_epochs and name not in RETRIEVAL_METRICS:
        raise ConfigError(f"eval.select_metric '{name}' is not a reported metric ({', '.join(RETRIEVAL_METRICS)})")


def key_id(key: str) -> int:
    """A non-negative int64 id for a sample key, the same in every process and run."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=7).digest(), "big")


def _flatten(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def prepare_corpora(cfg: Config, output_dir: str) -> Config:
    """With no corpora configured, the generated shapes corpus (written once, by rank 0)."""
    if cfg.data.corpora or cfg.data.synthetic is None:
        return cfg
    from .data import shared_synthetic_corpus

    cfg = copy.deepcopy(cfg)
    cfg.data.corpora = shared_synthetic_corpus(os.path.join(output_dir, "synthetic_data"), cfg.data.synthetic)["train"]
    return cfg


class Trainer:
    def __init__(self, cfg: Config, ds_config: Union[str, dict], output_dir: str,
                 resume: Optional[str] = None, batches: Optional[Iterable[dict]] = None,
                 steps_per_epoch: Optional[int] = None, client_optimizer=None):
        """`resume`: None (fresh), "" (latest if there is one, else fresh) or a tag.
        `batches`: any iterable of batches instead of the configured data stream (tests, bench).
        `client_optimizer(param_groups)`: an optimizer of one's own instead of the ds config's
        (the benchmark's baseline uses torch.optim.AdamW)."""
        # Handlers first: a SIGUSR1 while starting up is acted on at the first step, not fatal.
        # A start that fails gives them back (else SIGTERM would only set a flag nobody reads).
        self._signal = None
        self._previous_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGUSR1, signal.SIGTERM)}
        try:
            self._start(cfg, ds_config, output_dir, resume, batches, steps_per_epoch, client_optimizer)
        except BaseException:
            self._restore_signal_handlers()
            raise

    def _start(self, cfg, ds_config, output_dir, resume, batches, steps_per_epoch, client_optimizer) -> None:
        self.owns_process_group = dist.init_distributed()
        self.cfg, self.output_dir = cfg, output_dir
        self.ckpt_dir = os.path.join(output_dir, "checkpoints")
        self.ds_config = resolve_ds_config(ds_config, cfg, dist.world_size())
        check_eval_config(cfg)
        try:      # now, not at the first save thousands of steps in
            os.makedirs(self.ckpt_dir, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the checkpoint folder {self.ckpt_dir} (output_dir {output_dir}): {exc}") from None
        if not os.access(self.ckpt_dir, os.W_OK | os.X_OK):
            raise ConfigError(f"the checkpoint folder {self.ckpt_dir} (output_dir {output_dir}) is not writable")
        if client_optimizer is not None:
            self.ds_config.pop("optimizer")
        self.device = torch.device(f"cuda:{dist.local_rank()}" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(cfg.train.seed)     # same initial weights and queues on every rank

        self.stream = None
        self.tokenizer = None
        self.best = None              # (metric value, tag) of the best evaluation so far
        if batches is None:
            cfg = self.cfg = prepare_corpora(cfg, output_dir)
            self.stream = self._build_stream()
            batches = self.stream
        self.batches = batches
        # the evaluation set, read now when evaluations are due (a bad one stops the run before
        # the model is built), else at the first call of evaluate()
        self.eval_data = self._read_eval_data() if cfg.eval.every_epochs else None
        accum = cfg.train.grad_accum
        if steps_per_epoch is None:
            steps_per_epoch = self.stream.steps_per_epoch // accum if self.stream else 1
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch

        import deepspeed

        resume_tag = self._resume_tag(resume)
        if resume_tag is not None:
            checkpoint.check_resumable(self.ckpt_dir, resume_tag)
        if resume_tag is not None and cfg.model.init_checkpoint:
            # the checkpoint being resumed holds every weight: the init file is not read (or needed)
            cfg = copy.deepcopy(cfg)
            cfg.model.init_checkpoint = None
        model = build_model(cfg.model)
        groups = param_groups(model, cfg.train.weight_decay)
        optimizer = client_optimizer(groups) if client_optimizer is not None else None
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=None if optimizer else groups,
                                                    optimizer=optimizer, config=self.ds_config)
        self.model = self.engine.module
        self.dtype = torch.bfloat16 if self.engine.bfloat16_enabled() else torch.float32
        # DeepSpeed casts every floating tensor of the module to bf16; the feature queues stay fp32.
        for name in ("image_queue", "text_queue"):
            queue = getattr(self.model, name)
            queue.data = queue.data.float()
        self.momentum = MomentumEMA(self.model, cfg.model.momentum)
        if cfg.train.compile:
            # Layer by layer, in place (state-dict names unchanged); static shapes: a step has a
            # handful of distinct layer input shapes, each compiled once.
            for layer in self.model.transformer_layers():
                layer.compile(dynamic=False, mode=cfg.train.compile_mode)
        self.step = 0                 # optimizer steps applied
        self.micro_seen = 0           # micro-batches drawn, the seed of their masks and negatives
        self.bad_in_row = 0
        self.bad_total = 0
        self.log = None
        self.agreed_signal = None     # the signal a rank received, once all ranks know it
        self.applied_norm = None      # (step, global gradient norm) of the last applied step
        self.saved_step = None        # the step of the last checkpoint this run saved or resumed
        if resume_tag is not None:
            self._resume(resume_tag)

    def _build_stream(self):
        from .data import PretrainStream
        from .tokenizer import build_tokenizer

        tokenizer = self.tokenizer = build_tokenizer(self.cfg.model.text.tokenizer)
        t = self.cfg.model.text
        ids = {"pad_token_id": tokenizer.pad_token_id, "cls_token_id": tokenizer.cls_token_id,
               "mask_token_id": tokenizer.mask_token_id, "sep_token_id": tokenizer.sep_token_id}
        wrong = {k: (v, getattr(t, k)) for k, v in ids.items() if v != getattr(t, k)}
        if wrong or len(tokenizer) > t.vocab_size:
            raise ConfigError(f"tokenizer '{t.tokenizer}' disagrees with model.text: "
                              + ", ".join(f"{k} is {a}, config says {b}" for k, (a, b) in wrong.items())
                              + (f" vocabulary {len(tokenizer)} > vocab_size {t.vocab_size}" if len(tokenizer) > t.vocab_size else ""))
        return PretrainStream(self.cfg.data, self.cfg.model.vision.img_size, tokenizer, self.cfg.train.batch_size,
                              dist.rank(), dist.world_size(), self.cfg.train.seed)

    # ---- checkpoints ---------------------------------------------------------------------
    def _resume_tag(self, resume: Optional[str]) -> Optional[str]:
        if resume is None or resume:
            return resume
        tag = checkpoint.latest_tag(self.ckpt_dir)
        if tag is None and dist.rank() == 0:
            print(f"no checkpoint in {self.ckpt_dir}: starting fresh", flush=True)
        return tag

    def save(self) -> str:
        """Saves this step's checkpoint, once: a best evaluation on a save step or on the last
        step asks again, with nothing changed since."""
        if self.saved_step == self.step:
            return checkpoint.tag_for(self.step)
        self._check_applied_norm()
        client = {"step": self.step, "micro_seen": self.micro_seen, "bad_total": self.bad_total,
                  "best": self.best,
                  "queues": {k: v.detach().cpu() for k, v in self.model.named_buffers()
                             if k in ("image_queue", "text_queue", "idx_queue", "queue_ptr")},
                  "config": self.cfg.to_dict()}
        rank_state = {"rng": checkpoint.rng_state(),
                      "data": self.stream.state_dict() if self.stream is not None else None}
        tag = checkpoint.save(self.engine, self.ckpt_dir, self.step, client, rank_state, self.momentum,
                              self.cfg.train.keep_last)
        self.saved_step = self.step
        if dist.rank() == 0:
            print(f"saved checkpoint {os.path.join(self.ckpt_dir, tag)}", flush=True)
        return tag

    def _resume(self, tag: str) -> None:
        client, rank_state = checkpoint.load(self.engine, self.ckpt_dir, tag, self.momentum)
        self.step, self.micro_seen, self.bad_total = client["step"], client["micro_seen"], client["bad_total"]
        # the best as of the resumed step (best.json may name a later tag of an abandoned branch)
        self.best = client.get("best")
        self.saved_step = self.step
        buffers = dict(self.model.named_buffers())
        for name, value in client["queues"].items():
            buffers[name].copy_(value)
        checkpoint.set_rng_state(rank_state["rng"])
        if self.stream is not None and rank_state["data"] is not None:
            self.stream.load_state_dict(rank_state["data"])
        if dist.rank() == 0:
            print(f"resumed from {os.path.join(self.ckpt_dir, tag)} at step {self.step}", flush=True)

    # ---- evaluation ----------------------------------------------------------------------
    def _eval_due(self) -> bool:
        every = self.cfg.eval.every_epochs
        return every > 0 and self.step % (every * self.steps_per_epoch) == 0

    def _read_eval_data(self):
        """The evaluation set, kept for every evaluation: the captions, and the encoded images this
        rank encodes. A missing or unreadable set is a ConfigError."""
        from .evaluate import images_of_this_rank, read_retrieval_set

        e = self.cfg.eval
        if e.data:
            source = e.data[0] if len(e.data) == 1 else e.data
        elif self.cfg.data.synthetic is not None:
            from .data import shared_synthetic_corpus

            source = shared_synthetic_corpus(os.path.join(self.output_dir, "synthetic_data"),
                                             self.cfg.data.synthetic)["heldout"]
        else:
            raise ConfigError("evaluation needs eval.data (there is no generated corpus to take the held-out split of)")
        try:
            return read_retrieval_set(source, e.image_root or None, self.cfg.data.max_words,
                                      images_of_this_rank(e.batch_size))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"eval.data {e.data or source}: {exc}") from None

    def evaluate(self) -> dict:
        """Retrieval evaluation (albef_ds.evaluate) on eval.data, or on the held-out split of the
        generated corpus; a collective: every rank calls it and gets the same metrics."""
        from .evaluate import eval_model, evaluate_retrieval
        from .tokenizer import build_tokenizer

        e = self.cfg.eval
        if self.eval_data is None:
            self.eval_data = self._read_eval_data()
        self.tokenizer = self.tokenizer or build_tokenizer(self.cfg.model.text.tokenizer)
        return evaluate_retrieval(eval_model(self.engine), self.eval_data, self.tokenizer, self.cfg.model.vision.img_size,
                                  self.cfg.data.max_tokens, k_test=e.k_test, batch_size=e.batch_size)

    def _evaluate_and_keep_best(self) -> None:
        metrics = self.evaluate()
        name = self.cfg.eval.select_metric
        self.log.log_eval(self.step, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        if self.best is None or metrics[name] > self.best[0]:
            # set first: the checkpoint being saved records itself as the best
            self.best = (metrics[name], checkpoint.tag_for(self.step))
            checkpoint.mark_best(self.ckpt_dir, self.save(), name, metrics[name])

    # ---- signals -------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self._signal = signum

    # ---- the loop ------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> tuple:
        images = batch["image"].to(self.device, non_blocking=True).to(self.dtype)
        return images, batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    def _image_ids(self, batch: dict) -> Optional[torch.Tensor]:
        """Retrieval fine-tuning: captions of one image are positives of each other. The image id
        is a stable hash of the sample key (one sample per image, see tools/make_shards.py)."""
        if self.cfg.task != "retrieval":
            return None
        return torch.tensor([key_id(k) for k in batch["keys"]], device=self.device)

    def _agree(self, loss: torch.Tensor) -> bool:
        """The step's one wait for the device: after the forward pass, every rank learns at once
        whether any rank's loss is non-finite (to skip it everywhere), which signal any rank
        received (ranks may receive it at different steps) and whether the last applied gradient
        norm was non-finite (read here, not right after the step, which would be a second wait).
        True: the loss is finite on every rank."""
        flags = torch.zeros(3, device=loss.device)
        flags[0] = ~torch.isfinite(loss.detach())
        flags[1] = self._signal or 0
        flags[2] = self._applied_norm_is_bad()
        if dist.is_distributed():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        bad_loss, signum, bad_norm = flags.tolist()
        if bad_norm:
            self._raise_non_finite_norm()
        self.agreed_signal = max(self.agreed_signal or 0, int(signum)) or None
        return not bad_loss

    def _micro_step(self, batch: dict) -> Optional[dict]:
        """Forward, and backward unless the loss is non-finite on any rank. Returns the losses."""
        images, ids, mask = self._to_device(batch)
        generator = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + self.micro_seen)
        self.micro_seen += 1
        alpha = alpha_at(self.step, self.steps_per_epoch, self.cfg.model.alpha)
        out = self.engine(images, ids, mask, alpha=alpha, image_ids=self._image_ids(batch), generator=generator)
        if not self._agree(out["loss"]):
            self.bad_in_row += 1
            self.bad_total += 1
            if dist.rank() == 0:
                print(f"warning: non-finite loss at step {self.step + 1} (batch keys "
                      f"{list(batch.get('keys', []))[:3]}...), skipped ({self.bad_in_row} in a row, "
                      f"{self.bad_total} in all)", flush=True)
            if self.bad_in_row >= self.cfg.train.max_bad_steps:
                raise RuntimeError(
                    f"{self.bad_in_row} non-finite losses in a row (train.max_bad_steps="
                    f"{self.cfg.train.max_bad_steps}); stopping. The last good checkpoint in "
                    f"{self.ckpt_dir} is intact: lower train.lr or check the data, then --resume.")
            return None
        self.bad_in_row = 0
        self.engine.backward(out["loss"])
        self.engine.step()
        return {k: v.detach().float() for k, v in out.items()}

    # Under bf16 the shipped ds configs turn off DeepSpeed's per-tensor overflow check (a quarter
    # of an H100 step), so a non-finite gradient behind a finite loss is applied. The global
    # gradient norm, the same on every rank, shows it: it is kept (on the device) after each
    # applied step and checked at the next forward pass's agreement and before every save, so
    # every rank stops before a checkpoint could hold the damaged weights.
    def _applied_norm_is_bad(self) -> Union[torch.Tensor, bool]:
        if self.applied_norm is None:
            return False
        norm = self.applied_norm[1]
        return ~torch.isfinite(norm) if torch.is_tensor(norm) else not math.isfinite(norm)

    def _check_applied_norm(self) -> None:
        if bool(self._applied_norm_is_bad()):
            self._raise_non_finite_norm()

    def _raise_non_finite_norm(self) -> None:
        step, norm = self.applied_norm
        raise RuntimeError(
            f"non-finite gradient norm ({float(norm)}) at step {step} with a finite loss: "
            f"the update reached the weights, so training stops before saving them. Resume from the "
            f"last checkpoint in {self.ckpt_dir} (--resume); if it recurs at the same step, check "
            f"the data or lower train.lr, or set bf16.check_grad_overflow=true in the ds config to "
            f"skip such steps instead (slower).")

    def _clamp_temperature(self) -> None:
        """ALBEF clamps the temperature parameter itself; under ZeRO the value to clamp is the
        optimizer's fp32 master copy: each rank clamps the slice of it that it holds, if any (no
        communication, no wait for the device). DeepSpeed's safe_set_full_fp32_param would do it
        through a collective, and under ZeRO-3 it fails for a parameter smaller than the world
        size (it looks for the padded slice of the last rank past the value's end)."""
        temp = self.model.temp
        if hasattr(temp, "ds_id"):                       # ZeRO-3, as its own setter reaches the slice
            z3 = temp._z3_optimizer
            fragment, group = z3._get_fp32_opt_state_partition(temp, release_swap_buffers=False)
            with torch.no_grad():      # the fragment is a view of the optimizer's parameter
                fragment.clamp_(*TEMP_RANGE)
            if z3._swappable_optimizer_subgroup(group):  # optimizer states offloaded to NVMe
                z3._optimizer_states_and_gradient_swap_out(group)
        elif not hasattr(temp, "_hp_mapping"):           # no ZeRO: the module holds the master
            self.model.clamp_temperature_()
        elif temp._hp_mapping is not None:               # ZeRO-1/2, on the rank that owns it
            with torch.no_grad():
                temp._hp_mapping.get_hp_fragment().clamp_(*TEMP_RANGE)

    def temperature(self) -> float:
        """The temperature as the optimizer holds it (a collective under ZeRO: every rank calls it)."""
        from deepspeed.utils import safe_get_full_fp32_param

        master = safe_get_full_fp32_param(self.model.temp)
        return float(master if master is not None else self.model.temp.detach())

    def _set_lr(self) -> float:
        lr = lr_at(self.step, self.cfg.train, self.steps_per_epoch)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self, data) -> tuple[dict, float, float, float]:
        """One optimizer step over grad_accum finite micro-batches drawn from `data`.
        Returns (mean losses, lr, seconds, seconds spent waiting for data)."""
        lr = self._set_lr()
        started, waited, sums, done = time.perf_counter(), 0.0, {}, 0
        while done < self.cfg.train.grad_accum:
            t = time.perf_counter()
            batch = next(data)
            waited += time.perf_counter() - t
            out = self._micro_step(batch)
            if out is None:
                continue
            done += 1
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v / self.cfg.train.grad_accum
        if self.engine.was_step_applied():
            norm = self.engine.get_global_grad_norm()
            if norm is not None:
                self.applied_norm = (self.step + 1, norm)
            self.momentum.update()
            self._clamp_temperature()
        self.step += 1
        return sums, lr, time.perf_counter() - started, waited

    def train(self) -> int:
        """Runs to total_steps; returns a process exit code (0, or EXIT_REQUEUE / EXIT_TERMINATED
        after saving on a signal)."""
        self.log = MetricsLogger(self.output_dir, self.total_steps, enabled=dist.rank() == 0)
        data = iter(self.batches)
        try:
            while self.step < self.total_steps:
                sums, lr, elapsed, waited = self.train_step(data)
                if self.step % self.cfg.train.log_every == 0 or self.step == self.total_steps:
                    self._log(sums, lr, elapsed, waited)
                if self._eval_due():
                    self._evaluate_and_keep_best()
                received = self.agreed_signal
                if received:
                    self.save()
                    self.log.note(f"received {signal.Signals(received).name}: saved at step {self.step}, exiting")
                    return EXIT_REQUEUE if received == signal.SIGUSR1 else EXIT_TERMINATED
                if self.step % self.cfg.train.save_every == 0 and self.step < self.total_steps:
                    self.save()
            self.save()
            return 0
        finally:
            self._restore_signal_handlers()
            self.log.close()

    def _restore_signal_handlers(self) -> None:
        for s, handler in self._previous_handlers.items():
            signal.signal(s, handler)

    def close(self) -> None:
        """Tears down in order, every rank together: the signal handlers installed at start-up
        (also for a Trainer never trained), DeepSpeed's hooks and buffers, then the process group
        if this Trainer started it (one started by the caller serves on, e.g. for another
        Trainer). Left to interpreter exit, a rank sometimes aborted there ("terminate called
        without an active exception", 1 run in 8 of tools/bench.py)."""
        self._restore_signal_handlers()
        dist.barrier()
        self.engine.destroy()
        if self.owns_process_group:
            dist.shutdown()

    def _log(self, sums: dict, lr: float, elapsed: float, waited: float) -> None:
        global_batch = self.cfg.train.batch_size * self.cfg.train.grad_accum * dist.world_size()
        keys = sorted(sums)
        values = torch.stack([sums[k] for k in keys]).to(self.device)
        if dist.is_distributed():
            torch.distributed.all_reduce(values)
            values /= dist.world_size()
        scalars = dict(zip(keys, values.tolist()))
        grad_norm = self.engine.get_global_grad_norm()
        if torch.cuda.is_available():
            peak_gb = torch.cuda.max_memory_allocated() / 2**30
        else:
            peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        scalars.update(lr=lr, alpha=alpha_at(self.step - 1, self.steps_per_epoch, self.cfg.model.alpha),
                       temperature=self.temperature(),
                       grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                       samples_per_s=global_batch / elapsed, step_time_s=elapsed,
                       data_wait_fraction=waited / elapsed, peak_memory_gb=peak_gb,
                       nonfinite_skipped=self.bad_total)
        if self.stream is not None:
            stats = self.stream.stats()
            counts = torch.tensor([float(stats[k]) for k in sorted(stats)], device=self.device)
            if dist.is_distributed():
                torch.distributed.all_reduce(counts)
            scalars.update({f"data_skipped/{k}": v for k, v in zip(sorted(stats), counts.tolist())})
        self.log.log(self.step, scalars)
