"""tools/preprocess.py: every input format, every bad-record kind with and without --skip-bad, identical output for any
worker count, one-line errors. Reference: direct `tokenizers` encoding + EOS. A failed or stopped run (atomic
outputs, no workers left): tests/test_preprocess_failures.py. ~5 s (two spawn runs of 2 and 4 workers and three
subprocess runs; the rest in-process)."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from nanotronix.data import open_store
from helpers import load_tool
from test_data_support import run_tool

TEXTS = ["The quick brown fox.", "def add(a, b):\n    return a + b\n", "caf\u00e9 \u65e5\u672c", "jumps " * 200]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


def _reference(tok: str, texts: list[str]) -> list[list[int]]:
    from tokenizers import Tokenizer
    t = Tokenizer.from_file(tok)
    return [t.encode(x, add_special_tokens=False).ids + [0] for x in texts]


def _docs(prefix) -> list[list[int]]:
    """Documents via one stream read split by the document lengths (per-document zarr reads are slow)."""
    store = open_store(prefix)
    ends = np.cumsum(store.document_lengths())
    assert store.document(store.num_documents - 1).tolist() == store.tokens(int(ends[-2]) if len(ends) > 1 else 0,
                                                                            int(store.document_lengths()[-1])).tolist()
    return [d.tolist() for d in np.split(store.tokens(0, store.num_tokens), ends[:-1])]


def _jsonl(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def _outputs(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("out", ".out")))


def test_all_input_formats_match_direct_tokenisation(tmp_path, tok, preprocess_tool):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    records = [json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS)]
    _jsonl(src / "a.jsonl", records[:2])
    with gzip.open(src / "b.jsonl.gz", "wb") as f:
        f.write(("\n".join(records[2:]) + "\n").encode())
    (src / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(("\n".join(records) + "\n").encode()))
    pq.write_table(pa.table({"text": TEXTS[::-1], "n": list(range(4))}), src / "d.parquet", row_group_size=2)
    (src / "sub" / "e.md").write_text(TEXTS[0])
    (src / "sub" / "f.py").write_text(TEXTS[1])
    (src / ".hidden.txt").write_text("not read")
    (src / "notes.bin").write_bytes(b"\x00")  # unsupported suffix inside a folder: ignored
    assert preprocess_tool.main(["--input", str(src), "--tokenizer", tok, "--output-prefix", str(tmp_path / "out"),
                                 "--workers", "1", "--no-progress"]) == 0
    expected = _reference(tok, TEXTS[:2] + TEXTS[2:] + TEXTS + TEXTS[::-1] + TEXTS[0:1] + TEXTS[1:2])
    assert _docs(tmp_path / "out") == expected
    meta = open_store(tmp_path / "out").metadata
    assert [Path(i["path"]).name for i in meta["inputs"]] == ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet",
                                                              "e.md", "f.py"]
    assert [i["documents"] for i in meta["inputs"]] == [2, 2, 4, 4, 1, 1]
    assert sum(i["tokens"] for i in meta["inputs"]) == meta["num_tokens"] == sum(map(len, expected))
    assert meta["num_documents"] == 14 and meta["skipped"]["total"] == 0 and meta["eos_appended"]
    assert meta["tokenizer"]["eos_id"] == 0 and len(meta["tokenizer"]["sha256"]) == 64
    assert _outputs(tmp_path) == ["out.bin", "out.idx", "out.meta.json"]


BAD_JSONL = [
    (json.dumps({"text": "good one"}), None),
    (b'{"text": "bad \xff utf8"}', "invalid UTF-8"),
    ('{"text": "truncated', "invalid JSON"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({"content": "x"}), "missing text key ('text'; its keys: 'content'; --text-key names another)"),
    (json.dumps({"text": 42}), "text not a string"),
    (json.dumps({"text": "  \n "}), "empty text"),
    ('{"text": "lone \\ud800 surrogate"}', "invalid UTF-8"),
    ("", None),  # blank line: not a record
    (json.dumps({"text": "good two"}), None),
]


@pytest.mark.parametrize("bad", range(1, 8))
def test_each_bad_record_stops_the_run_with_file_line_and_reason(tmp_path, tok, preprocess_tool, capsys, bad):
    lines = [BAD_JSONL[0][0], BAD_JSONL[bad][0], BAD_JSONL[-1][0]]
    src = _jsonl(tmp_path / "in.jsonl", lines)
    code = preprocess_tool.main(["--input", str(src), "--tokenizer", tok, "--output-prefix", str(tmp_path / "out"),
                                 "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith(f"error: {src}:2: {BAD_JSONL[bad][1]}") and "\n" not in err
    assert _outputs(tmp_path) == [], "a failed run must leave nothing behind"


def test_skip_bad_counts_every_reason_and_keeps_every_good_record(tmp_path, tok, preprocess_tool, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    src = _jsonl(tmp_path / "in.jsonl", [x for x, _ in BAD_JSONL])
    (tmp_path / "bad.txt").write_bytes(b"text file \xfe\xff not utf-8")
    (tmp_path / "empty.txt").write_text("")
    pq.write_table(pa.table({"text": ["good three", None, ""]}), tmp_path / "p.parquet")
    pq.write_table(pa.table({"body": ["no text column"]}), tmp_path / "q.parquet")
    inputs = [str(src), str(tmp_path / "bad.txt"), str(tmp_path / "empty.txt"), str(tmp_path / "p.parquet"),
              str(tmp_path / "q.parquet")]
    assert preprocess_tool.main(["--input", *inputs, "--tokenizer", tok, "--output-prefix", str(tmp_path / "out"),
                                 "--workers", "1", "--skip-bad", "--no-progress"]) == 0
    summary = capsys.readouterr().out
    assert _docs(tmp_path / "out") == _reference(tok, ["good one", "good two", "good three"])
    skipped = open_store(tmp_path / "out").metadata["skipped"]
    assert skipped["reasons"] == {"invalid UTF-8": 3, "invalid JSON": 1, "not a JSON object": 1,
                                  "missing text key": 2, "text not a string": 2, "empty text": 3}
    assert skipped["total"] == 12 and f"{src}:3: invalid JSON" in skipped["examples"]
    assert f"{tmp_path / 'p.parquet'}:2: text not a string" in skipped["examples"]
    assert "skipped 12 bad records" in summary and "invalid JSON: 1" in summary
    one = _jsonl(tmp_path / "one.jsonl", [json.dumps({"text": "good"}), json.dumps({"text": 1})])
    assert preprocess_tool.main(["--input", str(one), "--tokenizer", tok, "--output-prefix", str(tmp_path / "one"),
                                 "--skip-bad", "--no-progress"]) == 0
    assert "skipped 1 bad record (text not a string: 1)" in capsys.readouterr().out
    # without --skip-bad, a Parquet file without the text column names its columns, as a JSON line its keys
    assert preprocess_tool.main(["--input", str(tmp_path / "q.parquet"), "--tokenizer", tok, "--output-prefix",
                                 str(tmp_path / "q"), "--workers", "2", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'q.parquet'}:1: missing text key ('text'; its " \
        "columns: 'body'; --text-key names another) (use --skip-bad to skip bad records)"


def test_workers_give_identical_bytes_and_zarr_format(tmp_path, tok, preprocess_tool):
    lines = [json.dumps({"text": f"document {i} " + TEXTS[i % 3] * (i % 5 + 1)}) for i in range(1500)]
    src = _jsonl(tmp_path / "in.jsonl", lines)
    args = ["--input", str(src), "--tokenizer", tok, "--no-progress"]
    assert preprocess_tool.main(args + ["--output-prefix", str(tmp_path / "one"), "--workers", "1"]) == 0
    from nanotronix.data import PreprocessOptions, preprocess
    # small chunks so that every worker gets many chunks and results arrive out of order: 2 threads; 3
    # forked processes of one thread; 2 forked processes of 2 threads (groups of chunks)
    layouts = {"threads": (2, 8), "processes": (3, 1), "mixed": (3, 2)}
    for name, (workers, per_process) in layouts.items():
        preprocess(PreprocessOptions([str(src)], tok, str(tmp_path / name), workers=workers, progress=False,
                                     chunk_bytes=2048, threads_per_process=per_process))
    # the spawn path (platforms without fork): workers load the tokenizer file themselves
    import multiprocessing
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
        preprocess(PreprocessOptions([str(src)], tok, str(tmp_path / "spawned"), workers=4, progress=False,
                                     chunk_bytes=8192, threads_per_process=2))
    for ext in ("bin", "idx"):
        for name in [*layouts, "spawned"]:
            assert (tmp_path / f"one.{ext}").read_bytes() == (tmp_path / f"{name}.{ext}").read_bytes(), name
    assert preprocess_tool.main(args + ["--output-prefix", str(tmp_path / "z"), "--workers", "1",
                                        "--format", "zarr"]) == 0
    assert _docs(tmp_path / "z.zarr") == _docs(tmp_path / "one")


def test_a_tokenizer_json_holding_truncation_and_padding_stores_each_document_whole(tmp_path, tok, preprocess_tool,
                                                                                     monkeypatch):
    """A tokenizer.json saved by transformers after a call with truncation=True or padding holds them, and tokenizers
    applies them to every encode: such a store held each document cut at 8 tokens, or padded to the batch's longest
    with the pad token, and said nothing. Now the ids of the same tokenizer.json without them (the reference: the
    file they were added to), in this process and in spawned workers (which load the file themselves)."""
    from tokenizers import Tokenizer
    import multiprocessing
    src = _jsonl(tmp_path / "in.jsonl", [json.dumps({"text": t}) for t in TEXTS])
    for setting in ("truncation", "padding"):
        edited = Tokenizer.from_file(tok)
        edited.enable_truncation(max_length=8) if setting == "truncation" else edited.enable_padding(pad_id=0)
        edited.save(str(tmp_path / f"{setting}.json"))
        assert preprocess_tool.main(["--input", str(src), "--tokenizer", str(tmp_path / f"{setting}.json"),
                                     "--output-prefix", str(tmp_path / setting), "--no-progress"]) == 0
        assert _docs(tmp_path / setting) == _reference(tok, TEXTS), setting
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    from nanotronix.data import PreprocessOptions, preprocess
    preprocess(PreprocessOptions([str(src)], str(tmp_path / "truncation.json"), str(tmp_path / "spawned"), workers=2,
                                 progress=False, chunk_bytes=64, threads_per_process=1))
    assert _docs(tmp_path / "spawned") == _reference(tok, TEXTS)


def test_cli_in_a_real_process_one_line_errors(tmp_path, tok):
    help_ = run_tool("preprocess.py", "--help")
    assert help_.returncode == 0 and "--output-prefix" in help_.stdout
    missing = run_tool("preprocess.py", "--input", str(tmp_path / "nope.jsonl"), "--tokenizer", tok,
                       "--output-prefix", str(tmp_path / "out"))
    assert missing.returncode != 0 and missing.stderr.strip() == f"error: input not found: {tmp_path / 'nope.jsonl'}"
    src = _jsonl(tmp_path / "in.jsonl", [json.dumps({"text": "x"})])
    bad_tok = run_tool("preprocess.py", "--input", str(src), "--tokenizer", str(tmp_path / "no" / "tokenizer.json"),
                       "--output-prefix", str(tmp_path / "new" / "out"))
    assert bad_tok.returncode != 0 and "tokenizer not found" in bad_tok.stderr
    assert not (tmp_path / "new").exists()  # the output folder is made once the tokenizer has loaded
    assert "Traceback" not in missing.stderr + bad_tok.stderr and len(bad_tok.stderr.strip().splitlines()) == 1


def test_unsupported_input_and_empty_result(tmp_path, tok, preprocess_tool, capsys):
    (tmp_path / "x.csv").write_text("a,b")
    assert preprocess_tool.main(["--input", str(tmp_path / "x.csv"), "--tokenizer", tok, "--output-prefix",
                                 str(tmp_path / "out"), "--workers", "1"]) != 0
    assert "unsupported file type" in capsys.readouterr().err
    src = _jsonl(tmp_path / "in.jsonl", [json.dumps({"text": ""})])
    assert preprocess_tool.main(["--input", str(src), "--tokenizer", tok, "--output-prefix", str(tmp_path / "out"),
                                 "--workers", "1", "--skip-bad", "--no-progress"]) != 0
    assert "no documents" in capsys.readouterr().err and _outputs(tmp_path) == []


def test_inputs_named_twice_and_url_outputs_are_refused(tmp_path, tok, preprocess_tool, capsys, monkeypatch):
    """A folder and a file inside it (or overlapping globs) would store that file's documents twice; a URL prefix
    would have been written as a local folder named 's3:' (preprocess writes local files): one line each, nothing
    written."""
    (tmp_path / "in").mkdir()
    src = _jsonl(tmp_path / "in" / "a.jsonl", [json.dumps({"text": "hello"})])
    out = ["--tokenizer", tok, "--workers", "1", "--no-progress"]
    assert preprocess_tool.main(["--input", str(tmp_path / "in"), str(src), *out,
                                 "--output-prefix", str(tmp_path / "out")]) == 2
    assert f"input {src} is named twice: its documents would be stored twice" in capsys.readouterr().err
    os.link(src, tmp_path / "in" / "hard_link.jsonl")  # one file under two names: a link copies nothing
    assert preprocess_tool.main(["--input", str(tmp_path / "in"), *out, "--output-prefix", str(tmp_path / "out")]) == 2
    assert f"(also as {src})" in capsys.readouterr().err
    os.unlink(tmp_path / "in" / "hard_link.jsonl")
    monkeypatch.chdir(tmp_path)
    assert preprocess_tool.main(["--input", str(src), *out, "--output-prefix", "s3://bucket/tokens"]) == 2
    assert "--output-prefix s3://bucket/tokens: preprocess writes local files" in capsys.readouterr().err
    assert _outputs(tmp_path) == [] and not (tmp_path / "s3:").exists()
    # an unset $INPUT ("") was the current folder, tokenized into a store that looked complete
    assert preprocess_tool.main(["--input", "", *out, "--output-prefix", str(tmp_path / "out")]) == 2
    assert "an input is empty (an unset variable?)" in capsys.readouterr().err
    # a negative seed failed in numpy only after the whole corpus was tokenized: refused up front
    with pytest.raises(SystemExit) as e:
        preprocess_tool.main(["--input", str(src), *out, "--output-prefix", str(tmp_path / "out"), "--shuffle", "-5"])
    assert e.value.code == 2 and "argument --shuffle: '-5' is not an integer >= 0" in capsys.readouterr().err
    assert _outputs(tmp_path) == []


def test_damaged_compressed_inputs_fail_cleanly_and_multi_frame_zstd_reads(tmp_path, tok, preprocess_tool, capsys):
    import zstandard
    body = ("\n".join(json.dumps({"text": f"line {i} " * 20}) for i in range(2000)) + "\n").encode()
    gz, zst = gzip.compress(body), zstandard.ZstdCompressor().compress(body)
    (tmp_path / "cut.jsonl.gz").write_bytes(gz[:len(gz) // 2])
    (tmp_path / "cut.jsonl.zst").write_bytes(zst[:len(zst) // 2])
    (tmp_path / "junk.jsonl.zst").write_bytes(b"this is not zstd")
    for name, why in (("cut.jsonl.gz", "EOFError"), ("cut.jsonl.zst", "truncated"), ("junk.jsonl.zst", "ZstdError")):
        assert preprocess_tool.main(["--input", str(tmp_path / name), "--tokenizer", tok, "--output-prefix",
                                     str(tmp_path / "out"), "--workers", "1", "--no-progress"]) != 0
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {tmp_path / name}:") and "cannot decompress" in err and why in err
        assert _outputs(tmp_path) == []
    c = zstandard.ZstdCompressor()
    (tmp_path / "multi.jsonl.zst").write_bytes(c.compress(b'{"text": "frame one"}\n')
                                               + c.compress(b'{"text": "two"}\n'))
    assert preprocess_tool.main(["--input", str(tmp_path / "multi.jsonl.zst"), "--tokenizer", tok, "--output-prefix",
                                 str(tmp_path / "out"), "--workers", "1", "--no-progress"]) == 0
    assert _docs(tmp_path / "out") == _reference(tok, ["frame one", "two"])


def test_a_damaged_parquet_page_is_named_by_file_and_row(tmp_path, tok, preprocess_tool, capsys):
    """A Parquet file whose footer reads but whose data pages are damaged fails while its rows are read: the line
    said only pyarrow's words ("Corrupt snappy compressed data"), naming no file among the thousands of an input
    folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "damaged.parquet"
    pq.write_table(pa.table({"text": [f"row {i} " * 30 for i in range(400)]}), path, row_group_size=100)
    data = bytearray(path.read_bytes())
    data[4:len(data) // 2] = bytes(b ^ 0x5A for b in data[4:len(data) // 2])  # the first groups' pages; not the footer
    path.write_bytes(bytes(data))
    assert preprocess_tool.main(["--input", str(path), "--tokenizer", tok, "--output-prefix", str(tmp_path / "out"),
                                 "--workers", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:1: cannot read the Parquet rows from here (") and err.count("\n") == 1, err
    assert _outputs(tmp_path) == []


def _sentencepiece_style_tokenizer(path: Path, prepend: bool) -> str:
    """A SentencePiece-style BPE: spaces become "▁" (Metaspace), and with `prepend` a normalizer puts one before the
    text as Llama-2's tokenizer.json does, so that a text cut before " word" would encode "▁▁word"."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from helpers import CORPUS
    t = Tokenizer(models.BPE())
    if prepend:
        t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never" if prepend else "always")
    t.train_from_iterator(CORPUS * 20, trainer=trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                                   show_progress=False))
    t.save(str(path))
    return str(path)


@pytest.mark.parametrize("which", ["byte_level", "smollm2", "metaspace", "prepended"])
def test_a_long_document_is_encoded_in_pieces_with_the_ids_of_encoding_it_whole(tmp_path, tok, preprocess_tool,
                                                                                monkeypatch, which, request):
    """Documents longer than LONG_TEXT_CHARS (made 1,500 here; 1 MiB in use) are encoded a piece at a time, so a
    worker's memory does not grow with the longest document, and give the ids `tokenizers` gives for the whole
    text: with the tiny byte-level BPE, the real SmolLM2 tokenizer, a Metaspace one, and one that puts "▁" before
    every text (which must not be cut)."""
    from nanotronix.data import encode
    from helpers import CORPUS
    if which == "smollm2":
        tok = request.getfixturevalue("smollm2_tokenizer_path")  # skips, saying so, where it is absent
    elif which != "byte_level":
        tok = _sentencepiece_style_tokenizer(tmp_path / f"{which}.json", prepend=which == "prepended")
    monkeypatch.setattr(encode, "LONG_TEXT_CHARS", 1500)
    long_text = "  ".join(f"{i}: {CORPUS[i % len(CORPUS)]}" for i in range(300))  # ~17k characters
    texts = ["short one", long_text, long_text[:1600], "x" * 4000 + " tail"]  # the third: one cut; the fourth: none
    src = _jsonl(tmp_path / "in.jsonl", [json.dumps({"text": t}) for t in texts])
    for workers in (1, 3):
        out = tmp_path / f"out{workers}"
        assert preprocess_tool.main(["--input", str(src), "--tokenizer", tok, "--output-prefix", str(out),
                                     "--no-progress", "--workers", str(workers)]) == 0
        assert _docs(out) == _reference(tok, texts), workers
    from tokenizers import Tokenizer
    encode.use_tokenizer(Tokenizer.from_file(tok), 0, np.int32)
    cut = encode._cut(long_text, 1500)
    assert (cut == len(long_text)) == (which == "prepended"), cut  # the check at the cut decides, not the name


def test_a_bom_json_arrays_and_files_a_folder_leaves_out_are_said(tmp_path, tok, preprocess_tool, capsys):
    """A byte-order mark before line 1 (some editors write one) is read past; a `.json` file holding one array says
    that JSON lines are read; a folder's files that are not read (an unsupported compression, a link to a folder)
    are named in a note, not dropped without a word."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": TEXTS[0]}).encode() + b"\n")
    (src / "b.jsonl.bz2").write_bytes(b"BZh9")
    (src / "linked").symlink_to(tmp_path)
    (src / ".hidden.jsonl").write_text("not read, not said\n")
    assert preprocess_tool.main(["--input", str(src), "--tokenizer", tok, "--output-prefix", str(tmp_path / "out"),
                                 "--no-progress", "--workers", "1"]) == 0
    assert _docs(tmp_path / "out") == _reference(tok, TEXTS[:1])
    err = capsys.readouterr().err
    assert f"note: input folder {src}: 2 entries not read (not a supported file type, a token store's file, or a " \
           "link to a folder): b.jsonl.bz2, linked" in err, err
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"text": "x"}]))
    assert preprocess_tool.main(["--input", str(array), "--tokenizer", tok, "--output-prefix", str(tmp_path / "arr"),
                                 "--no-progress"]) == 2
    assert "not a JSON object (list; JSON lines are read: one object per line)" in capsys.readouterr().err


