"""The cases tests/test_hf_shards_properties.py's property found (each a bug once), each held on its own: a copy of
the property's tiny sharded Llama folders (its `folders` and `sharded` fixtures) edited one way, imported by
tools/convert_from_hf.py and held against what `transformers.LlamaForCausalLM.from_pretrained` loads from it; and
config.json's and generation_config.json's values beside the weights (huge numbers said by their length, a folder in
the generation config's place)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from helpers import load_tool
import test_hf_shards_properties as shards_property
from test_hf_shards_properties import (PREFIX_RENAMES, all_tensors, changed, imported_weights, read_index,
                                       rename_with_prefix, shards, write_index)
from test_hf_import_damage_properties import INDEX, TINY_HF, transformers_reading

from nanotronix.checkpoint.reader import CheckpointReader
from nanotronix.errors import SHOWN_DIGITS, number_text

# the fixtures: the property's tiny Llama folders, saved by transformers, made for this module
folders, sharded = shards_property.folders, shards_property.sharded


def edited_copy(sharded: Path, tmp_path: Path) -> Path:
    hf = tmp_path / "hf"
    shutil.copytree(sharded, hf)
    return hf


def refused_with(hf: Path, tmp_path: Path, capsys, line: str) -> None:
    capsys.readouterr()
    assert load_tool("convert_from_hf").main(["--hf", str(hf), "--output", str(tmp_path / "ckpt")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {line}"]
    assert not (tmp_path / "ckpt").exists()


def imported_as_transformers(hf: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """HF imported, its weights bit for bit those transformers loads from it; returns them."""
    assert load_tool("convert_from_hf").main(["--hf", str(hf), "--output", str(tmp_path / "ckpt"),
                                             "--no-progress"]) == 0
    theirs = transformers_reading(hf)[0].state_dict()
    ours = imported_weights(tmp_path / "ckpt")
    assert all(torch.equal(tensor, theirs[name]) for name, tensor in ours.items())
    return ours


@pytest.mark.parametrize("how, differ", [("values", "values"), ("dtype", "dtypes (F32, BF16)"),
                                         ("shape", "shapes ([32, 16], [513])"), ("same", None)])
def test_a_tensor_in_two_shards_is_read_only_where_the_copies_agree(sharded, tmp_path, capsys, how, differ):
    """transformers takes a tensor held by two shards from the later file name, whatever the weight_map says, and
    a reader following the map takes the other: copies that differ were imported as the later one (a weight that
    depends on the reader); they are refused, naming both files. Copies alike are imported."""
    hf = edited_copy(sharded, tmp_path)
    weight_map = read_index(hf)["weight_map"]
    name = "model.embed_tokens.weight"
    first, last = weight_map[name], shards(hf)[-1]
    assert first < last
    tensors = load_file(hf / last)
    save_file({**tensors, name: changed(load_file(hf / first)[name], how)}, hf / last, metadata={"format": "pt"})
    if differ is None:
        imported_as_transformers(hf, tmp_path)
        return
    reference = transformers_reading(hf)[0]
    assert reference is not None or how == "shape"  # a copy of another shape: mismatched
    if how == "values":  # the later file's copy, not the one the weight_map names
        assert torch.equal(reference.state_dict()[name], load_file(hf / last)[name])
    refused_with(hf, tmp_path, capsys, f"--hf: {hf}: tensor {name} is in both {first} and {last}, with different "
                                       f"{differ}: which one is read depends on the reader")


@pytest.mark.parametrize("alias", ["model.model.norm.weight", "embed_tokens.weight"])
@pytest.mark.parametrize("how", ["values", "same"])
def test_a_tensor_under_a_second_name_transformers_reads_is_read_only_where_they_agree(sharded, tmp_path, capsys,
                                                                                       alias, how):
    """transformers renames a tensor named with LlamaForCausalLM's base_model_prefix before it, or without the one it
    has, to the model's name, and takes the first of the two in its order of the names (model.model.norm.weight
    before model.norm.weight, embed_tokens.weight before model.embed_tokens.weight): the import read the model's name
    alone and warned of the other as a tensor it has no place for, so its weight differed from transformers'."""
    hf = edited_copy(sharded, tmp_path)
    name = alias.removeprefix("model.") if alias.startswith("model.model.") else f"model.{alias}"
    last = shards(hf)[-1]
    save_file({**load_file(hf / last), alias: changed(all_tensors(hf)[name], how)}, hf / last,
              metadata={"format": "pt"})
    if how == "same":
        imported_as_transformers(hf, tmp_path)
        return
    assert torch.equal(transformers_reading(hf)[0].state_dict()[name], load_file(hf / last)[alias])
    held = read_index(hf)["weight_map"][name]
    refused_with(hf, tmp_path, capsys, f"--hf: {hf}: tensor {name} is in {last} as {alias}, which transformers reads "
                                       f"as {name}, and in {held}, with different values: which one is read depends "
                                       "on the reader")


