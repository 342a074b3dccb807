"""What an asynchronous save costs on the accelerator: its pause (the copy to host memory, `staging.HostStaging`) and
its device memory (the AdamW moments handed to the checkpoint, `DistributedOptimizer.param_states`).

- the host buffers are kept from one save to the next (the same storage at every save), and a save made while the
  training changes the weights and moments after the staging still writes the staged values, which equal what a
  synchronous save of the same state writes (the reference: the tensors themselves, written without staging);
- through the trainer: the Checkpointer stages a save only after the previous background write has finished
  (which the reuse of the buffers depends on), and an asynchronous run's checkpoints equal a synchronous run's;
- a run that fails while a background write is in flight lets it commit, then ends the writer thread and frees
  the buffers (`Checkpointer.release`);
- without ZeRO-1 the moments a save collects are the optimizer's own state tensors (no copy on the device), for
  the DistributedOptimizer and a plain torch AdamW alike;
- on a GPU (tools/gpu_checks.sh): the buffers are pinned.
Bit-exact resume with both (ZeRO-1 and not, async saves): test_resume_exact.py, test_checkpoint_resume.py. ~30 s.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from checkpoint_helpers import adamw, plain_model, train_in_process, train_steps
from helpers import requires_cuda, tiny_config, write_learnable_store


def _parallel_run():
    """A single-process parallelized model (several gradient buckets) with its DistributedOptimizer, and a step()."""
    from dist_common import make_config, make_data, rank_batch

    from nanotronix.model import build_model
    from nanotronix.parallel import DistributedOptimizer, ParallelContext, parallelize
    from nanotronix.train.optimizer import param_groups
    from nanotronix.train.step import train_step

    cfg = make_config({})
    ctx = ParallelContext.build(cfg)
    torch.manual_seed(0)
    model = parallelize(build_model(cfg.model), ctx, cfg)
    opt = DistributedOptimizer(model, param_groups(model.named_parameters(), 0.1), lr=1e-3, betas=(0.9, 0.95),
                               eps=1e-8)
    data = make_data(cfg)
    steps = iter(range(1, 10**6))

    def step():
        train_step(model, opt, rank_batch(cfg, data, next(steps), 0, 1), lr=1e-3, clip_grad=1.0)

    return cfg, ctx, model, opt, step


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a step folder (one process, no torch.distributed)."""
    from nanotronix.checkpoint.storage import Collective, dcp_metadata

    stored = dcp_metadata(folder).state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in stored.items() if hasattr(m, "size")}
    Collective(single_process=True).load(state, folder)
    return state


def assert_same_tensors(a: Path, b: Path) -> None:
    left, right = read_all(a), read_all(b)
    assert left.keys() == right.keys() and any(k.startswith("optim.") for k in left)
    for key in left:
        assert torch.equal(left[key], right[key]), key


def test_staged_buffers_are_reused_and_hold_the_values_of_the_save(tmp_path):
    from nanotronix.checkpoint.staging import HostStaging
    from nanotronix.checkpoint.storage import Collective
    from nanotronix.checkpoint.training_state import take_snapshot, write_snapshot

    cfg, ctx, model, opt, step = _parallel_run()
    config, coll = cfg.to_dict(), Collective(None)
    staging = HostStaging()

    def snapshot(n, with_staging):
        return take_snapshot(n, model, opt, ctx, config, {"consumed_samples": 8 * n},
                             staging=staging if with_staging else None, coll=coll)

    step()
    first = snapshot(1, True)
    storages = {k: p.tensor.untyped_storage().data_ptr() for k, p in first.pieces.items()}
    write_snapshot(first, tmp_path / "async", coll)
    step()
    write_snapshot(snapshot(2, False), tmp_path / "sync", coll)  # the reference: the live tensors, not staged
    second = snapshot(2, True)
    assert {k: p.tensor.untyped_storage().data_ptr() for k, p in second.pieces.items()} == storages
    assert all(p.tensor.device.type == "cpu" for p in second.pieces.values())
    step()  # the training goes on, changing the weights and moments in place, before the background write
    write_snapshot(second, tmp_path / "async", coll)
    assert_same_tensors(tmp_path / "sync" / "step_0000002", tmp_path / "async" / "step_0000002")
    now = snapshot(3, False)
    assert not torch.equal(now.pieces["optim.exp_avg.embed_tokens.weight"].tensor,
                           second.pieces["optim.exp_avg.embed_tokens.weight"].tensor)  # step 3 did change them


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_learnable_store(tmp_path_factory.mktemp("store") / "arith")


