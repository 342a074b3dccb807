"""Hugging Face export against transformers itself: logits of the export (fp32, 1e-5, tied and untied), sharded
bf16 safetensors with an index (through the command), and the tokenizer files shipped with it (the run's, a
given one, an instruct one with its chat template) with the bos/eos ids transformers reads from them, and the fields
of an imported config.json of a type transformers refuses left out."""
from __future__ import annotations

import dataclasses
import json
import struct

import pytest
import torch
import transformers
from safetensors import safe_open

from checkpoint_helpers import TINY, TINY_UNTIED, adamw, plain_model, save_single, train_steps
from convert_hf_helpers import (WITH_BYTES, _hf_original, byte_tokenizer, cli, hf_tensors, logits_match, saved_hf_llama,
                               trained_checkpoint)

from nanotronix.checkpoint.hf_export import export_to_hf
from nanotronix.checkpoint.hf_import import import_from_hf
from nanotronix.convert.hf_mapping import hf_config_dict
from nanotronix.errors import UserError


@pytest.mark.parametrize("cfg", [TINY, TINY_UNTIED], ids=["tied", "untied"])
def test_export_logits_match_transformers(tmp_path, cfg):
    folder, model = trained_checkpoint(tmp_path / "run", cfg)
    out = export_to_hf(tmp_path / "run", tmp_path / "hf", progress=False, log=lambda _: None)
    assert logits_match(out, model, cfg) < 1e-5
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] == cfg.tie_word_embeddings
    assert config["rope_theta"] == cfg.rope_theta and config["torch_dtype"] == "float32"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 0
    assert ("lm_head.weight" in hf_tensors(out)) == (not cfg.tie_word_embeddings)



