"""tools/bench_loader.py and tools/bench_data.py print the figures the README quotes ("Input pipeline: does DALI
help?", "Input pipeline: cold stores (madvise)", the data-path table). The end-to-end tests in test_prefetch.py check
that a row per loader / read path comes out and that the baseline's own ratio is 1.00; a rate divided by the wrong
count, a wait that includes the simulated compute, a ratio turned upside down, the worst round kept instead of the
best, a cold read whose cache was never dropped, or a warm read of other windows all printed plausible numbers there.

These tests drive the benchmarks with a clock of their own (the tools' `time` swapped for one that only advances when
a read is charged for it), so every printed figure can be recomputed here from the charges, by plain arithmetic.
Everything runs in process on tiny stores (a few seconds in all)."""
from __future__ import annotations

import gc
import os
import types
import weakref

import numpy as np
import pytest

from helpers import load_tool


class FakeClock:
    """perf_counter (wall) and process_time (CPU) that move only when charged; sleep() moves the wall clock."""

    def __init__(self, tick: float = 0.0):
        self.wall = self.cpu = 0.0
        self.tick = tick  # process_time() itself costs `tick` CPU seconds (bench_data's paired reads)
        self.sleeps = []

    def perf_counter(self):
        return self.wall

    def process_time(self):
        now = self.cpu
        self.cpu += self.tick
        return now

    def time(self):
        return self.wall

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.wall += seconds

    def module(self):
        return types.SimpleNamespace(perf_counter=self.perf_counter, process_time=self.process_time, time=self.time,
                                     sleep=self.sleep)


@pytest.fixture(scope="module")
def bench_loader():
    return load_tool("bench_loader")


@pytest.fixture(scope="module")
def bench_data():
    return load_tool("bench_data")


# ---------------------------------------------------------------------------------------------------- bench_loader


