"""`tools/preprocess.py --shard I/N` and the folder of shards it writes, read as one store: the shards' concatenated
stream is byte for byte the single run's (reference: one `preprocess` over the same inputs, and the Megatron files
it writes), in both writable formats; an incomplete folder refuses to open. `--shuffle`: the documents in numpy's
seeded permutation, per shard. Large inputs cut between shards: tests/test_preprocess_large_inputs.py. The Slurm
job array that runs the shards: tests/test_slurm.py. ~15 s."""
from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from nanotronix.data import DataError, open_store
from nanotronix.data.megatron_store import MegatronWriter
from nanotronix.data.sharded_store import shard_kinds, shard_name, split_inputs
from helpers import ROOT, load_tool

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


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
    with pytest.raises(DataError, match=r"3 shards but the inputs make 2 piece\(s\)"):
        split_inputs([1, 2], 0, 3)
    with pytest.raises(DataError, match="shard index must be in"):
        split_inputs([1, 2], 2, 2)


@pytest.mark.parametrize("fmt", ["megatron", "zarr"])
def test_shards_read_as_the_single_run(tmp_path, tiny_tokenizer, preprocess_tool, fmt, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    common = ["--input", str(corpus), "--tokenizer", tiny_tokenizer, "--no-progress", "--workers", "1", "--format", fmt]
    assert preprocess_tool.main(common + ["--output-prefix", str(tmp_path / "whole")]) == 0
    for i in range(3):
        assert preprocess_tool.main(common + ["--output-prefix", str(tmp_path / "sharded"), "--shard", f"{i}/3"]) == 0
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
    inspect = load_tool("inspect_store")
    assert inspect.main([str(tmp_path / "sharded"), "--verify"]) == 0
    shown = capsys.readouterr().out
    assert f"documents         {whole.num_documents}\n" in shown and "parts             3\n" in shown, shown
    if fmt == "megatron":  # the shards of a Megatron run hold the single run's .bin bytes, in order
        parts = b"".join((tmp_path / "sharded" / f"shard-{i:05d}-of-00003.bin").read_bytes() for i in range(3))
        assert parts == (tmp_path / "whole.bin").read_bytes()


def test_an_incomplete_folder_does_not_open(tmp_path, tiny_tokenizer, preprocess_tool, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    common = ["--input", str(corpus), "--tokenizer", tiny_tokenizer, "--no-progress", "--workers", "1",
              "--output-prefix", str(tmp_path / "sharded")]
    for i in (0, 2):
        assert preprocess_tool.main(common + ["--shard", f"{i}/3"]) == 0
    with pytest.raises(DataError, match=r"1 of 3 shards missing \(1\): a preprocess task has not finished"):
        open_store(tmp_path / "sharded")
    assert preprocess_tool.main(common + ["--shard", "1/3"]) == 0
    assert open_store(tmp_path / "sharded").num_documents > 0
    # the whole array resubmitted after one task failed: a finished shard succeeds without work, said; a shard of
    # other settings is not replaced unasked; a shard of another split would leave a folder that never opens
    capsys.readouterr()
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "sharded").iterdir()}
    assert preprocess_tool.main(common + ["--shard", "1/3"]) == 0
    said = capsys.readouterr()
    assert "this shard is already complete (the same inputs, tokenizer and settings): nothing to do" in said.err
    assert said.out.startswith(f"already complete: {tmp_path / 'sharded' / 'shard-00001-of-00003'}: ")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "sharded").iterdir()} == written
    assert preprocess_tool.main(common + ["--shard", "1/3", "--shuffle"]) == 2
    assert "already exists; pass --overwrite (slurm/preprocess.sh: EXTRA_ARGS=--overwrite)" in capsys.readouterr().err
    assert preprocess_tool.main(common + ["--shard", "3/4"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --output-prefix {tmp_path / 'sharded'}: holds shards of a "
                                               "3-way split; --shard 3/4 --format megatron would mix them in one "
                                               "store (write to another folder, or remove those shards)")
    # the folder's parts would mix formats
    assert preprocess_tool.main(common + ["--shard", "1/3", "--format", "zarr"]) == 2
    assert "holds shards of the megatron format; --shard 1/3 --format zarr would mix them" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "sharded").iterdir()} == written
    other = tmp_path / "mixed"
    shutil.copytree(tmp_path / "sharded", other)
    (other / "shard-00000-of-00002.idx").write_bytes((other / "shard-00000-of-00003.idx").read_bytes())
    with pytest.raises(DataError, match="shards of different splits"):
        open_store(other)
    # a file numbered past the split (copied in by hand) would be left out of the dataset: refused, named
    stray = tmp_path / "stray"
    shutil.copytree(tmp_path / "sharded", stray)
    (stray / "shard-00005-of-00003.bin").write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match=f"^{stray}: shard-00005-of-00003.bin is not one of its 3 shards \\(they are "
                                        r"numbered 0 to 2\): remove or rename it$"):
        open_store(stray)
    (stray / "shard-00005-of-00003.bin").unlink()
    for suffix in (".idx", ".bin"):  # a shard's file that is a folder is that, not "missing"
        part = stray / f"shard-00001-of-00003{suffix}"
        content = part.read_bytes()
        part.unlink()
        part.mkdir()
        with pytest.raises(DataError, match=f"{part}:? is a folder, not a file"):
            open_store(stray)
        part.rmdir()
        part.write_bytes(content)
    assert open_store(stray).num_documents == open_store(tmp_path / "sharded").num_documents
    # one shard in both formats (a zarr shard of the same split copied in by hand): refused naming both, not one read
    # and the other left out without a word
    assert preprocess_tool.main(common[:-1] + [str(tmp_path / "zarr_shards"), "--shard", "1/3",
                                               "--format", "zarr"]) == 0
    both = tmp_path / "both"
    shutil.copytree(tmp_path / "sharded", both)
    shutil.copytree(tmp_path / "zarr_shards" / "shard-00001-of-00003.zarr", both / "shard-00001-of-00003.zarr")
    with pytest.raises(DataError) as said:
        open_store(both)
    assert str(said.value) == (f"{both}: {both / 'shard-00001-of-00003.idx'} and {both / 'shard-00001-of-00003.zarr'}"
                               " are the same shard in two formats (preprocess writes one per folder): remove one")
    for i in (0, 2):  # every shard in both formats (before: the zarr ones read, the others unsaid)
        assert preprocess_tool.main(common[:-1] + [str(tmp_path / "zarr_shards"), "--shard", f"{i}/3",
                                                   "--format", "zarr"]) == 0
        name = f"shard-0000{i}-of-00003.zarr"
        shutil.copytree(tmp_path / "zarr_shards" / name, both / name)
    with pytest.raises(DataError, match=f"^{both}: {both / 'shard-00000-of-00003.idx'} and "
                                        f"{both / 'shard-00000-of-00003.zarr'} are the same shard in two formats"):
        open_store(both)
    capsys.readouterr()
    for path in corpus.rglob("*.jsonl"):  # compressed files are cut at 64 KiB blocks: 7 small ones are 7 pieces
        path.with_suffix(".jsonl.gz").write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    assert preprocess_tool.main(common + ["--shard", "0/9"]) == 2
    assert "9 shards but the inputs make 7 piece(s)" in capsys.readouterr().err


