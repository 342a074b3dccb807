"""Cases found by a mutation review of the less-reviewed readers and writers (checkpoint/safetensors_stream.py,
data/compressed_lines.py, data/datatrove_store.py, data/zarr_store.py, checkpoint/preemption.py, tools/): each
test pins behaviour no other test held, against a reference written independently of the code under test (the
`safetensors` library, datatrove's format facts and its own reader, zarr's own arrays, a plain recomputation)."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

# --- safetensors_stream: the writer's guards -------------------------------------------------------------------


def test_streaming_safetensors_writer_refuses_a_tensor_unlike_its_plan_and_reads_back_with_safetensors(tmp_path):
    """The header is written before any data, from the plan: a tensor of the planned name but another shape of the
    same element count (a transposed weight) or another dtype of the same size (fp16 for bf16) would be stored under
    the planned header and read back silently wrong, so `write` must refuse it. What follows the plan reads back
    exactly with the `safetensors` library itself, its metadata too."""
    from safetensors import safe_open

    from nanotronix.checkpoint.safetensors_stream import StreamingSafetensorsWriter

    a = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    b = torch.tensor([1.5, -2.0, 3.25, 0.0], dtype=torch.bfloat16)
    plan = [("a", a.shape, a.dtype), ("b", b.shape, b.dtype)]

    writer = StreamingSafetensorsWriter(tmp_path / "out.safetensors", plan, {"format": "pt"})
    with pytest.raises(RuntimeError, match="expected a"):
        writer.write("a", a.t().contiguous())  # (3, 2): the same bytes' worth, the wrong shape
    writer.write("a", a)
    with pytest.raises(RuntimeError, match="expected b"):
        writer.write("b", b.to(torch.float16))  # 2 bytes an element as bf16, other numbers
    writer.write("b", b)
    writer.close()

    with safe_open(str(tmp_path / "out.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert torch.equal(f.get_tensor("a"), a) and f.get_tensor("a").dtype == torch.float32
        assert torch.equal(f.get_tensor("b"), b) and f.get_tensor("b").dtype == torch.bfloat16


def test_streaming_safetensors_writer_closed_before_its_plan_is_written_raises(tmp_path):
    """A writer closed with planned tensors unwritten (an export that stopped early) holds a header promising bytes
    it lacks: close() must raise and name the first missing tensor, not flush it as a finished file."""
    from nanotronix.checkpoint.safetensors_stream import StreamingSafetensorsWriter

    plan = [("a", torch.Size([4]), torch.float32), ("b", torch.Size([2]), torch.float32)]
    writer = StreamingSafetensorsWriter(tmp_path / "short.safetensors", plan, {})
    writer.write("a", torch.ones(4))
    with pytest.raises(RuntimeError, match="closed before b was written"):
        writer.close()


# --- compressed_lines: a piece stops reading after its end -----------------------------------------------------


def test_a_compressed_piece_stops_decompressing_in_the_first_block_past_its_end_that_starts_a_line(tmp_path,
                                                                                                  monkeypatch):
    """`preprocess --shard` gives each task of a job array pieces of a large compressed file; a task decompresses
    from the file's start up to its pieces (no random access), then must stop in the first block at or past its
    piece's end that begins a line (that line, and every later one, is a later piece's). Reading on would give the
    same lines, but every task would decompress the rest of the file: quadratic work across the array. The lines are
    checked against the text compressed; the compressed bytes read against a plain recomputation with zlib: each
    block fed to a fresh gzip decompressor in turn, the first block at or past the end whose text holds a line's
    first byte. gzip only: zlib hands out text within a few bytes of its input (zstd holds whole blocks back)."""
    import zlib

    from nanotronix.data import compressed_lines
    from nanotronix.data.compressed_lines import CompressedLines

    block = 64
    monkeypatch.setattr(compressed_lines, "COMPRESSED_BLOCK", block)
    rng = np.random.default_rng(0)
    lines = [b'{"text": "%s"}\n' % rng.integers(0, 2**62, size=3).tobytes().hex().encode() for _ in range(300)]
    raw = b"".join(lines)
    packed = gzip.compress(raw, mtime=0)
    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(packed)
    size = len(packed)
    assert size > 50 * block  # incompressible enough to span many blocks
    line_starts = np.cumsum([0] + [len(x) for x in lines])[:-1]
    for end in (block, 4 * block, 20 * block):
        d, text = zlib.decompressobj(zlib.MAX_WBITS | 16), 0
        expected_read = size
        for offset in range(0, size, block):
            before = text
            text += len(d.decompress(packed[offset:offset + block]))
            if offset >= end and np.any((line_starts >= before) & (line_starts < text)):
                expected_read = min(offset + block, size)
                break
        first, second = CompressedLines(path, [(0, end)]), CompressedLines(path, [(end, size)])
        got = [line for _, line in first] + [line for _, line in second]
        assert got == lines  # every line once, in order
        assert first.read == expected_read < size, (end, first.read, expected_read, size)


# --- tools/plot_run.py -----------------------------------------------------------------------------------------


def test_plot_legend_labels_of_stores_sharing_a_file_name_are_told_apart(plot_tool):
    """The legend names each store by its file name, unless two share one (web/train and code/train): then every
    label must differ, or two curves of the data panel (and of the held-out losses) read as one store's. Checked
    plainly: distinct labels, each naming its store (a suffix of its path)."""
    for names in (["web/train", "code/train"], ["web/train", "code/train", "math/other"],
                  ["a/x", "b/x", "c/y", "d/y"]):
        labels = plot_tool.source_labels(names)
        assert len(set(labels.values())) == len(names), labels
        assert all(name.endswith(labels[name]) for name in names), labels
    assert plot_tool.source_labels(["web/train", "code/valid"]) == {"web/train": "train", "code/valid": "valid"}


def test_plot_reads_a_record_of_step_0(plot_tool, tmp_path):
    """A record's step is an integer in [0, 2^53] (the module's docstring): a record of step 0 is a record, not an
    unreadable line, and a later record of step 0 (a run restarted from scratch) drops what came before it."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 9.0}\n{"step": 1, "loss": 8.0}\n{"step": 0, "loss": 7.5}\n'
                    '{"step": 1, "loss": 7.0}\n')
    records, bad = plot_tool.read_metrics(path)
    assert bad == 0
    assert [(r["step"], r["loss"]) for r in records] == [(0, 7.5), (1, 7.0)]