def test_loader_rates_waits_and_ratios_follow_the_charged_clock(bench_loader, monkeypatch, capsys):
    """Default mode: windows per CPU-second = steps * windows / CPU seconds of the first loop, the data wait = wall
    seconds waiting for batches per step of the second loop (the simulated compute excluded), each the best of the
    rounds, ratios against `pytorch`. Each feed is charged a known CPU and wall cost per batch (3x in round 1, 1x
    in round 2), so the expected table is windows/cost and cost*1e3 ms. Also: every feed is warmed up on steps 1-3,
    then reads step ranges no other feed reads (no feed gets another's warm cache), the compute sleep is --step-ms per
    step of the wait loop only, both DALI rows read through DALI, batches come in --micro-batch micro-batches, and
    every feed is closed once."""
    from nanotronix import accel
    from nanotronix.data import dali_loader

    clock = FakeClock()
    monkeypatch.setattr(bench_loader, "time", clock.module())
    cpu_cost = {"pytorch": 2 ** -10, "dali": 2 ** -8, "pytorch+prefetch": 2 ** -9, "dali+prefetch": 2 ** -7}
    wall_cost = {"pytorch": 2 ** -9, "dali": 2 ** -7, "pytorch+prefetch": 2 ** -11, "dali+prefetch": 2 ** -12}
    steps, windows, rounds = 3, 8, 2
    seen, closed, shapes = {}, [], set()
    dali_readers = []
    if accel.dali_modules():
        real_init = dali_loader.DaliBatchReader.__init__

        def counting_init(self, *args, **kwargs):
            dali_readers.append(1)
            real_init(self, *args, **kwargs)
        monkeypatch.setattr(dali_loader.DaliBatchReader, "__init__", counting_init)
    real_make_feeds = bench_loader.make_feeds

    def charged_feeds(*args, **kwargs):
        feeds = real_make_feeds(*args, **kwargs)

        def charged(name, batch, close):
            def read(step):
                calls = seen.setdefault(name, [])
                round_factor = 3 if len(calls) < 3 + 2 * steps else 1  # 3 warm-up reads, then round 1, round 2
                calls.append(step)
                out = batch(step)
                shapes.add(tuple(out.shape))
                clock.cpu += cpu_cost[name] * round_factor
                clock.wall += wall_cost[name] * round_factor
                return out

            def close_once():
                closed.append(name)
                close()
            return read, close_once
        return {name: charged(name, batch, close) for name, (batch, close) in feeds.items()}
    monkeypatch.setattr(bench_loader, "make_feeds", charged_feeds)

    argv = ["--seq-len", "32", "--windows", str(windows), "--micro-batch", "2", "--steps", str(steps),
            "--step-ms", "5", "--tokens", "20000", "--rounds", str(rounds)]
    assert bench_loader.main(argv) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == set(seen) and len(rows) == (4 if accel.dali_modules() else 2), rows
    for name, row in rows.items():
        rate, ratio, wait_ms = float(row[1].replace(",", "")), float(row[2]), float(row[3])
        expected_rate = windows / cpu_cost[name]
        assert rate == pytest.approx(expected_rate, abs=1), (name, row)
        assert ratio == pytest.approx(expected_rate / (windows / cpu_cost["pytorch"]), abs=0.006), (name, row)
        assert wait_ms == pytest.approx(wall_cost[name] * 1e3, abs=1e-3), (name, row)
    # the compute: --step-ms after every step of the wait loops, never in the CPU loops or the warm-up
    assert clock.sleeps == [0.005] * (len(rows) * rounds * steps)
    measured = {}
    for name, calls in seen.items():
        assert calls[:3] == [1, 2, 3] and min(calls[3:]) > 3, (name, calls)  # measured: never the warm-up's steps
        measured[name] = set(calls[3:])
        assert len(calls) == 3 + rounds * 2 * steps and len(measured[name]) == rounds * 2 * steps, (name, calls)
    names = list(measured)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not measured[a] & measured[b], (a, b)
    assert sorted(closed) == sorted(rows)
    assert shapes == {(windows // 2, 2, 33)}  # micro-batches of --micro-batch windows of seq_len+1 tokens
    if accel.dali_modules():
        assert len(dali_readers) == 2  # `dali` and `dali+prefetch` both read through DALI


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "error: --steps must be >= 1"),
    (["--tokens", "100", "--seq-len", "32"], "error: --tokens 100 is too few for windows of 33 tokens"),
    (["--step-ms", "-0.5"], "error: --step-ms must be >= 0, got -0.5"),
    (["--windows", "6"], "error: --windows 6 is not divisible by --micro-batch 4"),
    (["--zarr", "--latency-ms", "10001"], "error: --latency-ms must be within 0-10000, got 10001.0"),
])
def test_loader_bad_arguments_are_one_line_errors(bench_loader, monkeypatch, capsys, argv, message):
    """Bad input ends with one line and exit code 2 before any store is written."""
    def measured(*args):
        raise AssertionError(f"{argv} was measured")
    for name in ("write_store", "cold_main", "zarr_main"):  # a bad value let through fails here, at once
        monkeypatch.setattr(bench_loader, name, measured)
    with pytest.raises(SystemExit) as bad:
        bench_loader.main(argv)
    assert bad.value.code == 2
    assert capsys.readouterr().err.strip() == message


def _fd_path(fd):
    return os.readlink(f"/proc/self/fd/{fd}")