def test_cli_sharded_bf16_export(tmp_path):
    _, model = trained_checkpoint(tmp_path / "run")
    proc = cli("convert_to_hf.py", "--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "hf"),
               "--dtype", "bfloat16", "--max-shard-size", "20KB", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "hf"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    tensors = hf_tensors(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors.values())
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    ours = model.state_dict()
    assert torch.equal(tensors["model.embed_tokens.weight"], ours["embed_tokens.weight"].to(torch.bfloat16))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16
    assert torch.equal(hf.model.layers[1].mlp.up_proj.weight, ours["layers.1.mlp.gate_up_proj.weight"][1::2]
                       .to(torch.bfloat16))



def test_export_ships_the_runs_tokenizer(tmp_path):
    from tokenizers import Tokenizer

    tokenizer_file = byte_tokenizer(tmp_path / "tok")
    trained_checkpoint(tmp_path / "run", cfg=WITH_BYTES, config={"data": {"tokenizer": str(tokenizer_file)}})
    out = export_to_hf(tmp_path / "run", tmp_path / "hf", progress=False, log=lambda _: None)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    text = "the lazy fox"
    assert theirs(text)["input_ids"] == Tokenizer.from_file(str(tokenizer_file)).encode(text).ids
    assert theirs.eos_token == "<|endoftext|>"



def test_export_takes_bos_from_the_tokenizer_and_refuses_a_larger_one(tmp_path):
    """config.json's bos_token_id is the tokenizer's own bos_token (here <s>, not its EOS); a tokenizer with more
    tokens than the model's vocabulary is not the model's (transformers' generate() would index past the
    embedding): refused when asked for, left out with a warning when it is the run's, and the ids defaulted say so."""
    from tokenizers import Tokenizer

    tokenizer_file = byte_tokenizer(tmp_path / "tok")
    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.add_special_tokens(["<s>"])
    tok.save(str(tokenizer_file))
    (tokenizer_file.parent / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|endoftext|>"}))
    trained_checkpoint(tmp_path / "run", cfg=WITH_BYTES, config={"data": {"tokenizer": str(tokenizer_file)}})
    out = export_to_hf(tmp_path / "run", tmp_path / "hf", progress=False, log=lambda _: None)
    config = json.loads((out / "config.json").read_text())
    assert config["bos_token_id"] == tok.token_to_id("<s>")
    assert config["eos_token_id"] == tok.token_to_id("<|endoftext|>")
    assert config["bos_token_id"] != config["eos_token_id"]
    assert transformers.AutoTokenizer.from_pretrained(out).bos_token_id == config["bos_token_id"]

    big = tmp_path / "big"
    big.mkdir()
    tok.add_tokens([f"word{i}" for i in range(100)])  # past the model's 320
    tok.save(str(big / "tokenizer.json"))
    with pytest.raises(UserError, match=f"has {tok.get_vocab_size()} tokens, more than the model's vocabulary "
                                        "\\(320\\)"):
        export_to_hf(tmp_path / "run", tmp_path / "hf2", tokenizer=str(big), progress=False, log=lambda _: None)
    assert not (tmp_path / "hf2").exists()
    said = []
    trained_checkpoint(tmp_path / "run2", cfg=WITH_BYTES, config={"data": {"tokenizer": str(big / "tokenizer.json")}})
    out = export_to_hf(tmp_path / "run2", tmp_path / "hf3", progress=False, log=said.append)
    assert not (out / "tokenizer.json").exists() and not (out / "tokenizer_config.json").exists()
    assert said[0].startswith("warning: tokenizer files not written (tokenizer ") and "more than the model's" in said[0]
    assert said[1].startswith("warning: no tokenizer, so bos_token_id and eos_token_id in config.json are set to 0")



CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"



def instruct_tokenizer(folder):
    """FOLDER/tokenizer.json (returned): the byte tokenizer with <|im_start|> and <|im_end|> as BOS and EOS (ids 257
    and 258) in its tokenizer_config.json, and CHAT_TEMPLATE."""
    from tokenizers import Tokenizer
    tokenizer_file = byte_tokenizer(folder)
    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(tokenizer_file))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return tokenizer_file


def test_another_tokenizer_shipped_with_an_import_gives_its_ids(tmp_path):
    """An imported base model (bos and eos 0 in its config.json and generation_config.json) exported with an instruct
    --tokenizer (EOS <|im_end|>): its ids won, so generate() ran past the tokenizer's EOS, without a word. Now the
    shipped tokenizer's ids are in both files, in a note; the import's own ids stay without a tokenizer."""
    base = saved_hf_llama(tmp_path / "base", **{k: v for k, v in hf_config_dict(WITH_BYTES).items()
                                                if k not in ("architectures", "model_type", "torch_dtype")})
    assert json.loads((base / "generation_config.json").read_text())["eos_token_id"] == 0
    import_from_hf(base, tmp_path / "imported", log=lambda _: None)
    said = []
    out = export_to_hf(tmp_path / "imported", tmp_path / "hf", tokenizer=str(instruct_tokenizer(tmp_path / "tok")),
                       progress=False, log=said.append)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    generation = transformers.GenerationConfig.from_pretrained(out)
    config = transformers.AutoConfig.from_pretrained(out)
    assert (config.bos_token_id, config.eos_token_id) == (theirs.bos_token_id, theirs.eos_token_id) == (257, 258)
    assert (generation.bos_token_id, generation.eos_token_id) == (257, 258)
    assert "note: bos_token_id 257 and eos_token_id 258 are the shipped tokenizer's, not the imported model's (0 and " \
        "0): generate() stops at the tokenizer's EOS" in said
    out = export_to_hf(tmp_path / "imported", tmp_path / "hf2", progress=False, log=lambda _: None)
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == 0


def test_export_ships_the_tokenizer_as_transformers_reads_it(tmp_path):
    """An instruct tokenizer (eos_token <|im_end|>, its chat template in chat_template.jinja, where transformers saves
    it): the export keeps the template and makes config.json's eos_token_id the one AutoTokenizer reports (generate()
    stops there); a run continued from an import that names no data.tokenizer ships the imported model's."""
    from tokenizers import Tokenizer
    from nanotronix.checkpoint.manifest import read_manifest
    from nanotronix.checkpoint.paths import Retention
    from nanotronix.checkpoint.storage import Collective
    from nanotronix.checkpoint.training_state import take_snapshot, write_snapshot
    from nanotronix.parallel import ParallelContext

    folder = tmp_path / "orig"
    tokenizer_file = instruct_tokenizer(folder)
    tok = Tokenizer.from_file(str(tokenizer_file))

    trained_checkpoint(tmp_path / "run", cfg=WITH_BYTES)
    out = export_to_hf(tmp_path / "run", tmp_path / "hf", tokenizer=str(folder), progress=False, log=lambda _: None)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert theirs.eos_token == "<|im_end|>" and config["eos_token_id"] == theirs.eos_token_id == tok.token_to_id(
        "<|im_end|>")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == theirs.eos_token_id
    assert theirs.chat_template == CHAT_TEMPLATE

    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config_dict(WITH_BYTES).items()
                                         if k not in ("architectures", "model_type", "torch_dtype")})
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(folder)
    import_from_hf(folder, tmp_path / "imported", log=lambda _: None)
    source = read_manifest(tmp_path / "imported" / "step_0000000")["source"]
    model = plain_model(WITH_BYTES)
    opt = adamw(model)
    train_steps(model, opt, range(1, 2), WITH_BYTES)
    snap = take_snapshot(1, model, opt, ParallelContext(tp=1, pp=1, dp=1, rank=0, world_size=1),
                         {"model": dataclasses.asdict(WITH_BYTES)}, {"consumed_samples": 2}, staging=None,
                         # what the trainer saves after resuming from the import, data.tokenizer unset
                         coll=Collective(), source=source)
    write_snapshot(snap, tmp_path / "continued", Collective(), Retention(0, 0, frozenset()))
    said = []
    out = export_to_hf(tmp_path / "continued", tmp_path / "hf2", progress=False, log=said.append)
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATE
    assert (out / "tokenizer.json").read_bytes() == tokenizer_file.read_bytes()
    assert any("shipping the imported model's" in line for line in said), said