def test_plot_draws_each_of_two_held_out_stores_beside_their_mean(plot_tool, tmp_path):
    """validation.datasets of two stores (e.g. web and code): the loss panel draws each store's curve, its points
    those of the records' val_losses, beside their mean; one store alone is its mean, drawn once. (The other test of
    the curves uses five stores, so `more than one` and `more than two` read the same to it.)"""
    import json

    import matplotlib.pyplot as plt

    for stores in (["/d/web", "/d/code"], ["/d/web"]):
        rows = []
        for s in range(1, 7):
            row = {"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3, "stage": "a"}
            if s % 2 == 0:
                row["val_losses"] = {name: 2.0 + i + 0.01 * s for i, name in enumerate(stores)}
                row["val_loss"] = sum(row["val_losses"].values()) / len(stores)
            rows.append(row)
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        fig, axes = plt.subplots(2, 2)
        try:
            records, _ = plot_tool.read_metrics(tmp_path / "metrics.jsonl")
            plot_tool._draw(fig, axes, records, [], {}, "t")
            lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                     for line in axes[0][0].get_lines()}
        finally:
            plt.close(fig)
        want = {f"validation: {name.rsplit('/', 1)[1]}": ([r["step"] for r in rows if "val_losses" in r],
                                                         [r["val_losses"][name] for r in rows if "val_losses" in r])
                for name in stores} if len(stores) > 1 else {}
        assert {k: v for k, v in lines.items() if k.startswith("validation: ")} == want, lines
        assert "validation" in lines and "training" in lines


# --- checkpoint/preemption.py: the first signal is the one said ------------------------------------------------


def test_the_first_preemption_signal_a_rank_receives_is_the_one_it_says(tmp_path):
    """Slurm's `--signal=USR1@N` warns a job N seconds before its end; SIGTERM follows at the end if the job is still
    there. A rank that got both before its step ended stops for the first (the handler keeps it: "once one
    arrived"), and says so; the later SIGTERM must not overwrite it. In one process (no group: no reduction), the
    handlers installed and removed as the Checkpointer does."""
    import os
    import signal

    from nanotronix.checkpoint.preemption import PreemptionWatcher

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    watcher = PreemptionWatcher(torch.device("cpu"))
    watcher.install()
    try:
        assert not watcher.stop_requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert watcher.stop_requested()
    finally:
        watcher.uninstall()
    assert (watcher.stop_signal, watcher.reason()) == (signal.SIGUSR1, "received SIGUSR1")
    assert {sig: signal.getsignal(sig) for sig in before} == before  # the previous handlers are back


