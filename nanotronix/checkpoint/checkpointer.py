"""The training loop's one handle on checkpoints: resume once, `after_step` after every step, `close` at the end.

    checkpointer = Checkpointer(cfg, ctx, device)          # installs the SIGTERM/SIGUSR1 handler
    resumed = checkpointer.resume(model, optimizer)         # weights, moments, step, RNG; .consumed_samples
    loader = build_train_loader(..., consumed_samples=resumed.consumed_samples)
    for step in range(resumed.step + 1, train_steps + 1):
        ...
        if checkpointer.after_step(step, model, optimizer, loader):
            break                                           # preempted: saved on all ranks, exit EXIT_PREEMPTED
    checkpointer.close()                                    # waits for an asynchronous save
    # on a failure: checkpointer.finish_pending() (a background save of a good step commits); at the end, always:
    checkpointer.release()                                  # the run folder's lock (one run per checkpoint.dir),
                                                            # the writer thread, staging buffers, signal handlers

Which checkpoint a run resumes from (`checkpoint.resume`):
  auto  the newest complete step in `checkpoint.dir`, or a fresh start when there is none;
  none  a fresh start;
  PATH  that step folder or run folder. Once the run has committed checkpoints of its own in `checkpoint.dir`,
        those win over a PATH outside it, so a requeued job continues instead of starting over from PATH. An
        earlier step inside `checkpoint.dir` is refused (every requeue would go back to it): tools/rollback.py.
"""
from __future__ import annotations

import datetime
import os
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from nanotronix.checkpoint import paths, run_lock
from nanotronix.checkpoint.errors import CheckpointError, unreadable
from nanotronix.checkpoint.manifest import layout_text, read_manifest
from nanotronix.checkpoint.preemption import PreemptionWatcher, torchrun_pid
from nanotronix.checkpoint.reader import section_from_saved
from nanotronix.checkpoint.staging import HostStaging
from nanotronix.checkpoint.state import WriterPlan
from nanotronix.checkpoint.storage import Collective
from nanotronix.checkpoint.training_state import load_training_state, take_snapshot, write_snapshot
from nanotronix.config import DataConfig
from nanotronix.config_checks import validate_data
from nanotronix.console import say
from nanotronix.data.blend import weight_units
from nanotronix.data.schedule import dataset_order_key
from nanotronix.distributed import joining, stopping_together
from nanotronix.errors import UserError, number_text

# Model fields that fix the shapes of the weights: a checkpoint only loads into a model that agrees on them.
# Other fields (rope_theta, max_position_embeddings, rms_norm_eps, init_std) may change between stages, e.g. the
# 8k context extension raising rope_theta.
# RUN_DIR/.lock: rank 0 of the run that uses the folder holds it (Checkpointer._lock_run_dir)
LOCK_WAIT_S = 150.0  # longer than an NFS lease (a dead node's lock outlives it that long)

ARCHITECTURE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "vocab_size", "tie_word_embeddings")


@dataclass
class ResumeState:
    step: int  # last completed step; 0 on a fresh start
    consumed_samples: int  # global samples consumed (what the data loader resumes from)
    path: Optional[Path]  # the step folder loaded, or None
    trainer_state: dict[str, Any] = field(default_factory=dict)  # what the loop saved beside the model (after_step)
    data: dict[str, Any] = field(default_factory=dict)  # the checkpoint's data state when its data position is kept


def check_architecture(saved: dict[str, Any], current: dict[str, Any], where: Path) -> list[str]:
    """Raise on a shape-changing difference; return notes on the allowed ones."""
    for key in ARCHITECTURE_FIELDS:
        if saved.get(key) != current.get(key):
            raise CheckpointError(f"checkpoint {where} was saved with model.{key}={number_text(saved.get(key))}, "
                                  f"but the config has {number_text(current.get(key))}")
    # number_text: an imported config.json's 10**400 (transformers takes it) said by its length, not its digits
    return [f"model.{k}: {number_text(saved.get(k))} in the checkpoint, {number_text(current.get(k))} now"
            for k in ("rope_theta", "max_position_embeddings", "rms_norm_eps", "document_mask_eos_id")
            if saved.get(k) != current.get(k)]



