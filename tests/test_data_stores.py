"""Token stores: Megatron bytes against an independent writer built from the spec, round trips of all three
formats (Megatron, datatrove .ds, zarr incl. an fsspec URL), the files datatrove itself writes, and the real SmolLM2
tokenizer. ~6 s."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from nanotronix.data import DataError, load_tokenizer, open_store
from nanotronix.data.megatron_store import MegatronWriter, optimal_dtype
from nanotronix.data.zarr_store import ZarrWriter, zarr_output_path
from helpers import load_tool, train_tiny_tokenizer
from test_data_support import spec_megatron_bytes, write_spec_megatron

RNG = np.random.default_rng(0)
DOCS = [RNG.integers(0, 49152, size=n).tolist() for n in (1, 7, 300, 2, 1000, 5)]


def _write_ours(prefix: Path, docs, dtype, fmt="megatron"):
    writer = MegatronWriter(prefix, dtype) if fmt == "megatron" else ZarrWriter(zarr_output_path(str(prefix)), dtype)
    # two batches, so the writer's concatenation across calls is exercised
    for part in (docs[:2], docs[2:]):
        writer.add_documents(np.concatenate([np.array(d) for d in part]), np.array([len(d) for d in part]))
    writer.finalize({"num_documents": len(docs), "num_tokens": sum(map(len, docs))})


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_writer_matches_spec_bytes(tmp_path, dtype):
    _write_ours(tmp_path / "ours", DOCS, dtype)
    binary, idx = spec_megatron_bytes(DOCS, dtype)
    assert (tmp_path / "ours.bin").read_bytes() == binary
    assert (tmp_path / "ours.idx").read_bytes() == idx
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"


def test_spec_written_store_reads_back_document_for_document(tmp_path):
    write_spec_megatron(tmp_path / "ref", DOCS, np.uint16)
    store = open_store(tmp_path / "ref")
    assert store.format == "megatron" and store.dtype == np.uint16
    assert store.num_documents == len(DOCS) and store.num_tokens == sum(map(len, DOCS))
    for i, doc in enumerate(DOCS):
        assert store.document(i).tolist() == doc
    flat = np.concatenate([np.array(d) for d in DOCS])
    assert store.tokens(3, 400).tolist() == flat[3:403].tolist()
    assert store.document_lengths(1, 4).tolist() == [7, 300, 2]
    with pytest.raises(DataError, match="no document 6"):
        store.document(6)
    # the .bin/.idx file names are accepted too
    assert open_store(f"{tmp_path / 'ref'}.idx").num_documents == len(DOCS)


def test_megatron_reader_accepts_multi_sequence_documents(tmp_path):
    """Megatron's --split-sentences layout: documents group several sequences (document_indices != 0..N)."""
    seqs = [[1, 2], [3], [4, 5, 6], [7]]
    n = len(seqs)
    lengths, pointers, off = [], [], 0
    for s in seqs:
        lengths.append(len(s))
        pointers.append(off)
        off += 2 * len(s)
    doc_index = [0, 2, 4]  # two documents of two sequences each
    idx = (b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, n, len(doc_index)) + struct.pack(f"<{n}i", *lengths)
           + struct.pack(f"<{n}q", *pointers) + struct.pack(f"<{len(doc_index)}q", *doc_index))
    (tmp_path / "s.idx").write_bytes(idx)
    (tmp_path / "s.bin").write_bytes(np.array(sum(seqs, []), dtype=np.uint16).tobytes())
    store = open_store(tmp_path / "s")
    assert store.num_documents == 2
    assert store.document(0).tolist() == [1, 2, 3] and store.document(1).tolist() == [4, 5, 6, 7]
    assert store.document_lengths().tolist() == [3, 4]
    store.verify()


def test_optimal_dtype_follows_megatron():
    assert optimal_dtype(49152) == np.uint16 and optimal_dtype(65499) == np.uint16
    assert optimal_dtype(65500) == np.int32 and optimal_dtype(128256) == np.int32


