"""The input side of the data path (preprocess, stores, loaders) in cases a mutation review found untested. Each
compares the stored tokens with a reference written plainly here: the `tokenizers` library encoding the same text
directly, plus the EOS id the tokenizer itself names."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nanotronix.data import open_store


def _encode(tok_file: str, texts: list[str], eos: str = "<|endoftext|>") -> list[list[int]]:
    from tokenizers import Tokenizer
    t = Tokenizer.from_file(tok_file)
    return [t.encode(x, add_special_tokens=False).ids + [t.token_to_id(eos)] for x in texts]


def _docs(prefix) -> list[list[int]]:
    store = open_store(prefix)
    return [store.document(i).tolist() for i in range(store.num_documents)]


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


TEXTS = ["The quick brown fox.", "def add(a, b):\n    return a + b\n", "caf\u00e9 \u65e5\u672c jumps over"]
OTHER = ["a different field entirely", "never stored", "not this one either"]


def test_text_key_selects_that_field_in_json_lines_and_parquet(tmp_path, tiny_tokenizer, preprocess_tool):
    """--text-key content stores each record's "content", even where the record also has a "text" field (a corpus
    with both: a raw and a cleaned copy); no other test passes a non-default --text-key, so a reader that took
    "text" whenever present, or read the default column, went unseen."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    src = tmp_path / "src"
    src.mkdir()
    _jsonl(src / "a.jsonl", [{"text": o, "content": t} for t, o in zip(TEXTS, OTHER)])
    pq.write_table(pa.table({"text": OTHER, "content": TEXTS[::-1]}), src / "b.parquet")
    assert preprocess_tool.main(["--input", str(src), "--tokenizer", tiny_tokenizer, "--output-prefix",
                                 str(tmp_path / "out"), "--text-key", "content", "--workers", "1",
                                 "--no-progress"]) == 0
    assert _docs(tmp_path / "out") == _encode(tiny_tokenizer, TEXTS + TEXTS[::-1])
    assert open_store(tmp_path / "out").metadata["text_key"] == "content"


def test_the_eos_appended_is_the_tokenizers_own_not_id_0(tmp_path):
    """Every document ends with the id the tokenizer gives its end-of-document token. The shared tiny tokenizer and
    SmolLM2 both have <|endoftext|> at id 0, so an encoder that appended 0 (or the dtype's zero) passed every other
    test; Llama-style tokenizers have it elsewhere (</s> = 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from helpers import CORPUS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    assert tok.token_to_id("</s>") == 2
    _jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    from nanotronix.data import PreprocessOptions, preprocess
    for workers in (1, 2):
        prefix = tmp_path / f"out{workers}"
        preprocess(PreprocessOptions([str(tmp_path / "in.jsonl")], str(tmp_path / "tokenizer.json"), str(prefix),
                                     workers=workers, progress=False, chunk_bytes=16))
        assert _docs(prefix) == _encode(str(tmp_path / "tokenizer.json"), TEXTS, eos="</s>")
        assert open_store(prefix).metadata["tokenizer"]["eos_id"] == 2


def test_sharded_read_windows_at_every_start_and_width_equals_the_stream(tmp_path):
    """ConcatenatedStore.read_windows (a folder of shards) against the parts' documents joined plainly, for every
    start and width: the property test draws random starts and missed the one window whose last token is the
    first token of the next part (it must be pieced from both parts, not read from the first past its end)."""
    from helpers import write_megatron
    from nanotronix.data.sharded_store import shard_name
    rng = np.random.default_rng(0)
    parts = [[rng.integers(1, 500, n).astype(np.uint16) for n in sizes] for sizes in ([3, 4], [5], [2, 6])]
    for i, docs in enumerate(parts):
        write_megatron(tmp_path / "shards" / shard_name(i, len(parts)), docs, np.uint16)
    stream = np.concatenate([d for docs in parts for d in docs]).astype(np.int64)
    store = open_store(tmp_path / "shards")
    for width in range(1, 9):
        starts = np.arange(len(stream) - width + 1)
        out = np.full((len(starts), width), -1, np.int64)
        top = store.read_windows(out, np.arange(len(starts)), starts)
        expected = np.stack([stream[s:s + width] for s in starts])
        assert np.array_equal(out, expected), width
        assert top == int(expected.max())


def _write_datatrove_plainly(path: Path, docs: list[np.ndarray]) -> None:
    """datatrove's layout written by hand: NAME.ds uint16 tokens, NAME.ds.index uint64 exclusive ends, no header."""
    np.concatenate(docs).astype("<u2").tofile(path)
    np.cumsum([len(d) for d in docs]).astype("<u8").tofile(f"{path}.index")