def _checked_saved_config(saved: dict[str, Any], where: Path) -> dict[str, Any]:
    """The checkpoint's config with its data section as the trainer reads its own (types, validate_data): the data
    order notes walk its stages and weights, which a hand-edited checkpoint.json may leave in any shape."""
    if "data" not in saved:  # a checkpoint saved without one (an import's step 0 has one; tests' plain saves not)
        return saved
    return {**saved, "data": asdict(section_from_saved(DataConfig, saved["data"], "data", where, validate_data))}


def data_order_notes(saved: dict[str, Any], current: dict[str, Any], step: int) -> list[str]:
    """Differences between the checkpoint's config and this one (full configs as dicts) that change which windows
    the steps after `step` read: notes, not errors, because some are deliberate (the 8k context stage changes
    seq_len), but a requeued run that reads other samples than it would have should say so."""
    def facts(cfg: dict[str, Any]):
        data = cfg.get("data") or {}
        blends = []
        for k, stage in enumerate(data.get("stages") or []):
            datasets = stage.get("datasets") or []
            # the weights as the blend serves them: 1:1 and 0.5:0.5 draw the same samples (no note for a rescale)
            units = weight_units([ds.get("weight") for ds in datasets]) if datasets else []
            blends.append((1 if k == 0 else stage.get("start_step") or 0,
                           list(zip([dataset_order_key(ds["path"], data.get("root")) for ds in datasets], units))))
        begun = [b for b in blends if b[0] <= step]  # their blends fixed what each dataset has given so far
        # a dataset only in a stage not begun has given nothing yet: adding, renaming or dropping it there is as free
        # as that stage's weights (a note for it would greet every branch that adds a stage, as the anneal recipe)
        keys = {key for _, blend in begun for key, _ in blend}
        return data.get("data_seed"), (cfg.get("train") or {}).get("seq_len"), keys, begun

    (seed0, seq0, keys0, begun0), (seed1, seq1, keys1, begun1) = facts(saved), facts(current)
    notes = []
    if seed0 != seed1:
        notes.append(f"data.data_seed: {seed0} in the checkpoint, {seed1} now (every dataset's sample order changes)")
    if seq0 != seq1:
        notes.append(f"train.seq_len: {seq0} in the checkpoint, {seq1} now (windows are cut anew)")
    if keys0 != keys1:
        gone, new = sorted(keys0 - keys1), sorted(keys1 - keys0)
        notes.append(f"datasets (order keys, relative to data.root) of the stages begun by step {step} that the "
                     f"checkpoint's did not have: {new or 'none'}; no longer in them: {gone or 'none'} (a dataset "
                     "renamed, or moved other than with data.root, gets another sample order)")
    if begun0 != begun1:
        notes.append(f"the stages begun by step {step} differ from the checkpoint's (start steps, datasets or "
                     "weights): what each dataset has given so far is recounted from the new blend, so some of "
                     f"its windows repeat or are skipped (to change the blend from here on without that, keep the "
                     f"checkpoint's stages and add a stage with start_step {step + 1})")
    return notes


