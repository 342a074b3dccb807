"""Property-based tests (hypothesis, configured in tests/properties.py) of the training side's hand-written pure logic,
each against the claims of its docstrings and against references written plainly here: the WSD learning rate
(lr_schedule.py) against exact Fractions and the config checks, the pipeline split (partition.py) against every split
enumerated, the data-parallel bucket layout and ZeRO-1 shards (data_parallel.py) against per-element coverage counts,
the MFU FLOP count (flops.py) against the README's formula and a direct sum over document lengths, the step ranges of
train.skip_steps / logging.profile_steps (config_checks.py) against sets of steps, and the spike guard's window
(spike_guard.py) against exact Fraction statistics. ~7 s on one core."""
from __future__ import annotations

import itertools
import math
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from nanotronix.config import ConfigError, ModelConfig, TrainConfig, config_from_dict
from nanotronix.config_checks import profiled_step_range, skipped_step_ranges
from nanotronix.parallel.data_parallel import ALIGN, GradBuffers
from nanotronix.parallel.partition import block_costs, partition_layers
from nanotronix.train.flops import document_attention_span, flops_per_token, matmul_params
from nanotronix.train.lr_schedule import lr_at
from nanotronix.train.spike_guard import SpikeGuard
from properties import PROPERTY

# --- lr_schedule.py -------------------------------------------------------------------------------------------

DECAY_STYLES = ("linear", "cosine", "1-sqrt")


@st.composite
def lr_schedules(draw):
    """(peak lr, the lr_schedule section) of a config, valid or not: the config checks decide."""
    peak = draw(st.one_of(st.sampled_from([0.0, 1e-3, 3e-4, 5e-4, 0.1, 0.3, 1.0]),
                          st.floats(0.0, 10.0), st.floats(0.0, 1.7e308)))
    section = {"warmup_steps": draw(st.integers(0, 40))}
    if draw(st.booleans()):
        section["decay_start_step"] = section["warmup_steps"] + draw(st.integers(-2, 30))
        section["decay_steps"] = draw(st.integers(0, 40))
        section["decay_style"] = draw(st.sampled_from(DECAY_STYLES))
        section["min_lr"] = draw(st.one_of(st.just(0.0), st.just(peak), st.floats(0.0, peak * 1.01)))
    return peak, section


def _loaded_schedule(peak: float, section: dict):
    """The schedule as load_config would train with it, or None where the config checks refuse it."""
    try:
        cfg = config_from_dict({"model": {"preset": "smollm2-135m"}, "optimizer": {"lr": peak},
                                "lr_schedule": section})
    except ConfigError:
        return None
    return cfg.lr_schedule


def _decay_factor(style: str, progress: Fraction) -> float:
    """The decay's share of (lr - min_lr) left at `progress` in [0, 1] of the decay (the module docstring's shapes)."""
    if style == "linear":
        return float(1 - progress)
    if style == "cosine":
        return 0.5 * (1 + math.cos(math.pi * float(progress)))
    return 1 - math.sqrt(float(progress))


def _reference_lr(step: int, peak: float, s) -> float:
    """The module docstring's piecewise definition, phase by phase, in Fractions where the shape is rational."""
    if step <= s.warmup_steps:
        return float(Fraction(peak) * step / s.warmup_steps)
    if s.decay_start_step is None or step <= s.decay_start_step:
        return peak
    progress = min(Fraction(1), Fraction(step - s.decay_start_step, s.decay_steps))
    return float(Fraction(s.min_lr) + (Fraction(peak) - Fraction(s.min_lr)) * Fraction(_decay_factor(s.decay_style,
                                                                                                      progress)))