# --- zarr_store: windows past the stream's end -----------------------------------------------------------------


def test_zarr_windows_past_the_streams_end_are_refused_as_the_generic_read_refuses_them(tmp_path):
    """ZarrStore.read_windows reads a block of windows at once, so it checks the block's lowest and highest start:
    a batch whose last window (not its first) runs past the stream's end must be the same DataError that
    TokenStore.read_windows (one window at a time) gives, not an IndexError from inside numpy or a short window.
    The store is made with zarr itself (the layout the module's docstring gives), not with the project's writer."""
    zarr = pytest.importorskip("zarr")

    from nanotronix.data.errors import DataError
    from nanotronix.data.store import TokenStore
    from nanotronix.data.zarr_store import ZarrStore

    tokens = np.arange(100, dtype=np.uint16)
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    group.create_array("tokens", data=tokens, chunks=(16,))
    group.create_array("document_ends", data=np.array([40, 100], dtype=np.int64), chunks=(16,))
    store = ZarrStore(str(tmp_path / "s.zarr"))
    out = np.zeros((2, 10), np.int64)
    assert store.read_windows(out, np.array([0, 1]), np.array([5, 90])) == 99
    assert out.tolist() == [tokens[5:15].tolist(), tokens[90:100].tolist()]
    for read in (store.read_windows, lambda *a: TokenStore.read_windows(store, *a)):
        with pytest.raises(DataError, match=r"tokens \[91, 101\) are outside the stream"):
            read(np.zeros((2, 10), np.int64), np.array([0, 1]), np.array([5, 91]))


# --- datatrove_store: verify of a .ds longer than its index ----------------------------------------------------


def test_datatrove_verify_refuses_a_ds_file_longer_than_its_index_says(tmp_path):
    """A .ds file is its documents' tokens and nothing else (datatrove's format facts: no header, no padding). Bytes
    past the index's last end (a file appended to twice, a copy over a larger one) are read by datatrove's own reader,
    which takes the token count from the file size, but not by ours, which reads the index: the two readers disagree
    on the stream, and --verify must say so. The file is written plainly from the format facts, and datatrove's
    reader shows the disagreement."""
    from datatrove.utils.dataset import DatatroveFolderDataset

    from nanotronix.data.datatrove_store import DatatroveStore
    from nanotronix.data.errors import DataError

    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    path = tmp_path / "000.ds"
    flat = np.array(sum(docs, []), dtype="<u2")
    Path(f"{path}.index").write_bytes(np.cumsum([len(d) for d in docs]).astype("<u8").tobytes())
    Path(f"{path}.metadata").write_text(f"some/tokenizer|2\n{len(flat)}\n{len(flat)}\n")
    path.write_bytes(flat.tobytes())
    DatatroveStore(path).verify()  # whole: passes
    path.write_bytes(flat.tobytes() + np.array([99], dtype="<u2").tobytes())
    theirs = DatatroveFolderDataset(str(tmp_path), seq_len=len(flat), token_size=2)
    assert theirs[0]["input_ids"].tolist() == flat.tolist() + [99]  # datatrove reads the extra token
    store = DatatroveStore(path)
    assert store.num_tokens == len(flat)  # ours reads the index's
    with pytest.raises(DataError, match="its index describes"):
        store.verify()


# --- tools/train_tokenizer.py: what the trained tokenizer is ---------------------------------------------------


