"""Cases a mutation review of the Hugging Face files found (hf_generation_config, hf_config_types, hf_tokenizer_files):
rules held to transformers itself at the values where they were not probed (a boundary, the combination a rule's other
branch reads), and the tokenizer_config.json the export writes beside a bare tokenizer.json held to what README says of
it, as AutoTokenizer and AutoConfig read the exported folder. Each case: the reference is transformers (or tokenizers)
on the same file, never our own output. ~6 s."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import transformers
from tokenizers import Tokenizer, decoders, normalizers

from convert_hf_helpers import WITH_BYTES, byte_tokenizer, saved_hf_llama, trained_checkpoint, unigram_tokenizer
from test_hf_generation_config import _transformers_loads
from test_hf_import_damage_properties import TINY_HF

from nanotronix.checkpoint.hf_export import export_to_hf
from nanotronix.checkpoint.hf_tokenizer_files import write_tokenizer_files
from nanotronix.convert.hf_config_types import check_field_types
from nanotronix.convert.hf_generation_config import refusal
from nanotronix.errors import UserError

BASE = {"bos_token_id": 0, "eos_token_id": 0}
PROSE = "Is it ? Yes , it is . I 've seen x != y ! Haven 't you ?"  # what clean_up_tokenization_spaces rewrites


@pytest.mark.parametrize("config", [
    {"watermarking_config": {"ngram_len": 5, "keys": [1], "sampling_table_size": 2**24}},  # the bound itself
    {"watermarking_config": {"ngram_len": 5, "keys": [1], "sampling_table_size": 2**24 - 1}},
    {"watermarking_config": {"greenlist_ratio": 0.0}},  # both ends of the ratio's interval
    {"watermarking_config": {"greenlist_ratio": 0}},
    {"watermarking_config": {"greenlist_ratio": 1.0}},
    {"watermarking_config": {"greenlist_ratio": -0.01}},
    {"num_return_sequences": 2, "num_beams": 1, "do_sample": True},  # sampling, beams given as 1
    {"num_return_sequences": 2, "num_beams": 1},
    {"num_return_sequences": 2, "num_beams": 1.0, "do_sample": True},
], ids=lambda c: json.dumps(c))
def test_generation_config_rules_agree_with_transformers_at_their_bounds(tmp_path, config):
    """test_hf_generation_config.py probes each rule off its bounds (2**24 + 1, a ratio of 1.5) and num_beams > 1 only:
    a rule refusing sampling_table_size 2**24 or greenlist_ratio 0 (`>=` / `<` for `>` / `<=`), or reading
    num_beams 1 as beams (refusing 2 sequences sampled with num_beams 1), went unseen, and the import would drop a
    field of a generation_config.json that transformers loads. The rules refuse exactly where GenerationConfig does."""
    transformers.logging.set_verbosity_error()
    config = {**BASE, **config}
    assert (refusal(config) is None) == _transformers_loads(tmp_path, config)


@pytest.fixture(scope="module")
def llama_config(tmp_path_factory) -> dict:
    """A config.json transformers' own save_pretrained wrote, less its dtype (and torch_dtype)."""
    folder = saved_hf_llama(tmp_path_factory.mktemp("saved"), **TINY_HF)
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    return config


@pytest.mark.parametrize("dtype", ["absent", None, "float32"])
@pytest.mark.parametrize("torch_dtype", ["x", 1e308, "float16"])
def test_check_field_types_reads_torch_dtype_where_transformers_does(llama_config, tmp_path, dtype, torch_dtype):
    """transformers reads transformers 4's torch_dtype in place of a dtype that is absent or null (and ignores it
    beside a dtype given). test_hf_config_types.py holds the per-field table (takes) to AutoConfig, but not
    check_field_types, which decides when torch_dtype is read: skipping it always, or whenever the key dtype is present
    (null too), let the import take a config.json AutoConfig refuses. check_field_types refuses exactly where
    AutoConfig.from_pretrained does."""
    transformers.logging.set_verbosity_error()
    config = {**llama_config, **({} if dtype == "absent" else {"dtype": dtype}), "torch_dtype": torch_dtype}
    (tmp_path / "config.json").write_text(json.dumps(config))
    try:
        transformers.AutoConfig.from_pretrained(tmp_path)
        loads = True
    except Exception:  # noqa: BLE001 (whatever it raises is a refusal)
        loads = False
    try:
        check_field_types(config)
        takes = True
    except ValueError:
        takes = False
    assert takes == loads, (config.get("dtype", "absent"), torch_dtype, "transformers loads it" if loads else
                            "transformers refuses it")


