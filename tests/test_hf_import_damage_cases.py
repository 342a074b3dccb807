"""The cases tests/test_hf_import_damage_properties.py's property found (each a bug once), each held on its own: a copy
of the property's transformers-saved folders (its `folders` fixture) with one file edited, imported by
tools/convert_from_hf.py: imported with the logits transformers gives loading the same folder (and exported to a
config.json AutoConfig loads), or refused in one line naming the file."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from convert_hf_helpers import saved_hf_llama
from helpers import load_tool
import test_hf_import_damage_properties as import_damage
from test_hf_import_damage_properties import (IDS, INDEX, TINY_HF, exported_config_loads, our_logits,
                                              transformers_reading, transformers_reading_with)

from nanotronix.checkpoint.reader import CheckpointReader
from nanotronix.errors import number_text

folders = import_damage.folders  # the fixture: the property's folders, saved by transformers, made for this module


@pytest.mark.parametrize("edit, said", [
    (lambda m, f: m.update({next(iter(m)): str(f / m[next(iter(m))])}), "lies outside"),  # absolute
    (lambda m, f: m.update({next(iter(m)): f"../{f.name}/{m[next(iter(m))]}"}), "lies outside"),
    (lambda m, f: m.update({k: 3 for k in m}), "other than a string"),
    (None, "not a safetensors index"),  # nested deeper than json recurses
])
def test_an_index_transformers_refuses_is_one_line(folders, tmp_path, capsys, edit, said):
    """Shards named from outside the folder (transformers refuses them: the import read /etc/hostname as a shard),
    named by numbers or nested past json's recursion: one line naming the index, not a traceback."""
    hf = tmp_path / "hf"
    shutil.copytree(folders["sharded"], hf)
    index = json.loads((hf / INDEX).read_text())
    if edit is None:
        (hf / INDEX).write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    else:
        edit(index["weight_map"], hf)
        (hf / INDEX).write_text(json.dumps(index))
    assert load_tool("convert_from_hf").main(["--hf", str(hf), "--output", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --hf: {hf / INDEX}: ") and said in err[0], err
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("name", ["config.json", "generation_config.json"])
def test_a_json_nested_past_the_reader_is_one_line(folders, tmp_path, capsys, name):
    hf = tmp_path / "hf"
    shutil.copytree(folders["tied"], hf)
    (hf / name).write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert load_tool("convert_from_hf").main(["--hf", str(hf), "--output", str(tmp_path / "ckpt")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: --hf: {hf / name}: nested too deeply to be read"]


def test_a_folder_without_generation_config_imports_a_loadable_checkpoint(folders, tmp_path):
    """The import recorded source.hf.generation_config as null, which the manifest's own check then refused: the
    checkpoint written could not be loaded, exported or resumed from."""
    hf = tmp_path / "hf"
    shutil.copytree(folders["tied"], hf)
    (hf / "generation_config.json").unlink()
    assert load_tool("convert_from_hf").main(["--hf", str(hf), "--output", str(tmp_path / "ckpt"),
                                             "--no-progress"]) == 0
    reference, _ = transformers_reading(hf)
    with torch.no_grad():
        assert (our_logits(tmp_path / "ckpt") - reference(input_ids=IDS).logits).abs().max().item() < 1e-5


def test_a_tied_head_of_another_shape_is_refused(folders, tmp_path, capsys):
    """transformers refuses a tied model whose lm_head.weight is not the embedding's shape (the config does not
    describe the weights); the import ignored it and imported."""
    hf = tmp_path / "hf"
    shutil.copytree(folders["tied"], hf)
    tensors = load_file(hf / "model.safetensors")
    save_file({**tensors, "lm_head.weight": torch.ones(4)}, hf / "model.safetensors", metadata={"format": "pt"})
    assert load_tool("convert_from_hf").main(["--hf", str(hf), "--output", str(tmp_path / "ckpt")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --hf: {hf}: tensor lm_head.weight is [4], but its config.json ties it to the embedding, [32, 16]"]
    assert transformers_reading(hf)[0] is None


def imported_as_transformers_reads_it(original: Path, tmp_path: Path, capsys, edits: dict,
                                      refusal: str | None) -> None:
    """ORIGINAL with config.json EDITS: imported with transformers' logits, and exported to a config.json AutoConfig
    loads, where AutoConfig loads its config.json and transformers loads the folder whole and runs it, else refused
    with the one line REFUSAL (after `--hf: FILE: `)."""
    hf = tmp_path / "hf"
    shutil.copytree(original, hf)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, **edits}))
    reference, _ = transformers_reading(hf)
    try:
        with torch.no_grad():
            expected = None if reference is None else reference(input_ids=IDS).logits
    except Exception:  # noqa: BLE001 (built, but it cannot run it: a padding_idx of true)
        expected = None
    capsys.readouterr()  # transformers' progress bar
    code = load_tool("convert_from_hf").main(["--hf", str(hf), "--output", str(tmp_path / "ckpt"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    if expected is None:
        assert code == 2 and err == [f"error: --hf: {hf / 'config.json'}: {refusal}"], err
    else:
        assert code == 0, err
        with torch.no_grad():
            assert (our_logits(tmp_path / "ckpt") - expected).abs().max().item() < 1e-5
        assert exported_config_loads(tmp_path / "ckpt", tmp_path) is None


@pytest.mark.parametrize("field, value", [("rope_parameters", False), ("rope_parameters", 0), ("rope_parameters", []),
                                          ("rope_scaling", False), ("rope_scaling", []), ("rope_scaling", "")])
def test_false_rope_settings_are_read_as_transformers_reads_them(folders, tmp_path, capsys, field, value):
    """transformers takes a false rope_scaling as none but refuses a rope_parameters that is neither null nor a
    mapping; the import took `"rope_parameters": false` as plain RoPE (a random seed of the property found it)."""
    imported_as_transformers_reads_it(folders["tied"], tmp_path, capsys, {field: value},
                                      f'field "{field}" is {json.dumps(value)}, transformers reads a mapping or null '
                                      "there")


def test_a_null_num_key_value_heads_is_read_as_transformers_reads_it(tmp_path, capsys):
    """transformers reads `"num_key_value_heads": null` as num_attention_heads (multi-head attention); the import
    refused it as a missing model field."""
    mha = saved_hf_llama(tmp_path / "mha", **{**TINY_HF, "num_key_value_heads": TINY_HF["num_attention_heads"]})
    imported_as_transformers_reads_it(mha, tmp_path, capsys, {"num_key_value_heads": None}, None)
    assert CheckpointReader(tmp_path / "ckpt").model_config.num_key_value_heads == TINY_HF["num_attention_heads"]


def test_a_tied_model_saved_with_its_head_alone_is_read_as_transformers_reads_it(folders, tmp_path, capsys):
    """A tied model's folder holding its embedding only as lm_head.weight: transformers ties the embedding to the head
    it loads (the same logits); the import refused it as lacking model.embed_tokens.weight (random seed 3211)."""
    head_only = tmp_path / "head_only"
    shutil.copytree(folders["tied"], head_only)
    weights = load_file(head_only / "model.safetensors")
    weights["lm_head.weight"] = weights.pop("model.embed_tokens.weight")
    save_file(weights, head_only / "model.safetensors", metadata={"format": "pt"})
    imported_as_transformers_reads_it(head_only, tmp_path, capsys, {}, None)


@pytest.mark.parametrize("pad", [None, 31, -32, 32, -33, pytest.param(10 ** 400, id="10**400"), True, 1.0, "1"])
def test_a_pad_token_id_is_read_as_transformers_reads_it(folders, tmp_path, capsys, pad):
    """transformers builds no model whose pad_token_id (the embedding's padding_idx) is outside the vocabulary, and
    AutoConfig refuses one that is not an integer or null; the import took one (a random seed of the property found
    10**400 and true), and its export would have carried it into a config.json transformers cannot load."""
    refusal = (f"pad_token_id: {number_text(pad, json.dumps)} is not null or a token id of the 32-token vocabulary"
               if type(pad) is int else
               f'field "pad_token_id" is {json.dumps(pad)}, transformers reads an integer or null there')
    imported_as_transformers_reads_it(folders["tied"], tmp_path, capsys, {"pad_token_id": pad}, refusal)


@pytest.mark.parametrize("head_dim, refusal", [
    (8, None), (16, "head_dim: 16 is not hidden_size / num_attention_heads = 8 (not supported)"),
    (8.0, 'field "head_dim" is 8.0, transformers reads an integer or null there'),
    (True, 'field "head_dim" is true, transformers reads an integer or null there'),
    ("8", 'field "head_dim" is "8", transformers reads an integer or null there')])
def test_a_head_dim_is_read_as_transformers_reads_it(folders, tmp_path, capsys, head_dim, refusal):
    """A head_dim of the right value as a float (8.0) is refused by AutoConfig's type checks alone: the import took it
    (its model, built past them, loads the weights whole), and its export wrote it into a config.json AutoConfig
    refuses; now it is refused as true or "8" are."""
    imported_as_transformers_reads_it(folders["tied"], tmp_path, capsys, {"head_dim": head_dim}, refusal)


@pytest.mark.parametrize("field, value, wanted", [
    ("use_cache", "x", "a bool"), ("use_cache", 1, "a bool"), ("eos_token_id", True, "an integer, a list of "
     "integers or null"), ("eos_token_id", [0, "1"], "an integer, a list of integers or null"),
    ("bos_token_id", 0.0, "an integer or null"), ("attention_dropout", "0.1", "an integer, a float (a number written "
     "with a point or an exponent) or null"), ("rms_norm_eps", 1, "a float (a number written with a point or an "
     "exponent)"), ("initializer_range", 1.5, "a float from 0 to 1"), ("initializer_range", 1, "a float from 0 to 1"),
    ("pretraining_tp", 1.0, "an integer or null"), ("max_position_embeddings", 64.0, "an integer"),
    ("attention_bias", None, "a bool"), ("dtype", "fp32", "a torch dtype's name or null"),
    ("dtype", 1e308, "a torch dtype's name or null"), ("id2label", {"a": "b"}, "a mapping of integer keys, or null"),
    pytest.param("use_cache", 10 ** 400, "a bool", id="10**400")])
def test_a_field_of_a_type_transformers_refuses_is_one_line(folders, tmp_path, capsys, field, value, wanted):
    """config.json fields holding a value AutoConfig refuses by its type (or a dtype it cannot read): the import took
    them (the fields it does not model are not read, only kept), and its export wrote them back into a config.json
    AutoConfig cannot load; now one line naming the field, nothing written."""
    hf = tmp_path / "hf"
    shutil.copytree(folders["tied"], hf)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(Exception):  # noqa: B017 (the reference: whatever AutoConfig raises is a refusal)
        transformers.AutoConfig.from_pretrained(hf)
    capsys.readouterr()
    assert load_tool("convert_from_hf").main(["--hf", str(hf), "--output", str(tmp_path / "ckpt")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --hf: {hf / 'config.json'}: field {json.dumps(field)} is {number_text(value, json.dumps)}, "
        f"transformers reads {wanted} there"]
    assert not (tmp_path / "ckpt").exists()


def test_fields_transformers_does_not_know_are_kept_whatever_they_hold(folders, tmp_path, capsys):
    """AutoConfig keeps a field it does not know, whatever its value (SmolLM2's is_llama_config): so do the import
    and the export, whose config.json AutoConfig loads with the same value."""
    hf = tmp_path / "hf"
    shutil.copytree(folders["tied"], hf)
    config = json.loads((hf / "config.json").read_text())
    extra = {"is_llama_config": "yes", "my_notes": {"a": [1, None, 2.5]}, "rope_interleaved": 0}
    (hf / "config.json").write_text(json.dumps({**config, **extra}))
    assert load_tool("convert_from_hf").main(["--hf", str(hf), "--output", str(tmp_path / "ckpt"),
                                             "--no-progress"]) == 0
    assert exported_config_loads(tmp_path / "ckpt", tmp_path) is None
    loaded = transformers.AutoConfig.from_pretrained(tmp_path / "export")
    assert {key: getattr(loaded, key) for key in extra} == extra


@pytest.mark.parametrize("layers", [2, 10 ** 30])
def test_more_layers_than_the_weights_hold_are_refused_before_the_model_is_built(folders, tmp_path, capsys, layers):
    """A config.json giving more decoder layers than the weights hold is refused (transformers leaves them missing,
    initialised at random) before the model is built: 10**30 layers hung the import building it (a random seed of
    the property found it). transformers itself is asked only for the small count: it builds them all."""
    hf = tmp_path / "hf"
    shutil.copytree(folders["tied"], hf)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}))
    if layers < 10:
        assert transformers_reading_with(hf, transformers.AutoConfig.from_pretrained(hf)) is None
    held = config["num_hidden_layers"]
    capsys.readouterr()  # transformers' progress bar
    assert load_tool("convert_from_hf").main(["--hf", str(hf), "--output", str(tmp_path / "ckpt")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --hf: {hf} lacks tensors model.layers.{held}.*: its config.json gives {layers} decoder layers, its "
        f"weights hold {held}"]


def test_an_initializer_range_of_0_is_read_as_transformers_reads_it(folders, tmp_path, capsys):
    """transformers takes `"initializer_range": 0.0` (it reads 0 to 1, and uses it only to initialise weights a
    checkpoint lacks: none here); the import refused it as an init_std that must be positive. It is kept as what the
    export writes (model.initializer_range), with init_std transformers' default, as where config.json has none:
    nanotron's init, which a run resumed from the import does not run. transformers reads 0 as unset: a model it builds
    from that config.json draws its matrices with the default's std, not zeros."""
    imported_as_transformers_reads_it(folders["tied"], tmp_path, capsys, {"initializer_range": 0.0}, None)
    assert json.loads((tmp_path / "export" / "config.json").read_text())["initializer_range"] == 0.0
    init_std = CheckpointReader(tmp_path / "ckpt").model_config.init_std
    assert init_std == transformers.LlamaConfig().initializer_range
    torch.manual_seed(0)
    drawn = transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(tmp_path / "hf"))
    matrices = torch.cat([p.detach().flatten() for name, p in drawn.named_parameters() if "norm" not in name])
    assert matrices.numel() > 2000 and matrices.std().item() == pytest.approx(init_std, rel=0.1)


@pytest.mark.parametrize("field, value", [("max_position_embeddings", 10 ** 400), ("bos_token_id", 10 ** 400),
                                          ("eos_token_id", 10 ** 400), ("eos_token_id", [0, 10 ** 400])],
                         ids=["max_position_embeddings", "bos_token_id", "eos_token_id", "eos_token_id list"])
def test_a_huge_length_or_token_id_is_kept_as_transformers_keeps_it(folders, tmp_path, capsys, field, value):
    """AutoConfig and the model take 10**400 there (a token id outside the vocabulary with a warning; generate reads
    generation_config.json's ids, and without one stops on an id past int64 alike in the folder and its export): the
    import keeps it and the export writes it back, into a config.json AutoConfig loads (checked, found matching)."""
    imported_as_transformers_reads_it(folders["tied"], tmp_path, capsys, {field: value}, None)
    assert json.loads((tmp_path / "export" / "config.json").read_text())[field] == value