@pytest.mark.parametrize("fmt", ["zarr", "datatrove"])
def test_document_lengths_of_any_range_and_windows_at_every_start(tmp_path, fmt):
    """document_lengths(start, stop) for every range, document(i) and read_windows at every start of zarr and
    datatrove stores, against the documents they were written from: the sampler reads lengths in ranges that do
    not start at 0, and a range read from ends[start] (not ends[start - 1]) gives one length too few, shifted."""
    rng = np.random.default_rng(1)
    docs = [rng.integers(1, 60000, n).astype(np.uint16) for n in (3, 1, 7, 2, 5, 4)]
    if fmt == "zarr":
        pytest.importorskip("zarr")
        from nanotronix.data.zarr_store import ZarrWriter
        writer = ZarrWriter(str(tmp_path / "s.zarr"), np.uint16)
        for d in docs:
            writer.add_documents(d, np.array([len(d)]))
        writer.finalize({})
        store = open_store(tmp_path / "s.zarr")
    else:
        _write_datatrove_plainly(tmp_path / "s.ds", docs)
        store = open_store(tmp_path / "s.ds")
    lengths = [len(d) for d in docs]
    for start in range(len(docs) + 1):
        for stop in range(start, len(docs) + 2):
            assert store.document_lengths(start, stop).tolist() == lengths[start:stop], (start, stop)
    for i, d in enumerate(docs):
        assert store.document(i).tolist() == d.tolist()
    stream = np.concatenate(docs).astype(np.int64)
    for width in (1, 4, 9):
        starts = np.arange(len(stream) - width + 1)
        out = np.full((len(starts), width), -1, np.int64)
        store.read_windows(out, np.arange(len(starts)), starts)
        assert np.array_equal(out, np.stack([stream[s:s + width] for s in starts])), width


def test_a_shard_written_from_another_text_key_is_not_taken_for_complete(tmp_path, tiny_tokenizer):
    """A resubmitted --shard task finds its shard already written and skips it only when it was written from the same
    inputs and settings: one written with --text-key text is not this task's with --text-key content (its tokens
    are of the other field), so the task refuses to replace it without --overwrite, and with --overwrite stores the
    content field."""
    from nanotronix.data import PreprocessOptions, preprocess
    from nanotronix.data.errors import DataError
    src = _jsonl(tmp_path / "in.jsonl", [{"text": o, "content": t} for t, o in zip(TEXTS, OTHER)])
    out = tmp_path / "shards"

    def run(key, **kw):
        return preprocess(PreprocessOptions([str(src)], tiny_tokenizer, str(out), text_key=key, shard=(0, 1),
                                            progress=False, **kw))

    assert run("text").written
    assert not run("text").written  # the very same shard: already complete
    with pytest.raises(DataError, match="already exists"):
        run("content")
    assert run("content", overwrite=True).written
    assert _docs(out) == _encode(tiny_tokenizer, TEXTS)


def _bpe_with_specials(folder: Path, specials: list[str]) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from helpers import CORPUS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


@pytest.mark.parametrize("named", ["<|im_end|>", {"content": "<|im_end|>", "lstrip": False, "normalized": False,
                                                 "rstrip": False, "single_word": False, "__type": "AddedToken"}])
def test_the_eos_token_named_by_tokenizer_config_ends_each_document(tmp_path, named):
    """A tokenizer without <|endoftext|> whose tokenizer_config.json names its EOS (a plain string, or the AddedToken
    dict older transformers saved) ends documents with that token, not with the first of the usual candidates it
    also holds (</s> here): nothing else tests the config's name, in either form."""
    from nanotronix.data import PreprocessOptions, load_tokenizer, preprocess
    file = _bpe_with_specials(tmp_path / "tok", ["<unk>", "<s>", "</s>", "<|im_end|>"])
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": named}))
    _, info = load_tokenizer(str(tmp_path / "tok"))
    assert (info.eos_token, info.eos_id) == ("<|im_end|>", 3)
    _jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    preprocess(PreprocessOptions([str(tmp_path / "in.jsonl")], str(tmp_path / "tok"), str(tmp_path / "out"),
                                 progress=False))
    assert _docs(tmp_path / "out") == _encode(str(file), TEXTS, eos="<|im_end|>")