def _traced_cold_run(bench_loader, monkeypatch, argv, durations=None):
    """Run --cold with every MegatronStore tracked by a weak reference, every posix_fadvise and read recorded in order,
    and each read charged durations[name][kind][round] on the tool's clock."""
    from nanotronix.data import megatron_store

    clock = FakeClock()
    monkeypatch.setattr(bench_loader, "time", clock.module())
    # the tool's full collections (~20 a run) take ~0.1 s each in a test process that holds torch and the suite's
    # objects; the stores are freed by their references going (checked below through the weak references)
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda generation=2: real_collect(0))
    live, events, in_read = [], [], []

    class Tracked(megatron_store.MegatronStore):
        def __init__(self, prefix):
            super().__init__(prefix)
            self.serial = len(live)  # not id(): a dead store's id is reused by the next one
            live.append(weakref.ref(self))

        def read_windows(self, out, rows, starts):
            if in_read:
                in_read[-1]["read_windows"] = True
            return super().read_windows(out, rows, starts)
    monkeypatch.setattr(megatron_store, "MegatronStore", Tracked)

    real_fadvise = os.posix_fadvise

    def fadvise(fd, offset, length, advice):
        events.append({"i": len(events), "op": "fadvise", "path": _fd_path(fd), "offset": offset, "len": length,
                       "advice": advice,
                       "live_stores": sum(ref() is not None for ref in live)})
        return real_fadvise(fd, offset, length, advice)
    monkeypatch.setattr(os, "posix_fadvise", fadvise)

    real_paths = bench_loader.cold_paths
    kinds = ("cold", "warm", "mapped")

    def traced_paths():
        def traced(name, read):
            def run(store, out, starts):
                n = sum(e["op"] == "read" and e["name"] == name for e in events)
                event = {"i": len(events), "op": "read", "name": name, "store": store.serial,
                         "bin": str(store.bin_path),
                         "starts": np.array(starts).copy(), "kind": kinds[n % 3], "round": n // 3,
                         "read_windows": False}
                events.append(event)
                in_read.append(event)
                before = getattr(store, "plain_map", None)
                try:
                    read(store, out, starts)
                finally:
                    in_read.pop()
                event["same_map"] = before is not None and before is getattr(store, "plain_map", None)
                del before
                clock.wall += durations[name][kinds[n % 3]][n // 3] if durations else 0.001
            return run
        return {name: traced(name, read) for name, read in real_paths().items()}
    monkeypatch.setattr(bench_loader, "cold_paths", traced_paths)
    assert bench_loader.main(argv) == 0
    return events


def test_cold_reads_follow_a_dropped_cache_and_read_the_same_windows(bench_loader, monkeypatch, capsys):
    """--cold, per path and round: the .bin's pages dropped (posix_fadvise DONTNEED over the whole file) while no map
    of it is open, then the cold read through a fresh store, the warm read through another fresh store, and the mapped
    read through that same store (and map) again, all three of the same windows; `map` is the plain map (not the store's
    MADV_RANDOM read_windows), `map+MADV_RANDOM` is the store's read_windows. The printed ms are the best of the rounds
    and each ratio is map's time over the path's, of the same kind (recomputed from the charged durations)."""
    durations = {"map": {"cold": (0.8, 0.4), "warm": (0.04, 0.08), "mapped": (0.02, 0.01)},
                 "map+MADV_RANDOM": {"cold": (0.1, 0.2), "warm": (0.02, 0.02), "mapped": (0.02, 0.005)},
                 "pread": {"cold": (0.05, 0.05), "warm": (0.01, 0.03), "mapped": (0.04, 0.08)}}
    rounds = 2
    argv = ["--cold", "--seq-len", "32", "--windows", "40", "--tokens", "20000", "--rounds", str(rounds)]
    events = _traced_cold_run(bench_loader, monkeypatch, argv, durations)
    out = capsys.readouterr().out.splitlines()
    reads = [e for e in events if e["op"] == "read"]
    assert len(reads) == 3 * 3 * rounds
    for name in durations:
        for r in range(rounds):
            mine = [e for e in reads if e["name"] == name and e["round"] == r]
            assert [e["kind"] for e in mine] == ["cold", "warm", "mapped"]
            cold = mine[0]
            before = events[:cold["i"]]
            drop = [e for e in before if e["op"] == "fadvise"][-1]
            assert drop["i"] > max([e["i"] for e in before if e["op"] == "read"], default=-1)
            assert drop["path"] == cold["bin"] and (drop["offset"], drop["len"]) == (0, 0)
            assert drop["advice"] == os.POSIX_FADV_DONTNEED
            assert drop["live_stores"] == 0, "a map of the .bin was still open: its pages could not be dropped"
            assert mine[0]["store"] != mine[1]["store"] and mine[1]["store"] == mine[2]["store"]
            assert all(np.array_equal(e["starts"], cold["starts"]) for e in mine), "other windows warm than cold"
            assert len(cold["starts"]) == 40
            assert all(e["read_windows"] == (name == "map+MADV_RANDOM") for e in mine), name
            if name == "map":  # `mapped`: the windows again through warm's very map, not a new one
                assert [e["same_map"] for e in mine] == [False, False, True]
    rows = {line.split()[0]: line.split()[1:] for line in out[2:-1]}
    best = {name: {kind: min(d) for kind, d in kinds.items()} for name, kinds in durations.items()}
    for name, cells in rows.items():
        for i, kind in enumerate(("cold", "warm", "mapped")):
            ms, ratio = float(cells[2 * i].removesuffix("ms")), float(cells[2 * i + 1].removesuffix("x"))
            assert ms == pytest.approx(best[name][kind] * 1e3, abs=0.05), (name, kind, cells)
            assert ratio == pytest.approx(best["map"][kind] / best[name][kind], abs=0.006), (name, kind, cells)
    assert out[0] == "40 random windows of 33 tokens from a synthetic store of 20,000 uint16 tokens; best of 2 rounds"


def test_cold_store_is_the_one_given(bench_loader, monkeypatch, capsys, tmp_path):
    """--cold --store PREFIX measures that store (not a synthetic one), down to one that holds exactly one window; one
    token fewer is a one-line error. Its windows need not fill micro-batches (--micro-batch is the loaders')."""
    from nanotronix.data.megatron_store import MegatronWriter

    tokens = np.arange(1, 34, dtype=np.uint16)  # exactly one window of 33 tokens
    for name, n in (("one", 33), ("short", 32)):
        writer = MegatronWriter(tmp_path / name, np.uint16)
        writer.add_documents(tokens[:n], np.array([n]))
        writer.finalize({"tokenizer": {"name": "synthetic", "vocab_size": 49152, "eos_id": 0}})
    prefix = str(tmp_path / "one")
    events = _traced_cold_run(bench_loader, monkeypatch,
                              ["--cold", "--store", prefix, "--seq-len", "32", "--windows", "3", "--rounds", "1"])
    assert capsys.readouterr().out.splitlines()[0].startswith(f"3 random windows of 33 tokens from --store {prefix};")
    reads = [e for e in events if e["op"] == "read"]
    assert len(reads) == 9 and {e["bin"] for e in reads} == {f"{prefix}.bin"}
    assert all((e["starts"] == 0).all() for e in reads)
    with pytest.raises(SystemExit) as bad:
        bench_loader.main(["--cold", "--store", str(tmp_path / "short"), "--seq-len", "32", "--windows", "4"])
    assert bad.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'short'}: 32 tokens, fewer than a window of 33"


