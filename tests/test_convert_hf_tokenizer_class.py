"""The Hugging Face export ships a tokenizer folder only where transformers' AutoTokenizer, loading it, tokenizes text
as its tokenizer.json does (README, Checkpoints and Hugging Face): a tokenizer_class that transformers 5 rebuilds from
tokenizer.json's vocabulary and merges with a pipeline of its own (GPT2Tokenizer) is refused where that pipeline
differs (a Lowercase normalizer; SmolLM2's digit splitting), with the fix; PreTrainedTokenizerFast, which loads
tokenizer.json whole, is shipped. Against AutoTokenizer of the source folder and `tokenizers` itself."""
from __future__ import annotations

import dataclasses
import base64
import inspect
import json
import shutil
import sys
from pathlib import Path

import pytest
import transformers
from tokenizers import Tokenizer, normalizers

from checkpoint_helpers import TINY
from convert_hf_helpers import WITH_BYTES, byte_tokenizer, cli, trained_checkpoint

from nanotronix.checkpoint.hf_export import export_to_hf
from nanotronix.errors import UserError

FIX = "name PreTrainedTokenizerFast as tokenizer_class in tokenizer_config.json to load tokenizer.json whole"
CODE = inspect.getsource(base64)  # real text: code, prose in docstrings, whitespace runs, digits


def with_config(folder: Path, tokenizer_class: str, **fields) -> Path:
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": tokenizer_class, **fields}))
    return folder


def same_ids(folder: Path, texts: list[str]) -> bool:
    """AutoTokenizer of FOLDER gives its tokenizer.json's ids for each of TEXTS (no special tokens added)."""
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return all(auto(t, add_special_tokens=False)["input_ids"] == reference.encode(t, add_special_tokens=False).ids
               for t in texts)


@pytest.fixture(scope="module")
def lowercasing(tmp_path_factory) -> Path:
    """The tiny byte tokenizer given a Lowercase normalizer: tokenizer.json lowercases, GPT2Tokenizer's rebuild does
    not."""
    folder = tmp_path_factory.mktemp("lowercasing")
    tok = Tokenizer.from_file(str(byte_tokenizer(folder)))
    tok.normalizer = normalizers.Lowercase()
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return trained_checkpoint(tmp_path_factory.mktemp("run") / "run", cfg=WITH_BYTES)[0].parent


def test_a_tokenizer_class_that_tokenizes_otherwise_is_refused(lowercasing, run, tmp_path):
    """A tokenizer_config.json naming GPT2Tokenizer beside a lowercasing tokenizer.json: transformers builds
    GPT2Tokenizer from the vocabulary alone, so the export loaded in transformers but tokenized "The" otherwise than the
    store; it said it succeeded. Now one line naming the file, the class, the text and the fix, and no folder."""
    folder = with_config(lowercasing, "GPT2Tokenizer", eos_token="<|endoftext|>")
    assert not same_ids(folder, ["The Fox"])  # the reference: AutoTokenizer of the source folder
    proc = cli("convert_to_hf.py", "--checkpoint", str(run), "--output", str(tmp_path / "hf"), "--tokenizer",
               str(folder), "--no-progress")
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert err[0].startswith(f'error: {folder / "tokenizer_config.json"}: tokenizer_class "GPT2Tokenizer", which '
                             f"transformers {transformers.__version__} builds as GPT2Tokenizer, tokenizes text "
                             'otherwise than its tokenizer.json (first "') and err[0].endswith(f"): {FIX}"), err
    assert not (tmp_path / "hf").exists() and not list(tmp_path.iterdir())


def test_the_runs_own_tokenizer_that_tokenizes_otherwise_is_left_out(lowercasing, tmp_path):
    """The run's data.tokenizer refused so is left out with a warning, as the export's other refusals of it are, and
    config.json's ids say they were defaulted."""
    folder = with_config(lowercasing, "GPT2Tokenizer", eos_token="<|endoftext|>")
    trained_checkpoint(tmp_path / "run", cfg=WITH_BYTES, config={"data": {"tokenizer": str(folder)}})
    said = []
    out = export_to_hf(tmp_path / "run", tmp_path / "hf", progress=False, log=said.append)
    assert not any((out / name).exists() for name in ("tokenizer.json", "tokenizer_config.json"))
    assert said[0].startswith("warning: tokenizer files not written (") and FIX in said[0], said
    assert said[1].startswith("warning: no tokenizer, so bos_token_id and eos_token_id in config.json are set to 0")
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 0


