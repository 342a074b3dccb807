"""Hugging Face export and import against transformers itself: logits of the export (fp32, 1e-5), sharded
safetensors with an index, bf16, tokenizer files, HF -> nanotronix -> HF identity of tensors and config, and the
commands' one-line errors (Hub without token / offline, bad input). Costs ~20-30 s (a few CLI subprocesses)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from checkpoint_helpers import TINY, TINY_UNTIED, adamw, plain_model, save_single, train_steps
from helpers import ROOT

from nanotronix.checkpoint.hf_export import export_to_hf
from nanotronix.checkpoint.hf_import import import_from_hf
from nanotronix.convert.hf_mapping import hf_config_dict
from nanotronix.errors import UserError


def cli(tool: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"tools/{tool}", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=180, env={**os.environ, **(env or {})})


def trained_checkpoint(run_dir: Path, cfg=TINY, config: dict | None = None):
    model = plain_model(cfg)
    opt = adamw(model)
    train_steps(model, opt, range(1, 3), cfg)
    return save_single(run_dir, 2, model, opt, config=config), model


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def logits_match(hf_dir: Path, model, cfg) -> float:
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").float().eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (hf(input_ids=ids).logits - model(ids)).abs().max().item()


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


def _write_tiny_tokenizer(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=TINY.vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


# the tiny byte-level tokenizer's 256 bytes and a few merges fit this vocabulary
WITH_BYTES = dataclasses.replace(TINY, vocab_size=320)


def test_export_ships_the_runs_tokenizer(tmp_path):
    from tokenizers import Tokenizer

    tokenizer_file = _write_tiny_tokenizer(tmp_path / "tok")
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

    tokenizer_file = _write_tiny_tokenizer(tmp_path / "tok")
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


def _hf_original(folder: Path, untied: bool, dtype=torch.float32) -> Path:
    """A tiny SmolLM2-shaped model saved by transformers itself, with the extra keys SmolLM2's config carries."""
    cfg = transformers.LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
                                   rope_theta=130000.0, rms_norm_eps=1e-5, tie_word_embeddings=not untied,
                                   bos_token_id=0, eos_token_id=0, initializer_range=0.03)
    cfg.is_llama_config = True
    cfg.rope_interleaved = False
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(folder)
    return folder


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

    a, b = hf_tensors(original), hf_tensors(tmp_path / "back")
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    ignore = {"transformers_version", "_name_or_path"}
    ca = {k: v for k, v in transformers.AutoConfig.from_pretrained(original).to_dict().items() if k not in ignore}
    cb = {k: v for k, v in transformers.AutoConfig.from_pretrained(tmp_path / "back").to_dict().items()
          if k not in ignore}
    assert ca == cb
    ga, gb = (json.loads((d / "generation_config.json").read_text()) for d in (original, tmp_path / "back"))
    ga.pop("transformers_version"), gb.pop("transformers_version")
    assert ga == gb


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


