"""Streaming, parallel text -> token store conversion (what `tools/preprocess.py` runs).

The main process reads inputs as chunks of whole records (`inputs.py`) and keeps at most a few chunks per
worker in flight; workers parse, validate and tokenize them (`encode.py`); results are written in input order,
so the output is the same for any worker count. Memory is bounded by chunk size x in-flight chunks whatever the
input size, and the output appears only when complete (see `files.py`).

Workers are threads first: `encode_batch` releases the GIL, and threads share one tokenizer (its BPE word
cache and tables stay in the same CPU caches), which measured 15-30% more tokens per CPU-second than the same
number of processes (`tools/bench_data.py`). The GIL-held part of a chunk (JSON parsing, ids -> numpy) is ~4%
of its CPU, so beyond `threads_per_process` threads one process would queue on the GIL: larger worker counts
use forked processes of up to that many threads each, every process encoding a group of chunks at a time.
"""
from __future__ import annotations

import collections
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from nanotronix.cli import Terminated, check_writable_folder
from nanotronix.errors import StoppedWhenComplete

from . import encode
from .errors import DataError, require_module
from .files import note_removed_temps, remove_abandoned_temps, remove_made_folders
from .inputs import InputPiece, expand_inputs, iter_chunks, split_large_inputs, text_per_byte, whole_files
from .megatron_store import MegatronWriter, optimal_dtype, sidecar_path
from .sharded_store import inputs_fingerprint, shard_name, shard_kinds, split_inputs
from .shuffle import ShufflingWriter
from .tokenizer import load_tokenizer

FORMATS = ("megatron", "zarr")
_MAX_EXAMPLES = 20  # bad records listed by position in the sidecar (all are counted)


@dataclass
class PreprocessOptions:
    inputs: list[str]
    tokenizer: str
    output_prefix: str
    text_key: str = "text"
    workers: int = 1
    format: str = "megatron"
    skip_bad: bool = False
    progress: bool = True
    # (index, count): tokenize only shard `index` of `count` of the inputs into OUTPUT_PREFIX/shard-IIIII-of-NNNNN,
    # one task of a job array; the folder then reads as one store (sharded_store.py)
    shard: Optional[tuple[int, int]] = None
    # documents stored in a random order drawn from this seed (and the shard index): the sampler shuffles windows,
    # so this is what keeps neighbouring input documents out of the same windows
    shuffle_seed: Optional[int] = None
    overwrite: bool = False  # replace a store already at the output (refused otherwise: it may be days of work)
    chunk_bytes: int = 1 << 18  # small enough to balance the workers on the last chunks
    threads_per_process: int = 8  # see the module docstring


@dataclass
class PreprocessResult:
    output: str  # the store's path as open_store accepts it
    documents: int
    tokens: int
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    written: bool = True  # False: an earlier run's complete shard, left as it was

    def summary_line(self) -> str:
        rate = self.tokens / max(self.seconds, 1e-9)
        skipped = sum(self.skipped.values())
        why = (" (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) + ")") if skipped else ""
        records = f"{skipped} bad record{'' if skipped == 1 else 's'}{why}"
        if not self.written:
            return (f"already complete: {self.output}: {self.documents} documents, {self.tokens} tokens; skipped "
                    f"{records}")
        return (f"wrote {self.output}: {self.documents} documents, {self.tokens} tokens in {self.seconds:.1f} s "
                f"({rate:,.0f} tokens/s); skipped {records}")


def create_writer(fmt: str, prefix: str, dtype: np.dtype, replace: bool = True):
    if fmt == "megatron":
        return MegatronWriter(prefix, dtype, replace), prefix
    if fmt == "zarr":
        from .zarr_store import ZarrWriter, zarr_output_path
        path = zarr_output_path(prefix)
        return ZarrWriter(path, dtype, replace), path
    raise DataError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")


def staged_paths(prefix: str) -> list[str | Path]:
    """The names that a run writing a store at `prefix` stages files under, in either format and with --shuffle
    (what a killed run at this prefix can have left, and nothing of another output's)."""
    from .zarr_store import ZarrWriter, zarr_output_path
    outputs = [prefix, zarr_output_path(prefix)]
    return [*MegatronWriter.staged_paths(prefix), *ZarrWriter.staged_paths(zarr_output_path(prefix)),
            *(name for output in outputs for name in ShufflingWriter.staged_paths(output))]