@pytest.mark.parametrize("tied", [True, False])
def test_a_base_llama_model_is_read_as_transformers_reads_it(tmp_path, capsys, tied):
    """A base LlamaModel saved by transformers names its tensors without LlamaForCausalLM's base_model_prefix
    (embed_tokens.weight, layers.0...) and has no lm_head: LlamaForCausalLM.from_pretrained renames every one to the
    model's name, and a tied model's head is its embedding, so it is imported (it was refused as lacking
    model.embed_tokens.weight); an untied one's head transformers initialises at random: refused, naming it."""
    cfg = transformers.LlamaConfig(**{**TINY_HF, "tie_word_embeddings": tied})
    torch.manual_seed(5)
    hf = tmp_path / "base"
    transformers.LlamaModel(cfg).save_pretrained(hf)
    assert not any(name.startswith("model.") for name in load_file(hf / "model.safetensors"))
    if tied:
        ours = imported_as_transformers(hf, tmp_path)
        assert torch.equal(ours["model.norm.weight"], load_file(hf / "model.safetensors")["norm.weight"])
        return
    assert transformers_reading(hf)[0] is None  # lm_head.weight missing: initialised at random
    refused_with(hf, tmp_path, capsys, f"--hf: {hf} has untied embeddings but no lm_head.weight (transformers would "
                                       "initialise the head at random)")


@pytest.mark.parametrize("which", ["tied", "untied"])
@pytest.mark.parametrize("how", PREFIX_RENAMES)
def test_weights_named_with_the_prefix_doubled_or_dropped_are_read_as_transformers_reads_them(folders, tmp_path,
                                                                                             which, how):
    """Every tensor of every shard named with `model.` doubled (model.model.layers.0..., model.lm_head.weight) or
    dropped (layers.0..., norm.weight): transformers renames each to the model's name; the import refused the folder
    as lacking model.embed_tokens.weight."""
    hf = edited_copy(folders[which], tmp_path)
    for shard in shards(hf):
        rename_with_prefix(hf / shard, how)
    imported_as_transformers(hf, tmp_path)


@pytest.mark.parametrize("how, said", [("reshape", "[3], but its config.json makes it [16]"),
                                       ("retype", "I32, not floating point")])
def test_a_renamed_tensor_refused_is_named_as_the_folder_holds_it(sharded, tmp_path, capsys, how, said):
    """A tensor read under a name transformers renames (norm.weight, as a base LlamaModel saves it) and refused for its
    shape or type: the line said the model's name alone, model.norm.weight, which no file of the folder holds."""
    hf = edited_copy(sharded, tmp_path)
    for shard in shards(hf):
        rename_with_prefix(hf / shard, "dropped")
    file = next(hf / shard for shard in shards(hf) if "norm.weight" in load_file(hf / shard))
    tensors = load_file(file)
    tensors["norm.weight"] = torch.zeros(3) if how == "reshape" else tensors["norm.weight"].to(torch.int32)
    save_file(tensors, file, metadata={"format": "pt"})
    refused_with(hf, tmp_path, capsys, f"--hf: {hf}: tensor model.norm.weight (held as norm.weight) is {said}"
                 + (" (a quantized model? convert from its unquantized weights)" if how == "retype" else ""))


def test_a_tied_head_of_another_shape_is_named_as_the_folder_holds_it(folders, tmp_path, capsys):
    """model.lm_head.weight, which transformers reads as lm_head.weight, of another shape than the embedding of a tied
    model: the line named lm_head.weight alone, which no file of the folder holds."""
    hf = edited_copy(folders["tied"], tmp_path)
    last = hf / shards(hf)[-1]
    save_file({**load_file(last), "model.lm_head.weight": torch.zeros(3, 16)}, last, metadata={"format": "pt"})
    assert transformers_reading(hf)[0] is None  # as transformers refuses it
    refused_with(hf, tmp_path, capsys, f"--hf: {hf}: tensor lm_head.weight (held as model.lm_head.weight) is [3, 16], "
                                       "but its config.json ties it to the embedding, [32, 16]")