@settings(PROPERTY, max_examples=250)
@given(lr_schedules())
def test_the_learning_rate_follows_its_documented_phases_within_bounds(drawn):
    peak, section = drawn
    s = _loaded_schedule(peak, section)
    assume(s is not None)
    end = s.warmup_steps if s.decay_start_step is None else s.decay_start_step + s.decay_steps
    steps = range(1, end + 4)
    rates = [lr_at(step, peak, s) for step in steps]
    for step, rate in zip(steps, rates):
        assert math.isfinite(rate) and rate >= 0, (step, rate)
        assert rate == pytest.approx(_reference_lr(step, peak, s), rel=1e-12, abs=1e-300), step
        assert rate <= peak, (step, rate)  # never above optimizer.lr
        if step > s.warmup_steps:
            assert rate >= s.min_lr, (step, rate)  # never below the floor after warm-up
    # the documented points, exactly: the peak at the end of warm-up and through the stable phase, min_lr at and
    # after the end of the decay
    if s.warmup_steps:
        assert lr_at(s.warmup_steps, peak, s) == peak
    stable_end = s.warmup_steps if s.decay_start_step is None else s.decay_start_step
    assert all(lr_at(step, peak, s) == peak for step in range(s.warmup_steps + 1, stable_end + 1))
    if s.decay_start_step is not None:
        assert [lr_at(step, peak, s) for step in range(end, end + 3)] == [s.min_lr] * 3
    # monotone within phases: rising through warm-up, then never rising again
    top = max(s.warmup_steps, 1)
    assert all(a <= b for a, b in zip(rates[:top], rates[1:top]))
    assert all(a >= b for a, b in zip(rates[top - 1:], rates[top:]))


# --- partition.py ---------------------------------------------------------------------------------------------

def _chunk_costs(bounds, num_layers, layer, embedding, head):
    edges = (0, *bounds, num_layers)
    costs = [(edges[c + 1] - edges[c]) * layer for c in range(len(edges) - 1)]
    costs[0] += embedding
    costs[-1] += head
    return costs


def _documented_split(num_layers, chunks, layer, embedding, head):
    """Every contiguous split enumerated; the smallest most expensive chunk wins, then (the docstring's tie-break,
    read from the last cut back) the earliest last cut, then the smallest most expensive chunk before it, then the
    earliest cut before that, ..."""
    def key(bounds):
        costs = _chunk_costs(bounds, num_layers, layer, embedding, head)
        order = [max(costs)]
        for c in range(chunks - 1, 0, -1):
            order += [bounds[c - 1], max(costs[:c])]
        return order
    return min(itertools.combinations(range(1, num_layers), chunks - 1), key=key)


@settings(PROPERTY, max_examples=200)
@given(st.integers(1, 11).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))),
       st.integers(1, 9), st.integers(0, 40), st.integers(0, 80))
def test_the_pipeline_split_minimises_the_most_expensive_chunk(shape, layer, embedding, head):
    num_layers, chunks = shape
    split = partition_layers(num_layers, chunks, float(layer), float(embedding), float(head))
    assert [i for chunk in split for i in chunk] == list(range(num_layers))  # contiguous, each layer once, in order
    assert len(split) == chunks and all(split)
    bounds = tuple(itertools.accumulate(len(chunk) for chunk in split[:-1]))
    best = _documented_split(num_layers, chunks, layer, embedding, head)
    assert max(_chunk_costs(bounds, num_layers, layer, embedding, head)) == \
        max(_chunk_costs(best, num_layers, layer, embedding, head))
    assert bounds == best


@settings(PROPERTY, max_examples=40)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(1, 4), st.integers(1, 8), st.integers(1, 300))
def test_block_costs_are_the_flop_counters_terms(heads_per_kv, kv_heads, head_dim_eighths, layers, seq_len):
    heads = heads_per_kv * kv_heads
    cfg = _model(heads * 8 * head_dim_eighths, 3 * head_dim_eighths * 8, layers, heads, kv_heads, 1000 + seq_len)
    embedding, layer, head = block_costs(cfg, seq_len)
    assert embedding == 2 * cfg.hidden_size
    assert head == 6 * cfg.hidden_size * cfg.vocab_size
    # the decoder layers and the head are exactly what the MFU counts (the lookup, which it leaves out, apart)
    assert layers * layer + head == flops_per_token(cfg, seq_len)


# --- data_parallel.py: bucket layout and ZeRO-1 shards --------------------------------------------------------

class _Params(nn.Module):
    def __init__(self, shapes, special):
        super().__init__()
        self.weights = nn.ParameterList()
        for shape, kind in zip(shapes, special):
            p = nn.Parameter(torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape))
            if kind == "sequence_parallel":
                p.sequence_parallel = True
            elif kind == "tied":
                p.tied_across_stages = True
            self.weights.append(p)