def existing_output(fmt: str, prefix: str) -> Optional[str]:
    """The first file or folder of a store already at `prefix` that a run in `fmt` would replace, if any."""
    if fmt == "zarr":
        from .zarr_store import zarr_output_path
        candidates = [zarr_output_path(prefix)]
    else:
        candidates = [f"{prefix}.idx", f"{prefix}.bin", str(sidecar_path(prefix))]
    return next((c for c in candidates if os.path.lexists(c)), None)


def preprocess(opts: PreprocessOptions) -> PreprocessResult:
    _check_options(opts)
    pieces = whole_files(expand_inputs(opts.inputs))
    prefix, shard = opts.output_prefix, None
    if opts.shard is not None:
        pieces, prefix, shard = _this_shard(opts, pieces)
    done = _earlier_output(opts, prefix, shard)
    if done is not None:  # an array resubmitted after one task failed: its finished tasks succeed at once
        return done
    tokenizer, info = load_tokenizer(opts.tokenizer)  # before the output folder is made: a bad one leaves none
    made_folders = check_writable_folder(os.path.dirname(os.path.abspath(prefix)), "--output-prefix")
    # Parallelism comes from worker processes, so the tokenizers thread pool stays off for this run (it would
    # oversubscribe the cores, and is unsafe in forked children); the caller's setting is restored after.
    previous_parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    executor = writer = bar = None
    try:  # from here on, a failure (a writer that cannot start too) stops the workers, gives the setting back and
        # removes the output folders this run made
        note_removed_temps(remove_abandoned_temps(*staged_paths(prefix)))
        dtype = optimal_dtype(info.vocab_size)
        start = time.perf_counter()
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        encode.use_tokenizer(tokenizer, info.eos_id, dtype)
        executor = _start_workers(opts, info, dtype)  # before any other thread (progress bar) exists
        writer, output = create_writer(opts.format, prefix, dtype, replace=opts.overwrite)
        shuffle_seed = _shuffle_seed(opts)
        if shuffle_seed is not None:
            writer = ShufflingWriter(writer, output, shuffle_seed, progress=opts.progress)
        bar = tqdm(total=sum(p.nbytes for p in pieces), unit="B", unit_scale=True, desc="preprocess",
                   disable=not opts.progress, smoothing=0.1)
        per_file, skipped, examples = _encode_into(writer, pieces, opts, executor, bar, start)
        # A shard with no document (its byte range holds no record start, or only records --skip-bad skipped) is
        # an empty part of the folder, written (with its skipped counts) so that the folder completes as a single
        # run over the same inputs would; a single run with no document is an error.
        if writer.num_documents == 0 and not opts.shard:
            raise DataError("no documents: every input record was empty or bad")
        sidecar = {
            "format": opts.format,
            "created_by": "nanotronix tools/preprocess.py",
            "tokenizer": {"name": info.name, "sha256": info.sha256, "vocab_size": info.vocab_size,
                          "eos_id": info.eos_id, "eos_token": info.eos_token},
            "dtype": dtype.name,
            "eos_appended": True,
            "num_documents": writer.num_documents,
            "num_tokens": writer.num_tokens,
            "text_key": opts.text_key,
            "inputs": per_file,
            "skipped": {"total": sum(skipped.values()), "reasons": dict(sorted(skipped.items())),
                        "examples": examples},
            "shuffled": None if shuffle_seed is None else {"seed": shuffle_seed},
            "shard": shard,
        }
        writer.finalize(sidecar)
    except BaseException as failure:
        if writer is not None:
            writer.abort()  # first: its staging files lie in the folders made, and rmdir removes only empty ones
            if isinstance(failure, KeyboardInterrupt) and writer.is_complete():  # stopped after the last rename
                raise StoppedWhenComplete(output, isinstance(failure, Terminated)) from None
        if not _shares_output_folder(opts):
            remove_made_folders(made_folders)
        raise
    finally:
        try:
            if executor is not None:  # stop the workers now, not when the traceback is freed
                executor.shutdown(wait=False, cancel_futures=True)
            if bar is not None:
                bar.close()
            if previous_parallelism is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous_parallelism
        except KeyboardInterrupt as stop:  # after the body: its store may be whole by now
            if writer is not None and writer.is_complete():
                raise StoppedWhenComplete(output, isinstance(stop, Terminated)) from None
            raise
    return PreprocessResult(output, writer.num_documents, writer.num_tokens, dict(skipped),
                            time.perf_counter() - start)