def _write_datatrove(path: Path, docs, token_size=2, metadata: str | None = "my/tokenizer|2"):
    """A .ds/.ds.index/.ds.metadata triple written from datatrove's format facts."""
    fmt = "H" if token_size == 2 else "I"
    flat = sum(docs, [])
    path.write_bytes(struct.pack(f"<{len(flat)}{fmt}", *flat))
    Path(f"{path}.index").write_bytes(struct.pack(f"<{len(docs)}Q", *np.cumsum([len(d) for d in docs]).tolist()))
    if metadata is not None:
        Path(f"{path}.metadata").write_text(f"{metadata}\n{len(flat)}\n{len(flat)}T")


@pytest.mark.parametrize("token_size,metadata", [(2, "my/tokenizer|2"), (4, "my/tokenizer|4"), (4, None)])
def test_datatrove_file_round_trip(tmp_path, token_size, metadata):
    _write_datatrove(tmp_path / "000_shuffled.ds", DOCS, token_size, metadata)
    store = open_store(tmp_path / "000_shuffled.ds")
    assert store.format == "datatrove" and store.dtype.itemsize == token_size
    assert [store.document(i).tolist() for i in range(len(DOCS))] == DOCS
    assert store.num_tokens == sum(map(len, DOCS))
    if metadata:
        assert store.tokenizer_info["name"] == "my/tokenizer"
    store.verify()


def test_datatrove_folder_is_one_stream(tmp_path):
    _write_datatrove(tmp_path / "b.ds", DOCS[3:])  # sorted order: a.ds first
    _write_datatrove(tmp_path / "a.ds", DOCS[:3])
    store = open_store(tmp_path)
    assert store.num_documents == len(DOCS)
    assert [store.document(i).tolist() for i in range(len(DOCS))] == DOCS
    flat = sum(DOCS, [])
    boundary = sum(map(len, DOCS[:3]))
    assert store.tokens(boundary - 5, 10).tolist() == flat[boundary - 5:boundary + 5]
    assert store.document_lengths(2, 5).tolist() == [len(d) for d in DOCS[2:5]]
    assert store.windows(np.array([boundary - 2, 0]), 4).tolist() == [flat[boundary - 2:boundary + 2], flat[:4]]


def test_an_empty_datatrove_file_without_metadata_takes_its_folders_token_size(tmp_path):
    """A .ds holding no tokens and no .metadata (a task that got no documents, from a datatrove that wrote none) beside
    4-byte files: the folder reads as datatrove's own reader reads it with token_size=4, the empty file adding nothing
    (before: taken as 2-byte, and the folder refused as mixing token dtypes); alone, it is an empty 2-byte store, as
    datatrove's default token_size reads it."""
    from datatrove.utils.dataset import DatatroveFolderDataset

    docs = [RNG.integers(0, 200_000, size=n).tolist() for n in (3, 9, 4)]
    _write_datatrove(tmp_path / "a.ds", docs[:2], token_size=4, metadata=None)  # the size from .ds over .ds.index
    _write_datatrove(tmp_path / "b.ds", [], metadata=None)
    _write_datatrove(tmp_path / "c.ds", docs[2:], token_size=4, metadata=None)
    store = open_store(tmp_path)
    assert store.dtype == np.uint32 and store.num_tokens == 16 and store.num_documents == 3
    reference = DatatroveFolderDataset(str(tmp_path), seq_len=3, token_size=4)  # windows of 4 tokens, in file order
    windows = [reference[i]["input_ids"].tolist() for i in range(len(reference))]
    assert store.tokens(0, 16).tolist() == sum(windows, [])
    assert [store.document(i).tolist() for i in range(3)] == docs
    store.verify()
    alone = open_store(tmp_path / "b.ds")
    assert alone.dtype == np.uint16 and alone.num_tokens == 0 and alone.num_documents == 0