def tool_main(name: str):
    """main() of tools/NAME.py, to run the command's own code in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_help_and_bad_input(tmp_path, capsys):
    for tool in ("convert_to_hf.py", "convert_from_hf.py"):
        assert cli(tool, "--help").returncode == 0
    (tmp_path / "weights_only_bin").mkdir()
    (tmp_path / "weights_only_bin" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    cases = [
        ("convert_to_hf", ["--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "o")],
         "error: checkpoint not found: "),
        ("convert_from_hf", ["--hf", str(tmp_path), "--output", str(tmp_path / "o")], "has no config.json"),
        ("convert_from_hf", ["--hf", str(tmp_path / "weights_only_bin"), "--output", str(tmp_path / "o")],
         "config.json: "),
        ("convert_to_hf", ["--checkpoint", str(tmp_path), "--output", str(tmp_path / "o"), "--max-shard-size",
                           "lots"], "--max-shard-size: cannot read 'lots'"),
        ("convert_to_hf", ["--checkpoint", str(tmp_path), "--output", str(tmp_path / "o"), "--max-shard-size",
                           "0GB"], "--max-shard-size: must be more than 0 bytes"),
        ("convert_to_hf", ["--checkpoint", str(tmp_path), "--output", str(tmp_path / "o"), "--private"],
         "--private: applies to the Hub repo that --push-to-hub creates"),
    ]
    for tool, args, message in cases:
        code = tool_main(tool)(args)
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("env, message", [
    ({"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_fake"}, "offline mode"),
    ({"HF_HUB_OFFLINE": "0"}, "no Hugging Face token"),
])
def test_push_to_hub_fails_early_with_one_line(tmp_path, env, message):
    trained_checkpoint(tmp_path / "run")
    clean = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    base = {**clean, "HF_HOME": str(tmp_path / "hf_home"), **env}
    proc = subprocess.run([sys.executable, "tools/convert_to_hf.py", "--checkpoint", str(tmp_path / "run"),
                           "--output", str(tmp_path / "hf"), "--push-to-hub", "someone/tiny"], env=base,
                          capture_output=True, text=True, cwd=ROOT, timeout=180)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "hf").exists()  # failed before converting


def test_push_to_hub_failure_keeps_the_complete_export(tmp_path):
    """The real huggingface_hub client up to its first request, against an endpoint where nothing listens (no
    network here): one error line naming the failure, exit 2, and the converted folder complete on disk."""
    import socket
    trained_checkpoint(tmp_path / "run")
    with socket.socket() as s:  # a free local port, closed again: connections to it are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    clean = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE")}
    env = {**clean, "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": "hf_fake", "HF_HUB_OFFLINE": "0",
           "HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    proc = subprocess.run([sys.executable, "tools/convert_to_hf.py", "--checkpoint", str(tmp_path / "run"),
                           "--output", str(tmp_path / "hf"), "--push-to-hub", "someone/tiny"], env=env,
                          capture_output=True, text=True, cwd=ROOT, timeout=180)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines[-1].startswith("error: --push-to-hub someone/tiny: upload failed")
    assert str(tmp_path / "hf") in lines[-1]  # where the complete export is
    assert transformers.AutoConfig.from_pretrained(tmp_path / "hf").model_type == "llama"
    assert list((tmp_path / "hf").glob("*.safetensors"))


def test_output_and_overwrite_never_destroy_the_input_or_other_files(tmp_path, capsys):
    """--overwrite replaces an earlier output of the same kind only: not the run being read (it used to delete the
    whole run and exit 0), not the HF folder being imported, not a training run, not someone's other files."""
    run = tmp_path / "run"
    trained_checkpoint(run)
    files = sorted(p.relative_to(tmp_path) for p in run.rglob("*"))
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("years of work")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")

    def one_error(tool: str, *args: str) -> str:
        code = tool_main(tool)([*args, "--no-progress"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    for output in (run, run / "step_0000002", tmp_path, run / "step_0000002" / "hf", run / "hf"):
        said = one_error("convert_to_hf", "--checkpoint", str(run), "--output", str(output), "--overwrite")
        assert "it is, holds or lies inside the input" in said
    assert "is not a Hugging Face model folder" in one_error(
        "convert_to_hf", "--checkpoint", str(run), "--output", str(notes), "--overwrite")
    assert "cannot write there" in one_error("convert_to_hf", "--checkpoint", str(run), "--output",
                                             str(blocker / "hf"))
    link = tmp_path / "link"
    link.symlink_to(notes)
    assert "is a symbolic link" in one_error("convert_to_hf", "--checkpoint", str(run), "--output", str(link),
                                             "--overwrite")
    assert sorted(p.relative_to(tmp_path) for p in run.rglob("*")) == files
    assert (notes / "thesis.tex").read_text() == "years of work"

    hf = tmp_path / "hf"
    assert tool_main("convert_to_hf")(["--checkpoint", str(run), "--output", str(hf), "--no-progress"]) == 0
    assert tool_main("convert_to_hf")(["--checkpoint", str(run), "--output", str(hf), "--overwrite",
                                       "--no-progress"]) == 0  # an earlier export is replaced
    capsys.readouterr()
    assert "it is, holds or lies inside the input" in one_error("convert_from_hf", "--hf", str(hf), "--output",
                                                                str(hf), "--overwrite")
    said = one_error("convert_from_hf", "--hf", str(hf), "--output", str(run), "--overwrite")
    assert "is not an earlier import" in said
    imported = tmp_path / "imported"
    for _ in range(2):  # the second replaces the first
        assert tool_main("convert_from_hf")(["--hf", str(hf), "--output", str(imported), "--overwrite",
                                             "--no-progress"]) == 0
    assert sorted(p.relative_to(tmp_path) for p in run.rglob("*")) == files
    assert (hf / "config.json").is_file() and not list(tmp_path.glob(".*tmp*"))


def test_weights_that_do_not_fit_their_config_are_one_line(tmp_path, capsys):
    """A config beside the weights that does not describe them (an edited checkpoint.json or config.json), damaged
    safetensors, a config.json that is not an object: one line naming the tensor or file, never a traceback."""
    run = tmp_path / "run"
    folder, _ = trained_checkpoint(run)
    hf = export_to_hf(run, tmp_path / "hf", progress=False, log=lambda _: None)

    def one_error(tool: str, *args: str) -> str:
        code = tool_main(tool)([*args, "--no-progress"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    edited = tmp_path / "edited"
    edited.mkdir()
    shutil.copytree(folder, edited / folder.name)
    manifest = json.loads((edited / folder.name / "checkpoint.json").read_text())
    manifest["config"]["model"]["intermediate_size"] *= 2
    (edited / folder.name / "checkpoint.json").write_text(json.dumps(manifest))
    said = one_error("convert_to_hf", "--checkpoint", str(edited), "--output", str(tmp_path / "o"))
    assert "tensor layers.0.mlp.gate_up_proj.weight is [" in said and "but the model config in checkpoint.json" in said

    config = json.loads((hf / "config.json").read_text())
    wrong = tmp_path / "wrong"
    shutil.copytree(hf, wrong)
    (wrong / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] * 2}))
    said = one_error("convert_from_hf", "--hf", str(wrong), "--output", str(tmp_path / "o"))
    assert said.startswith(f"error: --hf: {wrong}: tensor model.layers.0.mlp.gate_proj.weight is [")
    (wrong / "config.json").write_text(json.dumps(config))
    weights = wrong / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert one_error("convert_from_hf", "--hf", str(wrong), "--output", str(tmp_path / "o")).startswith(
        f"error: {weights}: cannot be read as safetensors (")
    (wrong / "config.json").write_text("[1]")
    assert one_error("convert_from_hf", "--hf", str(wrong), "--output", str(tmp_path / "o")) == (
        f"error: --hf: {wrong / 'config.json'}: a JSON list, not an object")
    assert not (tmp_path / "o").exists()


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
    refused({"attention_bias": "false"}, 'attention_bias: "false" is not supported')  # a string: a bias in transformers
    refused({"hidden_act": "gelu"}, "hidden_act: 'gelu' is not supported")
    refused({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling: RoPE type 'llama3'")
    refused({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling: RoPE type 'linear'")
    refused({"rope_parameters": {"rope_type": "yarn", "rope_theta": 130000.0}}, "rope_parameters: RoPE type 'yarn'")
    refused({"num_key_value_heads": 4}, "model.num_attention_heads: 6 is not a multiple of model.num_key_value_heads=4")
    refused({"hidden_size": "48"}, "model.hidden_size: expected an integer, got '48'")
    refused({"head_dim": 16}, "head_dim: 16 is not hidden_size / num_attention_heads = 8")

    def with_index(text: str):
        return lambda folder: (folder / "model.safetensors.index.json").write_text(text)

    refused({}, "model.safetensors.index.json: not a safetensors index (", with_index('{"weight_map": '))
    refused({}, "model.safetensors.index.json: not a safetensors index (no 'weight_map')", with_index("{}"))

    def add_bias(folder: Path) -> None:
        from safetensors.torch import load_file, save_file
        tensors = load_file(folder / "model.safetensors")
        tensors["model.layers.0.self_attn.q_proj.bias"] = torch.ones(48)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    refused({}, "holds bias tensors (model.layers.0.self_attn.q_proj.bias, ...)", add_bias)
    # plain RoPE written either way is imported (transformers 5 writes rope_parameters with rope_type default)
    plain = {"rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": 130000.0}}
    (tmp_path / "plain").mkdir()
    shutil.copytree(hf, tmp_path / "plain" / "hf")
    (tmp_path / "plain" / "hf" / "config.json").write_text(json.dumps({**config, **plain}))
    assert tool_main("convert_from_hf")(["--hf", str(tmp_path / "plain" / "hf"), "--output",
                                         str(tmp_path / "plain" / "o"), "--no-progress"]) == 0
    assert not (tmp_path / "o").exists()


def test_overwrite_replaces_only_a_bare_import_and_dot_is_refused(tmp_path, capsys, monkeypatch):
    """--overwrite of an import's folder: only when it holds the import's step 0, `latest` and a run's lock alone, not
    when steps set aside by tools/rollback.py (a run rolled back to its imported step 0) or the user's files lie
    beside them. `--output .` (the current folder) is one line for both converters, not a traceback."""
    hf = _hf_original(tmp_path / "hf", untied=False)
    capsys.readouterr()  # transformers' own progress bar
    imported = tmp_path / "imported"
    assert tool_main("convert_from_hf")(["--hf", str(hf), "--output", str(imported), "--no-progress"]) == 0
    (imported / "rolled_back_after_step_0000000-20261204-000000").mkdir()
    (imported / "rolled_back_after_step_0000000-20261204-000000" / "keep").write_text("trained steps")
    code = tool_main("convert_from_hf")(["--hf", str(hf), "--output", str(imported), "--overwrite", "--no-progress"])
    assert code == 2 and "is not an earlier import" in capsys.readouterr().err
    assert (imported / "rolled_back_after_step_0000000-20261204-000000" / "keep").is_file()
    shutil.rmtree(imported / "rolled_back_after_step_0000000-20261204-000000")
    (imported / ".lock").write_text("host h pid 1\n")  # left by a run that trained from it and saved nothing
    assert tool_main("convert_from_hf")(["--hf", str(hf), "--output", str(imported), "--overwrite",
                                         "--no-progress"]) == 0
    capsys.readouterr()
    assert tool_main("inspect_checkpoint")([str(imported)]) == 0  # where it came from, not its whole config.json
    assert f"imported from  {hf.resolve()} (Hugging Face)\n" in capsys.readouterr().out

    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    for tool, source in (("convert_from_hf", ["--hf", str(hf)]), ("convert_to_hf", ["--checkpoint", str(imported)])):
        code = tool_main(tool)([*source, "--output", ".", "--no-progress"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and lines == ["error: --output .: it is or holds the current folder; name a folder "
                                       "(e.g. ../NAME)"], lines
    assert not list(here.iterdir())


@pytest.mark.parametrize("tool", ["convert_to_hf", "convert_from_hf"])
def test_sigterm_leaves_no_half_written_output(tmp_path, capsys, monkeypatch, tool):
    """SIGTERM (kill, timeout, a Slurm time limit) in the middle of a conversion cleans up as Ctrl-C does: one line,
    exit 143, and neither the output nor its hidden staging folder is left (before, SIGTERM ended the process on
    the spot and left the staging folder, hundreds of MB, behind)."""
    import signal

    from nanotronix.checkpoint import hf_export, hf_import
    if tool == "convert_to_hf":
        trained_checkpoint(tmp_path / "run")
        source = ["--checkpoint", str(tmp_path / "run")]
    else:
        source = ["--hf", str(_hf_original(tmp_path / "hf", untied=False))]
    capsys.readouterr()
    module = hf_export if tool == "convert_to_hf" else hf_import

    def commit_when_killed(*args):  # the signal arrives while the output is still being written
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the conversion")

    monkeypatch.setattr(module, "commit", commit_when_killed)
    out = tmp_path / "out"
    assert tool_main(tool)([*source, "--output", str(out), "--no-progress"]) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == "terminated"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handed back when the command ended


def test_a_step_pruned_while_it_is_exported_is_said_in_one_line(tmp_path, capsys, monkeypatch):
    """A running run's keep_last prunes the step an export is reading (an export of a large model takes minutes):
    one line saying so, exit 2, no output (before: DCP's tracebacks, then "metadata is None")."""
    from nanotronix.checkpoint.reader import CheckpointReader
    folder, _ = trained_checkpoint(tmp_path / "run")
    real, calls = CheckpointReader.tensors, []

    def pruned_meanwhile(self, names, dtype=None):
        calls.append(names)
        if len(calls) == 3:  # what paths.prune does: rename aside, then delete
            folder.rename(folder.with_name(".pruned"))
        return real(self, names, dtype)

    monkeypatch.setattr(CheckpointReader, "tensors", pruned_meanwhile)
    capsys.readouterr()
    code = tool_main("convert_to_hf")(["--checkpoint", str(folder), "--output", str(tmp_path / "hf"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: checkpoint {folder} was removed while it was being read (a running run's "
                                 "checkpoint.keep_last prunes its older steps): read a step it keeps (a milestone: "
                                 "checkpoint.keep_every / keep_steps) or a copy of the step"], err
    assert not [p.name for p in tmp_path.iterdir() if "hf" in p.name]


def test_what_a_killed_conversion_left_is_removed(tmp_path, capsys):
    """SIGKILL (the OOM killer, scancel -s KILL) gives a converter no chance to remove its staging folder; the next
    conversion to that output removes the ones whose process is gone, and says so, leaving a live one alone."""
    dead = subprocess.Popen(["true"])  # its process id names no process once it has ended
    dead.wait()
    out = tmp_path / "out"
    for pid in (dead.pid, 1):  # 1: a process that is alive (init), maybe another conversion
        (tmp_path / f".out.tmp-{pid}").mkdir()
        (tmp_path / f".out.tmp-{pid}" / "model.safetensors").write_bytes(b"half")
    source = _hf_original(tmp_path / "hf", untied=False)
    capsys.readouterr()
    assert tool_main("convert_from_hf")(["--hf", str(source), "--output", str(out), "--no-progress"]) == 0
    assert f"note: removed what an interrupted run left beside the output (its process is gone): .out.tmp-{dead.pid}" \
        in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == [".out.tmp-1"]


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


CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


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
    tokenizer_file = _write_tiny_tokenizer(folder)
    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(tokenizer_file))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)

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