def schedule_change_notes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The learning-rate settings that differ from the checkpoint's config (full configs as dicts): a note each, since
    a branch means it (an annealing run decays from a milestone) but a requeue with edited overrides would jump the
    learning rate without a word."""
    fields = [("optimizer", "lr")] + [("lr_schedule", k) for k in
                                      ("warmup_steps", "decay_start_step", "decay_steps", "decay_style", "min_lr")]
    then = {f"{a}.{b}": (saved.get(a) or {}).get(b) for a, b in fields}
    now = {f"{a}.{b}": (current.get(a) or {}).get(b) for a, b in fields}
    return [f"{k}: {then[k]} in the checkpoint, {now[k]} now" for k in then if then[k] != now[k]]


def store_change_notes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Stores that hold another number of tokens, or as many but other ones (another content fingerprint), than
    when the checkpoint was saved, among those the run had read from (`saved`, `current`: the loader's stats, as the
    checkpoint keeps them): their windows are cut and shuffled from the token count, so a store rewritten or grown
    since gives other windows in another order, and one rewritten to the same count (documents reordered,
    re-tokenized, files replaced) other tokens in the same windows. One note per store (the count's when both
    changed); none for a checkpoint saved before fingerprints were kept. Notes, not errors: replacing or adding
    data can be deliberate."""
    before, now = saved.get("store_tokens") or {}, current.get("store_tokens") or {}
    prints_before, prints_now = saved.get("store_fingerprints") or {}, current.get("store_fingerprints") or {}
    read = [key for key, got in (saved.get("datasets") or {}).items() if got.get("consumed_tokens")]
    notes = []
    for key in read:
        if key in before and key in now and before[key] != now[key]:
            notes.append(f"dataset {key}: its store holds {now[key]:,} tokens, {before[key]:,} when the checkpoint "
                         "was saved, so its windows are cut and shuffled anew: some it gave repeat, some are passed "
                         "over")
        elif key in prints_before and key in prints_now and prints_before[key] != prints_now[key]:
            notes.append(f"dataset {key}: its store holds other tokens than when the checkpoint was saved (as many, "
                         "but another content fingerprint: rewritten, reordered or re-tokenized), so its windows "
                         "hold other data: some it gave may repeat, some be passed over")
    return notes


def check_resumed_position(source: Path, step: int, consumed: int, train: Any) -> None:
    """A run may continue after `step` of `source` (`consumed` samples): with the same global batch size (a step's
    samples are [(s-1)*gbs, s*gbs): another one skips or repeats data), and not past its last step. The trainer's
    check, and the preflight's before a job waits in the queue."""
    gbs = train.global_batch_size
    if consumed != step * gbs:
        raise CheckpointError(f"checkpoint {source} consumed {consumed} samples in {step} steps (global batch "
                              f"{consumed // max(step, 1)}), but train.global_batch_size is {gbs}: the run would "
                              "skip or repeat samples; resume with the checkpoint's global batch size")
    check_steps_left(step, train.train_steps)


def check_steps_left(step: int, train_steps: int) -> None:
    """A run that resumes after `step` has steps left to train (tools/plan.py's check too)."""
    if step > train_steps:
        raise UserError(f"train.train_steps={train_steps}, but the checkpoint resumed from is at step {step}: "
                        "past the end of the run, nothing to train", every_rank=True)


def choose_resume_source(run_dir: Optional[Path], resume: str, log: Callable[[str], None]) -> Optional[Path]:
    """The step folder a run with checkpoint.dir `run_dir` and checkpoint.resume `resume` starts from (None: from
    scratch), or the CheckpointError that refuses the combination; the trainer's rank 0 and preflight decide alike."""
    mode = resume.strip()
    try:
        if run_dir is not None:
            paths.check_not_a_step_folder(run_dir)
        own = paths.find_checkpoint(run_dir) if run_dir is not None else None
    except OSError as e:  # listing the folder failed (EIO, ESTALE): one line, not rank 0's traceback
        raise unreadable(e.filename or run_dir, e) from None
    if mode == "none":
        if own is not None:  # a fresh run's steps would be committed among those of the run already there
            raise CheckpointError(f"checkpoint.resume=none, but checkpoint.dir {run_dir} already holds "
                                  f"checkpoints (latest: {own.name}): set another checkpoint.dir, remove those, "
                                  "or checkpoint.resume=auto to continue them", every_rank=True)
        return None
    if mode == "auto":
        return own
    try:
        requested = paths.resolve_checkpoint(Path(mode).expanduser())
    except CheckpointError as e:  # "checkpoint not found: PATH" named no key (preflight's line already did)
        raise CheckpointError(f"checkpoint.resume: {e}") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint.resume: {unreadable(e.filename or mode, e)}") from None
    inside_run = run_dir is not None and run_dir.resolve() in requested.resolve().parents
    if own is not None and not inside_run:
        log(f"{run_dir} already holds this run's checkpoints: continuing from {own.name} "
            f"instead of checkpoint.resume={mode}")
        return own
    if own is None:
        return requested
    # a step folder of this run by another name (a copy kept as ckpt/best): its step is in its manifest
    requested_step = paths.step_of(requested)
    if requested_step is None:
        requested_step = int(read_manifest(requested)["step"])
    if requested_step < paths.step_of(own):
        # Honoured, this would take every requeue of the job back to that step again, losing its progress.
        raise CheckpointError(
            f"checkpoint.resume={mode} is an earlier step of this run's own checkpoint.dir (latest: {own.name}): "
            f"every requeue would go back to it again; to go back, run `python tools/rollback.py {run_dir} "
            f"--to-step {requested_step}` and resume with checkpoint.resume=auto")
    return requested


