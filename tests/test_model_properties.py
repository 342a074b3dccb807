"""Property-based tests (hypothesis) of the model and the Hugging Face converters over generated tiny Llama
architectures, with transformers' LlamaForCausalLM as the reference (tests/test_model_hf_parity.py and
tests/test_convert_hf_*.py check a few fixed shapes):

- the model's logits and next-token loss gradients equal transformers' holding the same weights (fp32, 1e-5), over
  hidden sizes 8-64, 1-8 heads with any divisor as KV heads (MHA, GQA, MQA), any MLP width, 1-3 layers, vocabularies
  of 3-300, tied or not, rope_theta and rms_norm_eps over many orders of magnitude, 1-3 sequences of 1 to
  max_position_embeddings tokens, either attention backend;
- a folder that transformers' save_pretrained wrote, imported (convert_from_hf) and exported again (convert_to_hf),
  is the same folder to transformers: the same tensors, config and generation config, and the same logits;
- a config.json describing what the model does not compute (biases, another activation, scaled RoPE, a head_dim
  of its own, KV heads that do not divide the heads, an odd head dim, a non-positive size) is refused by the import
  command's main() in one line naming the field; so is, by the export command's main(), a checkpoint whose
  manifest was edited into a model the trainer refuses (the weights' shapes kept).
Costs ~35 s on one core (each generated model is built, and the round trip writes two folders)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from convert_hf_helpers import assert_matches_transformers, assert_same_hf_folder, one_error_line, saved_hf_llama
from properties import PROPERTY, log_uniform

from nanotronix.checkpoint.hf_export import export_to_hf
from nanotronix.checkpoint.hf_import import import_from_hf
from nanotronix.config import ModelConfig


@st.composite
def architectures(draw) -> ModelConfig:
    """A tiny Llama that config_checks.validate_model accepts: hidden size 8-64, an even head dim (RoPE pairs the
    channels), KV heads any divisor of the heads."""
    heads = draw(st.integers(1, 8))
    head_dim = draw(st.sampled_from([d for d in range(2, 65, 2) if 8 <= heads * d <= 64]))
    kv_heads = draw(st.sampled_from([k for k in range(1, heads + 1) if heads % k == 0]))
    return ModelConfig(hidden_size=heads * head_dim, intermediate_size=draw(st.integers(1, 96)),
                       num_hidden_layers=draw(st.integers(1, 3)), num_attention_heads=heads,
                       num_key_value_heads=kv_heads, vocab_size=draw(st.integers(3, 300)),
                       max_position_embeddings=draw(st.integers(1, 48)),
                       rope_theta=draw(st.one_of(st.just(10000.0), log_uniform(1.0, 1e9))),
                       rms_norm_eps=draw(st.one_of(st.just(1e-5), log_uniform(1e-12, 1e-1))),
                       tie_word_embeddings=draw(st.booleans()), init_std=draw(log_uniform(0.005, 0.2)))


@st.composite
def batches(draw, cfg: ModelConfig) -> torch.Tensor:
    """Token ids [1-3, S + 1] with S of 1 to max_position_embeddings (the inputs S tokens, the labels shifted)."""
    rows, seq = draw(st.integers(1, 3)), draw(st.integers(1, cfg.max_position_embeddings))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return torch.randint(0, cfg.vocab_size, (rows, seq + 1), generator=torch.Generator().manual_seed(seed))


@settings(PROPERTY, max_examples=250)
@given(data=st.data(), cfg=architectures(), backend=st.sampled_from(["sdpa", "eager"]))
def test_logits_and_grads_match_transformers(data, cfg, backend):
    ids = data.draw(batches(cfg), label="ids")
    torch.manual_seed(data.draw(st.integers(0, 2 ** 31 - 1), label="init seed"))
    assert_matches_transformers(cfg, backend, ids)


def _hf_fields(cfg: ModelConfig) -> dict:
    """The LlamaConfig fields of CFG, as a Hugging Face config.json names them."""
    return dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                num_key_value_heads=cfg.num_key_value_heads, vocab_size=cfg.vocab_size,
                max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
                rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
                initializer_range=cfg.init_std, bos_token_id=0, eos_token_id=0)


def _logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits of the model saved in FOLDER. Its weights are copied out of the safetensors file first:
    loaded, they are views of the mapped file, whose addresses differ with the file's header length (safetensors
    aligns them to 8 bytes only), and CPU matmuls over differently aligned operands may round differently in the
    last bit (seen: 6e-8 at hidden size 52), which says nothing of the folder."""
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.data = p.data.clone()
        return hf(input_ids=ids).logits