def _encode_into(writer, pieces: list[InputPiece], opts: PreprocessOptions, executor, bar,
                 start: float) -> tuple[list[dict], collections.Counter, list[str]]:
    """Encode the pieces into `writer`, in input order; what the sidecar says of them: each input's documents and
    tokens, the bad records skipped by reason, and the first of them by position (a bad record is an error unless
    --skip-bad)."""
    per_file = [{"path": str(p.path), **({"part": p.part()} if p.part() else {}), "bytes": p.nbytes,
                 "documents": 0, "tokens": 0} for p in pieces]
    skipped: collections.Counter = collections.Counter()
    examples: list[str] = []
    results = _encoded_chunks(pieces, opts, executor, bar)
    try:
        for result in results:
            for file_index, line, reason, detail in result.bad:
                where = f"{pieces[file_index].path}:{line}"
                if not opts.skip_bad:
                    raise DataError(f"{where}: {reason}{f' ({detail})' if detail else ''} "
                                    f"(use --skip-bad to skip bad records)")
                skipped[reason] += 1
                if len(examples) < _MAX_EXAMPLES:
                    examples.append(f"{where}: {reason}")
            writer.add_documents(result.tokens, result.lengths)
            for file_index in np.unique(result.files).tolist():
                mine = result.files == file_index
                per_file[file_index]["documents"] += int(mine.sum())
                per_file[file_index]["tokens"] += int(result.lengths[mine].sum())
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{writer.num_documents / elapsed:,.0f} docs/s, "
                                f"{writer.num_tokens / elapsed:,.0f} tokens/s", refresh=False)
    finally:
        results.close()
    return per_file, skipped, examples


def _check_options(opts: PreprocessOptions) -> None:
    if opts.workers < 1:
        raise DataError(f"--workers must be >= 1, got {opts.workers}")
    most = max(64, 4 * (os.cpu_count() or 1))  # a typo (100000) would fork that many processes
    if opts.workers > most:
        raise DataError(f"--workers {opts.workers}: more than this machine's {os.cpu_count()} cores can use "
                        f"(tokenizing is CPU-bound); give at most {most}")
    if opts.format not in FORMATS:
        raise DataError(f"--format {opts.format!r}: expected one of {', '.join(FORMATS)}")
    if opts.format == "zarr":  # before any folder is made: the writer, which needs it, starts after the output's
        require_module("zarr", "--format zarr")
    if "://" in opts.output_prefix:  # as a local path it would be a folder named "s3:", the URL never written
        raise DataError(f"--output-prefix {opts.output_prefix}: preprocess writes local files (stores are read from "
                        "URLs, not written to them); write locally, then copy it there")
    # `data/`, `.`, `data/..`: a folder, whose last part the writers would take for NAME (`..bin`, hidden files)
    if opts.shard is None and os.path.basename(opts.output_prefix) in ("", os.curdir, os.pardir):
        written = "NAME.zarr is" if opts.format == "zarr" else "NAME.bin, NAME.idx and NAME.meta.json are"
        raise DataError(f"--output-prefix {opts.output_prefix}: names a folder; give DIR/NAME (the prefix of the "
                        f"store's files: {written} written)")


def _shares_output_folder(opts: PreprocessOptions) -> bool:
    """Whether this run is one shard of several (--shard I/N, N > 1): its sibling tasks, started at the same time
    (a job array), make and write into the same --output-prefix folder. A failed task leaves the folders it made:
    removing one between a sibling's mkdir and its first file would fail that sibling too."""
    return opts.shard is not None and opts.shard[1] > 1


