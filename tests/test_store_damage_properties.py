"""Property-based tests (hypothesis, configured in tests/properties.py) of what every reader of a token store does with
a damaged or hand-edited one (README, Data; DESIGN.md): each command, called in this process on a copy of a real store
whose files were edited, returns 0 with what a plain reader of the edited bytes reads, or ends with ONE `error: ...`
line (exit 2) naming the store; never a traceback, a hang, a read of tokens from outside what the index describes,
or a file written beside the store.

The stores, written once by the project's writers (datatrove `.ds` files by the format's facts: the project reads
the format, it writes none): Megatron `.bin/.idx` with its sidecar, zarr, datatrove `.ds` + `.ds.index` +
`.ds.metadata`, a folder of two such `.ds` files, a folder of two preprocess shards. The edits, drawn from the real
files: any file truncated, extended, overwritten in places, emptied, deleted or replaced by a folder; the `.idx`
header's fields (magic, version, dtype code, sequence and document counts) and its arrays' entries (lengths,
pointers, document indices: neighbours, zero, negative as read, past the end, huge); a token id changed (past the
vocabulary too); a zarr array's zarr.json (shape, chunk shape, data type, fill value) or the group's attributes; a
`.ds.index` entry or the `.ds.metadata` line (of either file of the folder); a shard deleted, copied over another,
added past N or rewritten in another dtype; the sidecar's JSON edited (keys deleted, values of other types) or
damaged (tests/properties.py's damaged_json); stores and edits: tests/store_edits.py. The readers:
tools/inspect_store.py (plain, --verify, --json, --doc N), `python -m nanotronix.preflight` and the trainer
(`python -m nanotronix.train`, world size 1, 2 steps) with a tiny config naming the store, `python -m
nanotronix.evaluate` (a tiny trained checkpoint scoring the store's windows), tools/plan.py.

What must be refused, from the plain readings (tests/plain_store_readings.py's `Plain`): what cannot be opened as
the format says (`at_open`: every reader); a document whose span leaves the stream (`--doc N`); any broken invariant
(`--verify`); float values and a sidecar vocabulary over the model's (the trainer, preflight, evaluate); ids outside
the model's vocabulary in the windows read (the trainer, evaluate). A store that the plain reader finds whole (every
invariant, the sidecar as written) must work in every reader. Not caught by the readers that open a store in O(1)
(only by --verify): pointers and lengths before the last sequence, a .bin or .ds longer than its index says, a zarr
chunk file missing (zarr reads it as its fill value). `--hypothesis-show-statistics` shows the outcomes. ~20 s on
one core."""
from __future__ import annotations

import json
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from helpers import load_tool, tiny_config
from plain_store_readings import Plain, plain_reading
from properties import PROPERTY
from store_edits import (DOCUMENTS, HALVES, STORES, VOCAB, edited_store, write_datatrove, write_shard,
                         write_store)
from test_cli_properties import call_and_check

SEQ_LEN, GLOBAL_BATCH, STEPS = 4, 4, 2
TIMEOUT_S = 60  # a call that takes longer hangs (the whole file runs in well under a minute)


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> Path:
    """One folder per format holding its store (STORES names it in there)."""
    from nanotronix.data.megatron_store import MegatronWriter
    from nanotronix.data.zarr_store import ZarrWriter

    root = tmp_path_factory.mktemp("stores")
    for fmt in STORES:
        (root / fmt).mkdir()
    write_store(MegatronWriter(root / "megatron" / "tokens", np.uint16), "megatron", DOCUMENTS)
    write_store(ZarrWriter(str(root / "zarr" / "tokens.zarr"), np.uint16), "zarr", DOCUMENTS)
    write_datatrove(root / "datatrove" / "tokens.ds", DOCUMENTS)
    (root / "datatrove_folder" / "trove").mkdir()
    for index, docs in enumerate(HALVES):  # a folder of a job's files, one stream in sorted order
        write_datatrove(root / "datatrove_folder" / "trove" / f"{index:05d}.ds", docs)
    (root / "shards" / "corpus").mkdir()
    for index, docs in enumerate(HALVES):
        write_shard(root / "shards" / "corpus", index, docs)
    return root