def test_a_complete_shard_with_an_edited_sidecar_reports_the_counts_it_holds(tmp_path, tiny_tokenizer, preprocess_tool,
                                                                              capsys):
    """A rerun task finds its shard complete by the sidecar's split, inputs and settings, and reports the counts the
    store holds: counts edited by hand in the sidecar were read as they were (int("x"): a ValueError traceback)."""
    corpus = write_corpus(tmp_path / "corpus")
    common = ["--input", str(corpus), "--tokenizer", tiny_tokenizer, "--no-progress", "--workers", "1",
              "--output-prefix", str(tmp_path / "sharded"), "--shard", "0/2"]
    assert preprocess_tool.main(common) == 0
    prefix = tmp_path / "sharded" / shard_name(0, 2)
    store = open_store(prefix)
    sidecar = Path(f"{prefix}.meta.json")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "num_documents": "x", "num_tokens": None,
                                   "skipped": {"total": 0, "reasons": [1]}}))
    capsys.readouterr()
    assert preprocess_tool.main(common) == 0
    said = capsys.readouterr()
    assert "this shard is already complete" in said.err
    assert said.out.startswith(f"already complete: {prefix}: {store.num_documents} documents, {store.num_tokens} "
                               "tokens; skipped "), said.out


def test_a_split_into_more_than_99999_shards_is_seen(tmp_path):
    """--shard I/N takes any N; past 99999 a shard's name has more than five digits (shard-00000-of-100000), which the
    folder once did not recognise as a shard: a folder of them was no store at all, and a task of another split
    was not refused."""
    writer = MegatronWriter(tmp_path / "sharded" / shard_name(0, 100_000), np.uint16)
    writer.add_document(np.array([1, 2, 3]))
    writer.finalize()
    assert shard_kinds(tmp_path / "sharded") == {(100_000, "megatron")}
    with pytest.raises(DataError, match=r"99999 of 100000 shards missing \(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, \.\.\.\)"):
        open_store(tmp_path / "sharded")
    (tmp_path / "sharded" / "shard-100000-of-100000.bin").write_bytes(b"")  # numbered past the split
    with pytest.raises(DataError, match="shard-100000-of-100000.bin is not one of its 100000 shards"):
        open_store(tmp_path / "sharded")