def test_pretrained_tokenizer_fast_loads_tokenizer_json_whole(lowercasing, run, tmp_path):
    """The same folder naming PreTrainedTokenizerFast is shipped, the command saying nothing more (transformers
    neither: its load and the probes print nothing, even with a model_max_length shorter than the probes, which it
    warns about when tokenizing), and tokenizes as tokenizer.json does."""
    folder = with_config(lowercasing, "PreTrainedTokenizerFast", eos_token="<|endoftext|>", model_max_length=4)
    out = tmp_path / "hf"
    proc = cli("convert_to_hf.py", "--checkpoint", str(run), "--output", str(out), "--tokenizer", str(folder),
               "--no-progress")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.splitlines() == [f"exported step 2 of {run / 'step_0000002'} to {out} (float32)"]
    assert same_ids(out, ["The Fox", "MiXeD", CODE])
    assert same_ids(out, ["The Fox", "MiXeD", CODE])


def test_without_transformers_the_check_is_said_not_run(lowercasing, run, tmp_path, monkeypatch):
    """Where transformers cannot be imported the folder is shipped as before, and the export says the check was not
    run."""
    folder = with_config(lowercasing, "GPT2Tokenizer", eos_token="<|endoftext|>")
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    said = []
    out = export_to_hf(run, tmp_path / "hf", tokenizer=str(folder), progress=False, log=said.append)
    assert "note: transformers is not installed: the tokenizer shipped was not checked to tokenize as its " \
           "tokenizer.json does (install transformers to check it)" in said, said
    assert (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()


def smollm2_folder(tokenizer_file: str, folder: Path, tokenizer_class: str) -> Path:
    """SmolLM2's tokenizer.json with a tokenizer_config.json as its Hub folder's (written by transformers 4:
    GPT2Tokenizer, the added tokens in added_tokens_decoder and additional_special_tokens), naming TOKENIZER_CLASS."""
    folder.mkdir()
    shutil.copyfile(tokenizer_file, folder / "tokenizer.json")
    added = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    decoder = {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
               for t in added}
    return with_config(folder, tokenizer_class, add_prefix_space=False, added_tokens_decoder=decoder,
                       additional_special_tokens=[t["content"] for t in added], bos_token="<|endoftext|>",
                       clean_up_tokenization_spaces=False, eos_token="<|endoftext|>", model_max_length=8192,
                       unk_token="<|endoftext|>", vocab_size=49152)


def test_smollm2s_gpt2_tokenizer_class_is_refused(smollm2_tokenizer_path, tmp_path):
    """SmolLM2's own folder (GPT2Tokenizer) does not tokenize as its tokenizer.json under transformers 5: its
    pre-tokenizer splits digits before the byte-level one; GPT2Tokenizer's keeps the space before a digit in one piece
    with it, which its vocabulary (trained on split digits) cannot merge ("x  =  1": two tokens for the two spaces, not
    one), as in much code (base64's source). Refused so; naming PreTrainedTokenizerFast, it is shipped and
    tokenizes as tokenizer.json does."""
    trained_checkpoint(tmp_path / "run", cfg=dataclasses.replace(TINY, vocab_size=49152))
    hub = smollm2_folder(smollm2_tokenizer_path, tmp_path / "hub", "GPT2Tokenizer")
    assert not same_ids(hub, ["x  =  1"]) and not same_ids(hub, [CODE])  # the reference
    assert same_ids(hub, ["The quick brown fox, 1234567 and 3.14159"])  # where the two pipelines agree
    with pytest.raises(UserError) as refused:
        export_to_hf(tmp_path / "run", tmp_path / "hf", tokenizer=str(hub), progress=False, log=lambda _: None)
    assert str(refused.value).startswith(f'{hub / "tokenizer_config.json"}: tokenizer_class "GPT2Tokenizer", which '
                                         "transformers") and str(refused.value).endswith(FIX), refused.value
    assert not (tmp_path / "hf").exists()

    fast = smollm2_folder(smollm2_tokenizer_path, tmp_path / "fast", "PreTrainedTokenizerFast")
    out = export_to_hf(tmp_path / "run", tmp_path / "hf", tokenizer=str(fast), progress=False, log=lambda _: None)
    assert same_ids(out, ["x  =  1", CODE, "<|im_start|>user\nhi<|im_end|>"])
