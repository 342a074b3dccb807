#!/usr/bin/env python
"""Input-pipeline benchmark: the PyTorch loader vs the NVIDIA DALI loader, each with and without prefetching.

    python tools/bench_loader.py [--seq-len 2048] [--windows 32] [--steps 100] [--step-ms 20] [--device cpu]

A synthetic token store (random uint16 tokens, --tokens of them) is written to a temporary folder, then one data
rank's batches of --windows windows of seq_len+1 tokens are read step after step by:

  pytorch            TrainLoader.batch(step) in the training thread (the baseline)
  dali               the same batches through the DALI pipeline (data.loader: dali), in the training thread
  pytorch+prefetch   the trainer's feed: the next step's batch read by a background thread (pinned on CUDA)
  dali+prefetch      the same for DALI

Two figures per loader:
  - cost: windows per CPU-second of this process (every thread) when reading is the whole loop. CPU time is the
    work done, whatever else runs on the machine; prefetching moves that work to another thread, it cannot
    shrink it.
  - data wait: the wall time per step that training waits for its batch when each step also "computes" for
    --step-ms milliseconds. That compute is a sleep: on a GPU the host thread mostly waits for the device,
    leaving the CPU to the reader, which a sleep models; on a CPU run the model competes with the reader for the
    cores, so prefetching can hide less there. This one is wall time, so run it on an otherwise idle machine.
Every figure is the best of --rounds interleaved rounds (other processes only slow a measurement down); ratios are
against `pytorch`, measured in this run.

    python tools/bench_loader.py --cold [--tokens 1000000000 | --store PREFIX] [--windows 1024] [--rounds 3]

--cold measures instead how one batch of --windows random windows of seq_len+1 tokens is read from a Megatron
store (the synthetic one, or --store, an existing store: one on the file system training reads from) by each read
path, the store's page cache dropped before each cold read (posix_fadvise DONTNEED on the .bin, after every map of
it is closed; no root needed):

  map               a plain memory map of the .bin (the sampler's path before MADV_RANDOM: the baseline)
  map+MADV_RANDOM   the store's read_windows, what the sampler reads through
  pread             one os.preadv per window into a block buffer (a candidate, measured only)

Three figures per path, each also as a ratio against `map`: cold (nothing cached), warm (cached, a fresh map: the
first touch of each page in this process, as on a store much larger than what training has read of it) and
mapped (the same windows read again through the same map).

    python tools/bench_loader.py --zarr [--latency-ms 20] [--tokens N] [--windows 64] [--rounds 3]

--zarr measures how a batch of --windows random windows is read from a zarr store (a synthetic one, written as
tools/preprocess.py --format zarr writes), every request to it first waiting --latency-ms (a round trip to object
storage: s3://, gs://; 0 for a local disk), by:

  one by one   a zarr read per window (TokenStore.read_windows, every other store's generic path: the baseline)
  at once      ZarrStore.read_windows: one read for the batch, zarr fetching the chunks it touches concurrently

with the requests made per batch and the most of them in flight at once, each path's windows checked against the
store's own reads.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import _project_python  # noqa: F401  (first: a Python without the project's packages says so in one line)
from nanotronix.cli import ArgumentParser, finite_float, integer, one_line_errors, user_path
from nanotronix.errors import fail


def _fail(message: str):
    sys.exit(fail(message))


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=integer, default=2048)
    parser.add_argument("--windows", type=integer, default=32,
                        help="windows per step on this rank (default 32: SmolLM2-1.7B's 1024 over 32 DP ranks)")
    parser.add_argument("--micro-batch", type=integer, default=4, help="micro-batch size (divides --windows)")
    parser.add_argument("--steps", type=integer, default=100, help="steps per measurement")
    parser.add_argument("--step-ms", type=finite_float, default=20.0,
                        help="simulated compute per step in the second figure")
    parser.add_argument("--tokens", type=integer, default=20_000_000, help="tokens in the synthetic store")
    parser.add_argument("--rounds", type=integer, default=3, help="interleaved repetitions; the best is kept")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where batches go (cuda: pinned memory, DALI pipeline on the GPU)")
    parser.add_argument("--cold", action="store_true",
                        help="measure the read paths of random windows, cold and warm, instead of the loaders")
    parser.add_argument("--store", type=user_path,
                        help="with --cold: an existing Megatron store PREFIX instead of a synthetic one")
    parser.add_argument("--zarr", action="store_true",
                        help="measure a zarr store's batch reads, one window at a time and all at once, instead")
    parser.add_argument("--latency-ms", type=finite_float, default=20.0,
                        help="with --zarr: the wait before every request (a round trip to object storage)")
    args = parser.parse_args(argv)
    for name in ("seq_len", "windows", "micro_batch", "steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.step_ms < 0:
        parser.error(f"--step-ms must be >= 0, got {args.step_ms}")
    if args.windows % args.micro_batch and not (args.cold or args.zarr):  # only the loaders cut micro-batches
        parser.error(f"--windows {args.windows} is not divisible by --micro-batch {args.micro_batch}")
    if args.store and not args.cold:
        parser.error("--store needs --cold")
    if args.zarr and args.cold:
        parser.error("--zarr and --cold measure different things: give one")
    if not 0 <= args.latency_ms <= 10_000:
        parser.error(f"--latency-ms must be within 0-10000, got {args.latency_ms}")
    if args.tokens < 4 * (args.seq_len + 1):
        parser.error(f"--tokens {args.tokens} is too few for windows of {args.seq_len + 1} tokens")
    return args


def write_store(prefix: Path, num_tokens: int) -> None:
    import numpy as np
    from nanotronix.data.megatron_store import MegatronWriter

    rng = np.random.default_rng(0)
    writer = MegatronWriter(prefix, np.uint16)
    lengths = rng.integers(200, 4000, size=num_tokens // 2000 + 1)
    lengths = lengths[np.cumsum(lengths) <= num_tokens]
    if lengths.sum() < num_tokens:  # the rest as a last document: the store holds --tokens tokens, however few
        lengths = np.append(lengths, num_tokens - lengths.sum())
    # in documents of at most 2^26 tokens at a time: a store of a few GB for --cold without that much memory
    ends = np.cumsum(lengths)
    for lo, hi in _batches(ends, 1 << 26):
        writer.add_documents(rng.integers(1, 49152, size=int(lengths[lo:hi].sum()), dtype=np.uint16), lengths[lo:hi])
    writer.finalize({"tokenizer": {"name": "synthetic", "vocab_size": 49152, "eos_id": 0}})


def _batches(ends, tokens: int):
    """[lo, hi) runs of documents (of cumulative ends `ends`) holding about `tokens` tokens each."""
    import numpy as np
    cuts = np.unique(np.concatenate([[0], np.searchsorted(ends, np.arange(tokens, ends[-1], tokens)), [len(ends)]]))
    return zip(cuts[:-1].tolist(), cuts[1:].tolist())


def drop_from_page_cache(path: Path) -> None:
    """Ask the kernel to drop `path`'s cached pages (those no live map of it holds): the next read is cold."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def pread_windows(store, out, starts) -> None:
    """The candidate path: one os.preadv per window into a block of the store's dtype, converted into `out`."""
    import numpy as np
    from nanotronix.data.store import WINDOW_BLOCK
    length, itemsize = out.shape[1], store.dtype.itemsize
    block = np.empty((WINDOW_BLOCK, length), dtype=store.dtype)
    fd = os.open(store.bin_path, os.O_RDONLY)
    try:
        for lo in range(0, len(starts), WINDOW_BLOCK):
            part = starts[lo:lo + WINDOW_BLOCK].tolist()
            for k, start in enumerate(part):
                os.preadv(fd, [block[k]], start * itemsize)
            out[lo:lo + len(part)] = block[:len(part)]
    finally:
        os.close(fd)


