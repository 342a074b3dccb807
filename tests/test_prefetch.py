"""The trainer's prefetching batch feed (nanotronix/data/prefetch.py) against the plain TrainLoader: the same
batches in order, after jumps and after a resume, the same resume state, errors surfacing in the training thread,
a clean shutdown, and data.loader validation. CPU only, about 2 s."""
import re
import threading

import pytest
import torch

from helpers import write_learnable_store
from nanotronix.config import ConfigError, config_from_dict
from nanotronix.data import DataError, build_prefetched_loader, build_train_loader
from nanotronix.data.prefetch import PrefetchingLoader

CPU = torch.device("cpu")
SEQ = 16


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_learnable_store(tmp_path_factory.mktemp("store") / "arith", num_docs=150)


def _cfg(store, **data):
    return config_from_dict({
        "model": {"preset": "smollm2-135m", "num_hidden_layers": 1},
        "train": {"seq_len": SEQ, "global_batch_size": 8, "micro_batch_size": 2},
        "data": {"stages": [{"name": "one", "start_step": 1, "datasets": [{"path": str(store)}]}], **data}})


def _threads():
    return {t for t in threading.enumerate() if t.name.startswith("nanotronix-prefetch")}


def test_prefetched_batches_equal_plain_loader(store):
    cfg = _cfg(store)
    plain = build_train_loader(cfg, 1, 2)
    feed = build_prefetched_loader(cfg, 1, 2, CPU, last_step=12)
    try:
        assert feed.name == "pytorch"
        for step in [1, 2, 3, 4, 9, 10, 11, 12, 2, 3]:  # in order, a jump ahead, the last step, a jump back
            got = feed.batch(step)
            want = plain.batch(step)
            assert got.shape == (2, 2, SEQ + 1) and got.dtype == torch.int32
            assert torch.equal(got, want), step
            assert feed.state_dict() == plain.state_dict() == {"consumed_samples": step * 8}
            assert feed.stats(step) == plain.stats(step)
    finally:
        feed.close()


def test_read_ahead_does_not_advance_resume_state(store):
    """The batch of step s+1 is read during step s, but a checkpoint after step s must say s, and a loader
    resumed from that state feeds s+1, s+2, ... exactly as an uninterrupted one."""
    cfg = _cfg(store)
    feed = build_prefetched_loader(cfg, 0, 1, CPU)
    for step in range(1, 4):
        feed.batch(step)
    feed._ahead[1].result()  # step 4 has been read ahead ...
    assert feed.state_dict() == {"consumed_samples": 3 * 8}  # ... yet only 3 steps were consumed
    state = feed.state_dict()
    feed.close()

    resumed = build_prefetched_loader(cfg, 0, 1, CPU, consumed_samples=state["consumed_samples"])
    uninterrupted = build_train_loader(cfg, 0, 1)
    try:
        assert resumed.next_step == 4
        for step in range(resumed.next_step, 8):
            assert torch.equal(resumed.batch(step), uninterrupted.batch(step))
    finally:
        resumed.close()


def test_batches_are_independent_buffers(store):
    """Each batch is its own tensor: a batch kept by the caller is not overwritten by later reads."""
    feed = build_prefetched_loader(_cfg(store), 0, 1, CPU)
    try:
        kept = [feed.batch(step) for step in range(1, 6)]
        plain = build_train_loader(_cfg(store), 0, 1)
        assert all(torch.equal(k, plain.batch(s)) for s, k in zip(range(1, 6), kept))
        assert len({k.data_ptr() for k in kept}) == len(kept)
    finally:
        feed.close()


def test_read_error_surfaces_in_caller_and_close_is_clean(store):
    loader = build_train_loader(_cfg(store), 0, 1)
    calls = []

    def flaky_read(step):
        calls.append((step, threading.current_thread().name))
        if step == 3:
            raise DataError("disk gone at step 3")
        return loader.read_batch(step)

    feed = PrefetchingLoader(loader, flaky_read, CPU)
    feed.batch(1)
    assert _threads()
    feed.batch(2)  # step 3's read (ahead) fails in the worker ...
    with pytest.raises(DataError, match="disk gone at step 3"):
        feed.batch(3)  # ... and is reported here, where training asks for it
    assert loader.state_dict() == {"consumed_samples": 2 * 8}
    assert all(name.startswith("nanotronix-prefetch") for _, name in calls)  # every read on the worker thread
    feed.close()
    feed.close()  # idempotent
    assert not _threads()


def test_pinned_read_needs_cuda_only_when_asked(store):
    """On CPU the feed reads plain memory (pinning needs CUDA); the pinned read is the same data."""
    loader = build_train_loader(_cfg(store), 0, 1)
    assert not loader.read_batch(1).is_pinned()
    if torch.cuda.is_available():
        pinned = loader.read_batch(1, pin_memory=True)
        assert pinned.is_pinned() and torch.equal(pinned, loader.read_batch(1))


def test_data_loader_field_is_validated(store):
    assert _cfg(store).data.loader == "pytorch"
    assert _cfg(store, loader="dali").data.loader == "dali"
    with pytest.raises(ConfigError, match=re.escape("data.loader: 'tfrecord' is not pytorch|dali")):
        _cfg(store, loader="tfrecord")