def test_a_shard_name_in_digits_of_another_script_is_no_shard(tmp_path):
    """Shard names are ASCII digits (shard_name); the folder's patterns were `\\d`, which takes any script's decimal
    digits, and int() reads them: a copy named shard-00000-of-00001 in Arabic-Indic digits counted as shard 0 of 1
    (the folder then held "the same shard in two formats"), and so did a name ending in a line break (`$`, not
    `\\Z`). Such a name is no shard, as a step_\u0663 folder is no step: the folder opens as its real shards."""
    folder = tmp_path / "sharded"
    writer = MegatronWriter(folder / shard_name(0, 1), np.uint16)
    writer.add_document(np.array([1, 2, 3]))
    writer.finalize()
    arabic = shard_name(0, 1).translate({ord(d): chr(0x0660 + int(d)) for d in "0123456789"})
    for suffix in (".bin", ".idx"):
        shutil.copy(folder / f"{shard_name(0, 1)}{suffix}", folder / f"{arabic}{suffix}")
    shutil.copy(folder / f"{shard_name(0, 1)}.idx", folder / f"{shard_name(0, 1)}.idx\n")  # a line break: no shard
    assert shard_kinds(folder) == {(1, "megatron")}
    assert open_store(folder).num_documents == 1
    (folder / f"{shard_name(0, 1)}.bin").unlink()
    (folder / f"{shard_name(0, 1)}.idx").unlink()
    assert shard_kinds(folder) == set()


@pytest.mark.parametrize("fmt", ["megatron", "zarr"])
def test_shards_cut_from_different_input_listings_do_not_open(tmp_path, tiny_tokenizer, preprocess_tool, fmt):
    """A file that grows while the array runs moves the cuts: a shard rerun afterwards would overlap its
    neighbours or leave a gap, so the folder refuses to open rather than read as a dataset."""
    corpus = write_corpus(tmp_path / "corpus")
    common = ["--input", str(corpus), "--tokenizer", tiny_tokenizer, "--no-progress", "--workers", "1", "--format", fmt,
              "--output-prefix", str(tmp_path / "sharded")]
    for i in range(3):
        assert preprocess_tool.main(common + ["--shard", f"{i}/3"]) == 0
    store = open_store(tmp_path / "sharded")
    shards = [part.metadata["shard"] for part in store.parts]
    assert [(s["index"], s["count"]) for s in shards] == [(0, 3), (1, 3), (2, 3)]
    assert len({s["inputs_sha256"] for s in shards}) == 1
    with open(corpus / "part0" / "00.jsonl", "a") as f:
        f.write(json.dumps({"text": "alpha beta"}) + "\n")
    assert preprocess_tool.main(common + ["--shard", "1/3"]) == 2  # a shard already written is not replaced unasked
    assert preprocess_tool.main(common + ["--shard", "1/3", "--overwrite"]) == 0
    with pytest.raises(DataError, match="its shards were cut from different input listings"):
        open_store(tmp_path / "sharded")