@pytest.fixture(scope="module")
def instruct_tokenizer(tmp_path_factory) -> Path:
    """The tiny byte tokenizer lowercasing its text, with an instruct tokenizer's <|im_start|> / <|im_end|> added as
    special tokens (ids 257, 258) beside <|endoftext|> (id 0)."""
    folder = byte_tokenizer(tmp_path_factory.mktemp("instruct")).parent
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.normalizer = normalizers.Lowercase()
    tok.save(str(folder / "tokenizer.json"))
    return folder


def _decoder(folder: Path) -> dict:
    """tokenizer_config.json's added_tokens_decoder as transformers 4 saved it: tokenizer.json's added tokens."""
    added = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    return {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for t in added}


def _swapped_ids(decoder: dict) -> dict:
    decoder["257"], decoder["258"] = decoder["258"], decoder["257"]
    return decoder


def _normalized_flipped(decoder: dict) -> dict:
    decoder["257"]["normalized"] = not decoder["257"]["normalized"]
    return decoder


TEXT = "hi <|im_start|>user <|IM_START|> x<|im_end|> <|endoftext|> <|EndOfText|> <nope> bye"
ADDED = {"__type": "AddedToken", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
         "special": True}  # an AddedToken as transformers 4 saved one into tokenizer_config.json, less its content