def test_reads_what_datatrove_itself_writes_and_preprocess_agrees(tmp_path):
    """datatrove's own tokenizer step (what SmolLM2's corpora were made with) writes .ds files: unshuffled, shuffled
    per task (two tasks), and merged by its DocumentTokenizerMerger. Each reads as one store holding datatrove's
    documents, and tools/preprocess.py makes the same documents from the same texts and tokenizer."""
    import json
    from datatrove.data import Document
    from datatrove.pipeline.tokens.merger import DocumentTokenizerMerger
    from datatrove.pipeline.tokens.tokenizer import DocumentTokenizer
    from nanotronix.data import PreprocessOptions, preprocess

    tokenizer = str(train_tiny_tokenizer(tmp_path / "tok" / "tokenizer.json"))
    texts = [f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i % 7 + 1) for i in range(40)]
    documents = lambda part: iter([Document(text, str(i)) for i, text in enumerate(part)])  # noqa: E731
    DocumentTokenizer(str(tmp_path / "plain"), tokenizer, eos_token="<|endoftext|>", shuffle_documents=False,
                      save_filename="web").run(documents(texts))
    for rank, part in enumerate((texts[:25], texts[25:])):  # two tasks of a shuffled tokenization, then merged
        DocumentTokenizer(str(tmp_path / "shuffled"), tokenizer, eos_token="<|endoftext|>", seed=3,
                          save_filename="web").run(documents(part), rank=rank)
    DocumentTokenizerMerger(str(tmp_path / "shuffled"), str(tmp_path / "merged"), save_filename="web",
                            seed=1).run(None)

    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    preprocess(PreprocessOptions([str(tmp_path / "in.jsonl")], tokenizer, str(tmp_path / "ours"), progress=False))
    ours = open_store(tmp_path / "ours")
    want = [ours.document(i).tolist() for i in range(ours.num_documents)]
    assert len(want) == len(texts) and all(doc[-1] == 0 for doc in want)  # <|endoftext|> is id 0
    for folder in ("plain", "shuffled", "merged"):
        store = open_store(tmp_path / folder)
        assert store.format == "datatrove" and store.dtype == np.uint16, folder
        got = [store.document(i).tolist() for i in range(store.num_documents)]
        assert (got == want) if folder == "plain" else (sorted(got) == sorted(want) and got != want), folder
        assert store.num_tokens == ours.num_tokens and store.tokenizer_info["name"] == tokenizer, folder
        store.verify()


def test_zarr_round_trip_local_and_fsspec_url(tmp_path):
    _write_ours(tmp_path / "z", DOCS, np.uint16, fmt="zarr")
    for location in (tmp_path / "z", f"{tmp_path / 'z'}.zarr", f"file://{tmp_path / 'z'}.zarr"):
        store = open_store(location)
        assert store.format == "zarr" and store.dtype == np.uint16
        assert [store.document(i).tolist() for i in range(len(DOCS))] == DOCS
        assert store.metadata["num_tokens"] == store.num_tokens == sum(map(len, DOCS))
    store.verify()


def test_zarr_spans_several_shards(tmp_path):
    """More tokens than one 2^20-token shard: the append buffer's whole-shard writes and the tail agree."""
    docs = [RNG.integers(0, 60000, size=n).tolist() for n in (700_000, 600_000, 5)]
    _write_ours(tmp_path / "big", docs, np.uint16, fmt="zarr")
    store = open_store(tmp_path / "big")
    assert [store.document(i).tolist() for i in range(3)] == docs
    flat = np.concatenate([np.array(d) for d in docs])
    assert np.array_equal(store.gather(np.array([0, 1_048_575, 1_048_576, 1_300_004])),
                          flat[[0, 1_048_575, 1_048_576, 1_300_004]])


def test_missing_store_names_the_path(tmp_path):
    with pytest.raises(DataError, match=f"token store not found: {tmp_path / 'nope'}"):
        open_store(tmp_path / "nope")
    (tmp_path / "half.bin").write_bytes(b"\x00\x00")  # its .idx lost in a copy
    with pytest.raises(DataError, match=f"token store {tmp_path / 'half'}: {tmp_path / 'half'}.idx is missing"):
        open_store(tmp_path / "half")
    with pytest.raises(DataError, match=f"token store {tmp_path / 'half'}.bin: {tmp_path / 'half'}.idx is missing"):
        open_store(tmp_path / "half.bin")  # named by its .bin file