def test_stores_written_into_an_input_folder_are_not_read_as_input(tmp_path, tok, preprocess_tool, capsys):
    """`--input data --output-prefix data/tokens`, then any run over `data` again (a rerun with --overwrite, another
    tokenizer, train_tokenizer): the stores' JSON (a sidecar, a shard's, a zarr store's zarr.json) is no text, and
    stopped those runs at `tokens.meta.json:1: invalid JSON`."""
    src = tmp_path / "data"
    src.mkdir()
    _jsonl(src / "a.jsonl", [json.dumps({"text": t}) for t in TEXTS[:2]])
    (src / "b.md").write_text(TEXTS[2])
    expected = _reference(tok, [*TEXTS[:2], TEXTS[2]])
    runs = [["--output-prefix", str(src / "tokens")], ["--output-prefix", str(src / "z"), "--format", "zarr"],
            ["--output-prefix", str(src / "sharded"), "--shard", "0/1"], ["--output-prefix", str(src / "tokens"),
                                                                        "--overwrite"]]
    for args in runs:
        assert preprocess_tool.main(["--input", str(src), "--tokenizer", tok, *args, "--no-progress",
                                     "--workers", "1"]) == 0, capsys.readouterr().err
        assert _docs(src / "tokens") == expected
    assert _docs(src / "z") == expected and _docs(src / "sharded") == expected
    assert "a token store's file" in capsys.readouterr().err  # said in the note, as what is not read
    train_tokenizer = load_tool("train_tokenizer")
    assert train_tokenizer.main(["--input", str(src), "--output", str(tmp_path / "tok.json"),
                                 "--vocab-size", "300"]) == 0, capsys.readouterr().err


