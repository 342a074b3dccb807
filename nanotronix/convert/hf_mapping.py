"""The one mapping between nanotronix parameter names/layouts and Hugging Face `LlamaForCausalLM`.

Everything that crosses the boundary goes through here: the fused QKV rows (grouped by KV head, see
`model/attention.py`), the pairwise gate/up interleave (`model/mlp.py`), the tied head (exported only when
untied), and the config fields. RoPE needs no permutation: both sides use the rotate-half layout.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from nanotronix.config import ModelConfig
from nanotronix.config_checks import validate_model
from nanotronix.config_tree import build_dataclass
from nanotronix.convert.hf_config_types import check_field_types
from nanotronix.errors import json_kind, number_text


def _split_qkv(w: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kv, d = cfg.num_key_value_heads, cfg.head_dim
    r = cfg.num_attention_heads // kv
    groups = w.view(kv, r + 2, d, w.shape[-1])
    q = groups[:, :r].reshape(kv * r * d, -1)
    k = groups[:, r].reshape(kv * d, -1)
    v = groups[:, r + 1].reshape(kv * d, -1)
    return q, k, v


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    kv, d = cfg.num_key_value_heads, cfg.head_dim
    r = cfg.num_attention_heads // kv
    cols = q.shape[-1]
    fused = torch.cat([q.view(kv, r, d, cols), k.view(kv, 1, d, cols), v.view(kv, 1, d, cols)], dim=1)
    return fused.reshape(-1, cols)


def to_hf(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Map one nanotronix tensor to the Hugging Face tensors it becomes (streaming-friendly)."""
    if name == "embed_tokens.weight":
        yield "model.embed_tokens.weight", tensor
    elif name == "norm.weight":
        yield "model.norm.weight", tensor
    elif name == "lm_head.weight":
        if not cfg.tie_word_embeddings:
            yield "lm_head.weight", tensor
    elif name.startswith("layers."):
        _, idx, rest = name.split(".", 2)
        p = f"model.layers.{idx}."
        if rest == "self_attn.qkv_proj.weight":
            q, k, v = _split_qkv(tensor, cfg)
            yield p + "self_attn.q_proj.weight", q.contiguous()
            yield p + "self_attn.k_proj.weight", k.contiguous()
            yield p + "self_attn.v_proj.weight", v.contiguous()
        elif rest == "mlp.gate_up_proj.weight":
            yield p + "mlp.gate_proj.weight", tensor[0::2].contiguous()
            yield p + "mlp.up_proj.weight", tensor[1::2].contiguous()
        else:
            yield p + rest, tensor
    else:
        raise KeyError(f"no Hugging Face name for parameter {name!r}")


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        out.update(to_hf(name, tensor, cfg))
    return out


