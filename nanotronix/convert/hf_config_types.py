"""The JSON values transformers' LlamaConfig takes in each config.json field, checked on import (and by the export,
on the fields an import made before that check carried into a checkpoint).

transformers (5.x) builds LlamaConfig as a strict dataclass (huggingface_hub's `@strict`): AutoConfig refuses a
config.json whose field holds a value of another type than the field's annotation, by type alone (`"use_cache": 1`,
`"rms_norm_eps": 1`: an int is no float, a bool no int). The import keeps the fields nanotronix does not model and the
export writes them back, so one of a wrong type made an export AutoConfig cannot load. transformers is no dependency
of nanotronix (only of its tests), hence this table rather than asking it; tests/test_hf_config_types.py checks that
the table takes exactly the values transformers takes, and that it names every field LlamaConfig annotates.

Fields transformers does not know (SmolLM2's `is_llama_config`, `rope_interleaved`) it keeps as they are, whatever
their value: so does the import. generation_config.json gets no table: transformers' GenerationConfig checks none of
its fields' types, only some values (nanotronix.convert.hf_generation_config).
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable

import torch

from nanotronix.errors import SHOWN_DIGITS, number_text


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no integer to transformers


def _is_dtype_name(value: Any) -> bool:
    """transformers turns a string dtype into torch's attribute of that name (torch.bfloat16), failing without one;
    other values it does not check, but it prints the config while loading it, cutting `str(value).split(".")[1]`
    for a value that is not a string, an integer, a bool or a mapping: a number or list printed without a "." (1e+308,
    NaN, [1]) fails there. Stricter than transformers only for a torch attribute that is no dtype (torch.Tensor)."""
    if isinstance(value, str):
        return isinstance(getattr(torch, value, None), torch.dtype)
    return value is None or isinstance(value, (int, dict)) or "." in str(value)


def _is_label_map(value: Any) -> bool:
    """transformers reads id2label's keys as ints (`int(key)`): a mapping whose keys int() cannot read is refused."""
    if value is None:
        return True
    if not isinstance(value, dict):
        return False
    try:
        for key in value:
            int(key)
    except ValueError:
        return False
    return True


# Each kind of JSON value a field may hold, as the error line says it, and the test of a value read by json.loads
KINDS: dict[str, Callable[[Any], bool]] = {
    "a bool": lambda v: isinstance(v, bool),
    "an integer": _is_int,
    "a float (a number written with a point or an exponent)": lambda v: isinstance(v, float),
    "a float from 0 to 1": lambda v: isinstance(v, float) and 0.0 <= v <= 1.0,  # huggingface_hub's interval(0, 1)
    "a string": lambda v: isinstance(v, str),
    "a list of integers": lambda v: isinstance(v, list) and all(_is_int(item) for item in v),
    "a mapping": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
    "a torch dtype's name": _is_dtype_name,
    "a mapping of integer keys, or null": _is_label_map,
    "any value": lambda v: True,
}

_INT, _FLOAT, _BOOL, _NULL = "an integer", "a float (a number written with a point or an exponent)", "a bool", "null"
# The fields LlamaConfig annotates (its own and PreTrainedConfig's) and the kinds of value AutoConfig.from_pretrained
# takes in each. PreTrainedConfig's own fields are annotated as text (its module has `from __future__ import
# annotations`), which @strict does not check: transformers 5.x takes any value there but for the few it reads itself
# (dtype, id2label). torch_dtype is no field but transformers 4's name of dtype, read in its place.
FIELD_KINDS: dict[str, tuple[str, ...]] = {
    "vocab_size": (_INT,),
    "hidden_size": (_INT,),
    "intermediate_size": (_INT,),
    "num_hidden_layers": (_INT,),
    "num_attention_heads": (_INT,),
    "num_key_value_heads": (_INT, _NULL),
    "hidden_act": ("a string",),
    "max_position_embeddings": (_INT,),
    "initializer_range": ("a float from 0 to 1",),
    "rms_norm_eps": (_FLOAT,),
    "use_cache": (_BOOL,),
    "pad_token_id": (_INT, _NULL),
    "bos_token_id": (_INT, _NULL),
    "eos_token_id": (_INT, "a list of integers", _NULL),
    "pretraining_tp": (_INT, _NULL),
    "tie_word_embeddings": (_BOOL,),
    "rope_parameters": ("a mapping", _NULL),
    "attention_bias": (_BOOL,),
    "attention_dropout": (_INT, _FLOAT, _NULL),
    "mlp_bias": (_BOOL,),
    "head_dim": (_INT, _NULL),
    "dtype": ("a torch dtype's name", _NULL),
    "torch_dtype": ("a torch dtype's name", _NULL),
    "id2label": ("a mapping of integer keys, or null",),
    "transformers_version": ("any value",),
    "architectures": ("any value",),
    "output_hidden_states": ("any value",),
    "return_dict": ("any value",),
    "chunk_size_feed_forward": ("any value",),
    "is_encoder_decoder": ("any value",),
    "label2id": ("any value",),
    "problem_type": ("any value",),
}


def takes(field: str, value: Any) -> bool:
    """Whether transformers' LlamaConfig takes VALUE (as json.loads reads it) in FIELD; any value in a field it does
    not know."""
    return any(KINDS[kind](value) for kind in FIELD_KINDS.get(field, ("any value",)))


def refusal(field: str, value: Any) -> str | None:
    """What transformers refuses of VALUE in FIELD, said as `field "use_cache" is "x", transformers reads a bool
    there`; None where it takes it."""
    if takes(field, value):
        return None
    kinds = FIELD_KINDS[field]
    wanted = kinds[0] if len(kinds) == 1 else f"{', '.join(kinds[:-1])} or {kinds[-1]}"
    return f"field {json.dumps(field)} is {json_text(value)}, transformers reads {wanted} there"


def json_text(value: Any) -> str:
    """VALUE as json.dumps writes it, but for each integer past errors.SHOWN_DIGITS, in a list or a mapping too, said
    by its length (number_text: 10**400 is `<an integer of 401 digits>`, not its digits). Walked item by item only
    where the text holds such a run of digits: json.dumps itself writes a value nested hundreds deep."""
    text = number_text(value, json.dumps)
    if not isinstance(value, (list, dict)) or not re.search(f"[0-9]{{{SHOWN_DIGITS + 1}}}", text):
        return text
    if isinstance(value, list):
        return f"[{', '.join(map(json_text, value))}]"
    return "{" + ", ".join(f"{json.dumps(key)}: {json_text(item)}" for key, item in value.items()) + "}"


def check_field_types(config: dict[str, Any]) -> None:
    """ValueError naming the first field of config.json (in its order) holding a value transformers refuses by type,
    and what it reads there."""
    for field, value in config.items():
        if field == "torch_dtype" and config.get("dtype") is not None:
            continue  # transformers reads torch_dtype only in place of a dtype not given
        said = refusal(field, value)
        if said:
            raise ValueError(said)