@pytest.mark.parametrize("fmt", ["megatron", "zarr"])
def test_shuffle_stores_a_seeded_permutation_of_the_documents(tmp_path, tiny_tokenizer, preprocess_tool, monkeypatch,
                                                              fmt):
    from nanotronix.data import shuffle
    monkeypatch.setattr(shuffle, "SHUFFLE_BATCH", 50)  # many batches of the permuted pass
    corpus = write_corpus(tmp_path / "corpus")
    common = ["--input", str(corpus), "--tokenizer", tiny_tokenizer, "--no-progress", "--workers", "1", "--format", fmt]
    suffix = ".zarr" if fmt == "zarr" else ""
    assert preprocess_tool.main(common + ["--output-prefix", str(tmp_path / "plain")]) == 0
    # batches also cut by tokens: the longest document is copied alone, the others gathered several at a time
    longest = int(open_store(tmp_path / ("plain" + suffix)).document_lengths().max())
    monkeypatch.setattr(shuffle, "SHUFFLE_BATCH_TOKENS", longest - 1)
    assert preprocess_tool.main(common + ["--output-prefix", str(tmp_path / "shuffled"), "--shuffle", "7"]) == 0
    assert preprocess_tool.main(common + ["--output-prefix", str(tmp_path / "other"), "--shuffle"]) == 0  # seed 1234
    plain, shuffled, other = (open_store(tmp_path / (name + suffix)) for name in ("plain", "shuffled", "other"))
    n = plain.num_documents
    order = np.random.default_rng([7]).permutation(n)  # document j of the output is input document order[j]
    assert [shuffled.document(j).tolist() for j in range(n)] == [plain.document(i).tolist() for i in order]
    assert np.array_equal(shuffled.document_lengths(), plain.document_lengths()[order])
    assert shuffled.metadata["shuffled"] == {"seed": [7]} and plain.metadata["shuffled"] is None
    assert not np.array_equal(other.document_lengths(), shuffled.document_lengths())  # another seed, another order
    shuffled.verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(  # no temporary file left beside the outputs
        ["corpus"] + [name + ext for name in ("plain", "shuffled", "other")
                      for ext in ([".zarr"] if fmt == "zarr" else [".bin", ".idx", ".meta.json"])])
    # shards: each shuffled on its own, from the seed and its index
    for i in range(2):
        assert preprocess_tool.main(common + ["--output-prefix", str(tmp_path / "sharded"), "--shard", f"{i}/2",
                                              "--shuffle", "7"]) == 0
    sharded = open_store(tmp_path / "sharded")
    offset = 0
    for i, part in enumerate(sharded.parts):
        m = part.num_documents
        order = np.random.default_rng([7, i, 2]).permutation(m) + offset
        assert [part.document(j).tolist() for j in range(m)] == [plain.document(k).tolist() for k in order]
        offset += m
    assert offset == n


@pytest.mark.parametrize("fmt", ["megatron", "zarr"])
def test_a_shard_whose_part_holds_no_record_is_written_empty(tmp_path, tiny_tokenizer, preprocess_tool, fmt):
    """One document longer than a shard's share of the text: the second task's byte range holds no line start. It
    writes an empty shard (0 documents), so the folder completes and reads as the single run; before, that task
    failed with 'every input record was empty or bad' on every rerun and the folder could never open."""
    src = tmp_path / "skew.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("x", "y", "z" * 3000)))
    common = ["--input", str(src), "--tokenizer", tiny_tokenizer, "--no-progress", "--workers", "1", "--format", fmt]
    assert preprocess_tool.main(common + ["--output-prefix", str(tmp_path / "whole")]) == 0
    for i in range(2):
        assert preprocess_tool.main(common + ["--output-prefix", str(tmp_path / "sharded"), "--shard", f"{i}/2"]) == 0
    whole = open_store(tmp_path / ("whole" if fmt == "megatron" else "whole.zarr"))
    sharded = open_store(tmp_path / "sharded")
    assert [p.num_documents for p in sharded.parts] == [3, 0]
    assert np.array_equal(sharded.tokens(0, sharded.num_tokens), whole.tokens(0, whole.num_tokens))
    sharded.verify()