def test_the_checkpointer_stages_after_the_last_write_and_saves_what_a_sync_run_saves(tmp_path, store,
                                                                                     monkeypatch):
    from nanotronix.checkpoint.checkpointer import Checkpointer
    from nanotronix.checkpoint.staging import HostStaging

    events: list[tuple] = []
    stage, write, wait = HostStaging.stage, Checkpointer._write, Checkpointer.wait
    # The main thread's calls of wait and stage (each save makes both), counted: a background write lasts until the
    # main thread has gone on to the next save, a call after the one that staged it. (An Event cleared by the writer
    # lost the main thread's call when the writer thread started late, on a loaded machine: it then waited out its
    # 60 s timeout, a minute added to the test.)
    main_calls = threading.Condition()
    counts = {"calls": 0, "staged_at": 0}  # staged_at: the call that staged the write in flight (one at a time)

    def note_call(staging: bool) -> None:
        with main_calls:
            counts["calls"] += 1
            if staging:
                counts["staged_at"] = counts["calls"]
            main_calls.notify_all()

    def noted_stage(self, pieces):
        events.append(("stage", time.perf_counter()))
        note_call(staging=True)
        return stage(self, pieces)

    def noted_wait(self):
        note_call(staging=False)
        return wait(self)

    def slow_write(self, snapshot):
        background = threading.current_thread() is not threading.main_thread()
        if background:  # a slow disk: this write lasts until the next save is due (whatever the step's time)
            with main_calls:
                staged_at = counts["staged_at"]  # the next stage waits for this write: it is still this one's
                assert main_calls.wait_for(lambda: counts["calls"] > staged_at, timeout=60), "no next save came"
        storages = {k: p.tensor.untyped_storage().data_ptr() for k, p in snapshot.pieces.items()}
        write(self, snapshot)
        events.append(("write", time.perf_counter(), snapshot.step, background, storages))

    monkeypatch.setattr(HostStaging, "stage", noted_stage)
    monkeypatch.setattr(Checkpointer, "_write", slow_write)
    monkeypatch.setattr(Checkpointer, "wait", noted_wait)
    folders = {}
    for mode, async_save in (("sync", False), ("async", True)):
        (tmp_path / mode).mkdir()
        cfg = tiny_config(tmp_path / mode, store, train={"train_steps": 4},
                          checkpoint={"dir": str(tmp_path / mode / "ckpt"), "interval": 1, "keep_last": 0,
                                      "async_save": async_save})
        train_in_process(cfg)
        folders[mode] = tmp_path / mode / "ckpt"
    writes = [e for e in events if e[0] == "write" and e[3]]
    assert [w[2] for w in writes] == [1, 2, 3]  # step 4, the last, saves in the foreground
    assert all(w[4] == writes[0][4] for w in writes)  # every background save staged into the same buffers
    stages = [e[1] for e in events if e[0] == "stage"]
    assert len(stages) == 3 and all(start > done[1] for start, done in zip(stages[1:], writes))
    for n in range(1, 5):
        assert_same_tensors(folders["sync"] / f"step_{n:07d}", folders["async"] / f"step_{n:07d}")



