"""Property-based tests (hypothesis) of the token stores' hand-written logic, each against the claims of its docstrings
and references written plainly here:

- the Megatron `.bin/.idx` writer and reader (megatron_store.py) against a reader and a writer of the format spec's
  offsets and dtype codes (Megatron-Core's indexed_dataset.py, formats/megatron_indexed.md), over generated documents
  (empty ones too), vocabulary sizes at the dtype boundaries, documents of several sequences, the multimodal trailer;
- the shuffling writer's order (shuffle.py), datatrove `.ds` files and folders written from datatrove's format facts,
  the zarr writer's whole-shard appends (zarr_store.py), the vocabulary checks on every id dtype (store.py);
- a folder of preprocess shards (sharded_store.py) against one store of all its documents, shard names of any N.

Derandomized with no example database (tests/properties.py); files go to temporary folders. ~4 s on one core."""
from __future__ import annotations

import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import SPEC_DTYPES, read_megatron_plainly, write_megatron

from nanotronix.data import megatron_store, shuffle
from nanotronix.data import store as store_module
from nanotronix.data.datatrove_store import DatatroveStore
from nanotronix.data.errors import DataError
from nanotronix.data.megatron_store import MegatronStore, MegatronWriter, optimal_dtype
from nanotronix.data.sharded_store import (ConcatenatedStore, ShardedStore, shard_kinds, shard_name,
                                          sharded_folder)
from nanotronix.data.shuffle import ShufflingWriter
from nanotronix.data.store import first_outside_vocabulary, largest_id, open_store
from properties import PROPERTY

# --- Megatron .bin/.idx ---------------------------------------------------------------------------------------

VOCAB_EDGES = [1, 2, 255, 256, 257, 32767, 32768, 49152, 65499, 65500, 65501, 65535, 65536, 65537, 100_000,
               2**31 - 1]
vocab_sizes = st.one_of(st.sampled_from(VOCAB_EDGES), st.integers(1, 2**31 - 1))
# a document: (length, seed of its tokens); lengths 0 (empty documents) and the 300 ceiling drawn often
documents = st.lists(st.tuples(st.one_of(st.just(0), st.just(300), st.integers(0, 300)), st.integers(0, 2**32 - 1)),
                     max_size=50)


def _tokens(docs, vocab: int, dtype) -> list[np.ndarray]:
    out = []
    for length, seed in docs:
        ids = np.random.default_rng(seed).integers(0, vocab, length, dtype=np.int64)
        if length:
            ids[0], ids[-1] = vocab - 1, 0  # the extreme ids of the vocabulary in every non-empty document
        out.append(ids.astype(dtype))
    return out


@settings(PROPERTY, max_examples=200)
@given(vocab_sizes)
def test_optimal_dtype_is_megatrons_rule_and_holds_every_id(vocab):
    assert optimal_dtype(vocab) == (np.uint16 if vocab < 65500 else np.int32)
    assert np.iinfo(optimal_dtype(vocab)).max >= vocab - 1


@settings(PROPERTY, max_examples=60)
@given(vocab_sizes, documents, st.integers(0, 2**32 - 1), st.sampled_from([1, 2, 3, 7, megatron_store._CHUNK]),
       st.data())