def cold_paths():
    """name -> read(store, out, starts), each through its own fresh map or file descriptor."""
    import numpy as np
    from nanotronix.data.store import TokenStore

    def plain_map(store, out, starts):
        if not hasattr(store, "plain_map"):  # one per store, as the store's own maps: `mapped` reads it again
            store.plain_map = np.memmap(store.bin_path, dtype=store.dtype, mode="r",
                                        shape=(store.num_tokens,)).view(np.ndarray)
        TokenStore._read_windows_from(store.plain_map, out, np.arange(len(out)), starts)

    return {"map": plain_map,
            "map+MADV_RANDOM": lambda store, out, starts: store.read_windows(out, np.arange(len(out)), starts),
            "pread": pread_windows}


def cold_main(args) -> int:
    """--cold: seconds per batch of random windows through each read path, cold, warm and mapped."""
    import gc

    import numpy as np
    from nanotronix.data.megatron_store import MegatronStore, megatron_prefix

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        prefix = args.store and megatron_prefix(os.path.expanduser(args.store))
        if args.store and prefix is None:
            _fail(f"--store {args.store}: no Megatron store there (PREFIX.bin + PREFIX.idx)")
        if not args.store:
            prefix = str(Path(tmp) / "tokens")
            write_store(Path(prefix), args.tokens)
        length, paths = args.seq_len + 1, cold_paths()
        best = {(name, kind): float("inf") for name in paths for kind in ("cold", "warm", "mapped")}
        rng = np.random.default_rng(1)
        for _ in range(args.rounds):
            for name, read in paths.items():
                store = MegatronStore(prefix)
                if store.num_tokens < length:
                    _fail(f"{prefix}: {store.num_tokens} tokens, fewer than a window of {length}")
                starts = np.sort(rng.integers(0, store.num_tokens - length + 1, size=args.windows))
                bin_path = store.bin_path
                for kind in ("cold", "warm", "mapped"):
                    if kind == "cold":
                        del store
                        gc.collect()  # every map of the .bin closed: its pages can be dropped
                        drop_from_page_cache(bin_path)
                        store = MegatronStore(prefix)
                    elif kind == "warm":  # the pages are cached now; a fresh store maps them anew
                        del store
                        gc.collect()
                        store = MegatronStore(prefix)
                    out = np.empty((args.windows, length), dtype=np.int64)
                    t0 = time.perf_counter()
                    read(store, out, starts)
                    best[name, kind] = min(best[name, kind], time.perf_counter() - t0)
                if not np.array_equal(out, np.stack([store.tokens(s, length) for s in starts.tolist()])):
                    _fail(f"{name} read other tokens than the store's windows")
                del store
                gc.collect()
    source = f"--store {args.store}" if args.store else f"a synthetic store of {args.tokens:,} uint16 tokens"
    print(f"{args.windows} random windows of {length} tokens from {source}; best of {args.rounds} rounds")
    print(f"{'path':16s} {'cold':>9s} {'vs map':>7s} {'warm':>9s} {'vs map':>7s} {'mapped':>9s} {'vs map':>7s}")
    for name in paths:
        cells = "".join(f" {best[name, kind] * 1e3:7.1f}ms {best['map', kind] / best[name, kind]:6.2f}x"
                        for kind in ("cold", "warm", "mapped"))
        print(f"{name:16s}{cells}")
    print("(vs map: how many times faster than the plain map)")
    return 0