def _this_shard(opts: PreprocessOptions, pieces: list[InputPiece]) -> tuple[list[InputPiece], str, dict]:
    """For --shard INDEX/COUNT: the inputs this shard tokenizes, its prefix in the --output-prefix folder, and what
    its sidecar records of the split; an error if the folder holds shards of another split or format."""
    index, count = opts.shard
    text_ratio = {p.path: text_per_byte(p.path) for p in pieces} if count > 1 else {}  # what cuts count by
    # what every task of the array must have seen alike, or their runs of the inputs overlap or leave gaps
    shard = {"index": index, "count": count, "inputs_sha256": inputs_fingerprint(pieces, text_ratio)}
    pieces = _pieces_of_shard(pieces, index, count, text_ratio)
    prefix = os.path.join(opts.output_prefix, shard_name(*opts.shard))
    others = shard_kinds(Path(opts.output_prefix)) - {(shard["count"], opts.format)}
    if others:  # the folder would never open: "shards of different splits", "its parts mix formats"
        count, fmt = min(others)
        other = f"a {count}-way split" if count != shard["count"] else f"the {fmt} format"
        raise DataError(f"--output-prefix {opts.output_prefix}: holds shards of {other}; --shard "
                        f"{shard['index']}/{shard['count']} --format {opts.format} would mix them in one store "
                        "(write to another folder, or remove those shards)")
    return pieces, prefix, shard


def _earlier_output(opts: PreprocessOptions, prefix: str, shard: Optional[dict]) -> Optional[PreprocessResult]:
    """None when nothing is at `prefix` (or --overwrite replaces it); an earlier run's result when it is this very
    shard, complete; otherwise the error that refuses to replace it."""
    from .store import stores_named

    name = opts.output_prefix if shard is not None else prefix  # what a run names the store by
    own = "shards" if shard is not None else opts.format
    other = next((where for kind, where in stores_named(os.path.expanduser(name)) if kind != own), None)
    if other is not None:  # even with --overwrite, which replaces a store of this kind: the name would open both
        raise DataError(f"--output-prefix {opts.output_prefix}: {other} is another token store by this name (a run "
                        "would not know which to read; --overwrite replaces only a store of the kind written): write "
                        "to another prefix, or remove it first")
    existing = existing_output(opts.format, prefix)
    if existing is None or opts.overwrite:
        return None
    if shard is not None:
        done = _complete_shard(opts, prefix, shard)
        if done is not None:
            return done
    how = f"pass --overwrite{' (slurm/preprocess.sh: EXTRA_ARGS=--overwrite)' if shard is not None else ''}"
    if opts.format == "megatron" and not os.path.lexists(f"{prefix}.idx"):  # a run killed between its renames
        raise DataError(f"--output-prefix {opts.output_prefix}: {existing} is there without {prefix}.idx, which is no "
                        f"store (what a run killed as it renamed its files into place leaves); {how} to write it")
    raise DataError(f"--output-prefix {opts.output_prefix}: {existing} already exists; {how} to replace that store")


def _shuffle_seed(opts: PreprocessOptions) -> Optional[list[int]]:
    """--shuffle's seed, per shard (the sidecar's `shuffled.seed`); None without --shuffle."""
    return None if opts.shuffle_seed is None else [opts.shuffle_seed, *(opts.shard or ())]


def _complete_shard(opts: PreprocessOptions, prefix: str, shard: dict) -> Optional[PreprocessResult]:
    """The result of an earlier run that wrote this very shard (same split, inputs, tokenizer file, format, text key
    and shuffle), said in a note; None when the store there is another one (or cannot be read). A shard that skipped
    bad records is this run's only with --skip-bad: without it, the error that says so."""
    from .store import open_store

    try:
        store = open_store(prefix)
        _, info = load_tokenizer(opts.tokenizer)
    except DataError:
        return None
    meta = store.metadata
    seed = _shuffle_seed(opts)
    if (meta.get("shard") != shard or meta.get("format") != opts.format or meta.get("text_key") != opts.text_key
            or meta.get("shuffled") != (None if seed is None else {"seed": seed})
            or (meta.get("tokenizer") or {}).get("sha256") != info.sha256):
        return None
    skipped_total = (meta.get("skipped") or {}).get("total")
    # a task without --skip-bad would stop at those records: it does not write this shard
    if isinstance(skipped_total, int) and skipped_total > 0 and not opts.skip_bad:
        count = f"{skipped_total} bad record{'' if skipped_total == 1 else 's'}"
        raise DataError(f"--output-prefix {opts.output_prefix}: {prefix} was written with --skip-bad, which skipped "
                        f"{count}; without --skip-bad this task stops at {'it' if skipped_total == 1 else 'them'}: "
                        "pass --skip-bad to keep that shard, or --overwrite (slurm/preprocess.sh: EXTRA_ARGS) to "
                        "write it again")
    print(f"note: {prefix}: this shard is already complete (the same inputs, tokenizer and settings): nothing to do "
          "(--overwrite writes it again)", file=sys.stderr)
    skipped = (meta.get("skipped") or {}).get("reasons")
    # the counts the store holds: its sidecar's may have been edited ("x" was a ValueError traceback here)
    return PreprocessResult(prefix, store.num_documents, store.num_tokens,
                            dict(skipped) if isinstance(skipped, dict) else {}, written=False)