def test_imported_fields_transformers_refuses_are_left_out_with_a_warning(tmp_path):
    """A checkpoint imported before the import refused them carries config.json fields of a type AutoConfig refuses,
    or a pad_token_id transformers builds no model of (its manifest's source.hf.config, edited here into one), which
    the export wrote back into a config.json transformers could not load. Now each field the export carries over is
    said in a warning naming the manifest and left out (a token id: the one the export gives without it); those
    transformers takes, known to it or not, are carried over, and those the export writes of its own (use_cache) are
    its own."""
    model = plain_model(TINY)
    step = save_single(tmp_path / "run", 0, model, adamw(model))
    manifest = json.loads((step / "checkpoint.json").read_text())
    refused = ['field "eos_token_id" is true, transformers reads an integer, a list of integers or null there',
               'field "id2label" is {"a": "b"}, transformers reads a mapping of integer keys, or null there',
               "pad_token_id: 96 is not null or a token id of the 96-token vocabulary"]  # TINY's 96 rows
    kept = {"rope_interleaved": False, "is_llama_config": "yes", "bos_token_id": 5}
    manifest["source"] = {"hf": {"path": str(tmp_path / "gone"), "generation_config": None,
                                 "config": {"model_type": "llama", "use_cache": "x", "eos_token_id": True,
                                            "id2label": {"a": "b"}, "pad_token_id": 96, **kept}}}
    (step / "checkpoint.json").write_text(json.dumps(manifest))
    said = []
    out = export_to_hf(tmp_path / "run", tmp_path / "hf", progress=False, log=said.append)
    loaded = transformers.AutoConfig.from_pretrained(out)
    transformers.LlamaForCausalLM(loaded)  # builds (a pad_token_id outside the vocabulary: it does not)
    written = json.loads((out / "config.json").read_text())
    assert not {"pad_token_id", "id2label"} & written.keys() and (written["eos_token_id"], written["use_cache"]) == \
        (0, True)
    assert {field: getattr(loaded, field) for field in kept} == kept
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert (generation.bos_token_id, generation.eos_token_id) == (5, 0)
    warnings = [line for line in said if "source.hf.config" in line]
    assert warnings == [f"warning: {step / 'checkpoint.json'}: source.hf.config: {why} (imported before the import "
                        "refused it): left out of config.json" for why in refused]