def make_config(args, store: Path, loader: str):
    from nanotronix.config import config_from_dict
    return config_from_dict({
        "model": {"preset": "smollm2-135m", "num_hidden_layers": 1, "max_position_embeddings": max(args.seq_len, 2048)},
        "train": {"seq_len": args.seq_len, "global_batch_size": args.windows, "micro_batch_size": args.micro_batch},
        "data": {"stages": [{"name": "bench", "start_step": 1, "datasets": [{"path": str(store)}]}],
                 "loader": loader}})


def make_feeds(args, store: Path, device, dali_ok: bool):
    """name -> (batch(step) function, close function). Batches go to `device` as the trainer's step does."""
    from nanotronix.data import build_prefetched_loader, build_train_loader
    feeds = {}
    plain = build_train_loader(make_config(args, store, "pytorch"), 0, 1)
    feeds["pytorch"] = (plain.batch, lambda: None)
    if dali_ok:
        from nanotronix.data.dali_loader import DaliBatchReader
        reader = DaliBatchReader(build_train_loader(make_config(args, store, "dali"), 0, 1), device)
        feeds["dali"] = (reader.read_batch, reader.close)
    for name in ("pytorch", "dali") if dali_ok else ("pytorch",):
        feed = build_prefetched_loader(make_config(args, store, name), 0, 1, device)
        feeds[f"{name}+prefetch"] = (feed.batch, feed.close)
    return feeds


def run_loop(batch, first_step: int, steps: int, step_seconds: float, device) -> tuple[float, float]:
    """(CPU seconds of the process, wall seconds spent waiting for batches) over `steps` consecutive steps."""
    import torch
    wait = 0.0
    start = time.process_time()
    for step in range(first_step, first_step + steps):
        t0 = time.perf_counter()
        tokens = batch(step).to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # the batch is only usable once it is there
        wait += time.perf_counter() - t0
        if step_seconds:
            time.sleep(step_seconds)
        del tokens
    return time.process_time() - start, wait


def counting_latency_store(store, latency_s: float):
    """`store` (a zarr store) behind a wrapper that waits `latency_s` before every read, as a request to object
    storage waits out its round trip, and counts the reads (`.requests`) and the most of them in flight at once
    (`.most_in_flight`)."""
    import asyncio

    from zarr.storage import WrapperStore

    class CountingLatencyStore(WrapperStore):
        def __init__(self, store, latency_s: float = 0.0):
            super().__init__(store)
            self.latency_s, self.requests, self.in_flight, self.most_in_flight = latency_s, 0, 0, 0

        def _with_store(self, store):
            return type(self)(store, self.latency_s)

        async def get(self, key, prototype, byte_range=None):
            self.requests += 1
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                await asyncio.sleep(self.latency_s)
                return await self._store.get(key, prototype, byte_range)
            finally:
                self.in_flight -= 1

    return CountingLatencyStore(store, latency_s)