@settings(PROPERTY, max_examples=60)
@given(st.lists(st.tuples(st.lists(st.integers(1, 70), min_size=1, max_size=3),
                          st.sampled_from(["regular"] * 4 + ["own", "sequence_parallel", "tied"])),
                min_size=1, max_size=8),
       st.integers(1, 8).flatmap(lambda dp: st.tuples(st.just(dp), st.integers(0, dp - 1))),
       st.integers(1, 400), st.sampled_from([0, 1]))
def test_buckets_hold_every_parameter_once_aligned_and_zero1_shards_tile_them(params, dp_layout, bucket_size,
                                                                              zero_stage):
    dp, dp_rank = dp_layout
    model = _Params([shape for shape, _ in params], [kind for _, kind in params])
    values = [p.detach().clone() for p in model.parameters()]
    own = [p for p, (_, kind) in zip(model.parameters(), params) if kind == "own"]
    # a layout of dp ranks seen from one of them: building the buckets runs no collective
    ctx = SimpleNamespace(dp=dp, dp_rank=dp_rank, dp_group=None, tp_group=None, embedding_group=None)
    grads = GradBuffers(model, ctx, zero_stage, bucket_size, own_buckets=own)

    seen = [id(p) for b in grads.buckets for p in b.params]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # every parameter in exactly one bucket
    for p, value in zip(model.parameters(), values):
        assert torch.equal(p.data, value)  # moved into the bucket unchanged
    for b in grads.buckets:
        assert b.numel % (ALIGN * dp) == 0  # every rank's reduce-scatter / all-gather piece is the same size
        used = [0] * b.numel
        for p, off in zip(b.params, b.offsets):
            assert off % ALIGN == 0
            assert p.data.data_ptr() == b.data[off:].data_ptr() and p.main_grad.data_ptr() == b.grad[off:].data_ptr()
            for i in range(off, off + p.numel()):
                used[i] += 1
        assert max(used) == 1  # no two parameters share an element
        kinds = {getattr(p, "tied_across_stages", False) * 2 + getattr(p, "sequence_parallel", False)
                 for p in b.params}
        assert len(kinds) == 1 and b.deferred == (kinds != {0})  # special parameters apart, reduced at finish()
    # ZeRO-1: the shards of the dp ranks tile each bucket with no gap or overlap; this rank's is its dp_rank-th
    for b in grads.buckets:
        if zero_stage == 1 and dp > 1:
            size = b.numel // dp
            assert (b.shard_start, b.shard_end) == (dp_rank * size, (dp_rank + 1) * size)
            assert b.shard_grad.numel() == size
        else:
            assert (b.shard_start, b.shard_end) == (0, b.numel)
        pieces = list(b.pieces())
        for p, off, lo, hi in pieces:
            assert b.shard_start <= lo < hi <= b.shard_end and off <= lo and hi <= off + p.numel()
        in_shard = sum(1 for i, p in enumerate(b.params) for e in range(b.offsets[i], b.offsets[i] + p.numel())
                       if b.shard_start <= e < b.shard_end)
        assert sum(hi - lo for _, _, lo, hi in pieces) == in_shard
    # the regular buckets of each stream fill up to the bucket size, then a new one starts
    for b in grads.buckets:
        if not b.deferred:
            assert sum(p.numel() for p in b.params[:-1]) < bucket_size


# --- flops.py -------------------------------------------------------------------------------------------------

def _model(hidden, intermediate, layers, heads, kv_heads, vocab) -> ModelConfig:
    return ModelConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                       max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=True, init_std=0.02)


@st.composite
def models(draw):
    kv_heads = draw(st.integers(1, 4))
    heads = kv_heads * draw(st.integers(1, 4))
    head_dim = draw(st.integers(1, 16)) * 2
    return _model(heads * head_dim, draw(st.integers(1, 200)), draw(st.integers(1, 12)), heads, kv_heads,
                  draw(st.integers(2, 5000)))