def test_imported_generation_config_values_transformers_refuses_are_left_out_with_a_warning(tmp_path):
    """A checkpoint imported before the import refused them carries generation_config.json values GenerationConfig
    refuses (its manifest's source.hf.generation_config, edited here into one), which the export wrote back into a
    folder neither GenerationConfig nor the model loads. Now each is said in a warning naming the manifest and left
    out; what transformers merely warns about (a temperature without do_sample) is carried over."""
    transformers.logging.set_verbosity_error()
    model = plain_model(TINY)
    step = save_single(tmp_path / "run", 0, model, adamw(model))
    manifest = json.loads((step / "checkpoint.json").read_text())
    kept = {"bos_token_id": 5, "eos_token_id": 0, "temperature": 0.5}
    manifest["source"] = {"hf": {"path": str(tmp_path / "gone"), "config": {"model_type": "llama"},
                                 "generation_config": {"early_stopping": "x", "num_return_sequences": 2, **kept}}}
    (step / "checkpoint.json").write_text(json.dumps(manifest))
    said = []
    out = export_to_hf(tmp_path / "run", tmp_path / "hf", progress=False, log=said.append)
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert {field: getattr(generation, field) for field in kept} == kept
    assert (generation.early_stopping, generation.num_return_sequences) == (None, None)
    transformers.AutoModelForCausalLM.from_pretrained(out)
    refused = ['field "early_stopping" is "x", transformers reads true, false, "never" or null there',
               'field "num_return_sequences" is 2, more than 1 without do_sample or num_beams']
    assert [line for line in said if "source.hf.generation_config" in line] == [
        f"warning: {step / 'checkpoint.json'}: source.hf.generation_config: {why} (imported before the import "
        "refused it): left out of generation_config.json" for why in refused]


def test_an_export_after_a_rope_theta_change_holds_the_new_theta(tmp_path):
    """A transformers-saved model (its config.json keeps the theta under rope_parameters, which transformers 5 reads
    first) imported, then trained on with another model.rope_theta (the 8k context stage): the export's config.json
    must give transformers the run's theta, not carry the imported rope_parameters over it. Reference: transformers'
    logits of the exported folder against the model the checkpoint holds."""
    from nanotronix.checkpoint.hf_export import export_to_hf
    from nanotronix.checkpoint.hf_import import import_from_hf
    from nanotronix.checkpoint.reader import CheckpointReader
    from nanotronix.checkpoint.storage import Collective
    from nanotronix.checkpoint.training_state import take_snapshot, write_snapshot
    from nanotronix.model import build_model
    from nanotronix.parallel import ParallelContext

    hf_dir = _hf_original(tmp_path / "hf", untied=False)  # rope_theta 130000
    assert "rope_parameters" in json.loads((hf_dir / "config.json").read_text())
    import_from_hf(hf_dir, tmp_path / "imported", log=lambda _: None)
    reader = CheckpointReader(tmp_path / "imported")
    source = reader.manifest["source"]
    cfg = dataclasses.replace(reader.model_config, rope_theta=10000.0)
    model = build_model(cfg)
    reader.load_into(model)

    snap = take_snapshot(1, model, adamw(model), ParallelContext(tp=1, pp=1, dp=1, rank=0, world_size=1),
                         {"model": dataclasses.asdict(cfg)}, {"consumed_samples": 1}, staging=None,
                         coll=Collective(), source=source)
    write_snapshot(snap, tmp_path / "run", Collective())
    out = export_to_hf(tmp_path / "run", tmp_path / "out", progress=False, log=lambda _: None)
    assert transformers.AutoConfig.from_pretrained(out).rope_parameters["rope_theta"] == 10000.0
    assert logits_match(out, model.eval(), cfg) < 1e-5


def test_shards_smaller_than_the_first_tensor_are_never_empty_and_headers_are_aligned(tmp_path):
    """--max-shard-size below the embedding's size: each tensor larger than a shard gets a shard of its own (as
    transformers' save_pretrained does), no shard file is left holding nothing, the index names every file, and every
    file's JSON header is padded so the data starts at a multiple of 8 bytes (the safetensors format's alignment,
    which safetensors_stream's docstring promises). transformers loads the folder."""
    from nanotronix.checkpoint.hf_export import export_to_hf

    model = plain_model()
    opt = adamw(model)
    save_single(tmp_path / "run", 0, model, opt)
    embedding_bytes = TINY.vocab_size * TINY.hidden_size * 4
    out = export_to_hf(tmp_path / "run", tmp_path / "hf", max_shard_bytes=embedding_bytes // 2, progress=False,
                       log=lambda _: None)
    files = sorted(out.glob("*.safetensors"))
    assert len(files) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            assert list(f.keys()), f"{file.name} holds no tensor"
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
        assert (8 + header_len) % 8 == 0, (file.name, header_len)
    assert logits_match(out, model.eval(), TINY) < 1e-5