def test_a_commit_whose_rename_fails_puts_the_older_folder_back(tmp_path, monkeypatch):
    """commit() renames an older folder at `final` aside before renaming the new one in; when that second rename fails
    (an error, or Ctrl-C between the two), the older folder must be back at `final`, whole: otherwise a store that
    --overwrite was replacing is gone with no new one in its place. test_durable_outputs.py never fails the rename."""
    import os
    from nanotronix.data import files
    final, temp = tmp_path / "s.zarr", tmp_path / ".s.zarr.tmp"
    (final / "c").mkdir(parents=True)
    (final / "c" / "0").write_bytes(b"old chunk")
    (temp / "c").mkdir(parents=True)
    (temp / "c" / "0").write_bytes(b"new chunk")
    real = os.replace

    def replace(src, dst):
        if Path(src) == temp:
            raise KeyboardInterrupt  # stopped between the two renames
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        files.commit(temp, final)
    monkeypatch.undo()
    assert (final / "c" / "0").read_bytes() == b"old chunk"
    assert (temp / "c" / "0").read_bytes() == b"new chunk"  # left for the writer's abort()


def test_train_tokenizer_learns_from_the_text_key_field(tmp_path, capsys):
    """tools/train_tokenizer.py --text-key content trains on each record's "content": a word that only that field holds,
    many times, becomes a token of the vocabulary, and a word only in the other field does not. No other test passes
    --text-key to it."""
    from tokenizers import Tokenizer
    from helpers import load_tool
    records = [{"content": "quokka " * 50 + f"line {i}", "text": "zebrafinch " * 50} for i in range(40)]
    _jsonl(tmp_path / "in.jsonl", records)
    assert load_tool("train_tokenizer").main(["--input", str(tmp_path / "in.jsonl"), "--output",
                                              str(tmp_path / "tok.json"), "--vocab-size", "300",
                                              "--text-key", "content"]) == 0, capsys.readouterr().err
    vocab = Tokenizer.from_file(str(tmp_path / "tok.json")).get_vocab()
    assert "Ġquokka" in vocab and not any("zebra" in token for token in vocab)


def test_a_tokenizer_that_adds_bos_on_encode_stores_no_bos(tmp_path):
    """A tokenizer.json whose post-processor puts <s> before every encoding (Llama-style TemplateProcessing): preprocess
    stores the text's own ids and EOS, as Megatron's preprocess_data does (documents are separated by EOS alone), not
    a BOS per document. The shared tiny tokenizer and SmolLM2's have no post-processor, so an encoder that let the
    tokenizer add its special tokens passed every other test."""
    from tokenizers import Tokenizer, processors
    from nanotronix.data import PreprocessOptions, preprocess
    file = _bpe_with_specials(tmp_path / "tok", ["<|endoftext|>", "<s>"])
    tok = Tokenizer.from_file(str(file))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(file))
    assert Tokenizer.from_file(str(file)).encode("x").ids[0] == 1  # the file does add BOS when asked to
    _jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    preprocess(PreprocessOptions([str(tmp_path / "in.jsonl")], str(file), str(tmp_path / "out"), progress=False))
    assert _docs(tmp_path / "out") == _encode(str(file), TEXTS)


def test_a_long_document_with_long_runs_of_spaces_keeps_the_ids_of_encoding_it_whole(tmp_path, monkeypatch,
                                                                                       smollm2_tokenizer_path):
    """A document longer than LONG_TEXT_CHARS (made 1,500 here) is cut only at a single space between two words: a cut
    inside a run of spaces longer than the window the cut is checked on passes that check (the window is all
    spaces either way) yet changes how SmolLM2's tokenizer splits the run, so the stored ids would differ from
    encoding the text whole. tests/test_preprocess.py's long texts have no such run."""
    from nanotronix.data import PreprocessOptions, encode, preprocess
    monkeypatch.setattr(encode, "LONG_TEXT_CHARS", 1500)
    texts = ["word " * (off // 5) + " " * run + "tail words here " * 200
             for run in (300, 600, 1000, 1400) for off in (100, 700, 1200)]
    _jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    preprocess(PreprocessOptions([str(tmp_path / "in.jsonl")], smollm2_tokenizer_path, str(tmp_path / "out"),
                                 progress=False))
    assert _docs(tmp_path / "out") == _encode(smollm2_tokenizer_path, texts)
