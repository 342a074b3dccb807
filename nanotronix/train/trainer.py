"""The training loop: build the model and data, then step, log and checkpoint.

Everything a step needs is a pure function of the config and the step number (learning rate, data), so the loop
keeps no hidden state beyond the model, the optimizer, the loader's consumed-sample count and, with
train.spike_skip_sigma, the spike guard's window (all of them saved with each checkpoint). What it reports is
nanotronix/train/run_log.py's; where it is, nanotronix/train/hang_report.py's.
"""
from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from nanotronix import accel
from nanotronix.checkpoint import Checkpointer
from nanotronix.checkpoint.checkpointer import ResumeState, store_change_notes
from nanotronix.checkpoint.paths import find_checkpoint, step_of
from nanotronix.config import Config, grad_accum_steps
from nanotronix.config_checks import skipped_step_ranges
from nanotronix.console import say
from nanotronix.data import DataError, PrefetchingLoader, build_prefetched_loader, document_eos_mismatch
from nanotronix.distributed import PeerStopped, cause_said_by, peer_stopped, stopping_together
from nanotronix.errors import UserError, found_behind
from nanotronix.model import build_model
from nanotronix.parallel import DistributedOptimizer, ParallelContext, ParallelModel, parallelize
from nanotronix.train import Interrupted
from nanotronix.train.hang_report import HangWatch
from nanotronix.train.lr_schedule import lr_at
from nanotronix.train.optimizer import param_groups
from nanotronix.train.profiler import StepProfiler
from nanotronix.train.run_folders import create_run_folders
from nanotronix.train.run_log import RunLog
from nanotronix.train.spike_guard import SpikeGuard
from nanotronix.train.start_notes import start_notes
from nanotronix.train.step import StepResult, train_step
from nanotronix.train.validation import Validator


def log0(ctx: ParallelContext, msg: str) -> None:
    if ctx.rank == 0:
        say(msg)


def train(cfg: Config, ctx: ParallelContext, device: torch.device) -> dict:
    """Run the configured training; return a summary (first/last loss, steps) for the caller to print."""
    watch = HangWatch.start(cfg.logging.hang_report_seconds)  # which rank a stuck run waits for, and where
    checkpointer: Optional[Checkpointer] = None
    # (signal handlers are the main thread's to set; a SIGINT ignored from the start, as in a background job, stays so)
    earlier_sigint = signal.getsignal(signal.SIGINT)
    own_sigint = threading.current_thread() is threading.main_thread() and earlier_sigint is signal.default_int_handler
    if own_sigint:
        signal.signal(signal.SIGINT, _interrupt_once)
    try:
        try:
            checkpointer = Checkpointer(cfg, ctx, device)  # resume, periodic saves, SIGTERM/SIGUSR1 -> save and stop
            return _train(cfg, ctx, device, watch, checkpointer)
        except Exception as e:
            oom = out_of_memory_behind(e)
            if oom is not None:
                raise out_of_memory(watch.where, oom) from None
            gone = peer_stopped(e)
            if gone is not None:
                raise PeerStopped(f"{watch.where}: another rank stopped (its error says why), so this one stops "
                                  f"too: {gone}", said_elsewhere=cause_said_by() is not None) from None
            raise
    except KeyboardInterrupt:  # also one that lands while the above handles the failed collective it caused
        # Ctrl-C reaches a worker twice (the terminal's process group, then torchrun passing it on): the second must
        # not cut short the first's handling
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise Interrupted(interrupted_line(cfg, watch.where, checkpointer.saving_step if checkpointer else None)) \
            from None
    finally:
        watch.close()
        if own_sigint and signal.getsignal(signal.SIGINT) is _interrupt_once:  # no Ctrl-C came: as it was
            signal.signal(signal.SIGINT, earlier_sigint)