@pytest.mark.parametrize("name, config", [
    ("model_max_length a float", {"model_max_length": 1e30}),
    ("model_max_length a whole float", {"model_max_length": 64.0}),
    ("chat templates named", {"chat_template": [{"name": "default", "template": "{{ messages[0]['content'] }}"}]}),
    ("a chat template without a name", {"chat_template": [{"template": "{{ messages[0]['content'] }}"}]}),
    ("extra tokens a mapping in tokenizer_config.json", {"additional_special_tokens": {"start": "<|im_start|>"}}),
    ("eos_token an AddedToken", {"eos_token": {**ADDED, "content": "<|endoftext|>"}}),
    ("image_token an AddedToken of the vocabulary", {"image_token": {**ADDED, "content": "<|im_start|>"}}),
    ("image_token an AddedToken the vocabulary lacks", {"image_token": {**ADDED, "content": "<nope>"}}),
    ("decoder as tokenizer.json", {"added_tokens_decoder": "same"}),
    ("decoder normalizing <|im_start|>", {"added_tokens_decoder": _normalized_flipped}),
    ("decoder swapping ids beside GPT2Tokenizer", {"added_tokens_decoder": _swapped_ids,
                                                   "tokenizer_class": "GPT2Tokenizer"}),
    ("decoder empty beside GPT2Tokenizer", {"added_tokens_decoder": lambda decoder: {},
                                            "tokenizer_class": "GPT2Tokenizer"}),
])
def test_tokenizer_files_are_refused_where_autotokenizer_fails_or_tokenizes_otherwise(instruct_tokenizer, tmp_path,
                                                                                     name, config):
    """write_tokenizer_files ships a tokenizer_config.json exactly where AutoTokenizer loads the folder, applies its
    chat template, and gives tokenizer.json's ids for text holding the added tokens (each also in upper case, which a
    Lowercase normalizer turns into them) and for the added tokens themselves. Found unprobed (each with what a planted
    bug then did, which transformers contradicts): a model_max_length that is a float (1e30: refused as "not a number"),
    a list of chat templates whose item has no "name" (transformers' KeyError: shipped), an eos_token written as an
    AddedToken mapping (as transformers 4 saved it: refused as "not a token"), a model's own image_token as an
    AddedToken mapping naming a token tokenizer.json lacks (AutoTokenizer adds it past the vocabulary: shipped),
    additional_special_tokens as a mapping in tokenizer_config.json (transformers 5 reads it as extra_special_tokens:
    refused), an added_tokens_decoder giving a token normalized true (AutoTokenizer re-adds it so, matching
    "<|IM_START|>" after lowercasing: shipped), or swapping two ids (GPT2Tokenizer, built with the decoder's ids, swaps
    the tokens: shipped), or empty (GPT2Tokenizer, built with the decoder's added tokens only, splits <|im_start|>:
    shipped)."""
    transformers.logging.set_verbosity_error()
    folder = tmp_path / "tok"
    shutil.copytree(instruct_tokenizer, folder)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", **config}
    if "added_tokens_decoder" in config:
        edit = config["added_tokens_decoder"]
        config["added_tokens_decoder"] = _decoder(folder) if edit == "same" else edit(_decoder(folder))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    try:
        auto = transformers.AutoTokenizer.from_pretrained(folder)
        if "chat_template" in config:
            auto.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        as_store = auto(TEXT, add_special_tokens=False)["input_ids"] == \
            reference.encode(TEXT, add_special_tokens=False).ids and \
            all(auto.convert_tokens_to_ids(t) == reference.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>")) \
            and len(auto) == reference.get_vocab_size(with_added_tokens=True)
    except Exception:  # noqa: BLE001 (whatever it raises, the folder does not load)
        as_store = False
    (tmp_path / "hf").mkdir()
    try:
        write_tokenizer_files(str(folder), tmp_path / "hf", 64)
        shipped = True
    except UserError:
        shipped = False
    assert shipped == as_store, (name, "AutoTokenizer reads it as the store" if as_store else
                                 "AutoTokenizer fails or tokenizes otherwise")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return trained_checkpoint(tmp_path_factory.mktemp("run") / "run", cfg=WITH_BYTES)[0].parent


@pytest.fixture(scope="module")
def bare_unigram(tmp_path_factory) -> Path:
    """A bare tokenizer.json (no HF config files beside it): convert_hf_helpers.unigram_tokenizer's."""
    return unigram_tokenizer(tmp_path_factory.mktemp("unigram"))


@pytest.mark.parametrize("kind", ["byte-level BPE", "Unigram"])
def test_a_bare_tokenizer_json_is_shipped_as_readme_says(run, bare_unigram, tmp_path, kind):
    """README: a folder without tokenizer_config.json is shipped with one naming the EOS as BOS, EOS and UNK. Held to
    AutoTokenizer and AutoConfig of the exported folder (nothing checked its unk_token, nor its model_max_length):
    its bos, eos and unk tokens are <|endoftext|>, whose id (tokenizers') config.json names as BOS and EOS; its
    model_max_length is the model's context (AutoConfig's max_position_embeddings); and the export says nothing but
    its own line: a tokenizer_config.json written with clean_up_tokenization_spaces true was set false again in a
    note for a Unigram tokenizer (which transformers 5 cleans up). It tokenizes and decodes as tokenizer.json."""
    transformers.logging.set_verbosity_error()
    source = byte_tokenizer(tmp_path / "tok") if kind == "byte-level BPE" else bare_unigram
    said = []
    out = export_to_hf(run, tmp_path / "hf", tokenizer=str(source), progress=False, log=said.append)
    assert len(said) == 1 and said[0].startswith("exported step 2 of "), said
    auto = transformers.AutoTokenizer.from_pretrained(out)
    reference = Tokenizer.from_file(str(source))
    eos = reference.token_to_id("<|endoftext|>")
    assert (auto.bos_token, auto.eos_token, auto.unk_token) == ("<|endoftext|>",) * 3
    hf_config = transformers.AutoConfig.from_pretrained(out)
    assert (hf_config.bos_token_id, hf_config.eos_token_id) == (eos, eos) == (auto.bos_token_id, auto.eos_token_id)
    assert auto.model_max_length == hf_config.max_position_embeddings
    ids = reference.encode(PROSE, add_special_tokens=False).ids
    assert auto(PROSE, add_special_tokens=False)["input_ids"] == ids
    assert auto.decode(ids, skip_special_tokens=False) == reference.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("private", [True, False])
def test_private_reaches_the_hub_repo_the_push_creates(run, tmp_path, monkeypatch, capsys, private):
    """--private was checked only for being given without --push-to-hub (no test can reach the Hub): the tool
    dropping it on the way to push_folder made a public repo of a model its user asked to keep private, exit 0. The
    real huggingface_hub client up to its requests (HfApi.create_repo and upload_folder, recorded here; the token and
    online checks, tested with the real client in test_convert_hf_cli.py, stood in for): create_repo gets
    private=True exactly with --private (and exist_ok), and the upload is of the complete exported folder."""
    import huggingface_hub

    from convert_hf_helpers import tool_main
    from nanotronix.checkpoint import hub

    calls = []
    monkeypatch.setattr(hub, "check_hub_access", lambda repo_id: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: calls.append(("create_repo", repo_id, kw)) or f"hub/{repo_id}")
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **kw: calls.append(("upload_folder", kw["repo_id"], kw)))
    out = tmp_path / "hf"
    args = ["--checkpoint", str(run), "--output", str(out), "--push-to-hub", "someone/tiny", "--no-progress"]
    assert tool_main("convert_to_hf")(args + (["--private"] if private else [])) == 0
    assert [(name, repo) for name, repo, _ in calls] == [("create_repo", "someone/tiny"),
                                                        ("upload_folder", "someone/tiny")]
    assert calls[0][2].get("private") is private
    assert calls[0][2].get("exist_ok") is True  # a second export goes to the repo the first made, not refused
    assert Path(calls[1][2]["folder_path"]) == out and (out / "config.json").is_file()
    assert "pushed to hub/someone/tiny" in capsys.readouterr().out