@pytest.fixture(scope="module")
def edits_root(tmp_path_factory, commands_in_process):
    return tmp_path_factory.mktemp("edited")


# --- the readers --------------------------------------------------------------------------------------------------

@contextmanager
def time_limit(seconds: int):
    """A call still running after `seconds` hangs: it is interrupted (a TimeoutError, which the check reports)."""
    def interrupt(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def call(main, args: list[str], store: Path, root: Path) -> tuple[int, str]:
    """main(args) through call_and_check (no traceback, the last stderr line `error: ...` when it fails, nothing
    written in the store's folder or its scratch folder), within TIMEOUT_S; (exit code, stdout). A failure is ONE
    `error:` line, naming the store."""
    with time_limit(TIMEOUT_S):
        code, out, err = call_and_check(main, [("text", a) for a in args], {"store": str(store.parent)}, root)
    if code:
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1, (code, err[-2000:])
        assert store.name in errors[0] or store.name.split(".")[0] in errors[0], errors
    return code, out


def check_refusal(plain: Plain, why: Optional[str], code: int, done: list[str]) -> None:
    """`why`: what the reader must refuse (None: it may work); a whole store must work unless the reader has a `why`
    of its own (a datatrove store, which records no vocabulary, holding an id past the model's)."""
    event(f"exit {code}, {'must be refused: ' + why if why else 'whole' if plain.whole else 'may work'}")
    assert why is None or code == 2, (done, plain, f"must be refused: {why}")
    assert not plain.whole or why or code == 0, (done, plain, "a whole store refused")


def for_training(plain: Plain, windows: Optional[int] = None) -> Optional[str]:
    """What a reader that trains on or scores a store must refuse besides what no reader opens: float values, a
    sidecar vocabulary over the model's, a stream too short for one window (schedule.py), an id outside the model's
    vocabulary in the first `windows` windows it reads (None: none counted)."""
    if plain.at_open:
        return plain.at_open
    if plain.dtype.kind not in "iu":
        return "float values"
    if plain.num_tokens < SEQ_LEN + 1:
        return "no window of seq_len + 1 tokens"
    if type(plain.vocab) is int and plain.vocab > VOCAB:
        return "a sidecar vocabulary over the model's"
    if windows is not None:
        read = plain.stream[:windows * SEQ_LEN + 1].astype(np.int64)  # as signed ids: a negative one is outside
        if len(read) and (read.min() < 0 or read.max() >= VOCAB):
            return "an id outside the model's vocabulary in a window read"
    return None


FORMATS = st.sampled_from(sorted(STORES))


@settings(PROPERTY, max_examples=200)
@given(data=st.data(), fmt=FORMATS, flags=st.sets(st.sampled_from(["--verify", "--json", "--doc"])))
def test_inspect_store(originals, edits_root, data, fmt, flags):
    store, done = data.draw(edited_store(originals, edits_root, fmt), "edit")
    plain = plain_reading(store, fmt)
    doc = data.draw(st.integers(-1, len(DOCUMENTS) + 1), "doc") if "--doc" in flags else None
    args = [str(store), *sorted(flags - {"--doc"}), *(["--doc", str(doc)] if doc is not None else [])]
    code, out = call(load_tool("inspect_store").main, args, store, edits_root)
    why = plain.at_open or ("--verify" in flags and plain.damage) or None
    if doc is not None and not why and not (0 <= doc < plain.num_documents and plain.documents[doc] is not None):
        why = f"document {doc} is not there to read"
    if doc is not None and not 0 <= doc < len(DOCUMENTS):
        plain.whole = False  # no such document in the store as written either
    check_refusal(plain, why or None, code, done)
    if code == 0 and "--json" in flags:  # what it read is what the plain reader reads
        report = json.loads(out)
        assert (report["documents"], report["tokens"], report["dtype"]) == \
            (plain.num_documents, plain.num_tokens, plain.dtype.name), (done, report, plain)
        if doc is not None:
            assert report["doc_tokens"] == plain.documents[doc].tolist(), (done, report["doc_tokens"])
    shutil.rmtree(store.parent.parent)


def config_for(store: Path, root: Path, **sections) -> Path:
    """A tiny run reading `store` (its folder as data.root), with its own folder for the config and logs."""
    folder = Path(tempfile.mkdtemp(dir=root))
    return tiny_config(folder, store, train={"seq_len": SEQ_LEN, "global_batch_size": GLOBAL_BATCH,
                                             "micro_batch_size": 2, "train_steps": STEPS}, **sections)


@settings(PROPERTY, max_examples=100)
@given(data=st.data(), fmt=FORMATS)
def test_preflight(originals, edits_root, data, fmt):
    """`python -m nanotronix.preflight` opens the store as the trainer does (headers and sizes, no tokens)."""
    from nanotronix.preflight import main

    store, done = data.draw(edited_store(originals, edits_root, fmt), "edit")
    plain, cfg = plain_reading(store, fmt), config_for(store, edits_root)
    code, _ = call(main, ["--config", str(cfg)], store, edits_root)
    check_refusal(plain, for_training(plain), code, done)
    shutil.rmtree(store.parent.parent)
    shutil.rmtree(cfg.parent)


@settings(PROPERTY, max_examples=30)
@given(data=st.data(), fmt=FORMATS)
def test_train(originals, edits_root, data, fmt):
    """The trainer (world size 1), 2 steps of 4 windows: one epoch of the 33-token store's 8 windows, so every id of
    the stream is read (an edit that lengthens the stream leaves some unread: only its first 8 windows count)."""
    from nanotronix.train.main import main

    store, done = data.draw(edited_store(originals, edits_root, fmt), "edit")
    plain = plain_reading(store, fmt)
    epoch = max((plain.num_tokens - 1) // SEQ_LEN, 0) if not plain.at_open else 0
    counted = epoch if epoch <= STEPS * GLOBAL_BATCH else None
    cfg = config_for(store, edits_root)
    code, _ = call(main, ["--config", str(cfg)], store, edits_root)
    check_refusal(plain, for_training(plain, counted), code, done)
    if code == 0:  # it trained the run's steps
        steps = [json.loads(line)["step"] for line in (cfg.parent / "logs" / "metrics.jsonl").read_text().splitlines()]
        assert steps[-1:] == [STEPS], (done, steps)
    shutil.rmtree(store.parent.parent)
    shutil.rmtree(cfg.parent)


@settings(PROPERTY, max_examples=60)
@given(data=st.data(), fmt=FORMATS)
def test_evaluate(trained, originals, edits_root, data, fmt):
    """`python -m nanotronix.evaluate` scores the first 8 windows of 4 tokens (the whole 33-token stream): the stream
    too short for them, or an id outside the model's vocabulary in them, must be refused."""
    from nanotronix.evaluate import main

    store, done = data.draw(edited_store(originals, edits_root, fmt), "edit")
    plain = plain_reading(store, fmt)
    windows = 8
    code, _ = call(main, ["--checkpoint", str(trained[1] / "ckpt"), "--data", str(store), "--seq-len", str(SEQ_LEN),
                          "--num-samples", str(windows), "--no-progress"], store, edits_root)
    why = for_training(plain, windows)
    if not why and plain.num_tokens < windows * SEQ_LEN + 1:
        why = "too few tokens for the windows"
    check_refusal(plain, why, code, done)
    shutil.rmtree(store.parent.parent)


@settings(PROPERTY, max_examples=60)
@given(data=st.data(), fmt=FORMATS)
def test_plan(originals, edits_root, data, fmt):
    """`tools/plan.py` shows a store it cannot open as such in its data table (exit 0: the plan of the rest stands)."""
    store, done = data.draw(edited_store(originals, edits_root, fmt), "edit")
    plain, cfg = plain_reading(store, fmt), config_for(store, edits_root)
    code, out = call(load_tool("plan").main, [str(cfg), "--gpus", "1"], store, edits_root)
    event(f"exit {code}, {'cannot be opened' if plain.at_open else 'opens'}")
    assert code == 0 and (not plain.at_open or "store unreadable" in out or "store not found" in out), (done, out)
    shutil.rmtree(store.parent.parent)
    shutil.rmtree(cfg.parent)