def test_megatron_files_follow_the_spec_and_read_back(vocab, docs, batching_seed, index_chunk, data):
    dtype = optimal_dtype(vocab)
    tokens = _tokens(docs, vocab, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = f"{tmp}/store"
        with mock.patch.object(megatron_store, "_CHUNK", index_chunk):  # the .idx arrays streamed in chunks
            write_megatron(prefix, tokens, dtype, batching_seed)
        spec_dtype, spec_docs = read_megatron_plainly(prefix)
        assert spec_dtype == dtype
        assert len(spec_docs) == len(tokens)
        assert all(np.array_equal(a, b) for a, b in zip(spec_docs, tokens))

        store = MegatronStore(prefix)
        store.verify()
        stream = np.concatenate(tokens) if tokens else np.zeros(0, dtype)
        assert (store.num_documents, store.num_tokens, store.dtype) == (len(tokens), len(stream), dtype)
        assert store.document_lengths().tolist() == [len(t) for t in tokens]
        for i, t in enumerate(tokens):
            assert store.document(i).dtype == dtype and np.array_equal(store.document(i), t)
        start = data.draw(st.integers(0, len(tokens)), "first document")
        stop = data.draw(st.integers(start, len(tokens) + 3), "stop document")
        assert store.document_lengths(start, stop).tolist() == [len(t) for t in tokens[start:stop]]
        lo = data.draw(st.integers(0, len(stream)), "token start")
        length = data.draw(st.integers(0, len(stream) - lo), "token count")
        assert np.array_equal(store.tokens(lo, length), stream[lo:lo + length])
        positions = np.array(data.draw(st.lists(st.integers(0, max(len(stream) - 1, 0)), max_size=20
                                                if len(stream) else 0), "positions"), dtype=np.int64)
        assert store.gather(positions).tolist() == stream[positions].astype(np.int64).tolist()


def _write_megatron_plainly(prefix: str, sequences: list[np.ndarray], doc_indices: list[int], dtype,
                           modes: bytes | None) -> None:
    """The spec's layout, written field by field: what Megatron's builder writes with --split-sentences (documents
    of several sequences), or a multimodal store (a mode byte per sequence after the arrays)."""
    dtype = np.dtype(dtype)
    lengths = [len(s) for s in sequences]
    pointers = np.cumsum([0] + lengths[:-1]).astype(np.int64) * dtype.itemsize if lengths else []
    code = {np.dtype(v): k for k, v in SPEC_DTYPES.items()}[dtype.newbyteorder("<")]
    head = (b"MMIDIDX\x00\x00" + (1).to_bytes(8, "little") + bytes([code]) + len(sequences).to_bytes(8, "little")
            + len(doc_indices).to_bytes(8, "little"))
    Path(f"{prefix}.idx").write_bytes(head + np.array(lengths, "<i4").tobytes() + np.array(pointers, "<i8").tobytes()
                                      + np.array(doc_indices, "<i8").tobytes() + (modes or b""))
    Path(f"{prefix}.bin").write_bytes(b"".join(s.astype(dtype.newbyteorder("<")).tobytes() for s in sequences))


@settings(PROPERTY, max_examples=50)
@given(st.lists(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 2**32 - 1)), max_size=4), max_size=20),
       st.sampled_from([np.uint16, np.int32, np.uint8, np.int64]), st.booleans(), st.data())
def test_megatron_reader_reads_documents_of_many_sequences(documents_of_sequences, dtype, multimodal, data):
    """Documents of zero or more sequences each: a document is its sequences' tokens one after another."""
    vocab = min(int(np.iinfo(dtype).max) + 1, 1000)
    sequences = [_tokens(seqs, vocab, dtype) for seqs in documents_of_sequences]
    flat = [s for doc in sequences for s in doc]
    doc_indices = np.cumsum([0] + [len(doc) for doc in sequences]).tolist()
    docs = [np.concatenate(doc) if doc else np.zeros(0, dtype) for doc in sequences]
    with tempfile.TemporaryDirectory() as tmp:
        _write_megatron_plainly(f"{tmp}/store", flat, doc_indices, dtype,
                                bytes(len(flat)) if multimodal else None)
        store = MegatronStore(f"{tmp}/store")
        store.verify()
        assert store.multimodal == (multimodal and len(flat) > 0)
        assert (store.num_documents, store.num_tokens) == (len(docs), sum(map(len, docs)))
        assert all(np.array_equal(store.document(i), d) for i, d in enumerate(docs))
        assert store.document_lengths().tolist() == [len(d) for d in docs]
        start = data.draw(st.integers(0, len(docs)), "first document")
        stop = data.draw(st.integers(start, len(docs) + 2), "stop document")
        assert store.document_lengths(start, stop).tolist() == [len(d) for d in docs[start:stop]]


