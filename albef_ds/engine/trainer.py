"""The one training loop. It knows no task: it calls the parts the build step made.

Flow of one optimizer step (gradient accumulation of `grad_accum` micro-batches):
    batch -> task model forward (loss, metrics) -> agreement of all ranks -> engine.backward ->
    engine.step -> model.after_micro_batch (queue writes); once the step is applied: momentum EMA
    (shard-local), clamps of the task's clamped parameters, lr for the next step
    -> metrics (rank 0) -> evaluation every eval.every_epochs -> checkpoint every save_every steps,
    at the end, or on SIGUSR1/SIGTERM.
"""
from __future__ import annotations

import contextlib
import math
import os
import resource
import signal
import time
from typing import Iterable, Optional, Union

import torch

from .. import distributed as dist
from ..checkpoint import elastic
from ..checkpoint import training as ckpt
from ..checkpoint.elastic import ResumePlan
from ..checkpoint.layout import model_layout
from ..config import Config, ConfigError
from ..eval.inputs import check_skipped
from ..optim import lr_at
from ..tasks.base import StepContext
from . import zero
from .build import build
from .log import MetricsLogger
from .preflight import preflight, select_metric
from .state import DataPosition, RandomState, TaskBuffers, TrainState

EXIT_REQUEUE = 124      # saved on SIGUSR1: the Slurm template requeues the job
EXIT_TERMINATED = 143   # saved on SIGTERM


