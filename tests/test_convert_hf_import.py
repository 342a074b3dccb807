"""Hugging Face import against transformers itself: HF -> nanotronix -> HF identity of tensors and config, imported
weights that load into a training model with transformers' logits, the weights and rope_theta transformers reads,
and what would import as another model refused in one line (biases, other activations or RoPE, quantized or NaN
weights, a damaged index)."""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers

from checkpoint_helpers import adamw
from convert_hf_helpers import _hf_original, assert_same_hf_folder, cli, logits_match, tool_main

from nanotronix.checkpoint.hf_export import export_to_hf
from nanotronix.checkpoint.hf_import import import_from_hf
from nanotronix.errors import UserError


@pytest.mark.parametrize("untied, dtype", [(False, "bfloat16"), (True, "float32")])
def test_hf_to_nanotronix_to_hf_is_identity(tmp_path, untied, dtype):
    original = _hf_original(tmp_path / "orig", untied, getattr(torch, dtype))
    if untied:  # once through the command, once through the function it runs
        proc = cli("convert_from_hf.py", "--hf", str(original), "--output", str(tmp_path / "ckpt"))
        assert proc.returncode == 0, proc.stderr
    else:
        import_from_hf(original, tmp_path / "ckpt", log=lambda _: None)
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_0000000"
    manifest = json.loads((tmp_path / "ckpt" / "step_0000000" / "checkpoint.json").read_text())
    assert manifest["optimizer"] is False and manifest["config"]["model"]["rope_theta"] == 130000.0
    export_to_hf(tmp_path / "ckpt", tmp_path / "back", dtype=dtype, progress=False, log=lambda _: None)

    assert_same_hf_folder(original, tmp_path / "back")



def test_imported_weights_load_into_a_training_model(tmp_path):
    """An import is a starting point for training: its weights load into the plain model exactly."""
    from checkpoint_helpers import load_single
    from nanotronix.checkpoint.reader import CheckpointReader
    from nanotronix.model import build_model

    original = _hf_original(tmp_path / "orig", untied=False)
    import_from_hf(original, tmp_path / "ckpt", log=lambda _: None)
    cfg = CheckpointReader(tmp_path / "ckpt").model_config
    model = build_model(cfg)
    manifest = load_single(tmp_path / "ckpt" / "step_0000000", model, adamw(model))
    assert manifest["_restored"]["optimizer"] is False
    hf = transformers.AutoModelForCausalLM.from_pretrained(original, attn_implementation="eager").eval()
    assert logits_match(original, model, cfg) < 1e-5
    assert dataclasses.asdict(cfg)["rope_theta"] == hf.config.rope_parameters["rope_theta"]