def test_a_folder_of_stores_given_as_a_store_names_them(tmp_path):
    """`inspect_store.py my/` (the folder `preprocess --output-prefix my/tokens` wrote into): the stores it holds,
    not 'looked for my/.bin + my/.idx'."""
    (tmp_path / "sharded").mkdir()
    for writer in (MegatronWriter(tmp_path / "tokens", np.uint16), ZarrWriter(str(tmp_path / "more.zarr"), np.uint16),
                   MegatronWriter(tmp_path / "sharded" / "shard-00000-of-00001", np.uint16)):
        writer.add_documents(np.array([5, 6, 0]), np.array([3]))
        writer.finalize({"tokenizer": {"name": "tiny", "vocab_size": 400, "eos_id": 0}})
    (tmp_path / "notes.txt").write_text("not a store")
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError) as e:
        open_store(f"{tmp_path}/")
    assert str(e.value) == (f"token store not found: {tmp_path}/ is a folder holding token stores (more.zarr, sharded, "
                            f"tokens): name one of them, e.g. {tmp_path}/more.zarr")
    assert open_store(tmp_path / "tokens").num_tokens == 3  # the name it gives opens
    assert open_store(tmp_path / "more.zarr").num_tokens == 3 and open_store(tmp_path / "sharded").num_tokens == 3


def test_a_store_prefix_typed_with_a_trailing_slash_names_the_store(tmp_path):
    """`--data tokens/` for the prefix `tokens` (a shell completes a folder with a /): said so, not 'looked for
    tokens/.bin + tokens/.idx'; a missing store with a / stays 'not found'."""
    writer = MegatronWriter(tmp_path / "tokens", np.uint16)
    writer.add_documents(np.array([5, 6, 0]), np.array([3]))
    writer.finalize({"tokenizer": {"name": "tiny", "vocab_size": 400, "eos_id": 0}})
    with pytest.raises(DataError) as e:
        open_store(f"{tmp_path}/tokens/")
    assert str(e.value) == (f"token store not found: {tmp_path}/tokens/ is no folder; the token store is "
                            f"{tmp_path}/tokens (without the trailing /)")
    with pytest.raises(DataError, match=f"token store not found: {tmp_path}/nope/ \\(looked for"):
        open_store(f"{tmp_path}/nope/")


def test_a_folder_in_place_of_a_store_file_is_said_so(tmp_path):
    """A folder with the name of a store's .idx, .bin or .ds.index (a copy gone wrong) is not "missing": the file
    the user would look for is there, as a folder."""
    (tmp_path / "a.bin").write_bytes(b"\x00\x00")
    (tmp_path / "a.idx").mkdir()
    with pytest.raises(DataError, match=f"^token store {tmp_path / 'a'}: {tmp_path / 'a'}.idx is a folder, not a "
                                        r"file \(a Megatron store is PREFIX.bin \+ PREFIX.idx\)$"):
        open_store(tmp_path / "a")
    write_spec_megatron(tmp_path / "b", DOCS, np.uint16)
    (tmp_path / "b.bin").unlink()
    (tmp_path / "b.bin").mkdir()
    with pytest.raises(DataError, match=f"^{tmp_path / 'b'}.bin: is a folder, not a file \\(the .idx is there\\)$"):
        open_store(tmp_path / "b")
    (tmp_path / "c.ds").write_bytes(b"\x00\x00")
    (tmp_path / "c.ds.index").mkdir()
    with pytest.raises(DataError, match=f"^{tmp_path / 'c'}.ds.index: is a folder, not a file"):
        open_store(tmp_path / "c.ds")


