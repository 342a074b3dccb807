"""The values of generation_config.json that transformers refuses to load, checked on import (and by the export, on a
generation config an import made before that check carried into a checkpoint).

transformers (5.x) checks no field's type in generation_config.json, but GenerationConfig, as it loads the file, runs
its `validate`, which raises on a few values and combinations (`"early_stopping": "x"`, a `num_return_sequences`
above 1 without sampling or beams), or fails comparing a value of the wrong kind (`"max_new_tokens": "x"`); so does
AutoModelForCausalLM.from_pretrained, which loads the file alike and goes on only without one (OSError). The import
keeps the file and the export writes it back, so such a value made an export transformers cannot load. transformers
is no dependency of nanotronix (only of its tests), hence these rules rather than asking it;
tests/test_hf_generation_config.py checks that they refuse exactly what transformers refuses of probe values. What
validate only warns about (a sampling flag without do_sample, a negative pad_token_id, max_cache_len without a static
cache) is kept, as transformers keeps it.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Optional

from nanotronix.convert.hf_config_types import json_text

# The fields GenerationConfig reads itself (those of GenerationConfig().__dict__); any other field it sets as an
# attribute only where _from_model_config is false, and ignores where it is true
FIELDS = frozenset((
    "_from_model_config", "assistant_confidence_threshold", "assistant_early_exit", "assistant_ensemble_weight",
    "assistant_lookbehind", "bad_words_ids", "begin_suppress_tokens", "bos_token_id", "cache_config",
    "cache_implementation", "compile_config", "constraints", "continuous_batching_config", "decoder_start_token_id",
    "disable_compile", "diversity_penalty", "do_sample", "dola_layers", "early_stopping",
    "encoder_no_repeat_ngram_size", "encoder_repetition_penalty", "eos_token_id", "epsilon_cutoff", "eta_cutoff",
    "exponential_decay_length_penalty", "force_words_ids", "forced_bos_token_id", "forced_eos_token_id",
    "guidance_scale", "is_assistant", "length_penalty", "low_memory", "max_cache_len", "max_length",
    "max_matching_ngram_size", "max_new_tokens", "max_time", "min_length", "min_new_tokens", "min_p",
    "no_repeat_ngram_size", "num_assistant_tokens", "num_assistant_tokens_schedule", "num_beam_groups", "num_beams",
    "num_return_sequences", "output_attentions", "output_hidden_states", "output_logits", "output_scores",
    "pad_token_id", "penalty_alpha", "prefill_chunk_size", "prompt_lookup_num_tokens", "remove_invalid_values",
    "renormalize_logits", "repetition_penalty", "return_dict_in_generate", "sequence_bias", "speculation_type",
    "stop_strings", "suppress_tokens", "target_lookbehind", "temperature", "token_healing", "top_h", "top_k", "top_p",
    "transformers_version", "typical_p", "use_cache", "use_mtp", "watermarking_config"))
# The cache_implementation values transformers knows (its ALL_CACHE_IMPLEMENTATIONS and "paged")
CACHE_IMPLEMENTATIONS = ("static", "offloaded_static", "sliding_window", "hybrid", "hybrid_chunked",
                         "offloaded_hybrid", "offloaded_hybrid_chunked", "dynamic", "offloaded", "quantized", "paged")
# Arguments of generate() that validate refuses as fields of the file, whatever their value
GENERATE_ARGUMENTS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus",
                      "assistant_model", "streamer", "negative_prompt_ids", "negative_prompt_attention_mask")
# The parameters of transformers' two watermarking configs (a mapping holding ngram_len is a SynthID one)
_SYNTHID = {"ngram_len", "keys", "context_history_size", "sampling_table_seed", "sampling_table_size",
            "skip_first_ngram_calls", "debug_mode"}
_WATERMARK = {"greenlist_ratio", "bias", "hashing_key", "seeding_scheme", "context_width"}
# Fields transformers drops before printing the config (or sets itself, transformers_version), or reads as its
# watermarking config: their mappings are not printed
_NOT_PRINTED = {"transformers_version", "_commit_hash", "_original_object_hash", "_mask_length", "watermarking_config"}


def _is_number(value: Any) -> bool:
    """Whether Python compares VALUE with a number (true and false too): validate's `<` on another value raises."""
    return isinstance(value, (int, float))


Refusal = Optional[tuple[str, str]]  # the field refused, and the line that says why


def _said(field: str, why: str) -> tuple[str, str]:
    return field, f"field {json.dumps(field)} {why}"


def _same(field: str, value: Any, wanted: str) -> tuple[str, str]:
    return _said(field, f"is {json_text(value)}, transformers reads {wanted} there")


def _single(field: str, wanted: str, takes: Callable[[Any], bool]) -> Callable[[dict], Refusal]:
    """A rule on one field's value alone (absent is null, which every such rule takes)."""
    return lambda config: None if config.get(field) is None or takes(config[field]) else \
        _same(field, config[field], wanted)