@pytest.mark.parametrize("stop", ["error", "ctrl-c"])
def test_a_run_failing_during_a_background_save_ends_its_writer_thread_and_frees_the_buffers(tmp_path, store,
                                                                                           monkeypatch, stop):
    """The trainer's failure path (`finish_pending`, then `release`; a Ctrl-C skips the first, and `release` waits
    alike): the write in flight commits, then the writer thread ends and the staging buffers are freed, not kept by a
    caller that goes on in the same process (a test, a bench running the trainer twice). `release` again, and
    `close` after it, do nothing more."""
    import gc
    import signal
    import weakref

    from nanotronix.checkpoint.checkpointer import Checkpointer
    from nanotronix.train import Interrupted, trainer

    made: list[Checkpointer] = []
    writers: list[threading.Thread] = []
    buffers: list[weakref.ref] = []
    failed, writing = threading.Event(), threading.Event()
    write, train_step = Checkpointer._write, trainer.train_step
    steps: list[int] = []

    class Noted(Checkpointer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    def slow_write(self, snapshot):
        if threading.current_thread() is not threading.main_thread():  # in flight when the run fails
            writers.append(threading.current_thread())
            buffers.extend(weakref.ref(p.tensor) for p in snapshot.pieces.values())
            writing.set()
            failed.wait(timeout=60)
        write(self, snapshot)

    def failing_step(*args, **kwargs):
        steps.append(len(steps) + 1)
        if steps[-1] == 3:  # the step after step 2's background save: it fails once that write has begun
            # (checked before by the writer's own note: a writer thread that started late on a loaded machine let
            # step 3 train, and step 4's save wait out the write's 60 s and commit a step more)
            assert writing.wait(timeout=60), "step 2's background write did not begin"
            failed.set()
            raise RuntimeError("a step that fails") if stop == "error" else KeyboardInterrupt()
        return train_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "Checkpointer", Noted)
    monkeypatch.setattr(Checkpointer, "_write", slow_write)
    monkeypatch.setattr(trainer, "train_step", failing_step)
    ckpt = tmp_path / "ckpt"
    cfg = tiny_config(tmp_path, store, train={"train_steps": 6},
                      checkpoint={"dir": str(ckpt), "interval": 2, "async_save": True})
    sigint = signal.getsignal(signal.SIGINT)  # a Ctrl-C's handling ignores the next one (torchrun passes it on)
    try:
        with pytest.raises(RuntimeError if stop == "error" else Interrupted,
                           match="a step that fails" if stop == "error" else "nothing saved since step_0000002"):
            train_in_process(cfg)
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert (ckpt / "latest").read_text() == "step_0000002\n"  # the write in flight committed first
    checkpointer, = made
    gc.collect()
    assert len(writers) == 1 and not writers[0].is_alive()
    assert buffers and all(ref() is None for ref in buffers)
    checkpointer.release()
    checkpointer.close()
    checkpointer.release()


def test_without_zero1_param_states_hands_out_the_optimizers_own_moments():
    """No copy of the moments on the device at a save: the state tensors themselves (views in the parameters'
    shapes), for every parameter and for the subset a writer asks for."""
    from nanotronix.checkpoint.state import optimizer_access

    _, _, model, opt, step = _parallel_run()
    assert not opt.sharded and len(model.grads.buckets) >= 4
    before = opt.param_states()  # zeros before the first step: AdamW's starting point
    assert all(not v.any() for s in before.values() for v in s.values())
    step()
    states = opt.param_states()
    names = {opt.names[id(p)] for p in model.grads.buckets[0].params}
    some = opt.param_states(names)
    assert set(some) == names
    for piece in opt.pieces:
        name = opt.names[id(piece.param)]
        for k in ("exp_avg", "exp_avg_sq"):
            own = opt.inner.state[piece.tensor][k]
            assert states[name][k].data_ptr() == own.data_ptr() and states[name][k].shape == piece.param.shape
            assert name not in names or some[name][k].data_ptr() == own.data_ptr()
            assert states[name][k].dtype == torch.float32

    plain = plain_model()
    optimizer = adamw(plain)
    train_steps(plain, optimizer, range(1))
    access = optimizer_access(optimizer, plain)
    got = access.param_states()
    for name, p in plain.named_parameters():
        for k in ("exp_avg", "exp_avg_sq"):
            assert got[name][k].data_ptr() == optimizer.state[p][k].data_ptr(), (name, k)


@requires_cuda
def test_cuda_pieces_are_staged_into_pinned_buffers_kept_across_saves():
    from nanotronix.checkpoint.staging import HostStaging
    from nanotronix.checkpoint.state import LocalPiece

    device = torch.device("cuda")
    sources = {"a": torch.randn(1 << 20, device=device), "b": torch.randn(64, 32, device=device)}
    staging = HostStaging()
    first = staging.stage({k: LocalPiece(v, None) for k, v in sources.items()})
    assert all(p.tensor.is_pinned() and p.tensor.device.type == "cpu" for p in first.values())
    assert all(torch.equal(first[k].tensor, v.cpu()) for k, v in sources.items())
    storages = {k: p.tensor.untyped_storage().data_ptr() for k, p in first.items()}
    for v in sources.values():
        v.mul_(2)
    second = staging.stage({k: LocalPiece(v, None) for k, v in sources.items()})
    for v in sources.values():
        v.add_(1)  # after the staging: the staged copies keep the values they were staged with
    assert {k: p.tensor.untyped_storage().data_ptr() for k, p in second.items()} == storages
    assert all(torch.equal(second[k].tensor, (v - 1).cpu()) for k, v in sources.items())