@settings(PROPERTY, max_examples=80)
@given(models(), st.integers(1, 4096))
def test_flops_are_six_times_the_matmul_weights_plus_causal_attention(cfg, seq_len):
    """README (Performance): 6·N_matmul + causal attention; N_matmul counts q, o at [D x D], k and v at [D x kv·hd]
    (GQA), gate, up and down at [D x F], and the logits GEMM [D x V] (tied or not), but not the lookup."""
    d, hd = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    layer_weights = {"q": d * d, "k": d * cfg.num_key_value_heads * hd, "v": d * cfg.num_key_value_heads * hd,
                     "o": d * d, "gate": d * cfg.intermediate_size, "up": d * cfg.intermediate_size,
                     "down": cfg.intermediate_size * d}
    n_matmul = cfg.num_hidden_layers * sum(layer_weights.values()) + d * cfg.vocab_size
    assert matmul_params(cfg) == n_matmul
    # QK^T and AV: 2 * S * D FLOPs each per token forward, half of them under the causal mask, times 3 (fwd + bwd)
    causal_attention = cfg.num_hidden_layers * 3 * Fraction(2 * 2 * seq_len * d, 2)
    assert flops_per_token(cfg, seq_len) == 6 * n_matmul + causal_attention


@settings(PROPERTY, max_examples=80)
@given(st.integers(1, 64).flatmap(lambda s: st.tuples(st.just(s), st.lists(
    st.lists(st.integers(1, s), min_size=1, max_size=s), min_size=1, max_size=4))), models())
def test_document_masked_flops_sum_the_attention_inside_each_document(windows, cfg):
    """Windows of S tokens cut into documents (each ended by EOS, the last one of a row may run on past it): the
    attention term is sum(l_i^2) / 2 causal pairs per window instead of S^2 / 2."""
    seq_len, cuts = windows
    eos, rows, lengths = 0, [], []
    for row_cuts in cuts:
        row, row_lengths = [], []
        for length in row_cuts:
            length = min(length, seq_len - len(row))
            if length == 0:
                break
            row += [1] * (length - 1) + [eos]
            row_lengths.append(length)
        if len(row) < seq_len:  # the document that runs on past the window
            row_lengths.append(seq_len - len(row))
            row += [1] * (seq_len - len(row))
        rows.append(row)
        lengths += row_lengths
    span = document_attention_span(torch.tensor(rows), eos)
    exact_span = Fraction(sum(n * n for n in lengths), len(rows) * seq_len)
    assert span == pytest.approx(float(exact_span), rel=1e-12)
    pairs_per_window = Fraction(sum(n * n for n in lengths), 2 * len(rows))  # causal (i, j <= i) pairs, halved
    attention = cfg.num_hidden_layers * 3 * 2 * 2 * cfg.hidden_size * pairs_per_window / seq_len
    assert flops_per_token(cfg, seq_len, span) == pytest.approx(6 * matmul_params(cfg) + float(attention), rel=1e-12)


# --- config_checks.py: train.skip_steps / logging.profile_steps -----------------------------------------------

def _range_text(a: int, b: int, pad: tuple[str, str, str, str]) -> str:
    return f"{pad[0]}{a}{pad[1]}" if a == b and not pad[2] else f"{pad[0]}{a}{pad[1]}-{pad[2]}{b}{pad[3]}"


pads = st.tuples(*[st.sampled_from(["", " ", "  ", "\t"])] * 4)


@settings(PROPERTY, max_examples=200)
@given(st.integers(1, 60).flatmap(lambda steps: st.tuples(st.just(steps), st.lists(
    st.tuples(st.integers(1, steps), st.integers(1, steps), pads).map(lambda t: (min(t[:2]), max(t[:2]), t[2])),
    max_size=6))))
def test_skip_ranges_merge_to_exactly_the_steps_listed(drawn):
    train_steps, ranges = drawn
    texts = [_range_text(a, b, pad) for a, b, pad in ranges]
    merged = skipped_step_ranges(TrainConfig(train_steps=train_steps, skip_steps=texts))
    listed = {s for a, b, _ in ranges for s in range(a, b + 1)}
    # a step is skipped iff it lies in one of the ranges given
    assert {s for a, b in merged for s in range(a, b + 1)} == listed
    # sorted, each range a real one, none overlapping or touching the next (merged), all within the run
    assert all(1 <= a <= b <= train_steps for a, b in merged)
    assert all(b + 1 < a2 for (_, b), (a2, _) in zip(merged, merged[1:]))
    # printed back as "A-B" / "N" they parse to the same ranges
    printed = [f"{a}-{b}" if a < b else str(a) for a, b in merged]
    assert skipped_step_ranges(TrainConfig(train_steps=train_steps, skip_steps=printed)) == merged
    for text, (a, b, _) in zip(texts, ranges):
        profiled = SimpleNamespace(logging=SimpleNamespace(profile_steps=text),
                                   train=SimpleNamespace(train_steps=train_steps))
        assert profiled_step_range(profiled) == (a, b)