@pytest.mark.parametrize("num_tokens", [150, 4001, 20000, 123457])
def test_synthetic_store_holds_exactly_the_tokens_asked_for(bench_loader, tmp_path, num_tokens):
    """The synthetic store holds --tokens tokens (the header says so), in documents, all valid SmolLM2 ids; the
    writing runs of _batches cover every document once, in order."""
    from nanotronix.data.megatron_store import MegatronStore

    bench_loader.write_store(tmp_path / "s", num_tokens)
    store = MegatronStore(str(tmp_path / "s"))
    assert store.num_tokens == num_tokens
    flat = store.tokens(0, num_tokens)
    assert flat.min() >= 1 and flat.max() < 49152
    ends = np.cumsum(np.random.default_rng(num_tokens).integers(1, 50, size=300))
    for size in (1, 37, 500, int(ends[-1]) + 10):
        runs = list(bench_loader._batches(ends, size))
        assert runs[0][0] == 0 and runs[-1][1] == len(ends), (size, runs)
        assert all(hi > lo for lo, hi in runs) and all(a[1] == b[0] for a, b in zip(runs, runs[1:])), (size, runs)


def test_zarr_best_times_and_ratio_follow_the_clock(bench_loader, monkeypatch, capsys):
    """--zarr: the printed ms per batch are the best of the rounds and the ratio is one-by-one's time over the path's
    (charged: one by one 400 then 200 ms, at once 50 then 100 ms: 200.0 ms, 50.0 ms, 4.00x)."""
    charges = iter([0.4, 0.05, 0.2, 0.1])  # round 1: one by one, at once; round 2: the same
    state = {"wall": 0.0, "calls": 0}

    def perf_counter():
        state["calls"] += 1
        if state["calls"] % 2 == 0:  # the end of a read: charge it
            state["wall"] += next(charges)
        return state["wall"]
    monkeypatch.setattr(bench_loader, "time", types.SimpleNamespace(perf_counter=perf_counter))
    argv = ["--zarr", "--latency-ms", "0", "--seq-len", "32", "--windows", "8", "--tokens", "20000", "--rounds", "2"]
    assert bench_loader.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line[:12].strip(): line[12:].split() for line in out[2:]}
    assert rows["one by one"][:2] == ["200.0ms", "1.00x"], out
    assert rows["at once"][:2] == ["50.0ms", "4.00x"], out