def test_a_path_from_home_is_expanded(tmp_path, monkeypatch):
    """`--data=~/corpus` reaches evaluate and inspect_store with its `~` (the shell expands only a word's start): it
    is read from the home folder, as the trainer's dataset paths are."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write_spec_megatron(tmp_path / "corpus", DOCS, np.uint16)
    assert open_store("~/corpus").num_documents == len(DOCS)


def test_tokenizer_from_file_folder_and_errors(tmp_path):
    file = train_tiny_tokenizer(tmp_path / "tok" / "tokenizer.json")
    tok, info = load_tokenizer(str(file))
    _, info_dir = load_tokenizer(str(file.parent))
    assert info == info_dir.__class__(**{**info_dir.to_dict(), "name": str(file)})
    assert info.eos_token == "<|endoftext|>" and info.eos_id == 0 and info.vocab_size == tok.get_vocab_size()
    with pytest.raises(DataError, match="tokenizer not found"):
        load_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(DataError, match="has no tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_tokenizer_hub_id_fails_with_one_clear_line(monkeypatch):
    # No network in CI: the Hub path must fail cleanly, not hang. huggingface_hub reads the variable once, at
    # import (an earlier test may have imported it): set its constant too, or this test waits ~25 s on the network.
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="could not be fetched from the Hugging Face Hub") as err:
        load_tokenizer("nanotronix-test/definitely-not-a-repo")
    assert "\n" not in str(err.value)


def test_huggingface_hubs_own_warnings_are_not_said_beside_the_error(monkeypatch):
    """Offline without HF_HUB_OFFLINE, huggingface_hub said each failed request on a line of its own (its logger's
    handler writes to stderr) before the one error line. Here its download logs as its retries do, then fails."""
    import logging

    import huggingface_hub
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # beside huggingface_hub's own, on its logger
    hub_logger = logging.getLogger("huggingface_hub")
    hub_logger.addHandler(handler)
    level = hub_logger.level
    hub_logger.setLevel(logging.WARNING)  # its default verbosity

    def download(**_):
        logging.getLogger("huggingface_hub.utils._http").warning("'[Errno -2] Name or service not known' thrown "
                                                                 "while requesting HEAD https://huggingface.co/...")
        raise OSError("offline")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    try:
        with pytest.raises(DataError, match=r"could not be fetched from the Hugging Face Hub \(OSError: offline\)"):
            load_tokenizer("nanotronix-test/definitely-not-a-repo")
        assert said == []
        logging.getLogger("huggingface_hub.utils._http").warning("said again")  # its level is back afterwards
        assert said == ["said again"]
    finally:
        hub_logger.removeHandler(handler)
        hub_logger.setLevel(level)


def test_real_smollm2_tokenizer_store_bytes(tmp_path, smollm2_tokenizer_path):
    """Real SmolLM2 tokenizer: preprocess text, compare .bin/.idx with the spec writer fed by a direct
    `tokenizers` encode + EOS (id 0)."""
    from tokenizers import Tokenizer
    from nanotronix.data import PreprocessOptions, preprocess
    texts = ["Hello world! SmolLM2 was trained on 11T tokens.", "def f(x):\n    return x ** 2  # 12345\n",
             "caf\u00e9 \u65e5\u672c\u8a9e"]
    src = tmp_path / "in.jsonl"
    import json
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    preprocess(PreprocessOptions([str(src)], smollm2_tokenizer_path, str(tmp_path / "out"), progress=False))
    reference = Tokenizer.from_file(smollm2_tokenizer_path)
    docs = [reference.encode(t, add_special_tokens=False).ids + [0] for t in texts]
    assert reference.token_to_id("<|endoftext|>") == 0 and reference.get_vocab_size() == 49152
    binary, idx = spec_megatron_bytes(docs, np.uint16)
    assert (tmp_path / "out.bin").read_bytes() == binary
    assert (tmp_path / "out.idx").read_bytes() == idx
    store = open_store(tmp_path / "out")
    assert store.metadata["tokenizer"]["sha256"] is not None and store.eos_id == 0 and store.vocab_size == 49152
    assert reference.decode(store.document(1).tolist()[:-1]) == texts[1]


def test_stores_of_different_tokenizer_files_get_a_note(tmp_path):
    from nanotronix.data import tokenizer_note
    from nanotronix.data.megatron_store import MegatronWriter

    def store(name: str, sha):
        writer = MegatronWriter(tmp_path / name, np.uint16)
        writer.add_document(np.array([5, 6, 0]))
        writer.finalize({"tokenizer": {"name": "t", "sha256": sha, "vocab_size": 10, "eos_id": 0}})
        return open_store(tmp_path / name)

    a, b, c, d = store("a", "aa" * 32), store("b", "aa" * 32), store("c", "cc" * 32), store("d", None)
    assert tokenizer_note({"a": a, "b": b, "d": d}) is None  # one file (d's is not known)
    note = tokenizer_note({"a": a, "b": b, "c": c})
    assert note.startswith("token stores were written with 2 different tokenizer files (aaaaaaaaaaaa: a, b; "
                           "cccccccccccc: c)"), note
    # data.tokenizer, which the Hugging Face export ships, against the stores' file (a file or a folder holding one)
    import hashlib
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text('{"model": "other"}')
    other = hashlib.sha256(b'{"model": "other"}').hexdigest()
    for configured in (str(tmp_path / "tok"), str(tmp_path / "tok" / "tokenizer.json")):
        note = tokenizer_note({"a": a, "b": b}, configured)
        assert note.startswith(f"data.tokenizer {configured} ({other[:12]}) is another file than the one the token "
                               "stores were written with (aaaaaaaaaaaa: a, b)"), note
    same = store("same", other)
    assert tokenizer_note({"same": same}, str(tmp_path / "tok")) is None
    assert tokenizer_note({"a": a}, "HuggingFaceTB/SmolLM2-135M") is None  # a Hub id: not compared (no download)


def test_fingerprint_follows_the_stream_not_the_format(tmp_path):
    """A store's content fingerprint (kept by checkpoints, so a resume notices a store rewritten with as many tokens)
    is a function of its token stream: the same for the store opened twice, for the same documents as a zarr store,
    a datatrove file and a folder of two preprocess shards; another for the same documents in another order (as
    many tokens) and for one token changed in a store small enough to be hashed whole. Computed once per store."""
    docs = [RNG.integers(1, 49152, size=n).tolist() for n in RNG.integers(5, 60, size=300)]
    _write_ours(tmp_path / "one", docs, np.uint16)
    _write_ours(tmp_path / "one", docs, np.uint16, fmt="zarr")
    _write_datatrove(tmp_path / "one.ds", docs)
    (tmp_path / "sharded").mkdir()
    _write_ours(tmp_path / "sharded" / "shard-00000-of-00002", docs[:120], np.uint16)
    _write_ours(tmp_path / "sharded" / "shard-00001-of-00002", docs[120:], np.uint16)
    _write_ours(tmp_path / "reordered", docs[::-1], np.uint16)
    store = open_store(tmp_path / "one.bin")  # (`one` names three stores: refused, test_preprocess_failures.py)
    assert store.num_tokens > 4 * 256  # sampled, not hashed whole
    prints = {where: open_store(tmp_path / where).fingerprint
              for where in ("one.bin", "one.zarr", "one.ds", "sharded", "reordered")}
    assert len(store.fingerprint) == 64 and store.fingerprint == prints["one.bin"]
    assert prints["one.zarr"] == prints["one.ds"] == prints["sharded"] == prints["one.bin"]
    assert open_store(tmp_path / "reordered").num_tokens == store.num_tokens
    assert prints["reordered"] != prints["one.bin"]
    _write_ours(tmp_path / "small", [[5, 6, 7], [8, 9], [4]], np.uint16)
    _write_ours(tmp_path / "small2", [[5, 6, 7], [8, 10], [4]], np.uint16)
    assert open_store(tmp_path / "small").fingerprint != open_store(tmp_path / "small2").fingerprint
    store.windows = None  # a second reading would fail: the first one's answer is kept
    assert store.fingerprint == prints["one.bin"]


def _advised_random(path: Path) -> bool:
    """Whether this process maps `path` with the kernel's random-read flag (madvise MADV_RANDOM: "rr" in the
    mapping's VmFlags in /proc/self/smaps)."""
    mapping = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            mapping = head[5] if len(head) > 5 else None
        elif head and head[0] == "VmFlags:" and mapping == str(path) and "rr" in head[1:]:
            return True
    return False


