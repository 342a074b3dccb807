"""Property-based test (hypothesis, configured in tests/properties.py) of which files and tensors
tools/convert_from_hf.py reads from a sharded Hugging Face folder (README, Checkpoints and Hugging Face): called in
this process on a copy of a tiny Llama that transformers' own save_pretrained sharded, with the shard layout edited,
it returns 0 with every imported weight bit for bit the one `transformers.LlamaForCausalLM.from_pretrained` loads
from the same folder, or ends with ONE `error: ...` line (exit 2) naming the folder or one of its files, writing
nothing. The reference no one here wrote is transformers itself: it opens the shards the index names (or
model.safetensors beside it, or the file config.json's `transformers_weights` names) and takes every tensor of each,
a later file's over an earlier one's, whatever the weight_map says.

The edits, one to three of them: a tensor copied into another shard (the same, with other values, another dtype or
shape), moved to another shard or into a stray shard, or held under a second name transformers reads as its own;
every name of a shard or of all of them with the `model.` prefix doubled or dropped;
weight_map entries moved, removed or added; a stray shard added to the index or left out of it; a shard moved into a
subfolder; the index naming a shard twice; its metadata removed or of another type; a model.safetensors beside the
index; config.json's transformers_weights naming a file; a shard's header metadata format other than "pt"; a stray
file named as a distributed checkpoint's shard. An untied and a tied model. ~20 s on one core. The cases it found
are held one by one in tests/test_hf_shards_cases.py."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException

from convert_hf_helpers import saved_hf_llama
from helpers import load_tool
from properties import PROPERTY
from test_cli_properties import call_and_check
from test_hf_import_damage_properties import INDEX, TINY_HF, transformers_reading

from nanotronix.checkpoint.reader import CheckpointReader, model_parameter_shapes
from nanotronix.convert.hf_mapping import to_hf_state_dict

# Refusals of a folder transformers loads whole, and why: a tensor in two opened files with different contents
# (transformers takes the later file name's, a reader following the index the index's: the weight depends on the
# reader's order of the files), or under a second name transformers renames to it (it takes the first of the two
# in its order of the names, a reader by the model's names the model's), and a distributed checkpoint's shard name
# (transformers then reads every .safetensors file of the folder through torch.distributed.checkpoint, in its order),
# and a tied config over a stored head of other values (transformers 5 computes with that head, 4 with the embedding)
ORDER_DEPENDENT = ("is in both", "which transformers reads as", "distributed checkpoint",
                   "transformers 5 computes with that head")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """An untied and a tied model, each in shards (a tied one's saved without lm_head.weight)."""
    root = tmp_path_factory.mktemp("hf_shards")
    out = {}
    for seed, tied in enumerate(["untied", "tied"]):
        single = saved_hf_llama(root / f"{tied}_single", seed=seed + 2, tie_word_embeddings=tied == "tied", **TINY_HF)
        transformers.LlamaForCausalLM.from_pretrained(single).save_pretrained(root / tied, max_shard_size="4KB")
        assert len(shards(root / tied)) > 2
        out[tied] = root / tied
    return out


@pytest.fixture(scope="module")
def sharded(folders) -> Path:
    return folders["untied"]


@pytest.fixture(scope="module")
def edits_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_shard_edits")


def shards(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("model-*.safetensors"))


def read_index(folder: Path) -> dict:
    return json.loads((folder / INDEX).read_text())


def write_index(folder: Path, index: dict) -> None:
    (folder / INDEX).write_text(json.dumps(index, indent=1))


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in shards(folder):
        out.update(load_file(folder / name))
    return out


def changed(tensor: torch.Tensor, how: str) -> torch.Tensor:
    """TENSOR as another copy of it holds it: the same, with other values, another dtype or another shape."""
    if how == "same":
        return tensor.clone()
    if how == "values":
        return tensor + 1
    if how == "dtype":
        return tensor.to(torch.bfloat16)
    return torch.zeros(tensor.numel() + 1)


# --- the edits ----------------------------------------------------------------------------------------------------

def copy_tensor(folder: Path, draw) -> str:
    """A tensor copied (or moved) into another shard; the weight_map left as it was, or pointed at the new copy."""
    index = read_index(folder)
    name = draw(st.sampled_from(sorted(all_tensors(folder))))
    source = next(s for s in shards(folder) if name in load_file(folder / s))
    target = draw(st.sampled_from([s for s in shards(folder) if s != source]))
    how = draw(st.sampled_from(["same", "values", "dtype", "shape"]))
    tensors = load_file(folder / target)
    tensors[name] = changed(load_file(folder / source)[name], how)
    save_file(tensors, folder / target, metadata={"format": "pt"})
    moved = draw(st.booleans())
    if moved:
        rest = load_file(folder / source)
        del rest[name]
        save_file(rest, folder / source, metadata={"format": "pt"})
    if draw(st.booleans()):
        index["weight_map"][name] = target
        write_index(folder, index)
    return f"{'move' if moved else 'copy'} {how} {'later' if target > source else 'earlier'}"


def alias_tensor(folder: Path, draw) -> str:
    """A tensor also held under a name transformers renames to it (its base_model_prefix added or dropped), with the
    same or other contents."""
    tensors = all_tensors(folder)
    name = draw(st.sampled_from(sorted(tensors)))
    alias = draw(st.sampled_from([f"model.{name}", f"model_{name}", name.removeprefix("model.")]))
    how = draw(st.sampled_from(["same", "values", "dtype"]))
    target = draw(st.sampled_from(shards(folder)))
    save_file({**load_file(folder / target), alias: changed(tensors[name], how)}, folder / target,
              metadata={"format": "pt"})
    return f"alias {alias.split('.')[0]}. {how}"


PREFIX_RENAMES = ("doubled", "dropped", "doubled with the head")


def rename_with_prefix(shard: Path, how: str) -> None:
    """Every tensor of SHARD named with LlamaForCausalLM's `model.` prefix doubled (model.model.layers.0..., and
    model.lm_head.weight where HOW says so) or dropped (layers.0..., norm.weight: a base LlamaModel's names)."""
    renamed = {}
    for name, tensor in load_file(shard).items():
        if how == "dropped":
            name = name.removeprefix("model.")
        elif name.startswith("model.") or how == "doubled with the head":
            name = f"model.{name}"
        renamed[name] = tensor
    save_file(renamed, shard, metadata={"format": "pt"})


def prefix_names(folder: Path, draw) -> str:
    """Every tensor of one shard, or of all of them, named with the prefix doubled or dropped."""
    how = draw(st.sampled_from(PREFIX_RENAMES))
    every = draw(st.booleans())
    for shard in shards(folder) if every else [draw(st.sampled_from(shards(folder)))]:
        rename_with_prefix(folder / shard, how)
    return f"prefix {how} in {'every shard' if every else 'one shard'}"


def edit_weight_map(folder: Path, draw) -> str:
    """An entry moved to another shard (one lacking the tensor), removed, or added for a tensor of no shard."""
    index = read_index(folder)
    weight_map = index["weight_map"]
    name = draw(st.sampled_from(sorted(weight_map)))
    kind = draw(st.sampled_from(["move", "remove", "add", "twice"]))
    if kind == "move":
        weight_map[name] = draw(st.sampled_from(shards(folder)))
    elif kind == "remove":
        del weight_map[name]
    elif kind == "add":
        weight_map[draw(st.sampled_from(["extra.weight", "model.layers.1.input_layernorm.weight"]))] = \
            draw(st.sampled_from(shards(folder)))
    else:  # one shard under a second name
        weight_map[name] = f"./{weight_map[name]}"
    write_index(folder, index)
    return f"weight_map {kind}"


def stray_shard(folder: Path, draw) -> str:
    """A shard file the index does not name (holding a copy of a tensor with other values, or a tensor of no other
    shard), then perhaps named by an entry; or one named as a distributed checkpoint's shard."""
    tensors = all_tensors(folder)
    name = draw(st.sampled_from(sorted(tensors)))
    held = {name: draw(st.sampled_from([tensors[name] + 1, tensors[name].clone()])),
            "extra.weight": torch.ones(3), "lm_head.weight": torch.ones(TINY_HF["vocab_size"], TINY_HF["hidden_size"])}
    stray = draw(st.sampled_from(["model-00000-of-00004.safetensors", "model-00099-of-00099.safetensors",
                                  "zz.safetensors", "shard-00000-model-00001-of-00001.safetensors"]))
    save_file(held, folder / stray, metadata={"format": "pt"})
    kind = "distributed" if stray.startswith("shard-") else "stray"
    if draw(st.booleans()):
        index = read_index(folder)
        index["weight_map"][draw(st.sampled_from([name, "extra.weight", "lm_head.weight"]))] = stray
        write_index(folder, index)
        kind += " indexed"
    return kind


def subfolder(folder: Path, draw) -> str:
    """A shard moved into a subfolder, its weight_map entries following it or not."""
    shard = draw(st.sampled_from(shards(folder)))
    (folder / "sub").mkdir(exist_ok=True)
    (folder / shard).rename(folder / "sub" / shard)
    followed = draw(st.booleans())
    if followed:
        index = read_index(folder)
        index["weight_map"] = {k: f"sub/{v}" if v == shard else v for k, v in index["weight_map"].items()}
        write_index(folder, index)
    return f"subfolder {'followed' if followed else 'left'}"


def edit_metadata(folder: Path, draw) -> str:
    index = read_index(folder)
    kind = draw(st.sampled_from(["removed", "{}", "[]", "null", '"pt"', "3", "dtype"]))
    if kind == "removed":
        index.pop("metadata")
    elif kind == "dtype":
        index["metadata"] = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
        # what transformers reads only to choose the type it loads in where neither the caller nor config.json does
        index["metadata"]["dtype"] = draw(st.sampled_from(["float16", "bfloat16", "int8", "nothing", 3, None]))
    else:
        index["metadata"] = json.loads(kind)
    write_index(folder, index)
    return f"metadata {kind}"


def single_beside(folder: Path, draw) -> str:
    """A model.safetensors beside the index (an older save's, with other values), the index perhaps damaged."""
    tensors = {k: v + 1 for k, v in all_tensors(folder).items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    damage = draw(st.sampled_from(["none", "not JSON", "no metadata"]))
    if damage == "not JSON":
        (folder / INDEX).write_text("{")
    elif damage == "no metadata":
        index = read_index(folder)
        index.pop("metadata", None)
        write_index(folder, index)
    return f"model.safetensors beside an index, {damage}"


def name_weights(folder: Path, draw) -> str:
    """config.json's transformers_weights naming a file: a shard, a whole file with other values, the index, one
    missing, one outside the folder, or no file name."""
    save_file({k: v * 2 for k, v in all_tensors(folder).items()}, folder / "whole.safetensors",
              metadata={"format": "pt"})
    named = draw(st.sampled_from([shards(folder)[0], "whole.safetensors", "./whole.safetensors", INDEX,
                                  "missing.safetensors", "missing.safetensors.index.json", "model.bin",
                                  f"../{folder.name}/whole.safetensors", str(folder / "whole.safetensors"), 3,
                                  None]))
    config = json.loads((folder / "config.json").read_text())
    config["transformers_weights"] = named
    (folder / "config.json").write_text(json.dumps(config))
    return f"transformers_weights {named if named in (None, 3, INDEX) else Path(str(named)).name}"


def header_format(folder: Path, draw) -> str:
    shard = draw(st.sampled_from(shards(folder)))
    metadata = draw(st.sampled_from([{"format": "np"}, {"format": "tf"}, {"format": ""}, {"other": "x"}, None]))
    save_file(load_file(folder / shard), folder / shard, metadata=metadata)
    return "header format"


# in the order they are made: the shards' contents, then the index (the last may leave it unreadable)
EDITS = {"copy": copy_tensor, "alias": alias_tensor, "prefix": prefix_names, "stray": stray_shard,
         "format": header_format,
         "named": name_weights, "weight_map": edit_weight_map, "subfolder": subfolder, "metadata": edit_metadata,
         "single": single_beside}


# --- the readings -------------------------------------------------------------------------------------------------

def imported_weights(output: Path) -> dict[str, torch.Tensor]:
    """The imported checkpoint's weights by their Hugging Face names, as its reader gives them."""
    reader = CheckpointReader(output)
    cfg = reader.model_config
    return to_hf_state_dict(reader.tensors(sorted(model_parameter_shapes(cfg))), cfg)


def import_folder(hf: Path, work: Path) -> tuple[int, str]:
    code, _, err = call_and_check(load_tool("convert_from_hf").main,
                                  [("text", "--hf"), ("path", "hf"), ("text", "--output"),
                                   ("text", str(work / "ckpt")), ("text", "--no-progress")], {"hf": str(hf)}, work,
                                  writes=True)
    return code, err


def check_against_transformers(hf: Path, work: Path, said: str) -> str:
    """Import HF and hold the result against transformers' reading of it; the outcome, for the events."""
    code, err = import_folder(hf, work)
    try:
        reference = transformers_reading(hf)[0]
    except CheckpointException:  # a BaseException: transformers refusing a folder it reads as a distributed checkpoint
        reference = None
    if code == 0:
        assert reference is not None, (said, "imported a folder transformers does not load whole")
        ours, theirs = imported_weights(work / "ckpt"), reference.state_dict()
        for name, tensor in ours.items():
            assert torch.equal(tensor, theirs[name]), (said, name)
        if "lm_head.weight" not in ours:  # tied: transformers' head must be the embedding too (a stored head of
            # other values, which transformers 5 computes with, was imported as the embedding and passed here)
            assert torch.equal(theirs["lm_head.weight"], ours["model.embed_tokens.weight"]), said
        return "imported"
    line = err.strip().splitlines()[-1]
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(hf) in line, (said, err)
    assert not (work / "ckpt").exists(), (said, "a refused import left its output")
    if reference is not None:  # transformers loads it whole: refused only where its weight depends on an order
        assert any(reason in line for reason in ORDER_DEPENDENT), (said, line)
        return "refused, order-dependent"
    return "refused, as transformers"


@settings(PROPERTY, max_examples=200)
@given(data=st.data())
def test_shards_are_read_as_transformers_reads_them(folders, edits_root, data):
    which = data.draw(st.sampled_from(sorted(folders)), "folder")
    work = Path(tempfile.mkdtemp(dir=edits_root))
    try:
        hf = work / "hf"
        shutil.copytree(folders[which], hf)
        kinds = sorted(data.draw(st.lists(st.sampled_from(list(EDITS)), min_size=1, max_size=3, unique=True), "edits"),
                       key=list(EDITS).index)
        said = "; ".join(EDITS[kind](hf, data.draw) for kind in kinds)
        for part in said.split("; "):
            event(part)
        event(check_against_transformers(hf, work, said))
    finally:
        shutil.rmtree(work, ignore_errors=True)