def test_a_tokenizer_json_adding_a_bos_is_compared_without_it(run, tmp_path):
    """A tokenizer.json whose post-processor adds a BOS (TemplateProcessing, as Llama 3's): the probes compare
    AutoTokenizer's ids with tokenizer.json's with no special tokens added on both sides. Nothing held the
    AutoTokenizer side to that (every tokenizer tested adds none): calling it with its special tokens made every probe
    differ by the BOS, and such a folder was refused though it tokenizes as the store. Shipped with no note, and
    AutoTokenizer of it gives tokenizers' ids, with and without the BOS."""
    from tokenizers import processors

    transformers.logging.set_verbosity_error()
    source = byte_tokenizer(tmp_path / "tok")
    tok = Tokenizer.from_file(str(source))
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[
        ("<|endoftext|>", tok.token_to_id("<|endoftext|>"))])
    tok.save(str(source))
    reference = Tokenizer.from_file(str(source))
    assert reference.encode(PROSE).ids[0] == reference.token_to_id("<|endoftext|>")  # the BOS it adds
    said = []
    out = export_to_hf(run, tmp_path / "hf", tokenizer=str(source), progress=False, log=said.append)
    assert len(said) == 1 and said[0].startswith("exported step 2 of "), said
    auto = transformers.AutoTokenizer.from_pretrained(out)
    for special in (False, True):
        assert auto(PROSE, add_special_tokens=special)["input_ids"] == \
            reference.encode(PROSE, add_special_tokens=special).ids


def test_clean_up_tokenization_spaces_is_blamed_only_where_it_is_the_cause(run, tmp_path):
    """GPT2Tokenizer beside a tokenizer.json whose decoder strips a leading space (which the class, rebuilt with a
    plain ByteLevel decoder, does not) and a tokenizer_config.json holding clean_up_tokenization_spaces true, as
    transformers 4 saved it. The folder decodes otherwise because of its class, not the setting: the reference,
    AutoTokenizer of the folder with the setting false, still decodes otherwise. The setting is said to be the cause
    only where transformers' tokenizers backend decodes the ids as tokenizer.json does (the one step decode() adds
    is the clean-up); nothing held that condition, and dropping it blamed (and rewrote) the setting in a first note
    before replacing the class in a second. One note, naming the class; shipped decoding as tokenizer.json."""
    transformers.logging.set_verbosity_error()
    folder = byte_tokenizer(tmp_path / "tok").parent
    edited = Tokenizer.from_file(str(folder / "tokenizer.json"))
    edited.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    edited.save(str(folder / "tokenizer.json"))
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = reference.encode("   leading spaces", add_special_tokens=False).ids
    for clean_up in (False, True):  # the reference: the setting is not what makes it decode otherwise
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>",
            "clean_up_tokenization_spaces": clean_up}))
        auto = transformers.AutoTokenizer.from_pretrained(folder)
        assert auto.decode(ids, skip_special_tokens=False) != reference.decode(ids, skip_special_tokens=False)
    said = []
    out = export_to_hf(run, tmp_path / "hf", tokenizer=str(folder), progress=False, log=said.append)
    assert len(said) == 2 and said[0].startswith(f'note: {folder / "tokenizer_config.json"}: tokenizer_class '
                                                 '"GPT2Tokenizer", ') \
        and "clean_up" not in said[0].split("tokenizer_config.json: ", 1)[1], said
    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert auto.decode(ids, skip_special_tokens=False) == reference.decode(ids, skip_special_tokens=False)