@settings(PROPERTY, max_examples=30)
@given(st.sampled_from([np.uint8, np.int8, np.int16, np.int32, np.int64, np.uint16]), documents)
def test_megatron_writer_stores_any_integer_dtype_under_its_spec_code(dtype, docs):
    dtype = np.dtype(dtype)
    vocab = int(np.iinfo(dtype).max) + 1
    tokens = _tokens(docs, vocab, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        write_megatron(f"{tmp}/store", tokens, dtype)
        spec_dtype, spec_docs = read_megatron_plainly(f"{tmp}/store")
        assert spec_dtype == dtype
        assert all(np.array_equal(a, b) for a, b in zip(spec_docs, tokens))


@settings(PROPERTY, max_examples=40)
@given(documents, st.one_of(st.integers(0, 2**32 - 1), st.lists(st.integers(0, 1000), min_size=1, max_size=3)),
       st.sampled_from([1, 2, 3, shuffle.SHUFFLE_BATCH]), st.sampled_from([1, 5, 120, shuffle.SHUFFLE_BATCH_TOKENS]))
def test_shuffled_store_holds_input_document_order_j_at_j(docs, seed, batch, batch_tokens):
    """ShufflingWriter's claim: document j of the store is input document order[j], order being
    numpy.random.default_rng(seed).permutation(n), whatever batches the permuted pass reads in."""
    tokens = _tokens(docs, 1000, np.uint16)
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(shuffle, "SHUFFLE_BATCH", batch), \
            mock.patch.object(shuffle, "SHUFFLE_BATCH_TOKENS", batch_tokens):
        writer = ShufflingWriter(MegatronWriter(f"{tmp}/store", np.uint16), f"{tmp}/store", seed)
        for t in tokens:
            writer.add_documents(t, np.array([len(t)]))
        writer.finalize()
        _, stored = read_megatron_plainly(f"{tmp}/store")
        order = np.random.default_rng(seed).permutation(len(tokens))
        assert len(stored) == len(tokens)
        assert all(np.array_equal(stored[j], tokens[order[j]]) for j in range(len(tokens)))
        assert sorted(Path(tmp).iterdir()) == [Path(tmp, "store.bin"), Path(tmp, "store.idx")]  # no spill left


# --- datatrove .ds ----------------------------------------------------------------------------------------------

def _write_datatrove_plainly(path: Path, docs: list[np.ndarray], token_size: int, metadata: bool) -> None:
    """datatrove's format facts: tokens little-endian of `token_size` bytes, the index their uint64 end offsets,
    optionally a metadata file `TOKENIZER|TOKEN_SIZE`, count, human-readable count."""
    flat = np.concatenate(docs) if docs else np.zeros(0, np.int64)
    path.write_bytes(flat.astype("<u2" if token_size == 2 else "<u4").tobytes())
    Path(f"{path}.index").write_bytes(np.cumsum([len(d) for d in docs], dtype=np.int64).astype("<u8").tobytes())
    if metadata:
        Path(f"{path}.metadata").write_text(f"some/tokenizer|{token_size}\n{len(flat)}\n{len(flat)}T\n")


@settings(PROPERTY, max_examples=40)
@given(st.lists(documents.map(lambda d: d[:15]), min_size=1, max_size=4), st.sampled_from([2, 4]), st.booleans(),
       st.data())
def test_datatrove_files_and_folders_read_back_as_written(files, token_size, metadata, data):
    vocab = 2**16 if token_size == 2 else 2**32
    tokens = [_tokens(docs, vocab, np.int64) for docs in files]
    # without metadata the token size is the file's bytes per token, which a file of no tokens does not tell
    metadata = metadata or not all(sum(map(len, t)) for t in tokens)
    everything = [t for file in tokens for t in file]
    stream = np.concatenate(everything) if everything else np.zeros(0, np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        for i, file in enumerate(tokens):
            _write_datatrove_plainly(Path(tmp, f"{i:03d}.ds"), file, token_size, metadata)
        single = DatatroveStore(Path(tmp, "000.ds"))
        single.verify()
        assert single.dtype.itemsize == token_size
        assert [single.document(i).tolist() for i in range(single.num_documents)] == [t.tolist() for t in tokens[0]]
        store = open_store(tmp)
        assert isinstance(store, ConcatenatedStore)
        store.verify()
        assert (store.num_documents, store.num_tokens) == (len(everything), len(stream))
        assert store.document_lengths().tolist() == [len(t) for t in everything]
        start = data.draw(st.integers(0, len(everything)), "first document")
        stop = data.draw(st.integers(0, len(everything) + 2), "stop document")
        assert store.document_lengths(start, stop).tolist() == [len(t) for t in everything[start:stop]]
        assert all(store.document(i).tolist() == t.tolist() for i, t in enumerate(everything))
        lo = data.draw(st.integers(0, len(stream)), "token start")
        length = data.draw(st.integers(0, len(stream) - lo), "token count")
        assert store.tokens(lo, length).tolist() == stream[lo:lo + length].tolist()
        write_megatron(f"{tmp}/megatron", everything, np.int64)  # the same stream in another format
        with mock.patch.object(store_module, "FINGERPRINT_RUNS", 3):
            assert store.fingerprint == MegatronStore(f"{tmp}/megatron").fingerprint


class _ArrayStandIn:
    """The two things `_AppendBuffer` does to a zarr array (resize, write a slice), recorded."""

    def __init__(self):
        self.values, self.writes = np.zeros(0, np.int64), []

    def resize(self, shape):
        self.values = np.resize(self.values, shape) if len(self.values) else np.zeros(shape, np.int64)

    def __setitem__(self, where: slice, values):
        self.writes.append((where.start, where.stop))
        self.values[where] = values


@settings(PROPERTY, max_examples=100)
@given(st.lists(st.integers(0, 40), max_size=30), st.integers(1, 16))
def test_zarr_append_buffer_writes_whole_blocks_then_the_rest(appends, block):
    """What each append adds lands in order; every write but the final flush's is whole blocks (shards)."""
    from nanotronix.data.zarr_store import _AppendBuffer
    array = _ArrayStandIn()
    buffer, expected = _AppendBuffer(array, block), []
    for k, n in enumerate(appends):
        values = np.arange(n) + 1000 * k
        buffer.append(values)
        expected += values.tolist()
    writes_before_flush = len(array.writes)
    buffer.flush()
    assert array.values.tolist() == expected
    starts, stops = [a for a, _ in array.writes], [b for _, b in array.writes]
    assert starts == ([0] + stops)[:len(starts)]  # one after another
    assert all(a % block == 0 and (b - a) % block == 0 for a, b in array.writes[:writes_before_flush])
    assert len(expected) - (stops[writes_before_flush - 1] if writes_before_flush else 0) < block  # held back


@settings(PROPERTY, max_examples=15)
@given(documents.map(lambda d: d[:20]), st.sampled_from([100, 70000]), st.data())
def test_zarr_store_reads_back_what_its_writer_wrote_across_shards(docs, vocab, data):
    pytest.importorskip("zarr")
    from nanotronix.data import zarr_store
    dtype = optimal_dtype(vocab)
    tokens = _tokens(docs, vocab, dtype)
    stream = np.concatenate(tokens) if tokens else np.zeros(0, dtype)
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(zarr_store, "SHARD", 64), \
            mock.patch.object(zarr_store, "INNER_CHUNK", 16), \
            mock.patch.object(zarr_store, "_READ_CHUNK", 8):  # many shards of a few chunks, read a few at a time
        writer = zarr_store.ZarrWriter(f"{tmp}/s.zarr", dtype)
        for k in range(0, len(tokens), 3):
            batch = tokens[k:k + 3]
            writer.add_documents(np.concatenate(batch), np.array([len(t) for t in batch]))
        writer.finalize({"num_documents": len(tokens), "num_tokens": len(stream)})
        store = open_store(f"{tmp}/s.zarr")
        store.verify()
        assert (store.format, store.num_documents, store.num_tokens, store.dtype) == ("zarr", len(tokens),
                                                                                        len(stream), dtype)
        assert all(np.array_equal(store.document(i), t) for i, t in enumerate(tokens))
        start = data.draw(st.integers(0, len(tokens)), "first document")
        stop = data.draw(st.integers(0, len(tokens) + 2), "stop document")
        assert store.document_lengths(start, stop).tolist() == [len(t) for t in tokens[start:stop]]
        if len(stream):
            positions = np.array(data.draw(st.lists(st.integers(0, len(stream) - 1), max_size=20), "positions"),
                                 dtype=np.int64)
            assert store.gather(positions).tolist() == stream[positions].astype(np.int64).tolist()
        write_megatron(f"{tmp}/megatron", tokens, dtype)  # the same stream in another format
        with mock.patch.object(store_module, "FINGERPRINT_RUNS", 3):
            assert store.fingerprint == MegatronStore(f"{tmp}/megatron").fingerprint


@settings(PROPERTY, max_examples=200)
@given(st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32]), st.data())
def test_ids_outside_the_vocabulary_negative_ones_too_are_found(dtype, data):
    """first_outside_vocabulary: the first id outside [0, vocab); largest_id: the largest id, a negative one (a
    damaged store) counting as above every vocabulary."""
    info = np.iinfo(dtype)
    ids = data.draw(st.lists(st.one_of(st.integers(int(info.min), int(info.max)), st.sampled_from(
        sorted({int(info.min), -1 if info.min else 0, 0, int(info.max)}))), max_size=20), "ids")
    vocab = data.draw(st.integers(1, min(int(info.max) + 1, 2**31)), "vocab")
    tokens = np.array(ids, dtype=dtype)
    outside = [i for i in ids if not 0 <= i < vocab]
    assert first_outside_vocabulary(tokens, vocab) == (outside[0] if outside else None)
    assert first_outside_vocabulary(tokens.reshape(1, -1), vocab) == (outside[0] if outside else None)
    if not ids:
        assert largest_id(tokens) == -1
    elif min(ids) < 0:
        assert largest_id(tokens) >= 2**64  # above any vocabulary
    else:
        assert largest_id(tokens) == max(ids)