def _interrupt_once(signum, frame) -> None:
    """Ctrl-C as KeyboardInterrupt, and SIGINT ignored from then on: it reaches a worker twice (the terminal's process
    group, then torchrun passing it on), and the second, landing while the first unwinds, would cut short the wait
    for a background save of a good step (Checkpointer.release): the line would name an older step than the one that
    save then commits at the exit (which waits for its thread), the step a rerun resumes from."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def interrupted_line(cfg: Config, where: str, saving_step: Optional[int]) -> str:
    """Ctrl-C's line: where the run stopped and where the same command would start again. `saving_step`: the step
    whose save it cut short, if any (SIGTERM or SIGUSR1 would have let that save finish, but saying so is no help
    then: the step was being saved)."""
    latest = find_checkpoint(Path(cfg.checkpoint.dir)) if cfg.checkpoint.dir else None
    if saving_step is None:
        return f"interrupted {where}: {what_a_rerun_does(cfg, latest, 'nothing saved since')} (SIGTERM or SIGUSR1 " \
               "would have saved this step first)"
    if latest is not None and step_of(latest) == saving_step:  # cut short after its commit (the pruning, `latest`)
        return f"interrupted {where}: step {saving_step} was saved, {what_a_rerun_does(cfg, latest, 'as')}"
    return f"interrupted {where}: the save of step {saving_step} was abandoned; " \
           f"{what_a_rerun_does(cfg, latest, 'the latest committed checkpoint is')} (the next save removes the " \
           "partial one)"


def what_a_rerun_does(cfg: Config, latest: Optional[Path], latest_is: str) -> str:
    """Where the same command would start again, `latest` (the run's newest complete step) said after `latest_is`."""
    resume = cfg.checkpoint.resume.strip()
    if latest is None:
        return (f"no checkpoint of this run saved yet, so a rerun starts again from {resume}"
                if resume not in ("auto", "none") else "no checkpoint saved yet, so a rerun starts over")
    if resume == "none":
        return f"{latest_is} {latest.name}; a rerun continues from it with checkpoint.resume=auto"
    return f"{latest_is} {latest.name}, which a rerun resumes from"


def out_of_memory_behind(error: BaseException) -> Optional[RuntimeError]:
    """The GPU (or host: a CPU run, a CPU tensor) out of memory that caused `error`, if one did
    (torch.distributed.pipelining re-raises a stage's errors as a RuntimeError from them)."""
    return found_behind(error, lambda e: isinstance(e, torch.OutOfMemoryError) or
                        (isinstance(e, RuntimeError) and _HOST_ALLOCATOR in str(e)))


_HOST_ALLOCATOR = "DefaultCPUAllocator: "  # torch's CPU allocator failing: a plain RuntimeError


def out_of_memory(where: str, error: RuntimeError) -> UserError:
    """An out of memory as one line (each rank that met it says it, and the ranks it stops say nothing): where, what
    torch tried and had free, and what to change."""
    if isinstance(error, torch.OutOfMemoryError):
        said = " ".join(str(error).split(" If reserved")[0].split())  # torch's sizes, without its allocator advice
    else:
        said = "host memory: " + " ".join(str(error).split(_HOST_ALLOCATOR, 1)[1].split())
    error = UserError(f"out of memory {where}: {said} Lower train.micro_batch_size (the global batch stays), or "
                      "set train.recompute=selective (or full) or train.loss_chunk_size; `python tools/plan.py CONFIG "
                      "--gpus N` estimates the memory per GPU; logging.profile_steps + logging.memory_snapshot show "
                      "what holds it")
    error.said_for_the_stopped = True  # the ranks this one stops (at their next collective) keep quiet once it is out
    return error


def _train(cfg: Config, ctx: ParallelContext, device: torch.device, watch: HangWatch,
           checkpointer: Checkpointer) -> dict:
    try:
        return _train_with(cfg, ctx, device, watch, checkpointer)
    except Exception:
        checkpointer.finish_pending()  # a background save of an earlier, good step commits before the exit
        raise
    finally:
        checkpointer.release()


def _train_with(cfg: Config, ctx: ParallelContext, device: torch.device, watch: HangWatch,
                checkpointer: Checkpointer) -> dict:
    t = cfg.train
    profiler = StepProfiler.from_config(cfg, ctx.rank, ctx.world_size, device)  # logging.profile_steps, or nothing
    model, optimizer, attn = _build_model_and_optimizer(cfg, ctx, device)
    create_run_folders(cfg, checkpointer.coll)
    resumed = _resume(cfg, ctx, watch, checkpointer, model, optimizer)
    skips = skipped_step_ranges(t)
    guard = (SpikeGuard(t.spike_skip_sigma, t.spike_skip_window, resumed.trainer_state.get("spike_guard"))
             if t.spike_skip_sigma > 0 else None)
    watch.at(0, "data")
    loader = log = None
    try:  # the read-ahead thread (or DALI pipeline) and the loggers are released on an error too
        # A bad store met by every rank is said once (rank 0); one that some ranks met stops the others too.
        with stopping_together(checkpointer.coll, watch.where):
            loader = _build_loader(cfg, ctx, device, resumed, skips)
            validator = Validator.from_config(cfg, ctx, model)  # None unless validation.interval > 0
        _continue_data(cfg, ctx, loader, validator, resumed)
        log0(ctx, _start_line(cfg, ctx, device, model, attn, loader))
        start_step = resumed.step + 1
        log = RunLog(cfg, ctx.rank, ctx.world_size, device, start_step)
        log.config_used_from(start_step)
        run = _TrainingRun(cfg, ctx, watch, checkpointer, profiler, model, optimizer, guard, skips, loader, validator,
                           log, start_step)
        return run.all_steps()
    finally:  # after the checkpointer's last save (normal path), or at once (an error)
        if loader is not None:
            loader.close()
        if log is not None:
            log.close()


def _build_model_and_optimizer(cfg: Config, ctx: ParallelContext,
                               device: torch.device) -> tuple[ParallelModel, DistributedOptimizer, str]:
    """This rank's part of the model, initialised from train.seed, its optimizer, and the attention it uses."""
    torch.manual_seed(cfg.train.seed)
    attn = accel.resolve_attention(cfg.model.attn_implementation, device, cfg.train.dtype)
    # Every rank builds the whole plain model from the same seed, then keeps its TP/PP part (nanotronix.parallel).
    model = parallelize(build_model(cfg.model, attn, device), ctx, cfg)
    o = cfg.optimizer
    groups = param_groups(model.named_parameters(), o.weight_decay, o.weight_decay_norms)
    optimizer = DistributedOptimizer(model, groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                     fused=True if device.type == "cuda" else None)
    return model, optimizer, attn


def _resume(cfg: Config, ctx: ParallelContext, watch: HangWatch, checkpointer: Checkpointer, model: ParallelModel,
            optimizer: DistributedOptimizer) -> ResumeState:
    """Load the checkpoint.resume step (if any) into the model and optimizer (an error if it is past the run's end:
    checkpointer.check_resumed_position)."""
    t = cfg.train
    watch.at(0, "resume")
    resumed = checkpointer.resume(model, optimizer)
    if resumed.step == t.train_steps:
        log0(ctx, f"step {resumed.step} = train.train_steps: the run is complete, nothing left to train")
    return resumed


def _build_loader(cfg: Config, ctx: ParallelContext, device: torch.device, resumed: ResumeState,
                  skips: list[tuple[int, int]]) -> PrefetchingLoader:
    """This data-parallel rank's batches, from the resumed data position on."""
    return build_prefetched_loader(cfg, ctx.dp_rank, ctx.dp, device, last_step=cfg.train.train_steps,
                                   consumed_samples=resumed.consumed_samples,
                                   skipped_steps=skips,  # reads ahead while a step trains
                                   earlier_order_keys=list(resumed.data.get("datasets") or ()))


def _continue_data(cfg: Config, ctx: ParallelContext, loader: PrefetchingLoader, validator: Optional[Validator],
                   resumed: ResumeState) -> None:
    """Carry the resumed token counts on, say what changed in the data order since the checkpoint, check the stores'
    end-of-document id, and say the start notes."""
    if resumed.data:
        loader.loader.count_tokens_from(resumed.data, resumed.step)
    if ctx.rank == 0:  # its notes to say, and its fingerprint reads alone (`stats`)
        for changed in store_change_notes(resumed.data, loader.stats(resumed.step, fingerprints=True)):
            log0(ctx, f"data order: {changed}")
    stores = {**loader.loader.stores, **(validator.stores if validator else {})}
    wrong_eos = document_eos_mismatch(stores, cfg.model.document_mask_eos_id)
    if wrong_eos:  # the same stores and config on every rank
        raise UserError(wrong_eos, every_rank=True)
    for note in start_notes(cfg, loader.loader, stores, resumed.step if ctx.rank == 0 else None):
        log0(ctx, f"note: {note}")  # the launch preflight said them too


def _start_line(cfg: Config, ctx: ParallelContext, device: torch.device, model: ParallelModel, attn: str,
                loader: PrefetchingLoader) -> str:
    """The run's one-line summary: size, layout, batch, device, attention, loader (and the fused kernels' path)."""
    t, m = cfg.train, cfg.model
    accum = grad_accum_steps(cfg, ctx.dp)
    return (f"nanotronix: {m.num_parameters() / 1e6:.1f}M parameters | layout {model.describe()} "
            f"| global batch {t.global_batch_size} x {t.seq_len} tokens, micro-batch "
            f"{t.micro_batch_size}, grad accumulation {accum} | device {device.type} | "
            f"{accel.describe(attn, m.document_mask_eos_id is not None)} | data loader: {loader.name}"
            + (f" | fused kernels: {accel.fused_kernels_in_use(device)}" if t.fused_kernels else ""))


@dataclass
class _TrainingRun:
    """What the steps work with, built once by _train_with; all_steps() runs them."""
    cfg: Config
    ctx: ParallelContext
    watch: HangWatch
    checkpointer: Checkpointer
    profiler: StepProfiler
    model: ParallelModel
    optimizer: DistributedOptimizer
    guard: Optional[SpikeGuard]
    skips: list[tuple[int, int]]  # train.skip_steps as (first, last) ranges
    loader: PrefetchingLoader
    validator: Optional[Validator]
    log: RunLog
    start_step: int

    def all_steps(self) -> dict:
        """Steps start_step..train.train_steps (or up to a SIGTERM/SIGUSR1 save): the summary train() returns."""
        first_loss = last_loss = None
        preempted = False
        for step in range(self.start_step, self.cfg.train.train_steps + 1):
            self.profiler.begin(step)
            lr = lr_at(step, self.cfg.optimizer.lr, self.cfg.lr_schedule)
            skipped = next(((a, b) for a, b in self.skips if a <= step <= b), None)
            if skipped is not None:  # no batch read, no update: the data position and the step move on
                self._pass_over(step, lr, skipped)
            else:
                loss = self._train_one(step, lr)
                first_loss = loss if first_loss is None else first_loss
                last_loss = loss
            if self._end_step(step):
                preempted = True
                break
        self._finish()
        return {"first_loss": first_loss, "last_loss": last_loss, "steps": self.cfg.train.train_steps,
                "first_step": self.start_step, "preempted": preempted}

    def _pass_over(self, step: int, lr: float, skipped: tuple[int, int]) -> None:
        """A train.skip_steps step: said at its range's start (or the run's), its validation kept when due."""
        self.watch.at(step, "skipped")
        if step in (skipped[0], self.start_step):
            which = f"steps {step}-{skipped[1]}" if skipped[1] > step else f"step {step}"
            log0(self.ctx, f"{which}: skipped (train.skip_steps), "
                           f"{(skipped[1] - step + 1) * self.cfg.train.global_batch_size} samples passed over")
        self.loader.skip(step)
        val_losses = self._validate_if_due(step)  # the curve keeps its points (the last trained step's weights)
        # a resumed run's first step is logged too: its record ends, for metrics.jsonl's readers, the steps past it
        # that a run abandoned by tools/rollback.py had logged (a step's record drops the later ones written before it)
        if val_losses or step == self.start_step > 1:
            self.log.skipped(step, lr, self.loader.stats(step), val_losses)

    def _train_one(self, step: int, lr: float) -> float:
        """Read the step's batch, train on it, log and validate when due; its loss. A loss or gradient norm that is
        not finite stops the run (FloatingPointError)."""
        batch = self._read_batch(step)
        self.watch.at(step, "train step")
        result = train_step(self.model, self.optimizer, batch, lr, self.cfg.optimizer.clip_grad, self.guard)
        if result.spike is not None:
            log0(self.ctx, f"step {step}: update skipped (train.spike_skip_sigma): {result.spike}")
        elif not result.applied:
            # an asynchronous save of an earlier (good) step completes first; its failure is said, not raised over
            # this step's error (where the run stopped, and the train.skip_steps to get past it)
            self.checkpointer.finish_pending()
            raise _not_finite(step, result, self.cfg.train.train_steps)
        self.log.trained()
        val_losses = self._validate_if_due(step)
        if (step % self.cfg.logging.interval == 0 or step in (self.start_step, self.cfg.train.train_steps)
                or val_losses or result.spike is not None or self._starts_a_stage(step)):
            self.log.step(step, lr, result, self.loader.stats(step), val_losses)
        return result.loss

    def _starts_a_stage(self, step: int) -> bool:
        """A data stage's first step is always logged: a record of it marks where the stage starts (plot_run draws
        the switch at the first record of a stage: with logging.interval > 1 that was a later step)."""
        return any(stage.start_step == step for stage in self.cfg.data.stages[1:])

    def _read_batch(self, step: int) -> torch.Tensor:
        self.watch.at(step, "data")
        asked = time.perf_counter()
        try:
            batch = self.loader.batch(step)  # read ahead while the previous step trained: ~0 unless input is slow
        except DataError as e:
            # (a token outside the vocabulary, a damaged store) every tensor- and pipeline-parallel rank of this
            # replica reads the same windows and meets it: the replica's first rank says it for them, and for the
            # other replicas' ranks, which stop at the gradient reduction (one line, not one per replica)
            e.said_elsewhere = self.ctx.tp_rank != 0 or self.ctx.pp_rank != 0
            e.said_for_the_stopped = True
            raise
        self.log.batch_read(time.perf_counter() - asked, batch)
        return batch

    def _validate_if_due(self, step: int) -> Optional[dict[str, float]]:
        if self.validator is None:
            return None
        if not (step % self.cfg.validation.interval == 0 or step == self.cfg.train.train_steps):
            return None
        self.watch.at(step, "validation")
        with self.log.paused():  # the tokens/s of training only
            return self.validator.run()

    def _end_step(self, step: int) -> bool:
        """Save if due, close the profiler's window if due; True when a SIGTERM/SIGUSR1 save asks the run to stop."""
        self.watch.at(step, "checkpoint")
        # a save, and writing the profiler's trace at its window's end, are not training: their time stays out of
        # tokens/s and MFU (Megatron-LM's interval timer stops for a save too), or the record after each save dips
        with self.log.paused():
            stop = self.checkpointer.after_step(step, self.model, self.optimizer, self.loader, self._trainer_state)
            self.profiler.end(step)
        return stop

    def _trainer_state(self) -> dict:  # saved with each checkpoint, back in `resumed.trainer_state` on resume
        return {"spike_guard": self.guard.state_dict()} if self.guard is not None else {}

    def _finish(self) -> None:
        self.watch.at(None, "finish")  # the last step it reached
        self.profiler.close()  # a run stopped inside the profiled steps (preempted): what it recorded
        self.model.grads.wait_for_weights()  # ZeRO-1 overlap_param_gather: the last step's weight gathers
        self.checkpointer.close()


def _not_finite(step: int, result: StepResult, last_step: int) -> FloatingPointError:
    return FloatingPointError(
        f"step {step}: the loss ({result.loss}) or the gradient norm ({result.grad_norm}) is not "
        f"finite; the weights were not updated and nothing was saved after step {step - 1} (rerunning "
        f"would meet the same batch: lower the learning rate, or resume with the steps from here "
        f"skipped, e.g. 'train.skip_steps=[{step}-{min(step + 99, last_step)}]'; tools/rollback.py "
        f"goes back further)")