@pytest.mark.parametrize("metadata, why", [(None, "no 'metadata'"),
                                           ("[]", "its metadata is a JSON array, not an object"),
                                           ("null", "its metadata is a JSON null, not an object"),
                                           ('"pt"', "its metadata is a JSON string, not an object")])
def test_an_index_without_a_metadata_object_is_refused(sharded, tmp_path, capsys, metadata, why):
    """transformers refuses an index with no metadata object (it adds its keys to it); the import read it."""
    hf = edited_copy(sharded, tmp_path)
    index = read_index(hf)
    if metadata is None:
        del index["metadata"]
    else:
        index["metadata"] = json.loads(metadata)
    write_index(hf, index)
    assert transformers_reading(hf)[0] is None
    refused_with(hf, tmp_path, capsys, f"--hf: {hf / INDEX}: not a safetensors index ({why})")


def test_model_safetensors_beside_an_index_is_read_alone(sharded, tmp_path):
    """transformers takes model.safetensors over an index beside it, which it does not read: the import read the
    index first and refused a damaged one."""
    hf = edited_copy(sharded, tmp_path)
    save_file({k: v + 1 for k, v in all_tensors(hf).items()}, hf / "model.safetensors", metadata={"format": "pt"})
    (hf / INDEX).write_text("{")
    assert torch.equal(imported_as_transformers(hf, tmp_path)["model.norm.weight"],
                       load_file(hf / "model.safetensors")["model.norm.weight"])


def test_the_weights_file_config_json_names_is_read_and_not_exported(sharded, tmp_path):
    """transformers loads the file config.json's transformers_weights names, whatever else the folder holds: the
    import read the shards instead (other weights), and its export carried the key over, so transformers looked for
    that file in the exported folder and could not load it."""
    hf = edited_copy(sharded, tmp_path)
    save_file({k: v * 2 for k, v in all_tensors(hf).items()}, hf / "whole.safetensors", metadata={"format": "pt"})
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "transformers_weights": "whole.safetensors"}))
    ours = imported_as_transformers(hf, tmp_path)
    assert torch.equal(ours["model.norm.weight"], load_file(hf / "whole.safetensors")["model.norm.weight"])
    assert load_tool("convert_to_hf").main(["--checkpoint", str(tmp_path / "ckpt"), "--output",
                                           str(tmp_path / "export")]) == 0
    exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).state_dict()
    assert all(torch.equal(tensor, exported[name]) for name, tensor in ours.items())


@pytest.mark.parametrize("named, why", [
    (3, "transformers_weights is a JSON number, not a file name"),
    ("model.bin", "transformers_weights: 'model.bin' is not a .safetensors or .safetensors.index.json file"),
    ("../x/whole.safetensors", "transformers_weights: '../x/whole.safetensors' lies outside {hf}"),
])
def test_a_weights_file_transformers_refuses_to_read_is_refused(sharded, tmp_path, capsys, named, why):
    hf = edited_copy(sharded, tmp_path)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "transformers_weights": named}))
    assert transformers_reading(hf)[0] is None
    refused_with(hf, tmp_path, capsys, f"--hf: {hf / 'config.json'}: {why.format(hf=hf)}")


def test_a_distributed_checkpoint_shard_name_is_refused(sharded, tmp_path, capsys):
    """A file named as a distributed checkpoint's shard makes transformers read every .safetensors file of the
    folder through torch.distributed.checkpoint (here a stray copy of a tensor with other values among them): the
    import read the index's shards and said nothing."""
    hf = edited_copy(sharded, tmp_path)
    stray = "shard-00000-model-00001-of-00001.safetensors"
    save_file({"model.norm.weight": torch.zeros(16)}, hf / stray, metadata={"format": "pt"})
    refused_with(hf, tmp_path, capsys, f"--hf: {hf}: {stray} makes transformers read the folder as a distributed "
                                       "checkpoint (every .safetensors file of it), which convert_from_hf does not "
                                       "read")