class Trainer:
    def __init__(self, cfg: Config, ds_config: Union[str, dict], output_dir: str,
                 resume: Optional[str] = None, batches: Optional[Iterable[dict]] = None,
                 steps_per_epoch: Optional[int] = None, client_optimizer=None, start_over: bool = False):
        """`resume`: None (fresh), "" (latest if there is one, else fresh) or a tag; `start_over`: a
        fresh run in a folder that holds another run's checkpoints moves them aside (else refused).
        `batches`: any iterable of batches instead of the configured data stream (tests, bench).
        `client_optimizer(param_groups)`: an optimizer of one's own instead of the ds config's
        (the benchmark's baseline uses torch.optim.AdamW)."""
        # Handlers first: a SIGUSR1 while starting up is acted on at the first step, not fatal.
        # A start that fails gives them back (else SIGTERM would only set a flag nobody reads).
        self._signal = None
        self._previous_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGUSR1, signal.SIGTERM)}
        self.run_folder = None
        try:
            self._start(cfg, ds_config, output_dir, resume, batches, steps_per_epoch, client_optimizer, start_over)
        except BaseException:
            self._restore_signal_handlers()
            if self.run_folder is not None:
                self.run_folder.release()
            raise

    def _start(self, cfg, ds_config, output_dir, resume, batches, steps_per_epoch, client_optimizer,
               start_over) -> None:
        self.owns_process_group = dist.init_distributed()
        plan = preflight(cfg, ds_config, output_dir, resume, reads_data=batches is None, start_over=start_over)
        self.run_folder = plan.run_folder
        parts = build(plan, batches, steps_per_epoch, client_optimizer)
        self.cfg, self.task, self.output_dir, self.ckpt_dir = parts.cfg, plan.task, output_dir, plan.ckpt_dir
        self.ds_config, self.evaluator = plan.ds_config, plan.evaluator
        self.engine, self.model, self.momentum = parts.engine, parts.model, parts.momentum
        self.stream, self.batches = parts.stream, parts.batches
        self.steps_per_epoch, self.total_steps = parts.steps_per_epoch, parts.total_steps
        self.device = torch.device(f"cuda:{dist.local_rank()}" if torch.cuda.is_available() else "cpu")
        self.clamped = {name: (dict(self.model.named_parameters())[name], bounds)
                        for name, bounds in self.model.clamped_parameters().items()}
        self.state = TrainState()
        # What a checkpoint keeps besides DeepSpeed's engine and the momentum model: parts shared
        # by the ranks, and each rank's own.
        self.shared_parts = {"train_state": self.state, "task_buffers": TaskBuffers(self.model)}
        self.rank_parts = {"rng": RandomState(), "data": DataPosition(self.stream)}
        self.bad_in_row = 0
        self.log = None
        self.agreed_signal = None     # the signal a rank received, once all ranks know it
        self.applied_norm = None      # (step, global gradient norm) of the last applied step
        self.saved_step = None        # the step of the last checkpoint this run saved or resumed
        self.evaluation_pending = False   # resumed from a tag whose due evaluation did not finish
        if plan.resume is not None:
            self._resume(plan.resume)

    # ---- checkpoints ---------------------------------------------------------------------
    def save(self) -> str:
        """Saves this step's checkpoint, once: a best evaluation on a save step or on the last
        step asks again, with nothing changed since."""
        step = self.state.step
        if self.saved_step == step:
            return ckpt.tag_for(step)
        self._check_applied_norm()
        run_info = {"world_size": dist.world_size(), "batch_size": self.cfg.train.batch_size,
                    "grad_accum": self.cfg.train.grad_accum, "config": self.cfg.to_dict()}
        tag = ckpt.save(self.engine, self.ckpt_dir, step, self.shared_parts, self.rank_parts, self.momentum,
                        self.cfg.train.keep_last, run_info)
        self.saved_step = step
        if dist.rank() == 0:
            print(f"saved checkpoint {os.path.join(self.ckpt_dir, tag)}", flush=True)
        return tag

    def _resume(self, plan: ResumePlan) -> None:
        if plan.elastic:      # saved on another number of ranks
            elastic.load(self.engine, self.ckpt_dir, plan, self.momentum, model_layout(self.cfg),
                         self.shared_parts, self.rank_parts)
        else:
            ckpt.load(self.engine, self.ckpt_dir, plan.tag, self.momentum, self.shared_parts, self.rank_parts)
        self.saved_step = self.state.step
        # the tag was saved before its own evaluation: what that evaluation found, if it finished
        recorded = ckpt.read_evaluation(self.ckpt_dir, plan.tag)
        name = select_metric(self.cfg, self.task)
        self.evaluation_pending = self._eval_due() and (recorded is None or name not in recorded)
        if not self.evaluation_pending and recorded is not None and name in recorded:
            self._consider_best(recorded[name], plan.tag)
        if dist.rank() == 0:
            print(f"resumed from {os.path.join(self.ckpt_dir, plan.tag)} at step {self.state.step}", flush=True)

    # ---- evaluation ----------------------------------------------------------------------
    def _eval_due(self) -> bool:
        every = self.cfg.eval.every_epochs
        return every > 0 and self.state.step % (every * self.steps_per_epoch) == 0

    def evaluate(self, model=None) -> dict:
        """The task's evaluation of the model as it is (`model`: its inference model, when the
        caller has it); a collective: every rank calls it and gets the same metrics. A set with more
        items skipped than eval.max_skipped allows is a ConfigError."""
        if self.evaluator is None:
            self.evaluator = self.task.evaluator(self.output_dir)
        metrics = self.evaluator(model if model is not None else zero.inference_model(self.engine, self.task))
        check_skipped(metrics, self.cfg.eval.max_skipped, "eval.max_skipped")
        return metrics

    def _save_and_evaluate(self) -> None:
        """Saves this step's checkpoint, then evaluates it: an evaluation that fails (a bug, a
        machine that runs out of memory in it) stops the run with the training already saved, and
        a resume runs that evaluation again before it trains on. The evaluation is kept with the
        tag; the best evaluated tag is marked in best.json."""
        tag = self.save()
        model = zero.inference_model(self.engine, self.task)
        try:
            metrics = self.evaluate(model)
        except ConfigError as exc:          # the evaluation data: a user's to fix, said in one line
            raise ConfigError(f"the evaluation at step {self.state.step} failed, after its checkpoint {tag} was "
                              f"saved (--resume evaluates it again first): {exc}") from None
        name = select_metric(self.cfg, self.task)
        self.log.log_eval(self.state.step, {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                          getattr(self.evaluator, "headline", None))
        self._log_pictures(model)
        ckpt.record_evaluation(self.ckpt_dir, tag, metrics)
        self._consider_best(metrics[name], tag)

    def _consider_best(self, value: float, tag: str) -> None:
        if self.state.best is None or value > self.state.best[0]:
            self.state.best = (value, tag)
            ckpt.mark_best(self.ckpt_dir, tag, select_metric(self.cfg, self.task), value)

    def _log_pictures(self, model) -> None:
        """The task's pictures of the first eval.pictures evaluation items, drawn by rank 0 with the
        model just evaluated and written to TensorBoard (the other ranks wait at their next
        collective)."""
        count = self.cfg.eval.pictures
        if count == 0 or dist.rank() != 0:
            return
        started = time.perf_counter()
        pictures = self.task.eval_pictures(self.evaluator, model, count)
        self.log.log_images(self.state.step, pictures)
        if pictures:
            self.log.note(f"eval pictures at step {self.state.step}: {len(pictures)} in tb/ "
                          f"({time.perf_counter() - started:.1f} s)")

    # ---- signals -------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self._signal = signum

    # ---- the loop ------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

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

    def _micro_step(self, batch: dict, phase) -> Optional[dict]:
        """Forward, and backward unless the loss is non-finite on any rank. Returns the metrics."""
        generator = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + self.state.micro_seen)
        self.state.micro_seen += 1
        with phase("forward"):
            loss, metrics = self.engine(self._to_device(batch), StepContext(self.state.step, self.steps_per_epoch, generator))
        with phase("agreement"):
            finite = self._agree(loss)
        if not finite:
            self.bad_in_row += 1
            self.state.bad_total += 1
            if dist.rank() == 0:
                print(f"warning: non-finite loss at step {self.state.step + 1} (batch keys "
                      f"{list(batch.get('keys', []))[:3]}...), skipped ({self.bad_in_row} in a row, "
                      f"{self.state.bad_total} in all)", flush=True)
            if self.bad_in_row >= self.cfg.train.max_bad_steps:
                raise RuntimeError(
                    f"{self.bad_in_row} non-finite losses in a row (train.max_bad_steps="
                    f"{self.cfg.train.max_bad_steps}); stopping. The last good checkpoint in "
                    f"{self.ckpt_dir} is intact: lower train.lr or check the data, then --resume.")
            return None
        self.bad_in_row = 0
        with phase("backward"):
            self.engine.backward(loss)
        with phase("optimizer"):
            self.engine.step()
            self.model.after_micro_batch()
        return {"loss": loss.detach().float(),
                **{k: torch.as_tensor(v, device=loss.device).detach().float() for k, v in metrics.items()}}

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

    def _set_lr(self) -> float:
        lr = lr_at(self.state.step, self.cfg.train, self.steps_per_epoch)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self, data, phase=None) -> tuple[dict, float, float, float]:
        """One optimizer step over grad_accum finite micro-batches drawn from `data`.
        Returns (mean metrics, lr, seconds, seconds spent waiting for data). `phase(name)`: a
        context manager around each phase of the step (data, forward, agreement, backward,
        optimizer, after_step), for the benchmark's step split."""
        phase = phase or (lambda name: contextlib.nullcontext())
        lr = self._set_lr()
        started, waited, sums, done = time.perf_counter(), 0.0, {}, 0
        while done < self.cfg.train.grad_accum:
            t = time.perf_counter()
            with phase("data"):
                batch = next(data)
            waited += time.perf_counter() - t
            out = self._micro_step(batch, phase)
            if out is None:
                continue
            done += 1
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v / self.cfg.train.grad_accum
        if self.engine.was_step_applied():
            norm = self.engine.get_global_grad_norm()
            if norm is not None:
                self.applied_norm = (self.state.step + 1, norm)
            with phase("after_step"):
                self.momentum.update()
                for param, bounds in self.clamped.values():
                    zero.clamp_master_(param, *bounds)
        self.state.step += 1
        return sums, lr, time.perf_counter() - started, waited

    def train(self) -> int:
        """Runs to total_steps; returns a process exit code (0, or EXIT_REQUEUE / EXIT_TERMINATED
        after saving on a signal)."""
        global_batch = self.cfg.train.batch_size * self.cfg.train.grad_accum * dist.world_size()
        self.log = MetricsLogger(self.output_dir, self.total_steps, enabled=dist.rank() == 0, global_batch=global_batch)
        data = iter(self.batches)
        try:
            if self.evaluation_pending:         # the resumed tag's evaluation did not finish
                self._save_and_evaluate()
            while self.state.step < self.total_steps:
                sums, lr, elapsed, waited = self.train_step(data)
                if self.state.step % self.cfg.train.log_every == 0 or self.state.step == self.total_steps:
                    self._log(sums, lr, elapsed, waited)
                if self._eval_due():
                    self._save_and_evaluate()
                received = self.agreed_signal
                if received:
                    self.save()
                    self.log.note(f"received {signal.Signals(received).name}: saved at step {self.state.step}, exiting")
                    return EXIT_REQUEUE if received == signal.SIGUSR1 else EXIT_TERMINATED
                if self.state.step % self.cfg.train.save_every == 0 and self.state.step < self.total_steps:
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
        self.run_folder.release()
        if self.owns_process_group:
            dist.shutdown()

    def _log(self, sums: dict, lr: float, elapsed: float, waited: float) -> None:
        global_batch = self.cfg.train.batch_size * self.cfg.train.grad_accum * dist.world_size()
        keys = list(sums)             # the task's order; the same on every rank
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
        scalars.update({name: float(zero.master_value(param).reshape(-1)[0]) for name, (param, _) in self.clamped.items()})
        scalars.update(lr=lr, grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                       samples_per_s=global_batch / elapsed, step_time_s=elapsed,
                       data_wait_fraction=waited / elapsed, peak_memory_gb=peak_gb,
                       nonfinite_skipped=self.state.bad_total)
        if self.stream is not None:
            stats = self.stream.stats()
            counts = torch.tensor([float(stats[k]) for k in sorted(stats)], device=self.device)
            if dist.is_distributed():
                torch.distributed.all_reduce(counts)
            scalars.update({f"data_skipped/{k}": v for k, v in zip(sorted(stats), counts.tolist())})
        self.log.log(self.state.step, scalars)