# --- sharded stores ---------------------------------------------------------------------------------------------

@settings(PROPERTY, max_examples=100)
@given(st.one_of(st.integers(1, 250_000), st.sampled_from([1, 99_999, 100_000, 100_001])), st.data())
def test_every_shard_name_preprocess_writes_is_read_as_a_shard(count, data):
    """Whatever --shard I/N preprocess accepts (tools/preprocess.py: any 0 <= I < N), the shard it writes is seen as
    shard I of an N-way split, so the folder opens as one (or says which shards are missing) and a task of another
    split is refused."""
    index = data.draw(st.sampled_from(sorted({0, count - 1, count // 2})), "index")
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, shard_name(index, count) + ".idx").touch()
        assert sharded_folder(tmp) == Path(tmp)
        assert shard_kinds(Path(tmp)) == {(count, "megatron")}
        if count > 1:
            with pytest.raises(DataError, match=f"{count - 1} of {count} shards missing"):
                ShardedStore(Path(tmp))


parts_of_documents = st.lists(documents.map(lambda d: d[:12]), min_size=1, max_size=5)


@settings(PROPERTY, max_examples=40)
@given(parts_of_documents, st.sampled_from([100, 70000]), st.data())
def test_a_folder_of_shards_reads_as_one_store_of_all_their_documents(parts, vocab, data):
    dtype = optimal_dtype(vocab)
    tokens = [_tokens(docs, vocab, dtype) for docs in parts]
    everything = [t for part in tokens for t in part]
    with tempfile.TemporaryDirectory() as tmp:
        for i, part in enumerate(tokens):  # empty shards too: a task whose inputs held no document
            write_megatron(Path(tmp, "shards", shard_name(i, len(tokens))), part, dtype)
        write_megatron(f"{tmp}/one", everything, dtype)
        sharded, one = open_store(Path(tmp, "shards")), MegatronStore(f"{tmp}/one")
        assert isinstance(sharded, ShardedStore) and len(sharded.parts) == len(parts)
        stream = np.concatenate(everything) if everything else np.zeros(0, dtype)
        assert (sharded.num_documents, sharded.num_tokens, sharded.dtype) == (len(everything), len(stream), dtype)
        assert np.array_equal(sharded.document_lengths(), one.document_lengths())
        offsets = np.concatenate([[0], np.cumsum([len(t) for t in everything])]).astype(int).tolist()
        for i, t in enumerate(everything):  # each document where the one store's global offsets put it
            assert np.array_equal(sharded.document(i), t)
            assert np.array_equal(sharded.tokens(offsets[i], len(t)), t)
        start = data.draw(st.integers(0, len(everything)), "first document")
        stop = data.draw(st.integers(start, len(everything) + 2), "stop document")
        assert np.array_equal(sharded.document_lengths(start, stop), one.document_lengths(start, stop))
        lo = data.draw(st.integers(0, len(stream)), "token start")
        length = data.draw(st.integers(0, len(stream) - lo), "token count")
        assert np.array_equal(sharded.tokens(lo, length), stream[lo:lo + length])
        assert sharded.tokens(lo, length).dtype == dtype
        if len(stream):
            positions = np.array(data.draw(st.lists(st.integers(0, len(stream) - 1), max_size=30), "positions"),
                                 dtype=np.int64)
            assert sharded.gather(positions).tolist() == stream[positions].astype(np.int64).tolist()
            width = data.draw(st.integers(1, min(len(stream), 40)), "window")
            starts = data.draw(st.lists(st.integers(0, len(stream) - width), min_size=1, max_size=40), "starts")
            every_row = data.draw(st.booleans(), "every row of out")  # the gather's contiguous path
            rows = list(range(len(starts))) if every_row else sorted(
                data.draw(st.sets(st.integers(0, 60), min_size=len(starts), max_size=len(starts)), "rows"))
            height = len(starts) if every_row else 61
            out, expected = np.full((height, width), -1, np.int64), np.full((height, width), -1, np.int64)
            with mock.patch.object(store_module, "WINDOW_BLOCK", data.draw(st.sampled_from([1, 3, 32]), "block")):
                top = sharded.read_windows(out, np.array(rows), np.array(starts))
                top_one = one.read_windows(np.zeros_like(out), np.array(rows), np.array(starts))
            for row, s in zip(rows, starts):
                expected[row] = stream[s:s + width]
            assert np.array_equal(out, expected)
            assert top == top_one == max(int(stream[s:s + width].max()) for s in starts)
        assert (sharded.metadata["num_documents"], sharded.metadata["num_tokens"]) == (len(everything), len(stream))
        # the content fingerprint is a function of the stream: the same sharded or not (a few runs: spaced ones too)
        with mock.patch.object(store_module, "FINGERPRINT_RUNS", data.draw(st.sampled_from([2, 3, 256]), "runs")):
            assert sharded.fingerprint == one.fingerprint