def test_a_record_nested_deeper_than_the_json_reader_recurses_is_a_bad_record(tmp_path, tok, preprocess_tool, capsys):
    """A JSON line nested 100,000 deep (a crawler's runaway metadata field) makes Python's JSON reader raise
    RecursionError, not ValueError: it ended preprocess with a traceback (exit 1), --skip-bad or not, and
    train_tokenizer too. It is invalid JSON to this reader: one line naming FILE:line, or skipped and counted."""
    deep = '{"text": "deep", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}"
    src = _jsonl(tmp_path / "in.jsonl", [json.dumps({"text": TEXTS[0]}), deep, json.dumps({"text": TEXTS[1]})])
    args = ["--input", str(src), "--tokenizer", tok, "--no-progress"]
    for workers in ("1", "2"):
        assert preprocess_tool.main(args + ["--output-prefix", str(tmp_path / "out"), "--workers", workers]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {src}:2: invalid JSON (") and err.count("\n") == 1, err
        assert _outputs(tmp_path) == []
    assert preprocess_tool.main(args + ["--output-prefix", str(tmp_path / "out"), "--skip-bad"]) == 0
    assert _docs(tmp_path / "out") == _reference(tok, TEXTS[:2])
    assert open_store(tmp_path / "out").metadata["skipped"]["reasons"] == {"invalid JSON": 1}
    train_tokenizer = load_tool("train_tokenizer")
    assert train_tokenizer.main(["--input", str(src), "--output", str(tmp_path / "tok.json")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {src}:2: invalid JSON (")


def test_a_byte_order_mark_at_the_start_of_a_text_file_is_no_text_as_in_json_lines(tmp_path, tok, preprocess_tool):
    """A UTF-8 byte-order mark that an editor put at the start of a text file is read past, as one before a JSON line
    is (it was tokenized into the document's first tokens); one inside the text is the text's and stays."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_bytes(b"\xef\xbb\xbf" + TEXTS[0].encode())
    (src / "b.md").write_text(TEXTS[0] + "\ufeff" + TEXTS[1], encoding="utf-8")
    _jsonl(src / "c.jsonl", [b"\xef\xbb\xbf" + json.dumps({"text": TEXTS[0]}).encode()])
    assert preprocess_tool.main(["--input", str(src), "--tokenizer", tok, "--output-prefix", str(tmp_path / "out"),
                                 "--no-progress", "--workers", "1"]) == 0
    assert _docs(tmp_path / "out") == _reference(tok, [TEXTS[0], TEXTS[0] + "\ufeff" + TEXTS[1], TEXTS[0]])
