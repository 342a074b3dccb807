"""nanotronix.convert.hf_generation_config against transformers itself: its rules refuse a generation_config.json
exactly where transformers' GenerationConfig.from_pretrained fails on a folder holding it (probes of each JSON type in
every field a rule reads and in some it does not, the values each rule is about, and combinations), its tables are
transformers' own, and AutoModelForCausalLM.from_pretrained fails alike on a file GenerationConfig refuses (it goes on
without one only where there is none) while it loads one GenerationConfig merely warns about."""
from __future__ import annotations

import json

import pytest
import transformers
from transformers.generation import configuration_utils

from convert_hf_helpers import saved_hf_llama
from test_hf_import_damage_properties import TINY_HF

from nanotronix.convert.hf_generation_config import CACHE_IMPLEMENTATIONS, FIELDS, loadable, refusal

# One value of each JSON type
PROBES = [True, 1, 1.5, "x", None, [1], {}]
# The fields the rules read, some no rule reads, and a field transformers does not know
FIELDS_PROBED = ["early_stopping", "max_new_tokens", "assistant_ensemble_weight", "pad_token_id",
                 "cache_implementation", "compile_config", "watermarking_config", "num_return_sequences", "num_beams",
                 "do_sample", "suppress_tokens", "forced_bos_token_id", "forced_eos_token_id", "streamer",
                 "negative_prompt_ids", "dtype", "cache_config", "max_length", "temperature", "max_cache_len",
                 "_from_model_config", "transformers_version", "my_own_field"]
# The values each rule is about
MORE_PROBES = {
    "early_stopping": ["never", "Never", 0, 2, 0.0, False],
    "max_new_tokens": [0, -1, False, 0.5, float("nan"), 10**400],
    "assistant_ensemble_weight": [0.5, 0.0, 1.0, 0, float("nan"), False],
    "pad_token_id": [-1, 0, float("nan")],
    "cache_implementation": list(CACHE_IMPLEMENTATIONS) + ["Static", ""],
    "watermarking_config": [{"seeding_scheme": "selfhash"}, {"seeding_scheme": "x"}, {"greenlist_ratio": 1.5},
                            {"greenlist_ratio": "x"}, {"greenlist_ratio": None}, {"context_width": 0},
                            {"context_width": True}, {"bias": "anything"}, {"unknown": 1},
                            {"ngram_len": 5, "keys": [1, 2]}, {"ngram_len": 5},
                            {"ngram_len": 5, "keys": [1], "sampling_table_size": 2**24 + 1},
                            {"ngram_len": 5, "keys": [1], "sampling_table_size": "x"}, [], "", 0],
    "num_return_sequences": [2, 0, -1, 2.5],
    "suppress_tokens": [[1, 2], [[1]], "ab", [], {"1": 2}, 0],
    "dtype": [{"dtype": 1}, 1e308, "float16", 2.5, [1.5], {"a": 1.5}, float("nan")],
    "cache_config": [{"dtype": 1}, {"dtype": "x"}, {"a": {"dtype": True}}, {"dtype": 1.5}],
    "my_own_field": [{"dtype": [1]}, {"dtype": None}],
    "transformers_version": [{"dtype": 1}],
    "_from_model_config": [{"dtype": 1}, 0, ""],
}
# Combinations: a rule across fields, and _from_model_config, with which transformers ignores fields it does not know
COMBINATIONS = [
    {"num_return_sequences": 2, "do_sample": True}, {"num_return_sequences": 2, "do_sample": "x"},
    {"num_return_sequences": 2, "num_beams": 2}, {"num_return_sequences": 3, "num_beams": 2},
    {"num_return_sequences": 2, "num_beams": True}, {"num_return_sequences": 2, "num_beams": "x"},
    {"num_return_sequences": 2, "num_beams": 1.0}, {"num_return_sequences": 2, "num_beams": [1]},
    {"suppress_tokens": [1, 2], "forced_bos_token_id": 1}, {"suppress_tokens": [1, 2], "forced_eos_token_id": [1, 2]},
    {"suppress_tokens": [1, 2], "forced_eos_token_id": [1, 3]}, {"suppress_tokens": [1], "forced_eos_token_id": []},
    {"suppress_tokens": [1], "forced_eos_token_id": True}, {"suppress_tokens": [1], "forced_bos_token_id": 1.5},
    {"suppress_tokens": [1], "forced_bos_token_id": "x"}, {"suppress_tokens": ["x"], "forced_bos_token_id": "x"},
    {"suppress_tokens": [1], "forced_bos_token_id": [[1]]}, {"forced_bos_token_id": 1.5},
    {"_from_model_config": True, "streamer": 1}, {"_from_model_config": True, "dtype": 1},
    {"_from_model_config": True, "cache_config": {"dtype": 1}}, {"_from_model_config": 1, "streamer": None},
    {"_from_model_config": True, "force_bos_token_to_be_generated": True, "bos_token_id": 1, "suppress_tokens": [1]},
    {"_from_model_config": False, "force_bos_token_to_be_generated": True, "bos_token_id": 1,
     "suppress_tokens": [1]},
    {"_commit_hash": {"dtype": 1}}, {"_original_object_hash": {"dtype": 1}},
]
BASE = {"bos_token_id": 0, "eos_token_id": 0}


