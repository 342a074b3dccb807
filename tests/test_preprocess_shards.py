"""`tools/preprocess.py --shard I/N` and the folder of shards it writes, read as one store: the shards' concatenated
stream is byte for byte the single run's (reference: one `preprocess` over the same inputs, and the Megatron files
it writes), in both writable formats; an incomplete folder refuses to open. `--shuffle`: the documents in numpy's
seeded permutation, per shard. The Slurm job array that runs the shards: tests/test_slurm.py. ~10 s."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from nanotronix.data import DataError, open_store
from nanotronix.data.sharded_store import split_inputs
from test_data_support import load_tool

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


@pytest.fixture(scope="module")
def tool():
    return load_tool("preprocess.py")


def write_corpus(folder: Path) -> Path:
    """Seven JSON-lines files of very different sizes (3 to 400 documents), in nested folders."""
    rng = np.random.default_rng(0)
    for k, docs in enumerate([40, 3, 400, 25, 150, 8, 90]):
        path = folder / f"part{k % 2}" / f"{k:02d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"text": " ".join(rng.choice(WORDS, rng.integers(1, 60)))}) for _ in range(docs)]
        path.write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.parametrize("sizes, count", [([5, 1, 400, 25, 150, 8, 90], 3), ([1] * 10, 4), ([100, 1, 1, 1], 4),
                                          ([7, 7, 7], 1), ([3, 9], 2)])
def test_split_is_contiguous_covering_and_balanced(sizes, count):
    runs = [split_inputs(sizes, i, count) for i in range(count)]
    assert runs[0][0] == 0 and runs[-1][1] == len(sizes)
    assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))  # contiguous, in order
    assert all(stop > start for start, stop in runs)  # none empty
    share = sum(sizes) / count
    for start, stop in runs:  # off the equal share by less than the largest file (unless forced to hold one)
        assert abs(sum(sizes[start:stop]) - share) <= max(sizes) or stop - start == 1


def test_split_refuses_impossible_requests():
    with pytest.raises(DataError, match="3 shards but 2 input file"):
        split_inputs([1, 2], 0, 3)
    with pytest.raises(DataError, match="shard index must be in"):
        split_inputs([1, 2], 2, 2)


@pytest.mark.parametrize("fmt", ["megatron", "zarr"])
def test_shards_read_as_the_single_run(tmp_path, tiny_tokenizer, tool, fmt, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    common = ["--input", str(corpus), "--tokenizer", tiny_tokenizer, "--no-progress", "--workers", "1", "--format", fmt]
    assert tool.main(common + ["--output-prefix", str(tmp_path / "whole")]) == 0
    for i in range(3):
        assert tool.main(common + ["--output-prefix", str(tmp_path / "sharded"), "--shard", f"{i}/3"]) == 0
    whole = open_store(tmp_path / ("whole" if fmt == "megatron" else "whole.zarr"))
    sharded = open_store(tmp_path / "sharded")
    assert sharded.format == whole.format and sharded.metadata["shards"] == 3
    assert (sharded.num_documents, sharded.num_tokens) == (whole.num_documents, whole.num_tokens)
    assert sharded.summary()["tokenizer"] == whole.summary()["tokenizer"]
    assert np.array_equal(sharded.tokens(0, sharded.num_tokens), whole.tokens(0, whole.num_tokens))
    assert np.array_equal(sharded.document_lengths(), whole.document_lengths())
    assert np.array_equal(sharded.document_lengths(100, 600), whole.document_lengths(100, 600))
    for i in (0, 42, 300, whole.num_documents - 1):
        assert np.array_equal(sharded.document(i), whole.document(i))
    # windows anywhere, many straddling shard boundaries, in the sampler's batched read
    starts = np.random.default_rng(1).integers(0, whole.num_tokens - 65, 500)
    starts[:3] = [int(sharded.parts[0].num_tokens) - 10, int(sharded.parts[0].num_tokens), 0]
    assert np.array_equal(sharded.windows(starts, 65), whole.windows(starts, 65))
    assert np.array_equal(sharded.gather(starts), whole.gather(starts))
    sharded.verify()
    inspect = load_tool("inspect_store.py")
    assert inspect.main([str(tmp_path / "sharded"), "--verify"]) == 0
    shown = capsys.readouterr().out
    assert f"documents         {whole.num_documents}\n" in shown and "parts             3\n" in shown, shown
    if fmt == "megatron":  # the shards of a Megatron run hold the single run's .bin bytes, in order
        parts = b"".join((tmp_path / "sharded" / f"shard-{i:05d}-of-00003.bin").read_bytes() for i in range(3))
        assert parts == (tmp_path / "whole.bin").read_bytes()


def test_an_incomplete_folder_does_not_open(tmp_path, tiny_tokenizer, tool, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    common = ["--input", str(corpus), "--tokenizer", tiny_tokenizer, "--no-progress", "--workers", "1",
              "--output-prefix", str(tmp_path / "sharded")]
    for i in (0, 2):
        assert tool.main(common + ["--shard", f"{i}/3"]) == 0
    with pytest.raises(DataError, match=r"1 of 3 shards missing \(1\): a preprocess task has not finished"):
        open_store(tmp_path / "sharded")
    assert tool.main(common + ["--shard", "1/3"]) == 0
    assert open_store(tmp_path / "sharded").num_documents > 0
    other = tmp_path / "mixed"
    shutil.copytree(tmp_path / "sharded", other)
    (other / "shard-00000-of-00002.idx").write_bytes((other / "shard-00000-of-00003.idx").read_bytes())
    with pytest.raises(DataError, match="shards of different splits"):
        open_store(other)
    capsys.readouterr()
    assert tool.main(common + ["--shard", "0/9"]) == 2  # more shards than input files
    assert "9 shards but 7 input file(s)" in capsys.readouterr().err


def test_shuffle_stores_a_seeded_permutation_of_the_documents(tmp_path, tiny_tokenizer, tool, capsys, monkeypatch):
    from nanotronix.data import megatron_store
    monkeypatch.setattr(megatron_store, "_SHUFFLE_BATCH", 50)  # many batches of the rewrite
    corpus = write_corpus(tmp_path / "corpus")
    common = ["--input", str(corpus), "--tokenizer", tiny_tokenizer, "--no-progress", "--workers", "1"]
    assert tool.main(common + ["--output-prefix", str(tmp_path / "plain")]) == 0
    assert tool.main(common + ["--output-prefix", str(tmp_path / "shuffled"), "--shuffle", "7"]) == 0
    assert tool.main(common + ["--output-prefix", str(tmp_path / "other"), "--shuffle"]) == 0  # seed 1234
    plain, shuffled, other = (open_store(tmp_path / name) for name in ("plain", "shuffled", "other"))
    n = plain.num_documents
    order = np.random.default_rng([7]).permutation(n)  # document j of the output is input document order[j]
    assert [shuffled.document(j).tolist() for j in range(n)] == [plain.document(i).tolist() for i in order]
    assert np.array_equal(shuffled.document_lengths(), plain.document_lengths()[order])
    assert shuffled.metadata["shuffled"] == {"seed": [7]} and plain.metadata["shuffled"] is None
    assert not np.array_equal(other.document_lengths(), shuffled.document_lengths())  # another seed, another order
    shuffled.verify()
    # shards: each shuffled on its own, from the seed and its index
    for i in range(2):
        assert tool.main(common + ["--output-prefix", str(tmp_path / "sharded"), "--shard", f"{i}/2",
                                   "--shuffle", "7"]) == 0
    sharded = open_store(tmp_path / "sharded")
    offset = 0
    for i, part in enumerate(sharded.parts):
        m = part.num_documents
        order = np.random.default_rng([7, i, 2]).permutation(m) + offset
        assert [part.document(j).tolist() for j in range(m)] == [plain.document(k).tolist() for k in order]
        offset += m
    assert offset == n
    capsys.readouterr()
    assert tool.main(common + ["--output-prefix", str(tmp_path / "z"), "--format", "zarr", "--shuffle"]) == 2
    assert "error: --shuffle: not implemented for --format zarr (megatron only)" in capsys.readouterr().err