def test_zarr_latency_is_waited_before_requests(bench_loader, capsys):
    """--latency-ms is waited out before every request: no batch read can take less than one wait (real clock)."""
    argv = ["--zarr", "--latency-ms", "60", "--seq-len", "32", "--windows", "4", "--tokens", "20000", "--rounds", "1"]
    assert bench_loader.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line[:12].strip(): line[12:].split() for line in out[2:]}
    assert all(float(r[0].removesuffix("ms")) >= 60 for r in rows.values()), out


# ------------------------------------------------------------------------------------------------------ bench_data


def test_data_thread_and_process_rates(bench_data, monkeypatch, tiny_tokenizer):
    """raw_thread_rate: (tokens, tokens per wall second, tokens per CPU second) on its own clock, tokens counted as
    `tokenizers` counts them, and so does a process's share; raw_process_rate: all texts over N balanced shares, wall
    time = the slowest share's, CPU time = the sum of the shares'."""
    from tokenizers import Tokenizer

    texts = ["def f(x):\n    return x + 1\n" * k for k in range(1, 9)]
    expected = sum(len(e.ids) for e in Tokenizer.from_file(tiny_tokenizer).encode_batch(texts,
                                                                                      add_special_tokens=False))
    clock = FakeClock()
    real_from_file = Tokenizer.from_file

    class Charged:
        def __init__(self, tok):
            self.tok = tok

        def encode_batch_fast(self, batch, add_special_tokens):
            clock.wall += 0.25 * len(batch)  # every call charged by its texts: the timed one 2 s wall, 3 s CPU;
            clock.cpu += 0.375 * len(batch)  # the warm-up call on 5 texts must stay outside the timing
            return self.tok.encode_batch(batch, add_special_tokens=add_special_tokens)

        encode_batch = encode_batch_fast
    import tokenizers
    monkeypatch.setattr(tokenizers, "Tokenizer",
                        types.SimpleNamespace(from_file=lambda path: Charged(real_from_file(path))))
    monkeypatch.setattr(bench_data, "time", clock.module())
    tokens, wall_rate, cpu_rate = bench_data.raw_thread_rate(tiny_tokenizer, texts)
    assert (tokens, wall_rate, cpu_rate) == (expected, pytest.approx(expected / 2), pytest.approx(expected / 3))
    # a process's share (run here in this process): (tokens, wall seconds, CPU seconds) of its timed call
    assert bench_data._encode_share(tiny_tokenizer, texts) == (expected, 2.0, 3.0)

    shares_seen = []

    class Pool:
        def __init__(self, n):
            self.n = n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def starmap(self, fn, args):
            shares_seen.extend(share for _, share in args)
            assert len(args) == self.n
            return [(100, 2.0, 1.5), (300, 4.0, 2.5), (200, 1.0, 4.0)]
    import multiprocessing
    monkeypatch.setattr(multiprocessing, "get_context", lambda method: types.SimpleNamespace(Pool=Pool))
    wall_rate, cpu_rate = bench_data.raw_process_rate(tiny_tokenizer, texts, 3)
    assert wall_rate == pytest.approx(600 / 4.0) and cpu_rate == pytest.approx(600 / 8.0)
    assert len(shares_seen) == 3 and sorted(t for s in shares_seen for t in s) == sorted(texts)
    sizes = [sum(len(t) for t in share) for share in shares_seen]  # balanced: within one text of each other
    assert max(sizes) - min(sizes) <= max(len(t) for t in texts), sizes