def _pieces_of_shard(pieces: list[InputPiece], index: int, count: int,
                     text_ratio: dict[Path, float]) -> list[InputPiece]:
    """The contiguous run of the inputs that shard `index` of `count` tokenizes, the shards holding like amounts of
    text (`text_ratio`: bytes of text per byte on disk, inputs.text_per_byte, 1 where left out). Files holding more
    than a quarter of a shard's share are first cut into pieces where their format allows
    (inputs.split_large_inputs), so that one huge input no longer has to be one task."""
    if count > 1:
        share = sum(p.nbytes * text_ratio.get(p.path, 1.0) for p in pieces) / count
        pieces = split_large_inputs(pieces, piece_bytes=max(share / 4, 1), text_ratio=text_ratio)
    start, stop = split_inputs([p.nbytes * text_ratio.get(p.path, 1.0) for p in pieces], index, count)
    return pieces[start:stop]


def _layout(opts: PreprocessOptions) -> tuple[int, int]:
    """(processes, threads per process) for opts.workers encoding threads in all."""
    if opts.threads_per_process < 1:
        raise DataError(f"threads per process must be >= 1, got {opts.threads_per_process}")
    processes = math.ceil(opts.workers / opts.threads_per_process)
    return processes, math.ceil(opts.workers / processes)


def _start_workers(opts: PreprocessOptions, info, dtype: np.dtype):
    """None for one worker (this thread encodes); a thread pool in this process for up to
    threads_per_process workers; otherwise an executor of processes (not multiprocessing.Pool: a worker
    killed by the OS makes it raise instead of hang), forked now so that they inherit the loaded tokenizer
    (no interpreter start-up, imports or tokenizer load per worker); where fork is unavailable they are
    spawned and load the tokenizer file."""
    processes, threads = _layout(opts)
    if opts.workers == 1:
        return None
    if processes == 1:
        return ThreadPoolExecutor(threads, thread_name_prefix="encode")
    if "fork" in multiprocessing.get_all_start_methods():
        executor = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"),
                                       initializer=encode.init_threads, initargs=(threads, os.getpid()))
        executor.submit(int).result()  # with fork, the first submit starts every worker process
        return executor
    return ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                               initializer=encode.init_worker,
                               initargs=(info.file, info.eos_id, dtype.name, threads, os.getpid()))


def _encoded_chunks(pieces: list[InputPiece], opts: PreprocessOptions, executor, bar):
    """Encoded chunks in input order; about 2 chunks per worker thread plus 2 are in flight."""
    chunks = iter_chunks(pieces, opts.text_key, opts.chunk_bytes, on_progress=bar.update)
    stop_early = not opts.skip_bad
    if executor is None:
        for chunk in chunks:
            yield encode.encode_chunk(chunk, opts.text_key, stop_early)
        return
    processes, threads = _layout(opts)
    group = 1 if processes == 1 else threads  # a process encodes `threads` chunks at a time
    pending: collections.deque = collections.deque()
    for chunks_of_task in _groups(chunks, group):
        pending.append(executor.submit(encode.encode_chunks, chunks_of_task, opts.text_key, stop_early))
        if len(pending) * group >= 2 * opts.workers + 2:
            yield from _result(pending.popleft())
    while pending:
        yield from _result(pending.popleft())


def _groups(items, size: int):
    group = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _result(future):
    try:
        return future.result()
    except BrokenProcessPool:
        raise DataError("a tokenizing worker process died (killed by the system, e.g. out of memory); "
                        "no output was written") from None