@settings(PROPERTY, max_examples=60)
@given(data=st.data(), cfg=architectures())
def test_import_then_export_gives_back_the_folder_transformers_saved(data, cfg):
    ids = data.draw(batches(cfg), label="ids")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        original = saved_hf_llama(tmp / "orig", seed=data.draw(st.integers(0, 2 ** 31 - 1), label="init seed"),
                                  **_hf_fields(cfg))
        import_from_hf(original, tmp / "ckpt", log=lambda _: None)
        back = export_to_hf(tmp / "ckpt", tmp / "back", progress=False, log=lambda _: None)
        assert_same_hf_folder(original, back)
        assert torch.equal(_logits(original, ids), _logits(back, ids))


# What the model does not compute, as an edit of a valid config.json: (the edit, the field the error line names).
UNSUPPORTED = st.one_of(
    st.sampled_from([({"attention_bias": True}, "attention_bias"), ({"mlp_bias": True}, "mlp_bias"),
                     ({"attention_bias": "false"}, "attention_bias")]),
    st.sampled_from(["gelu", "relu", "gelu_new", "tanh", "swish2"]).map(
        lambda act: ({"hidden_act": act}, "hidden_act")),
    st.tuples(st.sampled_from(["rope_scaling", "rope_parameters"]),
              st.sampled_from(["linear", "dynamic", "yarn", "llama3", "longrope"]),
              st.sampled_from(["rope_type", "type"]), st.floats(1.5, 32.0)).map(
        lambda t: ({t[0]: {t[2]: t[1], "factor": t[3]}}, t[0])),
    st.sampled_from(["num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                     "hidden_size", "intermediate_size", "max_position_embeddings"]).flatmap(
        lambda field: st.integers(-3, 0).map(lambda n: ({field: n}, field))),
    st.sampled_from(["rope_theta", "rms_norm_eps"]).flatmap(
        lambda field: st.sampled_from([0.0, -1e-6, -10000.0]).map(lambda v: ({field: v}, field))),
)


def _broken(cfg: ModelConfig, data) -> tuple[dict, str]:
    """An edit of CFG's config.json that the import must refuse, and the field its error line names: one of
    UNSUPPORTED, or one drawn for CFG (a head_dim other than hidden / heads, KV heads that do not divide the heads,
    an odd head dim)."""
    heads = cfg.num_attention_heads
    own = [({"head_dim": d}, "head_dim") for d in (cfg.head_dim * 2, cfg.head_dim + 2)]
    own += [({"num_key_value_heads": k}, "num_key_value_heads") for k in range(2, 9) if heads % k]
    own += [({"hidden_size": heads * d}, "hidden_size") for d in (1, 3, 5)]  # an odd head dim: no RoPE pairs
    return data.draw(st.one_of(UNSUPPORTED, st.sampled_from(own)), label="edit")


@settings(PROPERTY, max_examples=150)
@given(data=st.data(), cfg=architectures())
def test_a_config_the_model_does_not_compute_is_refused_on_import_in_one_line(data, cfg):
    edit, field = _broken(cfg, data)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "hf"
        folder.mkdir()  # config.json alone: it is read (and refused) before any weight
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", **_hf_fields(cfg), **edit}))
        said = one_error_line("convert_from_hf", "--hf", str(folder), "--output", str(Path(tmp) / "o"))
        assert field in said and str(folder) in said, said
        assert not (Path(tmp) / "o").exists()


# Model fields of a step's manifest edited, the weights' shapes kept, into values the trainer refuses.
REFUSED_IN_A_MANIFEST = st.one_of(
    st.tuples(st.sampled_from(["rope_theta", "rms_norm_eps", "init_std"]),
              st.sampled_from([0.0, -1e-6, -10000.0, "big", None, [1.0], float("nan"), float("inf")])),
    st.tuples(st.sampled_from(["max_position_embeddings", "num_hidden_layers"]), st.integers(-3, 0)),
    st.tuples(st.just("tie_word_embeddings"), st.sampled_from(["yes", 1, 0, None])),
    st.tuples(st.just("attn_implementation"), st.sampled_from(["magic", "", "SDPA"])),
)


@settings(PROPERTY, max_examples=40)
@given(data=st.data(), cfg=architectures(), edit=REFUSED_IN_A_MANIFEST)
def test_a_checkpoint_of_a_model_the_trainer_refuses_is_not_exported(data, cfg, edit):
    field, value = edit
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        import_from_hf(saved_hf_llama(tmp / "orig", **_hf_fields(cfg)), tmp / "ckpt", log=lambda _: None)
        manifest_file = tmp / "ckpt" / "step_0000000" / "checkpoint.json"
        manifest = json.loads(manifest_file.read_text())
        manifest["config"]["model"][field] = value
        manifest_file.write_text(json.dumps(manifest))
        said = one_error_line("convert_to_hf", "--checkpoint", str(tmp / "ckpt"), "--output", str(tmp / "o"))
        assert f"model.{field}" in said, said
        assert not (tmp / "o").exists()