def _watermarking(config: dict) -> Refusal:
    """transformers builds its watermarking config from a mapping (its parameters as keywords) and validates it."""
    value = config.get("watermarking_config")
    if value is None:
        return None
    if not isinstance(value, dict):
        return _same("watermarking_config", value, "a mapping or null")
    said = f"is {json_text(value)}"
    synthid = "ngram_len" in value
    allowed, required = (_SYNTHID, {"ngram_len", "keys"}) if synthid else (_WATERMARK, set())
    if value.keys() - allowed or required - value.keys():
        return _said("watermarking_config", f"{said}, transformers reads a mapping of {', '.join(sorted(allowed))} "
                     f"there ({'ngram_len and keys required' if synthid else 'ngram_len for a SynthID one'})")
    if synthid:
        size = value.get("sampling_table_size", 2**16)
        return None if _is_number(size) and not size > 2**24 else \
            _said("watermarking_config", f"{said}: its sampling_table_size is no number up to 2**24")
    ratio, width = value.get("greenlist_ratio", 0.25), value.get("context_width", 1)
    if value.get("seeding_scheme", "lefthash") not in ("selfhash", "lefthash"):
        return _said("watermarking_config", f"{said}: its seeding_scheme is neither \"selfhash\" nor \"lefthash\"")
    if not (_is_number(ratio) and 0.0 <= ratio <= 1.0):
        return _said("watermarking_config", f"{said}: its greenlist_ratio is no number from 0 to 1")
    if not (_is_number(width) and width >= 1):
        return _said("watermarking_config", f"{said}: its context_width is no number of at least 1")
    return None


def _return_sequences(config: dict) -> Refusal:
    """More sequences than one need sampling, or beams, as many as them."""
    count, beams = config.get("num_return_sequences"), config.get("num_beams")
    if count is None:
        return None
    if not _is_number(count):
        return _same("num_return_sequences", count, "a number or null")
    if not count > 1:
        return None
    if beams is None or beams == 1:
        return None if config.get("do_sample") else \
            _said("num_return_sequences", f"is {json_text(count)}, more than 1 without do_sample or num_beams")
    if not _is_number(beams) or count > beams:
        return _said("num_return_sequences", f"is {json_text(count)}, more than num_beams ({json_text(beams)})")
    return None


def _token_set(value: Any) -> Optional[set]:
    """Python's set of VALUE (a string's characters, a mapping's keys), None where set() raises."""
    try:
        return set(value)
    except TypeError:  # no iterable, or one of lists or mappings
        return None


def _forced_and_suppressed(config: dict) -> Refusal:
    """validate refuses a forced token set that suppress_tokens holds whole (generate would produce NaN), reading
    both as Python sets."""
    if config.get("suppress_tokens") is None:
        return None
    suppressed = _token_set(config["suppress_tokens"])
    if suppressed is None:
        return _same("suppress_tokens", config["suppress_tokens"], "a list of token ids or null")
    forced_bos = config.get("forced_bos_token_id")
    if config.get("_from_model_config") and config.get("force_bos_token_to_be_generated"):
        forced_bos = config.get("bos_token_id")  # transformers' old spelling, read only then
    for field, forced in (("forced_bos_token_id", forced_bos), ("forced_eos_token_id",
                                                                config.get("forced_eos_token_id"))):
        if forced is None:
            continue
        tokens = {forced} if isinstance(forced, int) else _token_set(forced)
        if tokens is None:
            return _same(field, forced, "a token id, a list of them or null")
        if tokens and tokens <= suppressed:
            return _said(field, f"is {json_text(forced)}, all of it in suppress_tokens")
    return None


def _printable_dtypes(field: str, value: Any) -> Refusal:
    """Loading prints the config, cutting `str(dtype).split(".")[1]` out of a "dtype" key, top-level or in a mapping
    at any depth, that holds neither a string nor null: one printed without a "." (1, true, [1], 1e+308) fails."""
    if not isinstance(value, dict):
        return None
    dtype = value.get("dtype")
    if dtype is not None and not isinstance(dtype, str) and "." not in str(dtype):
        return _said(field, f"holds \"dtype\": {json_text(dtype)}, transformers reads a string or null there (or "
                     "a value it prints with a \".\")")
    return next(filter(None, (_printable_dtypes(field, item) for item in value.values())), None)


_RULES: tuple[Callable[[dict], Refusal], ...] = (
    _single("early_stopping", 'true, false, "never" or null',
            lambda v: not isinstance(v, (list, dict)) and v in (True, False, "never")),
    _single("max_new_tokens", "a number above 0 or null", lambda v: _is_number(v) and not v <= 0),
    _single("assistant_ensemble_weight", "a number between 0 and 1 (both left out) or null",
            lambda v: _is_number(v) and 0.0 < v < 1.0),
    _single("pad_token_id", "a number or null", _is_number),
    _single("cache_implementation", f"one of {', '.join(map(json.dumps, CACHE_IMPLEMENTATIONS))} or null",
            lambda v: v in CACHE_IMPLEMENTATIONS),
    _single("compile_config", "null (only a CompileConfig object, which no JSON holds)", lambda v: False),
    _watermarking, _return_sequences, _forced_and_suppressed,
)


def refusal(config: dict[str, Any]) -> Refusal:
    """The first field of generation_config.json CONFIG (as json.loads reads it) that makes transformers refuse to
    load it, and why (`field "early_stopping" is "x", transformers reads ...`); None where it loads."""
    extras = not config.get("_from_model_config")  # fields it does not know are set as attributes only then
    for field, value in config.items():
        if field in GENERATE_ARGUMENTS and extras:
            return _said(field, "is an argument of generate(), which transformers refuses here")
        printed = (field in FIELDS or extras) and field not in _NOT_PRINTED
        if printed and (said := _printable_dtypes(field, {field: value} if field == "dtype" else value)):
            return said
    return next(filter(None, (rule(config) for rule in _RULES)), None)


def loadable(config: dict[str, Any], log: Callable[[str, str], None]) -> dict[str, Any]:
    """CONFIG less the fields that make transformers refuse it, one at a time (a combination's field: the one
    refusal names), each said through log(field, why)."""
    while (refused := refusal(config)) is not None:
        log(*refused)
        config = {k: v for k, v in config.items() if k != refused[0]}
    return config
