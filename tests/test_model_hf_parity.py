"""The plain model against transformers' LlamaForCausalLM holding the same weights (fp32, CPU).

Costs ~10 s: depth-reduced SmolLM2 shapes plus odd shapes (9 heads / 3 KV heads, untied, MHA).
"""

import pytest
import torch

from convert_hf_helpers import assert_matches_transformers

from nanotronix.config import PRESETS, ModelConfig
from nanotronix.convert.hf_mapping import from_hf_state_dict, to_hf_state_dict
from nanotronix.model import build_model


def _shape(preset=None, **kw) -> ModelConfig:
    base = dict(PRESETS[preset]) if preset else {}
    base.update(kw)
    return ModelConfig(**base)


SHAPES = {
    "smollm2-135m-2layers": _shape("smollm2-135m", num_hidden_layers=2, vocab_size=1024),
    "smollm2-360m-2layers": _shape("smollm2-360m", num_hidden_layers=2, vocab_size=1024),
    "smollm2-1.7b-1layer": _shape("smollm2-1.7b", num_hidden_layers=1, vocab_size=512),
    "odd-9h-3kv-untied": ModelConfig(hidden_size=72, intermediate_size=100, num_hidden_layers=3,
                                     num_attention_heads=9, num_key_value_heads=3, vocab_size=301,
                                     max_position_embeddings=64, rope_theta=500.0, rms_norm_eps=1e-6,
                                     tie_word_embeddings=False, init_std=0.05),
    "mha-6h-untied": ModelConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                                 num_key_value_heads=6, vocab_size=97, max_position_embeddings=32,
                                 rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, init_std=0.1),
}


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_logits_and_grads_match_transformers(name, backend):
    cfg = SHAPES[name]
    torch.manual_seed(0)
    seq = min(24, cfg.max_position_embeddings)
    assert_matches_transformers(cfg, backend, torch.randint(0, cfg.vocab_size, (2, seq + 1)))


def test_hf_roundtrip_is_identity():
    cfg = SHAPES["odd-9h-3kv-untied"]
    model = build_model(cfg)
    sd = model.state_dict()
    back = from_hf_state_dict(to_hf_state_dict(sd, cfg), cfg)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_parameter_count_matches_published_smollm2():
    # Published counts (SmolLM2 FACTS, derived from the HF releases).
    published = {"smollm2-135m": 134_515_008, "smollm2-360m": 361_821_120, "smollm2-1.7b": 1_711_376_384}
    for preset, count in published.items():
        cfg = _shape(preset)
        assert cfg.num_parameters() == count
    small = SHAPES["odd-9h-3kv-untied"]
    assert small.num_parameters() == sum(p.numel() for p in build_model(small).parameters())


def test_init_follows_nanotrons_standard_parametrization():
    """nanotron (SmolLM2's trainer) draws the residual-writing row-parallel matrices (o_proj, down_proj) with
    init_method.std / sqrt(2 * num_hidden_layers) and everything else with init_method.std (its
    StandardParametrizator); the 135M preset's 30 layers give 0.0417 and 0.0054."""
    cfg = _shape("smollm2-135m", num_hidden_layers=30, vocab_size=4096)
    torch.manual_seed(0)
    model = build_model(cfg)
    residual_std = cfg.init_std / (2 * cfg.num_hidden_layers) ** 0.5
    for name, param in model.named_parameters():
        expected = (residual_std if name.endswith(("o_proj.weight", "down_proj.weight"))
                    else 1.0 if "norm" in name else cfg.init_std)
        got = param.detach().std().item() if "norm" not in name else param.detach().mean().item()
        assert got == pytest.approx(expected, rel=0.02), name
        if "norm" not in name:  # normal_(mean=0, std): centred (within 5 standard errors), and a normal's tails
            w = param.detach().double().flatten()
            assert abs(w.mean().item()) < 5 * expected / w.numel() ** 0.5, name
            beyond = (w.abs() > 2 * expected).double().mean().item()  # 4.55% for a normal, none for a uniform
            assert beyond == pytest.approx(0.0455, abs=0.005), (name, beyond)


def test_an_untied_head_is_drawn_like_the_embedding():
    """With tie_word_embeddings=False the output head is a matrix of its own: nanotron's StandardParametrizator draws
    it from Normal(0, init_std) like the embedding. tests/test_model_hf_parity.py checks the init on the tied SmolLM2
    presets only, where the head IS the embedding, so a head left at nn.Linear's default (uniform, std 1/sqrt(3 D),
    0.036 here) would pass unnoticed. Normal's signature: 4.55% of the draws beyond 2 std (none for a uniform)."""
    from nanotronix.config import ModelConfig
    from nanotronix.model import build_model

    cfg = ModelConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=4096, max_position_embeddings=64, rope_theta=10000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, init_std=0.02)
    torch.manual_seed(0)
    model = build_model(cfg)
    head, embedding = model.lm_head.weight.detach().double(), model.embed_tokens.weight.detach().double()
    assert head.data_ptr() != embedding.data_ptr()
    for name, w in (("lm_head", head), ("embed_tokens", embedding)):
        assert w.std().item() == pytest.approx(cfg.init_std, rel=0.02), name
        assert abs(w.mean().item()) < 5 * cfg.init_std / w.numel() ** 0.5, name
        assert (w.abs() > 2 * cfg.init_std).double().mean().item() == pytest.approx(0.0455, abs=0.005), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_is_transformers_llama_rmsnorm_bit_for_bit(dtype):
    """RMSNorm's numerics are transformers' LlamaRMSNorm's (norm.py's docstring): normalise in fp32, round to the
    input dtype, then multiply by the fp32 gain (so a bf16 input gives an fp32 output). The model-level parity tests
    run fp32, and under the trainer's autocast the residual stream entering a norm is fp32 too, so a norm that
    scaled in fp32 and rounded the product to bf16 at the end (or kept bf16 out) was seen by no test."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from nanotronix.model.norm import RMSNorm

    torch.manual_seed(0)
    dim = 96
    theirs, ours = LlamaRMSNorm(dim, eps=1e-5), RMSNorm(dim, 1e-5)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(dim) * 0.3 + 1)
        ours.weight.copy_(theirs.weight)
    x = (torch.randn(4, 7, dim) * 3).to(dtype)
    want, got = theirs(x), ours(x)
    assert got.dtype == want.dtype == torch.float32
    assert torch.equal(got, want)