def test_train_tokenizer_learns_from_every_record_splits_digits_and_decodes_to_the_text(tmp_path, capsys):
    """The quickstart's tokenizer is SmolLM2-shaped: byte-level BPE over digits split one by one, learned from every
    record (the first too: the tool reads it ahead, to say a bad input before training), decoding back to the text.
    Checked on the tokenizer itself (tokenizers' own encode and decode) and against the SmolLM2 tokenizer's digit
    splitting; a corpus rich enough to give exactly --vocab-size tokens is said without a note of fewer."""
    import json
    import os

    from tokenizers import Tokenizer

    from helpers import load_tool

    words = ["quixotic"] * 200  # only the first record holds it
    records = [" ".join(words), "the cat sat on the mat with 12345 and 2024 and 987654. " * 40,
               "a brown dog ran far from the old barn, then slept by the river. " * 40]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in records))
    out = tmp_path / "tok.json"
    assert load_tool("train_tokenizer").main(["--input", str(tmp_path / "in.jsonl"), "--output", str(out),
                                              "--vocab-size", "300"]) == 0
    tok = Tokenizer.from_file(str(out))
    assert tok.get_vocab_size() == 300
    assert capsys.readouterr().out == f"tokenizer: 300 tokens -> {out}\n"
    assert tok.token_to_id("<|endoftext|>") == 0
    assert len(tok.encode("quixotic").ids) < len("quixotic")  # merges learned from the first record
    text = "the cat sat 12345 times in 2024"
    pieces = tok.encode(text).tokens
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert all(len(p) == 1 for p in digits) and len(digits) == 9, pieces
    real = os.environ.get("NANOTRONIX_SMOLLM2_TOKENIZER")  # the real one (where .ci/run gives it) splits them so too
    if real and Path(real).is_file():
        assert [p for p in Tokenizer.from_file(real).encode(text).tokens if any(c.isdigit() for c in p)] == digits
    assert tok.decode(tok.encode(text).ids) == text


# --- datatrove_store / zarr_store: document lengths from any first document ------------------------------------


def test_document_lengths_from_every_first_document_are_the_index_differences(tmp_path):
    """document_lengths(start, stop) (what the sampler's document-aware reads and --verify take) for every start
    and stop, of a .ds file (written from datatrove's format facts) and of a zarr store (written with zarr itself):
    the differences of the stored document ends, recomputed plainly. The other tests draw a few (start, stop) of a
    folder, whose parts are asked from their start."""
    zarr = pytest.importorskip("zarr")

    from nanotronix.data.datatrove_store import DatatroveStore
    from nanotronix.data.zarr_store import ZarrStore

    lengths = [3, 1, 4, 1, 5, 9, 2, 6]
    ends = np.cumsum(lengths)
    tokens = np.arange(ends[-1], dtype=np.uint16)
    path = tmp_path / "000.ds"
    path.write_bytes(tokens.astype("<u2").tobytes())
    Path(f"{path}.index").write_bytes(ends.astype("<u8").tobytes())
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    group.create_array("tokens", data=tokens, chunks=(8,))
    group.create_array("document_ends", data=ends.astype(np.int64), chunks=(3,))
    for store in (DatatroveStore(path), ZarrStore(str(tmp_path / "s.zarr"))):
        for start in range(len(lengths) + 1):
            for stop in range(len(lengths) + 2):
                assert store.document_lengths(start, stop).tolist() == lengths[start:stop], (store.format, start, stop)
        assert store.document_lengths().tolist() == lengths


def test_a_zarr_store_whose_tokens_outrun_its_document_ends_is_refused(tmp_path):
    """A zarr store's `tokens` are its documents' tokens and nothing else: `document_ends`' last value is their
    count (the layout in zarr_store's docstring, as datatrove's .ds.index). Tokens past it (an append that wrote the
    tokens but not the ends, a hand-made store) belong to no document; the store is refused when opened, as one with
    fewer tokens is, rather than read as if whole. Made with zarr itself."""
    zarr = pytest.importorskip("zarr")

    from nanotronix.data.errors import DataError
    from nanotronix.data.zarr_store import ZarrStore

    for count in (10, 12, 8):
        group = zarr.open_group(str(tmp_path / f"s{count}.zarr"), mode="w")
        group.create_array("tokens", data=np.arange(count, dtype=np.uint16), chunks=(4,))
        group.create_array("document_ends", data=np.array([4, 10], dtype=np.int64), chunks=(4,))
        if count == 10:
            assert ZarrStore(str(tmp_path / "s10.zarr")).num_tokens == 10
        else:
            with pytest.raises(DataError, match=f"tokens array holds {count} tokens, document_ends says 10"):
                ZarrStore(str(tmp_path / f"s{count}.zarr"))
