"""Property-based tests (hypothesis, configured in tests/properties.py) of what tools/convert_from_hf.py does with a
damaged or hand-edited Hugging Face folder (README, Checkpoints and Hugging Face): called in this process on a copy
of a real folder whose files were edited, it returns 0 with a checkpoint whose model gives the logits transformers
gives loading the same edited folder (in fp32), or ends with ONE `error: ...` line (exit 2) naming the folder or
one of its files; never a traceback, a file written into the folder, or a half-written output.

The folders, written once by transformers' own save_pretrained: a tied model in one model.safetensors, an untied
one in shards with model.safetensors.index.json. The edits: config.json (a key deleted, a value of another type,
the same value written as another JSON type (1 as 1.0 or "1", true as 1), a number changed, the head counts changed
together, another model_type / architectures / rope_scaling / torch_dtype, or the text damaged:
tests/properties.py's damaged_json); a safetensors header (its length prefix, a tensor's dtype string, shape or
data_offsets); a weight file truncated or extended; tensors removed, added, renamed (one, or every one of a file
with `model.` doubled or dropped, as a base LlamaModel names them), reshaped, retyped or given a NaN (the file
rewritten by safetensors itself); the index (an entry dropped or pointed at a missing, another, an absolute or a
`..` shard, a value of another type, or its text damaged); a file emptied, deleted or replaced by a folder.

Where the import succeeds, transformers' AutoConfig must load the edited config.json, transformers must load the
edited folder with every weight from it (nothing missing or resized; tensors it does not expect it leaves out, as the
import does) and give the same logits, and after a config.json edit the export of the imported checkpoint (which
writes back the fields nanotronix does not model) must hold a config.json AutoConfig loads. Where it refuses and
transformers loads every weight, the refusal must be one README documents (`DOCUMENTED`); a config.json AutoConfig
refuses, for a value's type alone too (`use_cache: "x"`, `rms_norm_eps: 1`), must be refused. ~15 s on one core.
The cases it found are held one by one in tests/test_hf_import_damage_cases.py."""
from __future__ import annotations

import copy
import json
import math
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from checkpoint_helpers import adamw, load_single
from convert_hf_helpers import saved_hf_llama
from helpers import load_tool
from properties import PROPERTY, damaged_json
from test_checkpoint_manifest_properties import OTHER_VALUES
from test_cli_properties import call_and_check

from nanotronix.checkpoint.hf_export import export_to_hf
from nanotronix.checkpoint.reader import CheckpointReader
from nanotronix.model import build_model

TINY_HF = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
               vocab_size=32, max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=0,
               eos_token_id=0)