def test_data_pipeline_rate_counts_tokens_without_eos_and_its_workers_cpu(bench_data, monkeypatch, tmp_path,
                                                                         tiny_tokenizer):
    """pipeline_rate: the store's tokens less one EOS per document (what the raw encoder yields, recounted here with
    `tokenizers`), per wall second and per CPU second of this process plus its reaped workers."""
    import json

    from tokenizers import Tokenizer

    texts = [f"line {k}: the quick brown fox jumps over the lazy dog {k * 7}\n" * (k + 1) for k in range(12)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    expected = sum(len(e.ids) for e in Tokenizer.from_file(tiny_tokenizer).encode_batch(texts,
                                                                                      add_special_tokens=False))
    clock, children = FakeClock(), iter([10.0, 13.0])
    monkeypatch.setattr(bench_data, "time", clock.module())
    monkeypatch.setattr(bench_data, "_children_cpu", lambda: next(children))
    from nanotronix import data
    real_preprocess = data.preprocess

    def charged(options):
        clock.wall += 4.0
        clock.cpu += 1.0
        return real_preprocess(options)
    monkeypatch.setattr(data, "preprocess", charged)
    args = types.SimpleNamespace(tokenizer=tiny_tokenizer, workers=1)
    tokens, wall_rate, cpu_rate = bench_data.pipeline_rate(args, corpus, tmp_path / "store")
    assert tokens == expected
    assert wall_rate == pytest.approx(expected / 4.0) and cpu_rate == pytest.approx(expected / (1.0 + 3.0))


def test_data_preprocess_keeps_the_best_of_each_rate(bench_data, monkeypatch, tmp_path, tiny_tokenizer):
    """bench_preprocess: each of the six rates is the best (highest) of the rounds, under its own name; differing
    token counts between the pipeline and the raw encoder stop the benchmark."""
    rounds = iter([((50, 1.0, 2.0), (3.0, 4.0), (50, 5.0, 6.0)),
                   ((50, 11.0, 1.0), (13.0, 0.5), (50, 2.0, 16.0)),
                   ((50, 0.1, 0.2), (0.3, 0.4), (50, 0.5, 60.0))])
    current = {}

    def next_round():
        current["r"] = next(rounds)
    monkeypatch.setattr(bench_data, "raw_thread_rate", lambda *a: (next_round(), current["r"][0])[1])
    monkeypatch.setattr(bench_data, "raw_process_rate", lambda *a: current["r"][1])
    monkeypatch.setattr(bench_data, "pipeline_rate", lambda *a: current["r"][2])
    args = types.SimpleNamespace(tokenizer=tiny_tokenizer, rounds=3, workers=1)
    tokens, best, _ = bench_data.bench_preprocess(args, ["a b c"], tmp_path)
    assert tokens == 50
    assert best == {"threads": 11.0, "threads_cpu": 2.0, "processes": 13.0, "processes_cpu": 4.0, "ours": 5.0,
                    "ours_cpu": 60.0}  # the last round's too
    for pipeline_tokens in (49, 51):
        monkeypatch.setattr(bench_data, "pipeline_rate", lambda *a: (pipeline_tokens, 1.0, 1.0))
        rounds = iter([((50, 1.0, 2.0), (3.0, 4.0), None)])
        with pytest.raises(SystemExit, match=rf"token counts differ \(pipeline {pipeline_tokens}, raw 50\)"):
            bench_data.bench_preprocess(types.SimpleNamespace(tokenizer=tiny_tokenizer, rounds=1, workers=1),
                                        ["a b c"], tmp_path)


def test_data_sampler_rates_are_windows_per_cpu_second_of_each_reader(bench_data, bench_loader, monkeypatch,
                                                                      tmp_path):
    """bench_sampler: each reader's windows per CPU-second over the calls after the warm-up one, best of the rounds,
    the loader and the raw slicing timed apart; the raw reader slices per_call windows of seq_len+1 tokens per call
    (also with --reads below a call's 1024 windows), the loaders read the whole batch / one DP rank's 4. Charged: every
    process_time() read costs 1 CPU unit in round 1 and 3 in round 2, a loader batch 9 units in round 1 and 1 in
    round 2: the raw reader's best is round 1 (per_call per unit), the loader's round 2 (per_call / 4 units)."""
    from nanotronix import data

    bench_loader.write_store(tmp_path / "s", 20000)
    clock = FakeClock(tick=1.0)
    monkeypatch.setattr(bench_data, "time", clock.module())
    real_build = data.build_train_loader
    batches = []

    class Charged:
        def __init__(self, loader, dp):
            self.loader, self.dp, self.calls = loader, dp, 0

        def batch(self, step):
            out = self.loader.batch(step)
            batches.append((self.dp, step, (int(np.prod(out.shape[:-1])), out.shape[-1])))  # micro-batches x windows
            if self.calls == 0:  # the warm-up call: raw slicing then costs 1 unit a call in round 1 ...
                clock.tick = 1.0
            else:  # ... and 3 in round 2 (this loader's batch: 9 units in round 1, 1 in round 2)
                clock.tick = 3.0
                clock.cpu += 9.0 if self.calls == 1 else 1.0
            self.calls += 1
            return out
    monkeypatch.setattr(data, "build_train_loader", lambda cfg, rank, dp: Charged(real_build(cfg, rank, dp), dp))
    slices = []
    real_memmap = np.memmap

    class CountingView:
        def __init__(self, array):
            self.array = array

        def __getitem__(self, key):
            part = self.array[key]
            slices.append(len(part))
            return part

    class Raw:
        def __init__(self, array):
            self.array = array

        def view(self, cls):
            return CountingView(self.array.view(cls))

    def memmap(path, *args, **kwargs):
        array = real_memmap(path, *args, **kwargs)
        return Raw(array) if str(path).endswith(".bin") and "shape" not in kwargs else array
    monkeypatch.setattr(np, "memmap", memmap)
    args = types.SimpleNamespace(seq_len=16, reads=8, rounds=2)
    seq, best = bench_data.bench_sampler(args, str(tmp_path / "s"))
    assert seq == 16
    for name, per_call in (("1024", 1024), ("4", 4), ("blend1024", 1024)):
        ours, raw = (best["ours" + name], best["raw" + name]) if name != "blend1024" else \
            (best["blend1024"], best["rawblend1024"])
        # round 1: raw 1 unit, ours 1 + 9 (process_time's own tick at 3 by then); round 2: raw 3, ours 3 + 1
        assert raw == pytest.approx(per_call) and ours == pytest.approx(per_call / 4), (name, best)
    # raw: per paired measurement a warm-up call and one call per round, each of per_call windows of seq+1 tokens
    assert slices == [17] * (3 * 1024 + 3 * 4 + 3 * 1024)
    assert [shape for _, _, shape in batches] == [(1024, 17)] * 3 + [(4, 17)] * 3 + [(1024, 17)] * 3
    assert [dp for dp, _, _ in batches] == [1] * 3 + [256] * 3 + [1] * 3


def test_data_main_prints_each_ratio_against_its_baseline(bench_data, monkeypatch, tmp_path, capsys):
    """bench_data's table: ours, the baseline (preprocess: the better of the thread and the process baselines) and
    ours / baseline, each figure in its row, recomputed here from the measured dicts."""
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.py").write_text("x = 1\n" * 100)
    pre = {"threads": 900.0, "threads_cpu": 450.0, "processes": 1200.0, "processes_cpu": 300.0, "ours": 1000.0,
           "ours_cpu": 400.0}
    samp = {"ours1024": 600.0, "raw1024": 1000.0, "ours4": 2000.0, "raw4": 5000.0, "blend1024": 300.0,
            "rawblend1024": 900.0}
    monkeypatch.setattr(bench_data, "bench_preprocess", lambda args, texts, tmp: (1234, pre, "store"))
    monkeypatch.setattr(bench_data, "bench_sampler", lambda args, store: (16, samp))
    assert bench_data.main(["--tokenizer", "t.json", "--corpus", str(tmp_path / "c"), "--workers", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2] == ("raw encode_batch_fast: 900 tokens/s with 2 Rust threads, 1,200 with 2 processes "
                      "(pure encoding time)")
    figures = [[float(x.replace(",", "")) for x in line[60:].split()[:3]] for line in out[4:]]
    expected = [(1000, 1200), (400, 450), (600, 1000), (2000, 5000), (300, 900)]
    assert len(figures) == len(expected)
    for (ours, base, ratio), (e_ours, e_base) in zip(figures, expected):
        assert (ours, base) == (e_ours, e_base) and ratio == pytest.approx(e_ours / e_base, abs=0.006), out
    assert out[7].endswith(f"latency {4e6 / 2000:.0f} us per call"), out  # 4 windows per call at ours4 windows/s


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "error: --rounds must be >= 1"),
    (["--reads", "0"], "error: --reads must be >= 1"),
    (["--workers", "0"], "error: --workers must be >= 1"),
    (["--seq-len", "0"], "error: --seq-len must be >= 1"),
    (["--max-mb", "0"], "error: --max-mb must be > 0, got 0.0"),
])
def test_data_bad_arguments_are_one_line_errors(bench_data, capsys, argv, message):
    """Bad values end in one line and exit code 2 before minutes of tokenizing, not after."""
    with pytest.raises(SystemExit) as bad:
        bench_data.main(["--tokenizer", "t.json", *argv])
    assert bad.value.code == 2
    assert capsys.readouterr().err.strip() == message


def test_data_collect_texts_stops_at_the_cap(bench_data, tmp_path):
    """collect_texts reads the suffixes it knows, in subfolders too, skips empty and undecodable files, and stops
    once --max-mb is reached (the file that crosses the cap is the last one read)."""
    for k in range(6):
        (tmp_path / f"{k}.py").write_text(f"# {k}\n" + "y = 2\n" * 50)
    (tmp_path / "empty.md").write_text("  \n")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "z.py").write_text("z = 3\n")  # subfolders are read too (the stdlib's packages)
    size = len((tmp_path / "0.py").read_text().encode())
    assert len(bench_data.collect_texts([str(tmp_path)], 10 ** 6)) == 7
    assert len(bench_data.collect_texts([str(tmp_path)], 2 * size)) == 2
    assert len(bench_data.collect_texts([str(tmp_path)], 2 * size + 1)) == 3