def test_windows_are_the_streams_slices_in_every_memory_mapped_format(tmp_path):
    """The sampler's windows (read through a map of their own, advised MADV_RANDOM so that a cold window does not
    read the device's whole readahead window) are the plain slices of the token stream: random starts, the first and
    the last window, windows across document boundaries and across the parts of a sharded folder and of a datatrove
    folder, rows filled in any subset, in a Megatron store (uint16, int32), a datatrove file (2 and 4 bytes)."""
    docs = [RNG.integers(0, 49152, size=n).tolist() for n in RNG.integers(1, 90, size=200)]
    flat = np.array(sum(docs, []), dtype=np.int64)
    _write_ours(tmp_path / "u16", docs, np.uint16)
    _write_ours(tmp_path / "i32", docs, np.int32)
    _write_datatrove(tmp_path / "two.ds", docs, 2, "t|2")
    _write_datatrove(tmp_path / "four.ds", docs, 4, "t|4")
    (tmp_path / "sharded").mkdir()
    _write_ours(tmp_path / "sharded" / "shard-00000-of-00002", docs[:70], np.uint16)
    _write_ours(tmp_path / "sharded" / "shard-00001-of-00002", docs[70:], np.uint16)
    (tmp_path / "dsfolder").mkdir()
    _write_datatrove(tmp_path / "dsfolder" / "a.ds", docs[:130])
    _write_datatrove(tmp_path / "dsfolder" / "b.ds", docs[130:])
    length = 65
    ends = np.cumsum([len(d) for d in docs])
    starts = np.concatenate([[0, len(flat) - length], ends[[3, 69, 129]] - 7,  # across documents and parts
                             RNG.integers(0, len(flat) - length + 1, size=40)])
    expected = np.stack([flat[s:s + length] for s in starts.tolist()])
    for where in ("u16", "i32", "two.ds", "four.ds", "sharded", "dsfolder"):
        store = open_store(tmp_path / where)
        assert np.array_equal(store.windows(starts, length), expected), where
        out, rows = np.full((len(starts), length), -1, dtype=np.int64), np.arange(0, len(starts), 3)
        assert store.read_windows(out, rows, starts[rows]) == int(expected[rows].max()), where
        assert np.array_equal(out[rows], expected[rows]) and (np.delete(out, rows, axis=0) == -1).all(), where
    if Path("/proc/self/smaps").is_file():  # Linux: the windows' maps carry the advice
        opened = [open_store(tmp_path / "u16"), open_store(tmp_path / "two.ds")]  # their maps exist while they do
        assert _advised_random((tmp_path / "u16.bin").resolve()) and _advised_random((tmp_path / "two.ds").resolve())
        assert [store.num_tokens for store in opened] == [len(flat)] * 2


