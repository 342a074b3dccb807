"""nanotronix.convert.hf_config_types against transformers itself: for every field of its table, the table takes a
value of config.json exactly where transformers' AutoConfig.from_pretrained loads a folder whose config.json holds it
(probes of each JSON type, and values near the table's other rules), and the table names every field LlamaConfig
annotates, so a field a newer transformers adds fails here instead of going unchecked."""
from __future__ import annotations

import dataclasses
import json

import pytest
import transformers

from convert_hf_helpers import saved_hf_llama
from test_hf_import_damage_properties import TINY_HF

from nanotronix.convert.hf_config_types import FIELD_KINDS, takes

# One value of each JSON type (2, not 1: hidden_size 1 is refused by value, not being a multiple of the head count;
# 0.5, not 1.5: initializer_range's bounds are probed below)
PROBES = [True, 2, 0.5, "x", None, [1, 2], {}]
# Values that try a field's other rules: initializer_range's interval, the names and printing of dtype, id2label's keys
MORE_PROBES = {"initializer_range": [1.5, -0.5, 0.0, 1.0, float("nan")],
               "dtype": ["bfloat16", "int8", "nn", 1e308, float("nan"), [1.5], 4.0, 1],
               "torch_dtype": ["float16", "x", 1e308], "id2label": [{"0": "a"}, {"a": "b"}, {" 1": "a"}],
               "eos_token_id": [[1, True], [], [0.0]], "attention_dropout": [1.5, "0.1"],
               "rope_parameters": [{"rope_type": "default", "rope_theta": 10000.0}]}


@pytest.fixture(scope="module")
def base_config(tmp_path_factory) -> dict:
    """A config.json transformers' own save_pretrained wrote (dtype left out, so that torch_dtype is read)."""
    folder = saved_hf_llama(tmp_path_factory.mktemp("saved"), **TINY_HF)
    config = json.loads((folder / "config.json").read_text())
    del config["dtype"]
    return config


def test_the_table_names_every_field_llama_config_annotates():
    assert {field.name for field in dataclasses.fields(transformers.LlamaConfig)} <= FIELD_KINDS.keys()


@pytest.mark.parametrize("field", sorted(FIELD_KINDS))
def test_the_table_takes_what_transformers_takes(base_config, tmp_path, field):
    transformers.logging.set_verbosity_error()  # warnings of the values probed
    disagreements = []
    for value in PROBES + MORE_PROBES.get(field, []):
        (tmp_path / "config.json").write_text(json.dumps({**base_config, field: value}))
        try:
            transformers.AutoConfig.from_pretrained(tmp_path)
            loads = True
        except Exception:  # noqa: BLE001 (whatever it raises is a refusal)
            loads = False
        if takes(field, value) != loads:
            disagreements.append((value, "transformers loads it" if loads else "transformers refuses it"))
    assert not disagreements, (field, disagreements)
