"""Property-based test (hypothesis, configured in tests/properties.py) of the config files tools/convert_to_hf.py
writes: for tiny Llama architectures (tests/test_model_properties.py's), their float fields drawn over every order
of magnitude a config accepts, the export of a step-0 checkpoint holds a config.json transformers' AutoConfig loads
with the model's own values (vocabulary, sizes, heads, eps, RoPE theta, tied head, initializer_range) and a
generation_config.json GenerationConfig loads. An initializer_range past 1 (init_std's, or its own), which AutoConfig
refuses, is refused when the run's config loads (config_checks.validate_model_export), and by the export of a
checkpoint saved before that check, in one line naming its manifest, writing nothing. ~15 s on one core."""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import transformers
from hypothesis import event, given, settings
from hypothesis import strategies as st

from checkpoint_helpers import adamw, plain_model, save_single
from convert_hf_helpers import one_error_line
from properties import PROPERTY, log_uniform
from test_model_properties import architectures

from nanotronix.checkpoint.hf_export import export_to_hf
from nanotronix.config import ModelConfig
from nanotronix.config_checks import validate_model_export
from nanotronix.convert.hf_mapping import hf_config_dict
from nanotronix.errors import ConfigError


@st.composite
def exported_models(draw) -> ModelConfig:
    """architectures() with init_std, initializer_range, rope_theta and rms_norm_eps drawn over the orders of
    magnitude the config's own checks accept (any positive finite number; an initializer_range of 0 too)."""
    cfg = draw(architectures())
    return dataclasses.replace(
        cfg, init_std=draw(log_uniform(1e-6, 1e3)),
        initializer_range=draw(st.one_of(st.none(), st.just(0.0), log_uniform(1e-6, 1e3))),
        rope_theta=draw(log_uniform(1e-300, 1e300)), rms_norm_eps=draw(log_uniform(1e-300, 1e300)))


def _exported(cfg: ModelConfig, tmp: Path) -> Path:
    """The export of a step-0 checkpoint of a model of CFG."""
    model = plain_model(cfg)
    save_single(tmp / "run", 0, model, adamw(model))
    return export_to_hf(tmp / "run", tmp / "hf", progress=False, log=lambda _: None)


def _autoconfig_refuses(config: dict) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        try:
            transformers.AutoConfig.from_pretrained(tmp)
        except Exception:  # noqa: BLE001 (whatever it raises is a refusal)
            return True
    return False


@settings(PROPERTY, max_examples=40)
@given(cfg=exported_models())
def test_the_exported_config_files_are_ones_transformers_loads(cfg):
    transformers.logging.set_verbosity_error()
    try:
        validate_model_export(cfg)
    except ConfigError as e:  # what transformers refuses, and only that
        event("refused")
        assert _autoconfig_refuses(hf_config_dict(cfg)), str(e)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            model = plain_model(cfg)  # saved as a run started before the check would have saved it
            step = save_single(tmp / "run", 0, model, adamw(model))
            said = one_error_line("convert_to_hf", "--checkpoint", str(tmp / "run"), "--output", str(tmp / "hf"))
            assert said == f"error: checkpoint {step}: checkpoint.json: {e}" and not (tmp / "hf").exists(), said
        return
    event("exported")
    with tempfile.TemporaryDirectory() as tmp:
        out = _exported(cfg, Path(tmp))
        config = transformers.AutoConfig.from_pretrained(out)
        generation = transformers.GenerationConfig.from_pretrained(out)
    assert type(config) is transformers.LlamaConfig
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
            config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.max_position_embeddings) \
        == (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim, cfg.max_position_embeddings)
    assert (config.rms_norm_eps, config.rope_parameters["rope_theta"], config.tie_word_embeddings) == \
        (cfg.rms_norm_eps, cfg.rope_theta, cfg.tie_word_embeddings)
    assert config.initializer_range == (cfg.init_std if cfg.initializer_range is None else cfg.initializer_range)
    assert (generation.bos_token_id, generation.eos_token_id) == (config.bos_token_id, config.eos_token_id)