def test_what_the_model_does_not_compute_is_refused_on_import(tmp_path, capsys):
    """A Llama config.json with biases, another activation or scaled RoPE (in each of the forms transformers
    writes: rope_scaling with `rope_type` or the older `type`, transformers 5's rope_parameters) describes a model
    whose logits this one would not give: refused in one line rather than imported as plain Llama. So are a
    config that the trainer itself would refuse, a damaged safetensors index, and bias tensors the config hides."""
    hf = _hf_original(tmp_path / "hf", untied=False)
    config = json.loads((hf / "config.json").read_text())
    capsys.readouterr()  # transformers' own progress bar

    def refused(edits: dict, message: str, folder_edit=None) -> None:
        folder = tmp_path / f"case{len(list(tmp_path.glob('case*')))}"
        shutil.copytree(hf, folder)
        (folder / "config.json").write_text(json.dumps({**config, **edits}))
        if folder_edit:
            folder_edit(folder)
        code = tool_main("convert_from_hf")(["--hf", str(folder), "--output", str(tmp_path / "o"), "--no-progress"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (edits, lines)

    refused({"attention_bias": True}, "attention_bias: true is not supported")
    refused({"mlp_bias": True}, "mlp_bias: true is not supported")
    refused({"attention_bias": "false"}, 'field "attention_bias" is "false", transformers reads a bool there')
    refused({"hidden_act": "gelu"}, "hidden_act: 'gelu' is not supported")
    refused({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling: RoPE type 'llama3'")
    refused({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling: RoPE type 'linear'")
    refused({"rope_parameters": {"rope_type": "yarn", "rope_theta": 130000.0}}, "rope_parameters: RoPE type 'yarn'")
    refused({"num_key_value_heads": 4}, "model.num_attention_heads: 6 is not a multiple of model.num_key_value_heads=4")
    refused({"hidden_size": "48"}, 'field "hidden_size" is "48", transformers reads an integer there')
    refused({"head_dim": 16}, "head_dim: 16 is not hidden_size / num_attention_heads = 8")
    # a rope_theta past a float's range, alone or beside another (float() of it was an OverflowError traceback)
    refused({"rope_parameters": None, "rope_theta": 10 ** 400}, "model.rope_theta: expected a finite number, got an "
            "integer beyond a float's range")
    refused({"rope_theta": 10 ** 400}, "rope_theta: config.json gives rope_parameters.rope_theta=130000.0, "
            "rope_theta=<an integer of 401 digits>; transformers versions differ")

    def with_index(text: str):  # in place of model.safetensors: beside it, transformers reads neither the index
        def edit(folder: Path) -> None:
            (folder / "model.safetensors.index.json").write_text(text)
            (folder / "model.safetensors").unlink()
        return edit

    refused({}, "model.safetensors.index.json: not a safetensors index (", with_index('{"weight_map": '))
    refused({}, "model.safetensors.index.json: not a safetensors index (no 'weight_map')", with_index("{}"))

    def add_bias(folder: Path) -> None:
        from safetensors.torch import load_file, save_file
        tensors = load_file(folder / "model.safetensors")
        tensors["model.layers.0.self_attn.q_proj.bias"] = torch.ones(48)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    refused({}, "holds bias tensors (model.layers.0.self_attn.q_proj.bias, ...)", add_bias)
    # beside a rope_scaling (here plain RoPE) transformers reads no rope_parameters: its 130000 was imported, while
    # transformers computed with 10000
    refused({"rope_scaling": {"rope_type": "default"}}, "rope_theta: config.json gives rope_parameters.rope_theta="
            "130000.0, the default (transformers reads no rope_parameters beside a rope_scaling)=10000")

    def add_head(shift: float):
        def edit(folder: Path) -> None:
            from safetensors.torch import load_file, save_file
            tensors = load_file(folder / "model.safetensors")
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + shift
            save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return edit

    # a tied config over a head trained apart: imported tied (the embedding), transformers 5 computes with the head
    refused({}, "its config.json ties the head to the embedding, but its lm_head.weight holds other values: "
            "transformers 5 computes with that head, transformers 4 with the embedding", add_head(0.5))
    folder = tmp_path / "equal_head"
    shutil.copytree(hf, folder)
    add_head(0.0)(folder)  # a copy of the embedding, as some saves hold it: imported
    assert tool_main("convert_from_hf")(["--hf", str(folder), "--output", str(tmp_path / "equal_ckpt"),
                                          "--no-progress"]) == 0
    # plain RoPE written either way is imported (transformers 5 writes rope_parameters with rope_type default)
    plain = {"rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": 130000.0}}
    (tmp_path / "plain").mkdir()
    shutil.copytree(hf, tmp_path / "plain" / "hf")
    (tmp_path / "plain" / "hf" / "config.json").write_text(json.dumps({**config, **plain}))
    assert tool_main("convert_from_hf")(["--hf", str(tmp_path / "plain" / "hf"), "--output",
                                         str(tmp_path / "plain" / "o"), "--no-progress"]) == 0
    assert not (tmp_path / "o").exists()


@pytest.fixture
def default_recursion_limit():
    """Python's default recursion limit (1000) for the test, as a command starts with; the one found is restored."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    yield
    sys.setrecursionlimit(limit)


@pytest.mark.parametrize("text, message", [
    ("{", "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ("[1]", "a JSON array, not an object"),
    ('{"early_stopping": "x"}', 'field "early_stopping" is "x", transformers reads true, false, "never" or null there'),
    ('{"num_return_sequences": 2, "do_sample": false}',
     'field "num_return_sequences" is 2, more than 1 without do_sample or num_beams'),
    ('{"streamer": null}', 'field "streamer" is an argument of generate(), which transformers refuses here'),
    # mappings nested deeper than transformers' copy of the config (and the rules' walk of them) recurses
    pytest.param('{"my_field": ' + '{"a": ' * 600 + "{}" + "}" * 601, "nested too deeply to be read", id="deep")])
def test_a_generation_config_transformers_cannot_read_is_refused(tmp_path, capsys, default_recursion_limit, text,
                                                                message):
    """A generation_config.json that is not JSON, not an object, or holds a value GenerationConfig refuses (see
    nanotronix.convert.hf_generation_config) is refused by transformers' GenerationConfig.from_pretrained, and by the
    import in one line (before: a JSONDecodeError traceback, or the list or values kept in the manifest, for the
    export to fail on later or write back into a folder transformers cannot load). At Python's default recursion
    limit, as the command runs: an Inductor compile earlier in the same test process raises it to 2000, at which
    transformers reads the deep case."""
    folder = _hf_original(tmp_path / "hf", untied=False)
    (folder / "generation_config.json").write_text(text)
    with pytest.raises((OSError, TypeError, ValueError, RecursionError)):
        transformers.GenerationConfig.from_pretrained(folder)
    capsys.readouterr()
    code = tool_main("convert_from_hf")(["--hf", str(folder), "--output", str(tmp_path / "o"), "--no-progress"])
    assert code == 2 and capsys.readouterr().err.strip().splitlines() == [
        f"error: --hf: {folder / 'generation_config.json'}: {message}"]
    assert not (tmp_path / "o").exists()



def test_quantized_nan_and_extra_tensors_are_said(tmp_path, capsys):
    """What would import as a float checkpoint that is not the model: a quantized model (quantization_config, or
    integer weights with scales beside them), weights holding NaN; extra tensors are imported without, and said."""
    from safetensors.torch import load_file, save_file
    original = _hf_original(tmp_path / "orig", untied=False)
    weights = load_file(original / "model.safetensors")
    config = json.loads((original / "config.json").read_text())

    def variant(name: str, tensors: dict, **config_fields) -> list[str]:
        folder = tmp_path / name
        shutil.copytree(original, folder)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({**config, **config_fields}))
        capsys.readouterr()
        code = tool_main("convert_from_hf")(["--hf", str(folder), "--output", str(tmp_path / f"{name}_ckpt"),
                                             "--no-progress"])
        said = capsys.readouterr()
        assert code == (0 if name == "extra" else 2) and (tmp_path / f"{name}_ckpt").exists() == (code == 0)
        return (said.err if code else said.out).strip().splitlines()

    said = variant("quantized_config", weights, quantization_config={"quant_method": "bitsandbytes"})
    assert said == [f"error: --hf: {tmp_path / 'quantized_config'} is a quantized model (quantization_config: "
                    "bitsandbytes); convert from its unquantized weights"]
    name = "model.layers.0.mlp.down_proj.weight"
    int8 = dict(weights, **{name: weights[name].to(torch.int8), name + "_scale": torch.ones(1)})
    said = variant("quantized_tensors", int8)
    assert said == [f"error: --hf: {tmp_path / 'quantized_tensors'}: tensor {name} is I8, not floating point (a "
                    "quantized model? convert from its unquantized weights)"]
    nan = dict(weights, **{name: weights[name].clone().fill_(float("nan"))})
    said = variant("nan", nan)
    assert len(said) == 1 and said[0].startswith(f"error: --hf: {tmp_path / 'nan'}: the weights of ") \
        and said[0].endswith("hold NaN or infinite values"), said
    extra = dict(weights, **{"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4),
                             "vision.proj": torch.ones(2)})
    said = variant("extra", extra)
    assert f"warning: 1 tensor(s) of {tmp_path / 'extra'} not imported, which this model has no place for: " \
           "vision.proj" in said, said



def test_import_reads_the_weights_and_rope_theta_transformers_reads(tmp_path):
    """A folder holding model.safetensors beside a sharded index (an older save left there): transformers loads
    model.safetensors, and so must the import; a rope_theta given twice with two values is refused (transformers 5
    reads rope_parameters', older versions the top-level one)."""
    original = _hf_original(tmp_path / "orig", untied=False)
    stale = tmp_path / "stale"
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(original)).save_pretrained(
        stale, max_shard_size="20KB")
    both = tmp_path / "both"
    shutil.copytree(original, both)
    for file in [*stale.glob("model-*.safetensors"), stale / "model.safetensors.index.json"]:
        shutil.copyfile(file, both / file.name)
    import_from_hf(both, tmp_path / "ckpt", log=lambda _: None)
    from checkpoint_helpers import load_single
    from nanotronix.checkpoint.reader import CheckpointReader
    from nanotronix.model import build_model
    cfg = CheckpointReader(tmp_path / "ckpt").model_config
    model = build_model(cfg)
    load_single(tmp_path / "ckpt" / "step_0000000", model, adamw(model))
    assert logits_match(both, model, cfg) < 1e-5

    config = json.loads((original / "config.json").read_text())
    twice = tmp_path / "twice"
    shutil.copytree(original, twice)
    (twice / "config.json").write_text(json.dumps(
        {**config, "rope_theta": 500000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 130000.0}}))
    with pytest.raises(UserError, match="rope_theta: config.json gives rope_parameters.rope_theta=130000.0, "
                                        "rope_theta=500000.0"):
        import_from_hf(twice, tmp_path / "ckpt2", log=lambda _: None)


def test_a_config_json_leaving_out_defaulted_fields_imports_as_transformers_reads_it(tmp_path):
    """tie_word_embeddings and the RoPE theta may be left out of a config.json: transformers then takes its
    LlamaConfig defaults (an untied head, theta 10000). The import must take the same, so that the imported model
    gives transformers' logits for the folder (an import that defaulted to a tied head refused the folder's own head;
    another default theta computed other logits)."""
    from nanotronix.checkpoint.hf_import import import_from_hf
    from nanotronix.checkpoint.reader import CheckpointReader
    from nanotronix.model import build_model

    hf_dir = _hf_original(tmp_path / "hf", untied=True)
    config = json.loads((hf_dir / "config.json").read_text())
    for field in ("tie_word_embeddings", "rope_theta", "rope_parameters", "rope_scaling"):
        config.pop(field, None)
    (hf_dir / "config.json").write_text(json.dumps(config))
    hf_config = transformers.AutoConfig.from_pretrained(hf_dir)
    assert hf_config.tie_word_embeddings is False  # transformers' own defaults, the reference

    import_from_hf(hf_dir, tmp_path / "ckpt", log=lambda _: None)
    reader = CheckpointReader(tmp_path / "ckpt")
    cfg = reader.model_config
    assert cfg.tie_word_embeddings == hf_config.tie_word_embeddings
    assert cfg.rope_theta == hf_config.rope_parameters["rope_theta"]
    model = build_model(cfg)
    reader.load_into(model)
    assert logits_match(hf_dir, model.eval(), cfg) < 1e-5