def test_zarr_windows_are_the_streams_slices_read_at_once(tmp_path, monkeypatch):
    """ZarrStore.read_windows reads a batch's windows with one zarr read, not one each: the same slices of the stream as
    the generic read per window gives (random starts, the first and the last window, windows across documents, rows
    filled in any subset, no rows), both when the windows lie close enough for one read of their span and when they
    need a coordinate selection; the chunks they touch are fetched concurrently, where the read per window fetched a
    window's few at a time (on object storage each waited out a round trip: tools/bench_loader.py --zarr)."""
    from functools import partial

    import zarr
    from zarr.storage import LocalStore

    from nanotronix.data import zarr_store
    from nanotronix.data.store import TokenStore

    docs = [RNG.integers(0, 49152, size=n).tolist() for n in RNG.integers(1, 400, size=300)]
    flat = np.array(sum(docs, []), dtype=np.int64)
    # zarr fetches a read's shards concurrently: shards of 2^12 tokens (2^10-token chunks) give this ~60K-token
    # store ~15 of them, as the format's 2^20-token shards give a corpus of ~15M tokens
    monkeypatch.setattr(zarr_store, "SHARD", 1 << 12)
    monkeypatch.setattr(zarr_store, "INNER_CHUNK", 1 << 10)
    _write_ours(tmp_path / "z", docs, np.uint16, fmt="zarr")
    store = open_store(tmp_path / "z")
    length, ends = 65, np.cumsum([len(d) for d in docs])
    starts = np.concatenate([[0, len(flat) - length], ends[[3, 150]] - 7, RNG.integers(0, len(flat) - length, 40)])
    expected = np.stack([flat[s:s + length] for s in starts.tolist()])
    rows = np.arange(0, len(starts), 2)
    bench_loader = load_tool("bench_loader")
    in_flight, read_chunks = {}, (zarr_store._READ_CHUNK, 1000)  # the default reads the span at once; 1000: coordinates
    for read_chunk in read_chunks:
        monkeypatch.setattr(zarr_store, "_READ_CHUNK", read_chunk)
        for name, read in (("at once", store.read_windows), ("one by one", partial(TokenStore.read_windows, store))):
            counted = bench_loader.counting_latency_store(LocalStore(f"{tmp_path / 'z'}.zarr", read_only=True), 0.0)
            store._tokens = zarr.open_group(counted, mode="r")["tokens"]  # the same array, its reads counted
            out = np.full((len(starts), length), -1, dtype=np.int64)
            assert read(out, rows, starts[rows]) == int(expected[rows].max()), (name, read_chunk)
            assert np.array_equal(out[rows], expected[rows]) and (np.delete(out, rows, axis=0) == -1).all(), name
            assert read(out, rows[:0], starts[:0]) == -1
            in_flight[name, read_chunk] = counted.most_in_flight
    # (measured: 10 and 8 requests at once, zarr's limit being 10, against 4 for a window)
    assert all(in_flight["at once", chunk] > in_flight["one by one", chunk] for chunk in read_chunks), in_flight
    with pytest.raises(DataError, match=r"tokens \[\d+, \d+\) are outside the stream"):
        store.read_windows(np.zeros((1, length), np.int64), np.array([0]), np.array([len(flat) - length + 1]))