def zarr_main(args) -> int:
    """--zarr: seconds per batch of random windows from a zarr store behind a per-request wait, a read per window
    against one read for all."""
    import numpy as np
    import zarr
    from zarr.storage import LocalStore

    from nanotronix.data.store import TokenStore
    from nanotronix.data.zarr_store import ZarrStore, ZarrWriter

    length = args.seq_len + 1
    paths = {"one by one": lambda store, out, starts: TokenStore.read_windows(store, out, np.arange(len(out)), starts),
             "at once": lambda store, out, starts: store.read_windows(out, np.arange(len(out)), starts)}
    best = {name: float("inf") for name in paths}
    counts = {}
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        path = str(Path(tmp) / "tokens.zarr")
        rng = np.random.default_rng(0)
        lengths = np.full(max(1, args.tokens // 1000), 1000)
        lengths[-1] += args.tokens - lengths.sum()
        writer = ZarrWriter(path, np.dtype(np.uint16))
        writer.add_documents(rng.integers(1, 49152, size=args.tokens, dtype=np.uint16), lengths)
        writer.finalize({"tokenizer": {"name": "synthetic", "vocab_size": 49152, "eos_id": 0}})
        store = ZarrStore(path)
        plain = store._tokens
        for _ in range(args.rounds):
            starts = np.sort(rng.integers(0, args.tokens - length + 1, size=args.windows))
            expected = np.stack([np.asarray(plain[s:s + length]) for s in starts.tolist()])
            for name, read in paths.items():
                # the store's tokens array reopened behind the wait: nothing cached from the round before
                slow = counting_latency_store(LocalStore(path, read_only=True), args.latency_ms / 1e3)
                store._tokens = zarr.open_group(slow, mode="r")["tokens"]
                out = np.empty((args.windows, length), dtype=np.int64)
                t0 = time.perf_counter()
                read(store, out, starts)
                best[name] = min(best[name], time.perf_counter() - t0)
                counts[name] = (slow.requests, slow.most_in_flight)
                if not np.array_equal(out, expected):
                    _fail(f"{name} read other tokens than the store's windows")
    print(f"{args.windows} random windows of {length} tokens from a zarr store of {args.tokens:,} uint16 tokens, "
          f"{args.latency_ms:g} ms before every request; best of {args.rounds} rounds")
    print(f"{'read':12s} {'per batch':>10s} {'vs one by one':>14s} {'requests':>9s} {'most in flight':>15s}")
    for name in paths:
        print(f"{name:12s} {best[name] * 1e3:8.1f}ms {best['one by one'] / best[name]:13.2f}x "
              f"{counts[name][0]:9d} {counts[name][1]:15d}")
    return 0


@one_line_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cold:
        return cold_main(args)
    if args.zarr:
        return zarr_main(args)
    import torch
    from nanotronix import accel

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        _fail("--device cuda but CUDA is not available")
    dali_ok = accel.dali_modules() is not None
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        store = Path(tmp) / "tokens"
        write_store(store, args.tokens)
        feeds = make_feeds(args, store, device, dali_ok)
        rate = {name: 0.0 for name in feeds}
        wait_ms = {name: float("inf") for name in feeds}
        step = 1
        for name, (batch, _) in feeds.items():  # warm-up: pipelines built, first pages touched
            run_loop(batch, step, 3, 0.0, device)
        step += 3
        for _ in range(args.rounds):
            for name, (batch, _) in feeds.items():
                # each feed reads a fresh range of steps, so no feed gets another's warm page cache
                cpu, _ = run_loop(batch, step, args.steps, 0.0, device)
                rate[name] = max(rate[name], args.steps * args.windows / cpu)
                _, wait = run_loop(batch, step + args.steps, args.steps, args.step_ms / 1e3, device)
                wait_ms[name] = min(wait_ms[name], wait / args.steps * 1e3)
                step += 2 * args.steps
        for _, close in feeds.values():
            close()
    dali_note = f"DALI {accel.dali_modules().version}" if dali_ok else "DALI not installed: its rows are missing"
    print(f"device {device.type}; {args.windows} windows of {args.seq_len + 1} tokens per step "
          f"(micro-batch {args.micro_batch}); {args.steps} steps per measurement, best of {args.rounds}; {dali_note}")
    print(f"{'loader':18s} {'windows/CPU-s':>14s} {'vs pytorch':>10s} {'data wait per step':>19s}  (each step "
          f"computes {args.step_ms:g} ms)")
    for name in feeds:
        print(f"{name:18s} {rate[name]:14,.0f} {rate[name] / rate['pytorch']:10.2f} {wait_ms[name]:16.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