class Checkpointer:
    def __init__(self, cfg, ctx, device: torch.device):
        self.cfg, self.ctx = cfg, ctx
        self.settings = cfg.checkpoint
        self.retention = paths.Retention.of(self.settings)  # which steps pruning keeps; milestones are always saved
        self.run_dir = Path(self.settings.dir).expanduser() if self.settings.dir else None
        # Checkpoint traffic gets its own gloo group: a background save must not interleave its collectives
        # with the training step's on the same communicator, and gloo carries DCP's small planning messages.
        timeout = datetime.timedelta(minutes=cfg.parallel.collective_timeout_minutes)  # not inherited by a group
        group = None
        if dist.is_initialized():
            with joining(cfg.parallel.collective_timeout_minutes):
                group = dist.new_group(backend="gloo", timeout=timeout)
        self.coll = Collective(group)
        # rank 0 waits for a held lock while the other ranks wait in this group's broadcast: within its timeout, so
        # that they hear the lock's one line rather than die of gloo's timeout first
        self._lock_wait_s = min(LOCK_WAIT_S, timeout.total_seconds() / 2) if self.coll.distributed else LOCK_WAIT_S
        self.watcher = PreemptionWatcher(device, launcher_pid=torchrun_pid())
        self.watcher.install()
        self._executor = ThreadPoolExecutor(1, "checkpoint") if self.settings.async_save else None
        # host buffers an asynchronous save copies into, kept from one save to the next (pinned on a GPU)
        self._staging = HostStaging() if self.settings.async_save else None
        self._writers = WriterPlan()  # which rank writes each chunk, decided at the first save
        self._pending: Optional[Future] = None
        self.last_saved_step: Optional[int] = None
        # the step whose save runs in the calling thread (its snapshot, and its write unless in the background);
        # left set by a Ctrl-C that cut it short, for the trainer's line to say so
        self.saving_step: Optional[int] = None
        self.origin: Optional[dict] = None  # the manifest's `source` of the checkpoint resumed from, saved on
        self._lock_fd: Optional[int] = None  # rank 0's hold on RUN_DIR/.lock (one run per checkpoint.dir)

    def _log(self, msg: str) -> None:
        if self.ctx.rank == 0:
            say(f"checkpoint: {msg}")

    # ---- resume --------------------------------------------------------------------------------------

    def _resume_source(self) -> Optional[Path]:
        """The step folder to resume from, chosen by rank 0 for every rank: ranks that each read the folder could
        choose different steps (a save committed between their reads, a file system that shows one node a new
        step later than another), and would then load a model of mixed steps. Every rank must see the folder."""
        chosen, failure = None, None
        if self.coll.rank == 0:
            try:
                if self.run_dir is not None:  # before its lock file lands in a step folder (choose_resume_source)
                    paths.check_not_a_step_folder(self.run_dir)
                self._lock_run_dir()
                if self.run_dir is not None:
                    paths.check_pointer_replaceable(self.run_dir)
                chosen = ("ok", self._choose_resume_source())
            except CheckpointError as e:
                chosen = ("error", str(e))
            except Exception as e:  # unforeseen: the other ranks must not wait in the broadcast until its timeout
                chosen, failure = ("error", f"rank 0 could not choose the checkpoint to resume from ({e!r})"), e
        outcome, value = self.coll.broadcast(chosen)
        if failure is not None:
            raise failure
        if outcome == "error":
            raise CheckpointError(value, every_rank=True)
        if value is None:
            return None
        missing = None if paths.is_step_folder(value) else (
            f"rank {self.ctx.rank} ({socket.gethostname()}) does not see checkpoint {value}, which rank 0 resumes "
            f"from: checkpoint.dir and checkpoint.resume must be on a file system every node mounts")
        missing = next((m for m in self.coll.all_gather(missing) if m), None)
        if missing:
            raise CheckpointError(missing, every_rank=True)
        return value

    def _lock_run_dir(self) -> None:
        """Rank 0 holds RUN_DIR/.lock until the run ends (run_lock: one run per checkpoint.dir)."""
        if self.run_dir is not None:
            self._lock_fd = run_lock.acquire(
                self.run_dir, self._lock_wait_s, self._log, "two runs in one folder would resume from and replace each "
                "other's steps; wait for it to end, or set another checkpoint.dir")

    def release(self) -> None:
        """Let go of what the run holds, at its end or its failure (again after `close` or itself: nothing more): the
        asynchronous save's writer thread and host buffers (a failed run kept them, and a caller that goes on in the
        same process, such as a test or tools/bench_checkpoint.py, one thread and ~1/N of the checkpoint in pinned
        memory per run), the SIGTERM/SIGUSR1 handlers (left installed after a failure, they swallowed a later SIGTERM
        of the process that ran it) and the run folder's lock.

        A write still in flight (a caller that did not `finish_pending`: a Ctrl-C) finishes first, as there: it writes
        into the locked folder, and the interpreter's exit would wait for its thread anyway; its collectives time out
        (parallel.collective_timeout_minutes) when the other ranks are gone. Its wait cut short (a second Ctrl-C), it is
        left to end on its own: a step folder is renamed into place only once complete, so at worst a `.step_N.tmp`
        is left, never read, removed by the next save."""
        finished = False
        try:
            self.finish_pending()
            finished = True
        finally:
            self._end_writer(join=finished)
            self.watcher.uninstall()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # closing the descriptor releases the flock
                self._lock_fd = None

    def _end_writer(self, join: bool) -> None:
        """End the writer thread (`join`: wait for it; it is idle unless a wait was interrupted) and free the staging
        buffers; a second call does nothing."""
        if self._executor is not None:
            self._executor.shutdown(wait=join, cancel_futures=True)
        if self._staging is not None:
            self._staging.release()

    def _choose_resume_source(self) -> Optional[Path]:
        return choose_resume_source(self.run_dir, self.settings.resume, self._log)

    def resume(self, model, optimizer) -> ResumeState:
        source = self._resume_source()
        if source is None:
            return ResumeState(0, 0, None)
        t0 = time.perf_counter()
        current = self.cfg.to_dict()
        # read by each rank alone: a damaged manifest or another model config, met by every rank, is said once
        with stopping_together(self.coll, f"resuming from {source}"):
            saved = read_manifest(source)
            notes = check_architecture(saved["config"]["model"], current["model"], source)
            saved_config = _checked_saved_config(saved["config"], source)
        self.origin = saved.get("source")  # an imported model's HF config, carried to this run's checkpoints
        for note in notes:
            self._log(note)
        manifest = load_training_state(source, model, optimizer, self.ctx, self.coll,
                                       tied=bool(self.cfg.model.tie_word_embeddings))
        restored = manifest["_restored"]
        step = int(manifest["step"]) if restored["optimizer"] else 0
        consumed = int(manifest.get("consumed_samples", 0)) if restored["optimizer"] else 0
        check_resumed_position(source, step, consumed, self.cfg.train)
        if consumed:  # the data position continues (not a fresh start from imported weights)
            for note in data_order_notes(saved_config, current, step):
                self._log(f"data order: {note}")
            for note in schedule_change_notes(saved_config, current):
                self._log(f"learning rate: {note}")
        own_run = self.run_dir is not None and source.parent.resolve() == self.run_dir.resolve()
        self.last_saved_step = step if own_run else None  # never save again the step resumed from
        what = "weights, optimizer state" if restored["optimizer"] else "weights only (no optimizer state saved)"
        rng = "RNG restored" if restored["rng"] else \
            f"RNG freshly seeded (saved in layout {layout_text(saved.get('layout'))})"
        self._log(f"resumed from {source} at step {step}: {what}, {consumed} samples consumed, {rng} "
                  f"({time.perf_counter() - t0:.1f} s)")
        return ResumeState(step, consumed, source, manifest.get("trainer_state", {}) if restored["optimizer"] else {},
                           dict(manifest.get("data") or {}) if consumed else {})

    # ---- save ----------------------------------------------------------------------------------------

    def after_step(self, step: int, model, optimizer, loader,
                   trainer_state: Optional[Callable[[], dict]] = None) -> bool:
        """Save when due; return True when the run was preempted (the checkpoint is then saved on all ranks): not at
        its last step, which ends the run anyway (a signal met there must not ask for a requeue of a finished run).
        `trainer_state()` (JSON values), asked for only when a save is due, is saved too and comes back as
        `ResumeState.trainer_state`."""
        stop = self.watcher.stop_requested()
        if not stop and self._pending is not None and self._pending.done():
            self.wait()  # a background save that failed is said now, not when the next one is due (an interval on)
        # (preempted: `save` saves this step first, then raises that failure; raised here, the step would be lost)
        last = step == self.cfg.train.train_steps
        interval = self.settings.interval
        if stop or last or (interval > 0 and step % interval == 0) or self.retention.milestone(step):
            self.save(step, model, optimizer, loader, blocking=stop or last,
                      trainer_state=trainer_state() if trainer_state is not None else None)
        if stop:
            saved = f"saved step {step}" if self.run_dir is not None else "checkpoint.dir is not set, nothing saved"
            self._log(f"{self.watcher.reason()}: {saved}; " +
                      ("that was the last step: the run is complete" if last else
                       "stopping (exit 75: a scheduler may requeue the job, which resumes from it)"))
        return stop and not last

    def save(self, step: int, model, optimizer, loader, blocking: bool = True,
             trainer_state: Optional[dict] = None) -> None:
        if self.run_dir is None or step == self.last_saved_step:
            return
        earlier = None
        try:
            self.wait()  # one save at a time (and the staging buffers are reused only once the last write is done)
        except UserError as e:  # a background save failed (a full disk since cleared?): this step is still tried
            earlier = e
        self.saving_step = step
        # the fingerprints on rank 0 alone, which writes the manifest (`stats`: reads the others need not make)
        data_state = {**loader.state_dict(), **loader.stats(step, fingerprints=self.ctx.rank == 0)}
        background = self._executor is not None and not blocking
        snapshot = take_snapshot(step, model, optimizer, self.ctx, self.cfg.to_dict(), data_state,
                                 staging=self._staging if background else None, coll=self.coll,
                                 trainer_state=trainer_state, source=self.origin, writers=self._writers)
        self.last_saved_step = step
        if background:
            self._pending = self._executor.submit(self._write, snapshot)
        else:
            self._write(snapshot)
        self.saving_step = None
        if earlier is not None:
            raise earlier

    def _write(self, snapshot) -> None:
        t0 = time.perf_counter()
        folder = write_snapshot(snapshot, self.run_dir, self.coll, self.retention)
        self._log(f"saved step {snapshot.step} to {folder} ({time.perf_counter() - t0:.1f} s)")

    def wait(self) -> None:
        """Block until an asynchronous save has committed (re-raising its error, if any)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def finish_pending(self) -> None:
        """The run failed: a background save of an earlier, good step still writing commits before the process
        exits (which would kill it mid-write and lose that step); its own failure is said, not raised over the run's
        error."""
        try:
            self.wait()
        except Exception as e:
            self._log(f"the save in progress failed too: {e}")

    def close(self) -> None:
        """The run's end: wait for an asynchronous save (raising its error), then end its writer and free its
        buffers; the run folder's lock is kept until `release`."""
        try:
            self.wait()
        finally:
            self._end_writer(join=True)
            self.watcher.uninstall()