def test_pickled_weights_are_refused_in_one_line(sharded, tmp_path, capsys):
    """A folder of .bin (pickle) weights alone, which transformers loads, is refused (the import reads safetensors
    alone); a .bin shard named by the safetensors index, which transformers refuses too, is one line naming it."""
    hf = edited_copy(sharded, tmp_path)
    last = shards(hf)[-1]
    torch.save(load_file(hf / last), hf / "pytorch_model-00099.bin")
    (hf / last).unlink()
    index = read_index(hf)
    index["weight_map"] = {k: "pytorch_model-00099.bin" if v == last else v for k, v in index["weight_map"].items()}
    write_index(hf, index)
    assert transformers_reading(hf)[0] is None
    refused = f"--hf: {hf / 'pytorch_model-00099.bin'}: cannot be read as safetensors"
    capsys.readouterr()
    assert load_tool("convert_from_hf").main(["--hf", str(hf), "--output", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {refused} ("), err
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(hf / "config.json", pickled)
    torch.save(all_tensors(sharded), pickled / "pytorch_model.bin")
    assert transformers_reading(pickled)[0] is not None
    refused_with(pickled, tmp_path, capsys, f"--hf: {pickled}: only .bin (pickle) weights found; convert_from_hf "
                                            "reads .safetensors (re-save the model with safe_serialization=True)")


# --- config.json and generation_config.json, beside the weights ---------------------------------------------------

@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "head_dim", "pad_token_id",
                                   "rope_theta"])
def test_a_huge_number_in_config_json_is_said_by_its_length(sharded, tmp_path, capsys, field, sign):
    """A config.json value of 10**400 put its 401 digits into the error line (a vocab_size twice: itself and the
    weight it makes; a rope_theta beside rope_parameters' own, in the line naming both); an integer of more digits
    than errors.SHOWN_DIGITS is said by its digit count."""
    hf = edited_copy(sharded, tmp_path)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, field: sign * 10 ** 400}))
    capsys.readouterr()
    assert load_tool("convert_from_hf").main(["--hf", str(hf), "--output", str(tmp_path / "ckpt")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --hf: {hf}"), lines
    assert "integer of 401 digits>" in lines[0] and not re.search(f"[0-9]{{{SHOWN_DIGITS + 1}}}", lines[0]), lines


@pytest.mark.parametrize("field, value", [("eos_token_id", [10 ** 400, True]), ("use_cache", {"a": [-10 ** 400]})])
def test_a_huge_number_inside_a_refused_value_is_said_by_its_length(sharded, tmp_path, capsys, field, value):
    """A value of a type transformers refuses is said as config.json writes it, but for its integers of more digits
    than errors.SHOWN_DIGITS, said by their digit count: json.dumps wrote a list's or a mapping's 401 digits."""
    hf = edited_copy(sharded, tmp_path)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, field: value}))
    shown = json.dumps(value).replace(str(10 ** 400), "<an integer of 401 digits>").replace(
        "-<an integer", "<a negative integer")
    said = "an integer, a list of integers or null" if field == "eos_token_id" else "a bool"
    refused_with(hf, tmp_path, capsys, f"--hf: {hf / 'config.json'}: field \"{field}\" is {shown}, transformers "
                                       f"reads {said} there")


def test_number_text_shows_an_integer_whole_up_to_its_limit():
    """Python's own writing of the number is the reference: whole up to SHOWN_DIGITS digits, its length past them."""
    for value in (0, 7, -7, 10 ** SHOWN_DIGITS - 1, -(10 ** SHOWN_DIGITS - 1), 2.5, True, "12"):
        assert number_text(value) == str(value)
    assert number_text(None, json.dumps) == "null"
    for value in (10 ** SHOWN_DIGITS, 10 ** SHOWN_DIGITS + 1, 99 * 10 ** 600, -(10 ** SHOWN_DIGITS), -(10 ** 700)):
        sign = "a negative" if value < 0 else "an"
        assert number_text(value) == f"<{sign} integer of {len(str(abs(value)))} digits>"


def test_a_generation_config_json_that_is_a_folder_is_read_as_none(sharded, tmp_path):
    """transformers reads a folder named generation_config.json as no generation config: GenerationConfig's
    from_pretrained says the file is missing, word for word as where there is none, and the model's from_pretrained
    then builds one from config.json. The import records none, as for a folder without one (found matching)."""
    hf = edited_copy(sharded, tmp_path)
    none = tmp_path / "none"
    shutil.copytree(sharded, none)
    (none / "generation_config.json").unlink()
    (hf / "generation_config.json").unlink()
    (hf / "generation_config.json").mkdir()
    said = []
    for folder in (hf, none):
        with pytest.raises(OSError) as e:
            transformers.GenerationConfig.from_pretrained(folder)
        said.append(str(e.value).replace(str(folder), "FOLDER"))
    assert said[0] == said[1] and "does not appear to have a file named generation_config.json" in said[0]
    imported_as_transformers(hf, tmp_path)
    assert CheckpointReader(tmp_path / "ckpt").manifest["source"]["hf"]["generation_config"] is None