def test_bench_loader_reports_every_loader(capsys):
    """tools/bench_loader.py end to end on a tiny store (in process, ~1 s): a row per loader, ratios vs pytorch."""
    import sys

    from helpers import ROOT
    from nanotronix import accel
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_loader

    args = ["--seq-len", "32", "--windows", "8", "--micro-batch", "2", "--steps", "3", "--step-ms", "1",
            "--tokens", "20000", "--rounds", "1"]
    assert bench_loader.main(args) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    expected = {"pytorch", "pytorch+prefetch"} | ({"dali", "dali+prefetch"} if accel.dali_modules() else set())
    assert set(rows) == expected
    assert rows["pytorch"][2] == "1.00" and all(float(r[1].replace(",", "")) > 0 for r in rows.values())
    with pytest.raises(SystemExit) as bad:
        bench_loader.main(["--windows", "5"])
    assert bad.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --windows 5 is not divisible by --micro-batch 4"


def test_bench_loader_cold_reports_every_read_path(capsys, tmp_path):
    """tools/bench_loader.py --cold on a tiny store (in process, < 1 s): a row per read path, each read checked against
    the store's tokens by the benchmark itself, ratios vs the plain map; --store needs --cold and a store."""
    import sys

    from helpers import ROOT
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_loader

    argv = ["--cold", "--seq-len", "32", "--windows", "40", "--tokens", "20000", "--rounds", "1"]
    assert bench_loader.main(argv) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:-1]}
    assert set(rows) == {"map", "map+MADV_RANDOM", "pread"}
    assert rows["map"][2] == rows["map"][4] == rows["map"][6] == "1.00x"
    missing = tmp_path / "none"
    for argv, message in ((["--store", "x"], "error: --store needs --cold"),
                          (["--cold", "--store", str(missing)],
                           f"error: --store {missing}: no Megatron store there (PREFIX.bin + PREFIX.idx)")):
        with pytest.raises(SystemExit):
            bench_loader.main(argv)
        assert capsys.readouterr().err.strip() == message


def test_bench_loader_zarr_reports_both_reads(capsys, monkeypatch):
    """tools/bench_loader.py --zarr on a tiny store (in process, < 1 s; no wait before the requests): a row per read,
    each checked against the store's windows by the benchmark itself, the ratio against the read per window, and fewer
    requests for the batch read; --zarr and --cold exclude each other."""
    import sys

    from helpers import ROOT
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_loader

    argv = ["--zarr", "--latency-ms", "0", "--seq-len", "32", "--windows", "40", "--tokens", "200000", "--rounds", "1"]
    assert bench_loader.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("40 random windows of 33 tokens from a zarr store of 200,000 uint16 tokens, 0 ms"), out
    rows = {line[:12].strip(): line[12:].split() for line in out[2:]}
    assert set(rows) == {"one by one", "at once"} and rows["one by one"][1] == "1.00x", out
    assert int(rows["at once"][2]) < int(rows["one by one"][2]), out  # requests (one 2^20-token shard: none at once)
    for argv, message in ((["--zarr", "--cold"], "error: --zarr and --cold measure different things: give one"),
                          (["--zarr", "--latency-ms", "-1"], "error: --latency-ms must be within 0-10000, got -1.0")):
        with pytest.raises(SystemExit):
            bench_loader.main(argv)
        assert capsys.readouterr().err.strip() == message

    def failing(args):
        raise DataError("the store cannot be read")
    monkeypatch.setattr(bench_loader, "zarr_main", failing)  # an error in a measurement: one line, as every command
    assert bench_loader.main(["--zarr"]) == 2 and capsys.readouterr().err == "error: the store cannot be read\n"


def test_skipped_steps_are_never_read(store):
    """train.skip_steps: after step 3 the batch read ahead is step 7's (4-6 skipped); a skipped step counts as consumed
    for the resume state; nothing is read past the run's last step, even when the steps before it are skipped."""
    cfg = _cfg(store)
    plain = build_train_loader(cfg, 0, 1)
    feed = build_prefetched_loader(cfg, 0, 1, CPU, last_step=10, skipped_steps=[(4, 6), (9, 10)])
    read = []
    reader = feed._read_batch
    feed._read_batch = lambda step: read.append(step) or reader(step)
    try:
        for step in range(1, 11):
            if 4 <= step <= 6 or step >= 9:
                feed.skip(step)
            else:
                assert torch.equal(feed.batch(step), plain.read_batch(step)), step
            # the serial worker is let finish what was queued (else a read of step 4 that the jump to 7 cancels
            # before the worker starts it goes unseen: on a busy machine it mostly is)
            feed._worker.submit(lambda: None).result()
            assert feed.state_dict() == {"consumed_samples": step * 8}
        assert read == [1, 2, 3, 7, 8]
    finally:
        feed.close()


def test_a_failing_run_leaves_no_reader_thread(tmp_path):
    """train() ending in an error (here a damaged store's token id, met while reading ahead) stops the read-ahead
    thread too (before, it outlived the call: tests, notebooks, tools that train in-process)."""
    import numpy as np

    from checkpoint_helpers import train_in_process
    from helpers import tiny_config

    bad = write_learnable_store(tmp_path / "store" / "arith")
    tokens = np.fromfile(f"{bad}.bin", dtype=np.uint16)
    tokens[len(tokens) // 4:] = 9999  # beyond the tiny model's vocabulary (256)
    tokens.tofile(f"{bad}.bin")
    cfg = tiny_config(tmp_path, bad, train={"train_steps": 20}, checkpoint={"dir": str(tmp_path / "ckpt")})
    before = _threads()
    with pytest.raises(DataError, match="token id 9999"):
        train_in_process(cfg)
    assert _threads() - before == set()