IDS = torch.randint(0, TINY_HF["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
INDEX = "model.safetensors.index.json"
# Refusals README documents of a folder transformers loads whole: a model field missing from config.json (not
# filled with transformers' defaults, which differ between its versions), what this model does not compute, the
# trainer's own checks of the model fields, bias tensors, weights that are not finite or not floating point, a config
# or generation config that is not a JSON object (": model.", the trainer's check naming its field right after the
# file: "model." alone excused any line naming a tensor, "lacks tensor model.norm.weight" of a folder transformers
# loads too)
DOCUMENTED = ("is missing", "not supported", ": model.", "bias tensors", "NaN or infinite", "not floating point",
              "not a Llama config", "rope_theta", "generation_config.json", "not an object", "nested too deeply",
              "quantized")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_damage")
    tied = saved_hf_llama(root / "tied", tie_word_embeddings=True, **TINY_HF)
    untied = saved_hf_llama(root / "untied_single", seed=1, tie_word_embeddings=False, **TINY_HF)
    transformers.LlamaForCausalLM.from_pretrained(untied).save_pretrained(root / "sharded", max_shard_size="4KB")
    assert (root / "sharded" / INDEX).is_file() and len(list((root / "sharded").glob("model-*.safetensors"))) > 2
    return {"tied": tied, "sharded": root / "sharded"}


@pytest.fixture(scope="module")
def edits_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_edits")


# --- the edits ----------------------------------------------------------------------------------------------------

def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def recast(value) -> list:
    """VALUE written as other JSON types, as a hand edit or another tool writes it (the same number as an integer, a
    float or text, a bool as 0 or 1, a token id as a list of one)."""
    if isinstance(value, bool):
        return [int(value), json.dumps(value), None]
    if isinstance(value, int):
        return [float(value), str(value), [value], value != 0]
    if isinstance(value, float):
        return [str(value), [value]] + ([int(value)] if value.is_integer() else [])
    if isinstance(value, str):
        return [[value], None]
    if value is None:
        return [0, False, "null", "", []]
    if isinstance(value, list):
        return [value[0] if value else None, {}]
    return [list(value), json.dumps(value), []]  # a mapping


def edit_config(folder: Path, draw) -> str:
    config = json.loads((folder / "config.json").read_text())
    kind = draw(st.sampled_from(["delete", "retype", "recast", "number", "heads", "kind", "none"]))
    key = draw(st.sampled_from(sorted(config)))
    if kind == "delete":
        del config[key]
    elif kind == "retype":
        config[key] = copy.deepcopy(draw(st.sampled_from(OTHER_VALUES)))
    elif kind == "recast":
        config[key] = draw(st.sampled_from(recast(config[key])))
    elif kind == "number":
        key = draw(st.sampled_from(sorted(k for k, v in config.items() if isinstance(v, (int, float))
                                          and not isinstance(v, bool))))
        old = config[key]
        config[key] = draw(st.sampled_from([old + 1, old - 1, old * 2, 0, old * 0, -old, 10 ** 30, math.nan,
                                            float(old)]))  # old * 0: 0.0 in a float field
    elif kind == "heads":  # changed together, consistently: the model they describe has other shapes
        heads = draw(st.sampled_from([1, 2, 4]))
        config.update(num_attention_heads=heads, num_key_value_heads=draw(st.sampled_from([1, heads])),
                      head_dim=config["hidden_size"] // heads)
    elif kind == "kind":
        key, value = draw(st.sampled_from([
            ("model_type", "mistral"), ("model_type", "qwen2"), ("model_type", None),
            ("architectures", ["MistralForCausalLM"]), ("architectures", []), ("architectures", "LlamaForCausalLM"),
            ("rope_scaling", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 32}),
            ("rope_scaling", {"type": "linear", "factor": 2.0}), ("rope_scaling", {"rope_type": "default"}),
            ("rope_scaling", None), ("rope_parameters", {"rope_type": "default", "rope_theta": 500000.0}),
            ("rope_parameters", {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}),
            ("torch_dtype", "bfloat16"), ("torch_dtype", "float16"), ("torch_dtype", "int8"), ("torch_dtype", 3),
            ("dtype", "float16"), ("hidden_act", "gelu"), ("attention_bias", True), ("mlp_bias", "false"),
            ("quantization_config", {"quant_method": "bitsandbytes"})]))
        config[key] = value
    data, damage = draw(damaged_json(config))
    (folder / "config.json").write_bytes(data)
    return f"config {kind} {key} {damage}"


def rewrite_header(file: Path, change) -> None:
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def edit_header(folder: Path, draw) -> str:
    file = draw(st.sampled_from(weight_files(folder)))
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    names = sorted(k for k in json.loads(raw[8:8 + n]) if k != "__metadata__")
    name = draw(st.sampled_from(names))
    kind = draw(st.sampled_from(["length", "dtype", "shape", "offsets", "swap"]))
    if kind == "length":
        file.write_bytes(struct.pack("<Q", draw(st.sampled_from([0, 7, n - 1, n + 8, len(raw), 2 ** 63]))) + raw[8:])
    elif kind == "dtype":
        dtype = draw(st.sampled_from(["F16", "BF16", "F64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "f32", "X"]))
        rewrite_header(file, lambda h: h[name].update(dtype=dtype))
    elif kind == "shape":
        shape = draw(st.lists(st.integers(0, 64), max_size=3))
        rewrite_header(file, lambda h: h[name].update(shape=shape))
    elif kind == "offsets":
        def shift(h):
            begin, end = h[name]["data_offsets"]
            h[name]["data_offsets"] = draw(st.sampled_from([[begin + 4, end + 4], [begin, end + 4], [0, end - begin],
                                                            [end, begin], [begin, 2 ** 40], [-1, end]]))
        rewrite_header(file, shift)
    else:  # two tensors' places exchanged (same sizes: the file reads, with other values in them)
        other = draw(st.sampled_from(names))
        rewrite_header(file, lambda h: h.update({name: h[other], other: h[name]}))
    return f"header {kind}"


def edit_bytes(folder: Path, draw) -> str:
    file = draw(st.sampled_from(weight_files(folder)))
    raw = file.read_bytes()
    if draw(st.booleans()):
        file.write_bytes(raw[:draw(st.integers(0, len(raw) - 1))])
        return "bytes truncated"
    file.write_bytes(raw + b"\0" * draw(st.sampled_from([1, 8, 64])))
    return "bytes extended"


def edit_tensors(folder: Path, draw) -> str:
    file = draw(st.sampled_from(weight_files(folder)))
    tensors = load_file(file)
    name = draw(st.sampled_from(sorted(tensors)))
    kind = draw(st.sampled_from(["remove", "add", "rename", "prefix", "reshape", "retype", "nan"]))
    if kind == "prefix":  # every name of the file with `model.` doubled or dropped (a base LlamaModel's names)
        doubled = draw(st.booleans())
        tensors = {(f"model.{key}" if doubled else key.removeprefix("model.")): tensor
                   for key, tensor in tensors.items()}
        kind += " doubled" if doubled else " dropped"
    elif kind == "remove":
        del tensors[name]
    elif kind == "add":
        tensors[draw(st.sampled_from(["extra.weight", "model.layers.0.self_attn.q_proj.bias", "lm_head.weight",
                                      "model.layers.0.self_attn.rotary_emb.inv_freq"]))] = torch.ones(4)
    elif kind == "rename":
        renamed = draw(st.sampled_from(["model." + name, name.replace("weight", "w"), "lm_head.weight"]))
        tensors[renamed] = tensors.pop(name)
    elif kind == "reshape":
        tensors[name] = torch.zeros(draw(st.sampled_from([(3,), (tensors[name].numel(),), (2, 8), (16, 16)])))
    elif kind == "retype":
        dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int8]))
        tensors[name] = tensors[name].to(dtype)
    else:
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = draw(st.sampled_from([math.nan, math.inf]))
    save_file(tensors, file, metadata={"format": "pt"})
    return f"tensors {kind}"


def edit_index(folder: Path, draw) -> str:
    index = json.loads((folder / INDEX).read_text())
    weight_map = index["weight_map"]
    name = draw(st.sampled_from(sorted(weight_map)))
    shards = sorted({*weight_map.values()})
    kind = draw(st.sampled_from(["drop", "missing", "other", "absolute", "up", "retype", "map", "none"]))
    if kind == "drop":
        del weight_map[name]
    elif kind == "missing":
        weight_map[name] = "model-00099-of-00099.safetensors"
    elif kind == "other":
        weight_map[name] = draw(st.sampled_from(shards))
    elif kind == "absolute":
        weight_map[name] = str(folder / weight_map[name])
    elif kind == "up":
        weight_map[name] = f"../{folder.name}/{weight_map[name]}"
    elif kind == "retype":
        weight_map[name] = copy.deepcopy(draw(st.sampled_from(OTHER_VALUES)))
    elif kind == "map":
        index["weight_map"] = copy.deepcopy(draw(st.sampled_from(OTHER_VALUES)))
    data, damage = draw(damaged_json(index))
    (folder / INDEX).write_bytes(data)
    return f"index {kind} {damage}"


def edit_file(folder: Path, draw) -> str:
    file = draw(st.sampled_from(sorted(p for p in folder.iterdir())))
    kind = draw(st.sampled_from(["empty", "delete", "folder"]))
    if kind == "empty":
        file.write_bytes(b"")
    else:
        file.unlink()
        if kind == "folder":
            file.mkdir()
    return f"file {kind} {'weights' if file.suffix == '.safetensors' else file.name}"


# Fields of generation_config.json that nanotronix.convert.hf_generation_config's rules read, and two no rule reads
GENERATION_FIELDS = ["early_stopping", "max_new_tokens", "num_return_sequences", "num_beams", "do_sample",
                     "suppress_tokens", "forced_eos_token_id", "cache_implementation", "watermarking_config",
                     "streamer", "dtype", "pad_token_id", "temperature", "my_own_field"]


def edit_generation_config(folder: Path, draw) -> str:
    """One to three fields of generation_config.json set to a drawn value (with transformers' _from_model_config
    kept, or dropped: only then does it read fields it does not know)."""
    file = folder / "generation_config.json"
    config = json.loads(file.read_text())
    if draw(st.booleans()):
        config.pop("_from_model_config", None)
    values = OTHER_VALUES + ["never", "static", [0], [1, 0], {"dtype": 1}, {"seeding_scheme": "x"}]
    edits = dict(draw(st.lists(st.tuples(st.sampled_from(GENERATION_FIELDS), st.sampled_from(values)), min_size=1,
                               max_size=3)))
    config.update(copy.deepcopy(edits))
    file.write_text(json.dumps(config))
    return f"generation_config.json {'with' if '_from_model_config' in config else 'without'} _from_model_config: " \
        f"{sorted(edits)}"


EDITS = {"config": edit_config, "header": edit_header, "bytes": edit_bytes, "tensors": edit_tensors,
         "index": edit_index, "file": edit_file, "generation": edit_generation_config}


# --- the readings -------------------------------------------------------------------------------------------------

def transformers_reading(folder: Path) -> tuple[object, bool]:
    """transformers' fp32 model of FOLDER, or None where it refuses it or does not load every weight from it
    (missing ones it would initialise at random, resized ones), and whether AutoConfig refuses FOLDER's config.json
    (for a value's type alone too: `use_cache: "x"`, `attention_bias: null`, `rms_norm_eps: 1`)."""
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except Exception:  # noqa: BLE001 (whatever it raises is a refusal)
        if currently_in_test_context():  # not in the cases below the property
            event("AutoConfig refuses config.json")
        return None, True
    return transformers_reading_with(folder, config), False


def exported_config_loads(output: Path, work: Path) -> str | None:
    """None where AutoConfig loads the config.json of the export of the checkpoint OUTPUT (the imported config.json's
    fields nanotronix does not model written back) and GenerationConfig its generation_config.json (the imported one
    written back), else what it raised."""
    export_to_hf(output, work / "export", progress=False, log=lambda _: None)
    try:
        transformers.AutoConfig.from_pretrained(work / "export")
        transformers.GenerationConfig.from_pretrained(work / "export")
    except Exception as e:  # noqa: BLE001 (whatever it raises is a refusal)
        return f"{type(e).__name__}: {e}"
    return None


def transformers_reading_with(folder: Path, config):
    """transformers' fp32 model of FOLDER read with CONFIG; None as `transformers_reading` says."""
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and layers > TINY_HF["num_hidden_layers"]:
        # more layers than any folder here holds weights for (a TINY_HF model's, edited): transformers leaves them
        # missing; not built, as 10**30 of them never would be
        return None
    try:
        with torch.no_grad():
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                folder, config=config, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    except Exception:  # noqa: BLE001 (whatever it raises is a refusal)
        return None
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()  # the embedding, whatever it held
    if type(model).__name__ != "LlamaForCausalLM" or \
            any({k if isinstance(k, str) else k[0] for k in info.get(field, ())} - tied
                for field in ("missing_keys", "mismatched_keys")):
        return None  # unexpected tensors it leaves out, as the import does (saying so)
    return model.eval()


def our_logits(output: Path) -> torch.Tensor:
    cfg = CheckpointReader(output).model_config
    model = build_model(cfg)
    load_single(output / "step_0000000", model, adamw(model))
    with torch.no_grad():
        return model.eval()(IDS)


@settings(PROPERTY, max_examples=300)
@given(data=st.data())
def test_convert_from_hf(folders, edits_root, data):
    which = data.draw(st.sampled_from(sorted(folders)), "folder")
    kinds = sorted(EDITS) if which == "sharded" else sorted(set(EDITS) - {"index"})
    kind = data.draw(st.sampled_from(kinds), "edit")
    work = Path(tempfile.mkdtemp(dir=edits_root))
    try:
        hf = work / "hf"
        shutil.copytree(folders[which], hf)
        said = EDITS[kind](hf, data.draw)
        event(said)
        output = work / "ckpt"
        code, _, err = call_and_check(load_tool("convert_from_hf").main,
                                      [("text", "--hf"), ("path", "hf"), ("text", "--output"), ("text", str(output)),
                                       ("text", "--no-progress")], {"hf": str(hf)}, work, writes=True)
        reference, config_refused = transformers_reading(hf)
        if code == 0:
            event("imported")
            assert not config_refused, (said, "imported a config.json AutoConfig refuses")
            assert reference is not None, (said, "imported a folder transformers does not load whole")
            with torch.no_grad():
                expected = reference(input_ids=IDS).logits
            assert (our_logits(output) - expected).abs().max().item() < 1e-5, said
            if kind in ("config", "generation"):  # the export writes the edited files' fields back
                refused = exported_config_loads(output, work)
                assert refused is None, (said, "the export's config.json", refused)
            return
        line = err.strip().splitlines()[-1]
        event("refused")
        assert code == 2 and str(hf) in line, (said, line)
        assert not output.exists(), (said, "a refused import left its output")
        if reference is not None and not config_refused:  # transformers loads it whole: a refusal README documents
            assert any(reason in line for reason in DOCUMENTED), (said, line)
            # but none of a generation_config.json that stays a JSON object (DOCUMENTED names its file for that)
            assert kind != "generation", (said, "refused a generation config transformers loads", line)
    finally:
        shutil.rmtree(work, ignore_errors=True)