@pytest.mark.parametrize("sidecar, kind", [([], "array"), (None, "null"), ("x", "string"), (True, "boolean"),
                                           (3, "number")])
def test_a_sidecar_that_is_no_object_is_said_by_its_json_type(sidecar, kind):
    """The line names what the file holds in JSON's words (an array, not Python's list), as the HF import's do."""
    from nanotronix.data.store import checked_sidecar

    with pytest.raises(DataError) as raised:
        checked_sidecar(sidecar, "s.meta.json")
    assert str(raised.value) == f"s.meta.json: not a token store's sidecar (a JSON {kind}, not an object)"


def test_verify_counts_a_sharded_zarr_stores_missing_shards(tmp_path, monkeypatch):
    """A zarr store missing one token shard file: --verify said "320 of its 324 chunks stored" for a missing shard of
    64 chunks (zarr counts every chunk slot of a stored shard, past the array's end too, against the chunks up to
    it). Now shard files against the shards the stream needs: 2 of 3 here (shards of 2^12 tokens, chunks of 2^10)."""
    from nanotronix.data import zarr_store
    monkeypatch.setattr(zarr_store, "SHARD", 1 << 12)
    monkeypatch.setattr(zarr_store, "INNER_CHUNK", 1 << 10)
    docs = [RNG.integers(0, 49152, size=n).tolist() for n in (4000, 4000, 1000)]  # 9000 tokens: 3 shards, the last
    _write_ours(tmp_path / "z", docs, np.uint16, fmt="zarr")  # holding 1 of its 4 chunks
    open_store(tmp_path / "z").verify()
    (tmp_path / "z.zarr" / "tokens" / "c" / "1").unlink()
    with pytest.raises(DataError, match=r"its tokens array is missing shard files \(2 of its 3 shards stored"):
        open_store(tmp_path / "z").verify()