@settings(PROPERTY, max_examples=200)
@given(st.text(st.sampled_from("0123456789- \t+_.e²٣x"), max_size=8), st.integers(1, 99))
def test_a_step_range_is_a_step_or_two_ordered_steps_within_the_run(text, train_steps):
    parts = [part.strip() for part in text.split("-")]
    plain = 1 <= len(parts) <= 2 and all(part and set(part) <= set("0123456789") for part in parts)
    valid = plain and 1 <= int(parts[0]) <= int(parts[-1]) <= train_steps
    if valid:
        assert skipped_step_ranges(TrainConfig(train_steps=train_steps, skip_steps=[text])) == \
            [(int(parts[0]), int(parts[-1]))]
    else:
        with pytest.raises(ConfigError, match="train.skip_steps: "):
            skipped_step_ranges(TrainConfig(train_steps=train_steps, skip_steps=[text]))


# --- spike_guard.py -------------------------------------------------------------------------------------------

values = st.one_of(st.sampled_from([0.1, 0.3, 1.0, 2.0, 2.5, 1e9]), st.floats(0.0, 1e3, allow_subnormal=False))
# a run of steps whose values repeat (a window of one level: a loss or a norm that sat still), then any steps
spike_guard_steps = st.tuples(st.tuples(values, values), st.integers(0, 7),
                              st.lists(st.tuples(values, values), min_size=1, max_size=8)) \
    .map(lambda t: [t[0]] * t[1] + t[2])


def _exact_spike(window: list[float], value: float, sigma: float) -> tuple[bool, bool]:
    """(certainly a spike, certainly not one): value > mean + sigma * std in exact arithmetic, with a margin of
    1e-9 sigma either side where float rounding may decide; std 0 is never a spike (nothing to measure against)."""
    seen = [Fraction(x) for x in window]
    mean = sum(seen) / len(seen)
    variance = sum((x - mean) ** 2 for x in seen) / len(seen)
    excess = Fraction(value) - mean
    if variance == 0:
        return False, True
    above = excess > 0 and excess ** 2 > (Fraction(sigma) * (1 + Fraction(1, 10 ** 9))) ** 2 * variance
    below = excess <= 0 or excess ** 2 < (Fraction(sigma) * (1 - Fraction(1, 10 ** 9))) ** 2 * variance
    return above, below


@settings(PROPERTY, max_examples=200)
@given(st.integers(2, 6), st.sampled_from([0.5, 1.0, 3.0, 6.0]),
       spike_guard_steps, st.integers(0, 14))
def test_the_spike_guard_judges_by_the_last_window_and_resumes_exactly(window, sigma, steps, resume_at):
    guard = SpikeGuard(sigma, window)
    verdicts = []
    for i, (loss, grad_norm) in enumerate(steps):
        losses, norms = list(guard.losses), list(guard.grad_norms)
        verdict = guard.judge(loss, grad_norm)
        if i < window:
            assert verdict is None  # waits for a full window
        else:
            loss_spike, loss_calm = _exact_spike(losses, loss, sigma)
            norm_spike, norm_calm = _exact_spike(norms, grad_norm, sigma)
            if loss_spike or norm_spike:
                assert verdict is not None
            if loss_calm and norm_calm:
                assert verdict is None, (losses, loss, norms, grad_norm)
        verdicts.append(verdict)
        # every step enters the window, the skipped ones too; the window holds the last `window` steps
        assert guard.state_dict() == {"losses": [x for x, _ in steps[max(0, i + 1 - window):i + 1]],
                                      "grad_norms": [y for _, y in steps[max(0, i + 1 - window):i + 1]]}
    # a guard restored from the state at any step judges the rest as the uninterrupted one did
    resume_at = min(resume_at, len(steps))
    before = SpikeGuard(sigma, window)
    for loss, grad_norm in steps[:resume_at]:
        before.judge(loss, grad_norm)
    resumed = SpikeGuard(sigma, window, before.state_dict())
    assert [resumed.judge(*step) for step in steps[resume_at:]] == verdicts[resume_at:]