def _transformers_loads(folder, config: dict) -> bool:
    (folder / "generation_config.json").write_text(json.dumps(config))
    try:
        transformers.GenerationConfig.from_pretrained(folder)
    except Exception:  # noqa: BLE001 (whatever it raises is a refusal)
        return False
    return True


def test_the_tables_are_transformers_own():
    assert FIELDS == configuration_utils.GenerationConfig().__dict__.keys()
    assert CACHE_IMPLEMENTATIONS == configuration_utils.ALL_CACHE_IMPLEMENTATIONS + ("paged",)


@pytest.mark.parametrize("field", FIELDS_PROBED)
def test_the_rules_refuse_what_transformers_refuses(tmp_path, field):
    transformers.logging.set_verbosity_error()  # warnings of the values probed
    disagreements = []
    for value in PROBES + MORE_PROBES.get(field, []):
        config = {**BASE, field: value}
        loads = _transformers_loads(tmp_path, config)
        if (refusal(config) is None) != loads:
            disagreements.append((value, "transformers loads it" if loads else "transformers refuses it"))
    assert not disagreements, (field, disagreements)


def test_the_rules_refuse_the_combinations_transformers_refuses(tmp_path):
    transformers.logging.set_verbosity_error()
    disagreements = [(config, loads) for config in COMBINATIONS
                     if (refusal({**BASE, **config}) is None) != (loads := _transformers_loads(tmp_path, {**BASE,
                                                                                                          **config}))]
    assert not disagreements


def test_loadable_leaves_out_each_refused_field_and_says_it(tmp_path):
    transformers.logging.set_verbosity_error()
    config = {**BASE, "early_stopping": "x", "num_return_sequences": 2, "streamer": 1, "temperature": 0.5}
    said: list[tuple[str, str]] = []
    kept = loadable(config, lambda field, why: said.append((field, why)))
    assert kept == {**BASE, "temperature": 0.5} and _transformers_loads(tmp_path, kept)
    assert [field for field, _ in said] == ["streamer", "early_stopping", "num_return_sequences"]
    assert said[1][1] == 'field "early_stopping" is "x", transformers reads true, false, "never" or null there'


def test_the_model_fails_on_a_file_generation_config_refuses_and_loads_one_it_warns_about(tmp_path):
    """from_pretrained reads generation_config.json as GenerationConfig does, catching OSError (no file) alone."""
    transformers.logging.set_verbosity_error()
    folder = saved_hf_llama(tmp_path / "hf", **TINY_HF)
    (folder / "generation_config.json").write_text(json.dumps({**BASE, "early_stopping": "x"}))
    with pytest.raises(ValueError, match="early_stopping"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({**BASE, "temperature": 0.5, "pad_token_id": -1}))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert model.generation_config.temperature == 0.5 and refusal(json.loads(
        (folder / "generation_config.json").read_text())) is None