def test_a_shard_whose_records_were_all_skipped_is_written_empty(tmp_path, tiny_tokenizer, preprocess_tool):
    """With --skip-bad, a task whose part of the inputs holds only bad records writes an empty shard that counts
    them, so the folder reads as the single run over the same inputs (which skips them too); before, that task
    failed on every rerun and the folder never opened."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.jsonl").write_text("".join(json.dumps({"text": f"good document {i}"}) + "\n" for i in range(50)))
    (inputs / "b.jsonl").write_text("".join(json.dumps({"text": "   " * 12}) + "\n" for _ in range(50)))
    common = ["--input", str(inputs), "--tokenizer", tiny_tokenizer, "--no-progress", "--workers", "1", "--skip-bad"]
    assert preprocess_tool.main(common + ["--output-prefix", str(tmp_path / "whole")]) == 0
    for i in range(2):
        assert preprocess_tool.main(common + ["--output-prefix", str(tmp_path / "sharded"), "--shard", f"{i}/2"]) == 0
    whole, sharded = open_store(tmp_path / "whole"), open_store(tmp_path / "sharded")
    assert [p.num_documents for p in sharded.parts] == [50, 0]
    assert np.array_equal(sharded.tokens(0, sharded.num_tokens), whole.tokens(0, whole.num_tokens))
    sidecars = sorted((tmp_path / "sharded").glob("*.json"))
    skipped = [json.loads(p.read_text()).get("skipped", {}).get("total") for p in sidecars]
    assert sum(skipped) == 50, skipped  # each task counts the bad records of its own byte range
    assert sharded.metadata["skipped"]["total"] == 50
    nulled = json.loads(sidecars[-1].read_text())  # a count the sidecar may leave out (null): the rest still add up
    sidecars[-1].write_text(json.dumps({**nulled, "skipped": {**nulled["skipped"], "total": None}}))
    assert open_store(tmp_path / "sharded").metadata["skipped"]["total"] == sum(skipped[:-1])


def test_a_failed_task_of_an_array_leaves_the_shared_output_folder(tmp_path, tiny_tokenizer, preprocess_tool, capsys):
    """A --shard task of several that fails (a bad record) leaves the --output-prefix folders it made: its sibling
    tasks, started at the same time, write into them, and removing one between a sibling's mkdir and its first file
    would fail that sibling. A single task (--shard 0/1) has no siblings: its failure removes them, as a run's."""
    src = tmp_path / "bad.jsonl"
    src.write_text("".join("{not json}\n" for _ in range(40)))
    common = ["--input", str(src), "--tokenizer", tiny_tokenizer, "--no-progress", "--workers", "1"]
    assert preprocess_tool.main(common + ["--output-prefix", str(tmp_path / "new" / "sharded"), "--shard", "0/2"]) == 2
    assert "bad.jsonl:1: invalid JSON" in capsys.readouterr().err
    assert (tmp_path / "new" / "sharded").is_dir() and list((tmp_path / "new" / "sharded").iterdir()) == []
    assert preprocess_tool.main(common + ["--output-prefix", str(tmp_path / "alone" / "sharded"),
                                          "--shard", "0/1"]) == 2
    assert "bad.jsonl:1: invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "alone").exists()


def test_a_shard_that_skipped_bad_records_is_complete_only_for_a_rerun_with_skip_bad(tmp_path, tiny_tokenizer,
                                                                                   preprocess_tool, capsys):
    """A rerun task finds its shard complete when it would write the same shard: one that --skip-bad wrote past a bad
    record is not what a task without --skip-bad writes (that task stops at the record), so such a task is refused,
    saying why, instead of succeeding on it; a shard with nothing skipped is complete either way."""
    corpus = write_corpus(tmp_path / "corpus")
    first = sorted(corpus.rglob("*.jsonl"))[0]  # in shard 0 of 2
    first.write_text(first.read_text() + "{not json\n")
    common = ["--input", str(corpus), "--tokenizer", tiny_tokenizer, "--no-progress", "--workers", "1",
              "--output-prefix", str(tmp_path / "sharded")]
    assert preprocess_tool.main(common + ["--shard", "0/2", "--skip-bad"]) == 0
    assert preprocess_tool.main(common + ["--shard", "1/2"]) == 0
    assert open_store(tmp_path / "sharded" / shard_name(0, 2)).metadata["skipped"]["total"] == 1
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "sharded").iterdir()}
    capsys.readouterr()
    assert preprocess_tool.main(common + ["--shard", "0/2", "--skip-bad"]) == 0
    assert "this shard is already complete" in capsys.readouterr().err
    assert preprocess_tool.main(common + ["--shard", "1/2", "--skip-bad"]) == 0  # nothing skipped: the same shard
    assert "this shard is already complete" in capsys.readouterr().err
    assert preprocess_tool.main(common + ["--shard", "0/2"]) == 2
    prefix = tmp_path / "sharded" / shard_name(0, 2)
    assert capsys.readouterr().err.strip() == (
        f"error: --output-prefix {tmp_path / 'sharded'}: {prefix} was written with --skip-bad, which skipped 1 bad "
        "record; without --skip-bad this task stops at it: pass --skip-bad to keep that shard, or --overwrite "
        "(slurm/preprocess.sh: EXTRA_ARGS) to write it again")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "sharded").iterdir()} == written


def test_the_array_script_reads_a_shard_count_with_a_leading_zero_as_decimal(tmp_path):
    """slurm/preprocess.sh with SHARDS=08 and task 8 (run by bash as Slurm would, outside a job: its checks come
    before any Slurm command): bash arithmetic read 08 as octal and printed "value too great for base" above the
    error line. Now one line, counted in decimal."""
    import subprocess
    env = {**os.environ, "SHARDS": "08", "SLURM_ARRAY_TASK_ID": "8", "INPUT": str(tmp_path), "TOKENIZER": "t.json",
           "OUTPUT": str(tmp_path / "out"), "NANOTRONIX_DIR": str(ROOT)}
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "preprocess.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert (proc.returncode, proc.stdout + proc.stderr) == (
        2, "error: array task 8 is not a shard of 8: give --array within 0-7\n"), proc