def from_hf(name: str, get: Callable[[str], torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """The nanotronix tensor `name`, built from the Hugging Face tensors that `get(hf_name)` returns (reads only
    the ones it needs, so a converter can stream)."""
    if name == "embed_tokens.weight":
        return get("model.embed_tokens.weight")
    if name == "norm.weight":
        return get("model.norm.weight")
    if name == "lm_head.weight":
        return get("model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight")
    if not name.startswith("layers."):
        raise KeyError(f"no Hugging Face source for parameter {name!r}")
    _, idx, rest = name.split(".", 2)
    p = f"model.layers.{idx}."
    if rest == "self_attn.qkv_proj.weight":
        return _fuse_qkv(get(p + "self_attn.q_proj.weight"), get(p + "self_attn.k_proj.weight"),
                         get(p + "self_attn.v_proj.weight"), cfg)
    if rest == "mlp.gate_up_proj.weight":
        gate, up = get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")
        return torch.stack([gate, up], dim=1).reshape(-1, gate.shape[-1])
    return get(p + rest)


_LAYER_PARAMS = ("self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight",
                 "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face tensors -> nanotronix state dict (raises KeyError naming a missing tensor)."""
    def get(key: str) -> torch.Tensor:
        if key not in hf:
            raise KeyError(f"Hugging Face checkpoint lacks {key}")
        return hf[key]

    names = ["embed_tokens.weight", "norm.weight", "lm_head.weight"]
    names += [f"layers.{i}.{rest}" for i in range(cfg.num_hidden_layers) for rest in _LAYER_PARAMS]
    return {name: from_hf(name, get, cfg) for name in names}


def hf_config_dict(cfg: ModelConfig, eos_token_id: int = 0, bos_token_id: int = 0,
                   torch_dtype: str = "bfloat16") -> dict[str, Any]:
    """config.json for LlamaForCausalLM, with the field values SmolLM2's own release uses."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "initializer_range": cfg.init_std if cfg.initializer_range is None else cfg.initializer_range,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "mlp_bias": False,
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "pretraining_tp": 1,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": torch_dtype,
        "use_cache": True,
        "vocab_size": cfg.vocab_size,
    }


def _json_integer(text: str) -> int:
    """int(text), refusing one past Python's int-from-text limit (sys.get_int_max_str_digits, 4300 by default; 0 is
    none) in words a user can act on rather than json's advice to raise the interpreter's limit."""
    digits = len(text.lstrip("-"))
    limit = sys.get_int_max_str_digits()
    if limit and digits > limit:
        raise ValueError(f"holds an integer of {digits} digits, more than Python's JSON reader (and so transformers) "
                         f"reads ({limit})")
    return int(text)


def read_json_object(file: Path) -> dict:
    """The JSON object a Hugging Face folder's file (config.json, tokenizer_config.json, ...) holds, read as UTF-8 as
    transformers reads it. ValueError when it is not UTF-8 (UnicodeDecodeError), not JSON (JSONDecodeError) or
    holds another value (a list, a number) or an integer longer than Python reads (transformers' reader refuses it
    too); RecursionError when nested past json's reader: each caller words it."""
    value = json.loads(file.read_bytes().decode("utf-8"), parse_int=_json_integer)
    if not isinstance(value, dict):
        raise ValueError(f"a JSON {json_kind(value)}, not an object")
    return value


def _rope_type(field: str, settings: Any) -> str:
    """The RoPE variant a config's `rope_scaling` / `rope_parameters` names: transformers writes `rope_type` (and,
    before 4.45, `type`); none named is the default. transformers takes any false `rope_scaling` (false, 0, "", [])
    as none; `rope_parameters` (null or a mapping, as it refuses others) comes here checked by check_field_types."""
    if settings is None or (field == "rope_scaling" and not settings):
        return "default"
    if not isinstance(settings, dict):
        raise ValueError(f"{field}: {json.dumps(settings)} is not a mapping")
    return settings.get("rope_type") or settings.get("type") or "default"


DEFAULT_INITIALIZER_RANGE = 0.02  # transformers' LlamaConfig's, where config.json gives none


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """The model section of a Llama config.json, refusing (ValueError) what this model does not compute: biases,
    another activation, scaled RoPE (llama3, yarn, linear, ...). Accepting them would load the weights into a model
    that gives other logits. So is a field holding a value of a type transformers refuses (the export would write
    it back into a config.json transformers cannot load)."""
    if hf.get("model_type") != "llama":
        raise ValueError(f"not a Llama config (model_type={hf.get('model_type')!r})")
    check_field_types(hf)
    for field in ("rope_scaling", "rope_parameters"):  # transformers >= 5 keeps the RoPE settings in the second
        kind = _rope_type(field, hf.get(field))
        if kind != "default":
            raise ValueError(f"{field}: RoPE type {kind!r} is not supported (only plain RoPE)")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):  # a bool here (check_field_types)
            raise ValueError(f"{field}: {json.dumps(hf[field])} is not supported (the model has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act: {hf['hidden_act']!r} is not supported (the MLP is SwiGLU: silu)")
    # transformers >= 5 keeps rope_theta under rope_parameters (and reads it from there, or from a rope_scaling dict,
    # before the top-level field); older versions read only the top-level one. Two different values: refused, as
    # which one applies depends on the transformers version
    thetas = {f"{field}.rope_theta": hf[field]["rope_theta"] for field in ("rope_parameters", "rope_scaling")
              if isinstance(hf.get(field), dict) and hf[field].get("rope_theta") is not None}
    if hf.get("rope_theta") is not None:
        thetas["rope_theta"] = hf["rope_theta"]
    if hf.get("rope_scaling") and thetas.keys() == {"rope_parameters.rope_theta"}:
        # beside a rope_scaling, transformers 5 reads no rope_parameters (it takes the first in its place), 4 never
        # does: both compute with the default
        thetas["the default (transformers reads no rope_parameters beside a rope_scaling)"] = 10000.0
    distinct: list = []
    for value in thetas.values():  # compared as values (130000 and 130000.0 are one), not converted: float() of
        if value not in distinct:  # 10**400 raised OverflowError; a single one is the model field's to check
            distinct.append(value)
    if len(distinct) > 1:
        given = ", ".join(f"{k}={number_text(v)}" for k, v in thetas.items())  # 10**400: its length, not its digits
        raise ValueError(f"rope_theta: config.json gives {given}; transformers versions differ in which one they "
                         "use: keep one")
    rope_theta = next(iter(thetas.values()), 10000.0)
    kv_heads = hf.get("num_key_value_heads")  # null or left out: transformers' LlamaConfig reads the head count
    fields = {
        "hidden_size": hf["hidden_size"], "intermediate_size": hf["intermediate_size"],
        "num_hidden_layers": hf["num_hidden_layers"], "num_attention_heads": hf["num_attention_heads"],
        "num_key_value_heads": hf["num_attention_heads"] if kv_heads is None else kv_heads,
        "vocab_size": hf["vocab_size"], "max_position_embeddings": hf["max_position_embeddings"],
        "rope_theta": rope_theta, "rms_norm_eps": hf["rms_norm_eps"],
        "tie_word_embeddings": hf.get("tie_word_embeddings", False)}
    # initializer_range (a float from 0 to 1: check_field_types) is what transformers initialises weights a checkpoint
    # lacks with (none here), init_std what nanotron's init draws a model trained from scratch with, which a run
    # resumed from the import is not: 0.0, which transformers takes (and initialises with 0.02, as if unset) and the
    # trainer's init_std refuses, is kept as what the export writes (model.initializer_range), with init_std
    # transformers' default, as where config.json gives none
    init_range = hf.get("initializer_range", DEFAULT_INITIALIZER_RANGE)
    fields.update(init_std=init_range or DEFAULT_INITIALIZER_RANGE, initializer_range=None if init_range else 0.0)
    model = build_dataclass(ModelConfig, fields, "model")  # each value of its field's type (ConfigError)
    validate_model(model)  # the trainer's own checks (ConfigError, a ValueError)
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != model.head_dim:
        raise ValueError(f"head_dim: {number_text(head_dim)} is not hidden_size / num_attention_heads = "
                         f"{model.head_dim} (not supported)")
    said = pad_token_refusal(hf.get("pad_token_id"), model.vocab_size)  # null or an integer: check_field_types
    if said:  # the export would carry it into a config.json transformers builds no model of
        raise ValueError(said)
    return model


def pad_token_refusal(pad: int | None, vocab_size: int) -> str | None:
    """What is wrong with a config.json's pad_token_id (null or an integer), None where nothing is: transformers makes
    it its embedding's padding_idx, and builds no model with one outside the vocabulary (AutoConfig loads it)."""
    if pad is not None and not -vocab_size <= pad < vocab_size:
        return f"pad_token_id: {number_text(pad, json.dumps)} is not null or a token id of the {vocab_size}-token " \
            "vocabulary"
    return None
