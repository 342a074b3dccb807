"""Property-based tests (hypothesis) of the data schedule's stateless index math: the keyed permutation
(permutation.py), the blend tree (blend.py) and the stages x blend x packed-window schedule (schedule.py), each
against the claims of its docstrings and against references written plainly here (sorted() bijections, Python-int
splitmix64, exact Fractions, direct sequential counts). Derandomized with no example database (tests/properties.py:
nearly the same examples every run, nothing written into the checkout). ~8 s on one core."""
from __future__ import annotations

import math
import sys
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanotronix.data.blend import MAX_SAMPLES, BlendTree, weight_units
from nanotronix.data.errors import DataError
from nanotronix.data.loader import TrainLoader
from nanotronix.data.permutation import derive_keys, mix64, permute
from nanotronix.data.schedule import BlendSchedule, PackedStream, window_starts
from properties import PROPERTY

MASK64 = (1 << 64) - 1

keys64 = st.integers(0, MASK64)


def _near_powers_of_two(top_bits: int, low: int = 1):
    return st.sampled_from(sorted({m for b in range(top_bits + 1) for m in ((1 << b) - 1, 1 << b, (1 << b) + 1)
                                   if m >= low}))


# --- permutation.py -------------------------------------------------------------------------------------------

def _splitmix64_finaliser(z: int) -> int:
    """Vigna's splitmix64 output function, in Python ints."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _undo_xorshift(z: int, s: int) -> int:
    x = z
    for _ in range(64 // s + 1):  # each pass fixes s more of the top bits
        x = z ^ (x >> s)
    return x


def _splitmix64_finaliser_inverse(z: int) -> int:
    z = _undo_xorshift(z, 31)
    z = (z * pow(0x94D049BB133111EB, -1, 1 << 64)) & MASK64
    z = _undo_xorshift(z, 27)
    z = (z * pow(0xBF58476D1CE4E5B9, -1, 1 << 64)) & MASK64
    return _undo_xorshift(z, 30)


@settings(PROPERTY, max_examples=120)
@given(st.lists(keys64, min_size=1, max_size=64))
def test_mix64_is_splitmix64s_finaliser_and_bijective(values):
    mixed = mix64(np.array(values, dtype=np.uint64)).tolist()
    assert mixed == [_splitmix64_finaliser(v) for v in values]
    assert [_splitmix64_finaliser_inverse(m) for m in mixed] == values
    golden = 0x9E3779B97F4A7C15
    index = list(range(len(values)))
    assert derive_keys(values[0], np.array(index)).tolist() == \
        [_splitmix64_finaliser(values[0] ^ (((e + 1) * golden) & MASK64)) for e in index]


@settings(PROPERTY, max_examples=160)
@given(st.one_of(st.integers(1, 5000), _near_powers_of_two(12)), keys64)
def test_permute_is_a_bijection_of_every_small_n(n, key):
    image = permute(np.arange(n), n, key)
    assert sorted(image.tolist()) == list(range(n))
    assert image.dtype == np.int64
    assert np.array_equal(permute(np.arange(n), n, key), image)  # deterministic


@settings(PROPERTY, max_examples=120)
@given(st.one_of(st.integers(2, 1 << 40), _near_powers_of_two(40, low=2)), keys64, st.data())
def test_permute_of_large_n_stays_in_range_and_is_injective(n, key, data):
    points = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=300, unique=True))
    if n - 1 not in points:
        points.append(n - 1)  # the top of the domain, where cycle walking is longest
    image = permute(np.array(points, dtype=np.int64), n, key).tolist()
    assert all(0 <= v < n for v in image)
    assert len(set(image)) == len(points)


@settings(PROPERTY, max_examples=80)
@given(st.lists(st.tuples(st.one_of(st.integers(1, 3000), st.integers(1, 1 << 40), _near_powers_of_two(40)), keys64),
                min_size=1, max_size=6), st.randoms(use_true_random=False))
def test_per_element_sizes_and_keys_equal_one_call_per_size_and_key(groups, rnd):
    """One vectorised call with a size and key per element (datasets and epochs of a batch, interleaved) equals
    one call per (size, key)."""
    per_group = [[rnd.randrange(n) for _ in range(rnd.randrange(1, 50))] for n, _ in groups]
    apart = [permute(np.array(i, dtype=np.int64), n, key).tolist() for i, (n, key) in zip(per_group, groups)]
    rows = [(g, k) for g, i in enumerate(per_group) for k in range(len(i))]
    rnd.shuffle(rows)
    together = permute(np.array([per_group[g][k] for g, k in rows], dtype=np.int64),
                       np.array([groups[g][0] for g, _ in rows], dtype=np.int64),
                       np.array([groups[g][1] for g, _ in rows], dtype=np.uint64)).tolist()
    assert together == [apart[g][k] for g, k in rows]


@settings(PROPERTY, max_examples=80)
@given(st.integers(1, 5000), keys64, st.sampled_from([(), (1,), (3, 4), (2, 3, 2)]), st.data())
def test_permute_keeps_the_shape_of_i_and_maps_each_value_alike(n, key, shape, data):
    """permute's "image of each value of `i`", for a scalar or an array of any shape: as in a flat call."""
    size = math.prod(shape)
    values = data.draw(st.lists(st.integers(0, n - 1), min_size=size, max_size=size))
    flat = permute(np.array(values, dtype=np.int64), n, key)
    shaped = permute(np.array(values, dtype=np.int64).reshape(shape), n, key)
    assert shaped.shape == shape and shaped.ravel().tolist() == flat.tolist()
    keys = np.full(shape, key, dtype=np.uint64)
    sizes = np.full(shape, n, dtype=np.int64)
    assert permute(np.array(values, dtype=np.int64).reshape(shape), sizes, keys).ravel().tolist() == flat.tolist()


# --- blend.py -------------------------------------------------------------------------------------------------

weight_lists = st.lists(st.one_of(st.floats(1e-3, 1e3), st.sampled_from([1e-6, 1.0, 1e6])), min_size=1, max_size=20)


def _servable(weights) -> bool:
    """Whether every weight is at least one 2^-24 unit of the sum (with a margin for the rounding at half a unit)."""
    return min(weights) / sum(weights) * (1 << 24) >= 0.75


def _depth(k: int) -> int:
    return math.ceil(math.log2(k)) if k > 1 else 0


@settings(PROPERTY, max_examples=160)
@given(weight_lists.filter(_servable), st.integers(0, 3000))
def test_blend_ranks_are_gapless_and_counts_match_a_direct_count(weights, n):
    tree = BlendTree(weights)
    k = len(weights)
    source, rank = tree.assign(np.arange(n))
    assert source.shape == rank.shape == (n,) and (n == 0 or 0 <= source.min() <= source.max() < k)
    direct = [0] * k
    for s, r in zip(source.tolist(), rank.tolist()):  # each dataset's ranks: 0, 1, 2, ... in sample order
        assert r == direct[s]
        direct[s] += 1
    assert tree.counts(n) == direct
    # every prefix is within ceil(log2 K) samples of its share of the served weights (exact integers)
    units = np.array(weight_units(weights), dtype=np.int64)
    prefix_counts = np.zeros((n + 1, k), dtype=np.int64)
    if n:
        prefix_counts[1:] = np.cumsum(np.eye(k, dtype=np.int64)[source], axis=0)
    error_times_total = np.abs(prefix_counts * units.sum() - np.arange(n + 1)[:, None] * units[None, :])
    assert error_times_total.max() <= _depth(k) * units.sum()


@settings(PROPERTY, max_examples=160)
@given(weight_lists.filter(_servable), st.one_of(st.integers(0, MAX_SAMPLES - 1), st.integers(MAX_SAMPLES - 10**6,
                                                                                     MAX_SAMPLES - 1)),
       st.integers(1, 400))
def test_blend_window_at_any_start_continues_each_datasets_ranks(weights, start, length):
    """Sample numbers [start, start+length) anywhere below 2^38: each dataset's ranks continue from
    counts(start), one by one, up to counts(end); the counts stay within ceil(log2 K) of the exact share."""
    end = min(start + length, MAX_SAMPLES)
    tree = BlendTree(weights)
    before, after = tree.counts(start), tree.counts(end)
    source, rank = tree.assign(np.arange(start, end))
    for s in range(len(weights)):
        assert rank[source == s].tolist() == list(range(before[s], after[s]))
    units = weight_units(weights)
    exact_total = sum(Fraction(w) for w in weights)
    for m, counts in ((start, before), (end, after)):
        assert sum(counts) == m
        assert all(abs(Fraction(c) - Fraction(m * u, sum(units))) <= _depth(len(weights))
                   for c, u in zip(counts, units))
        # from the configured weights: further off by their quantisation to ~2^24 units (not within log2 K alone)
        quantisation = Fraction(m * (len(weights) + 1), 2 * sum(units))
        assert all(abs(Fraction(c) - m * Fraction(w) / exact_total) <= _depth(len(weights)) + quantisation
                   for c, w in zip(counts, weights))


@settings(PROPERTY, max_examples=160)
@given(weight_lists.filter(_servable), st.integers(-40, 40))
def test_weight_units_keep_the_ratios_and_ignore_the_scale(weights, exponent):
    units = weight_units(weights)
    assert min(units) >= 1
    total_units, total = sum(units), math.fsum(weights)
    k = len(weights)
    # each unit is its weight's share of 2^24, rounded: the served share is off by at most ~K/2 units
    assert all(abs(Fraction(u, total_units) - Fraction(w) / Fraction(total)) <= Fraction(k + 1, total_units)
               for u, w in zip(units, weights))
    # 1:1 and 0.5:0.5 are the same blend: exact rescaling (by a power of two) leaves the units alone
    assert weight_units([math.ldexp(w, exponent) for w in weights]) == units


bad_weight = st.one_of(st.floats(allow_nan=True, allow_infinity=True).filter(lambda w: not w > 0),
                       st.sampled_from([float("inf"), float("nan"), 0, -1]))


@settings(PROPERTY, max_examples=160)
@given(st.lists(st.one_of(st.floats(1e-300, 1e308), st.integers(1, 10**400), st.integers(10**4300, 10**5000),
                          bad_weight), min_size=0, max_size=8))
def test_blend_weights_are_served_or_refused_in_one_line(weights):
    """Any list of numbers: units of at least one each, or a DataError of one line (never another exception)."""
    try:
        units = weight_units(weights)
    except DataError as e:
        assert "\n" not in str(e) and str(e)
        return
    assert len(units) == len(weights) and min(units) >= 1
    assert all(w > 0 for w in weights)


def test_a_blend_weight_too_long_to_write_is_said_by_its_digit_count():
    """An int past Python's int-to-str limit (4300 digits by default) among the weights: the DataError says how many
    digits it has (before: a ValueError from writing the message, which str() refuses for such an int)."""
    limit = sys.get_int_max_str_digits()
    for huge in (10**4400 - 1, 10**4400, 7 * 10**5000):
        sys.set_int_max_str_digits(0)  # no limit: Python's own count of its digits, the reference
        try:
            digits = len(str(huge))
        finally:
            sys.set_int_max_str_digits(limit)
        for weights in ([huge, 1.0], [huge, -1]):
            with pytest.raises(DataError, match=rf"^blend weights .*\[<an integer of {digits} digits>, "):
                weight_units(weights)


def test_blend_sample_numbers_outside_its_range_are_refused():
    tree = BlendTree([1.0, 2.0, 3.0])
    for bad in (-1, MAX_SAMPLES):
        with pytest.raises(DataError):
            tree.assign(np.array([bad]))
    for bad in (-1, MAX_SAMPLES + 1):
        with pytest.raises(DataError):
            tree.counts(bad)


# --- schedule.py ----------------------------------------------------------------------------------------------

@st.composite
def packed_streams(draw, name="d"):
    seq_len = draw(st.integers(1, 12))
    windows = draw(st.integers(1, 60))
    slack = draw(st.integers(0, seq_len - 1))
    return PackedStream(name, windows * seq_len + 1 + slack, seq_len, draw(st.integers(0, 2**31)))


@settings(PROPERTY, max_examples=160)
@given(packed_streams(), st.integers(0, 10**9))
def test_window_starts_cover_each_epoch_once_inside_the_store(stream, first_epoch):
    w, seq_len = stream.windows_per_epoch, stream.seq_len
    num_tokens = w * seq_len + 1 + stream.slack
    for epoch in (first_epoch, first_epoch + 1):
        starts = stream.window_starts(np.arange(epoch * w, (epoch + 1) * w)).tolist()
        shift = min(starts)
        assert 0 <= shift <= stream.slack  # the epoch's offset
        assert sorted(starts) == [shift + k * seq_len for k in range(w)]  # every window once, cut at one offset
        assert max(starts) + seq_len + 1 <= num_tokens  # a window is seq_len+1 tokens inside the store
        assert [int(stream.window_starts(c)) for c in range(epoch * w, epoch * w + min(w, 3))] == starts[:3]


@settings(PROPERTY, max_examples=60)
@given(st.lists(packed_streams(), min_size=1, max_size=5),
       st.lists(st.tuples(st.integers(0, 4), st.integers(0, 10**12)), min_size=1, max_size=40))
def test_window_starts_with_facts_per_sample_equal_one_call_per_dataset(streams, samples):
    """The schedule places the samples of every dataset of a batch in one call (a dataset's facts per sample)."""
    owner = np.array([k % len(streams) for k, _ in samples])
    c = np.array([c for _, c in samples], dtype=np.int64)
    facts = [np.array([getattr(s, fact) for s in streams], dtype=dtype)[owner] for fact, dtype in (
        ("windows_per_epoch", np.int64), ("key", np.uint64), ("slack", np.int64), ("seq_len", np.int64))]
    assert window_starts(c, *facts).tolist() == [int(streams[k].window_starts(x)) for k, x in zip(owner, c)]


@st.composite
def blend_schedules(draw, max_gap=6):
    streams = {f"d{k}": draw(packed_streams(f"d{k}")) for k in range(draw(st.integers(1, 5)))}
    names = list(streams)
    stages, step = [], 1
    for k in range(draw(st.integers(1, 4))):
        step = 1 if k == 0 else step + draw(st.integers(1, max_gap))
        chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True))
        stages.append((f"stage{k}", step, [(d, draw(st.floats(0.05, 20.0))) for d in chosen]))
    return BlendSchedule(stages, draw(st.integers(1, 8)), streams), stages


@settings(PROPERTY, max_examples=120)
@given(blend_schedules(), st.integers(1, 6), st.randoms(use_true_random=False))
def test_schedule_stages_switch_at_their_step_and_datasets_continue_without_gaps(schedule_and_stages, extra, rnd):
    schedule, stages = schedule_and_stages
    gbs = schedule.global_batch_size
    last_step = stages[-1][1] + extra
    n = last_step * gbs
    names, which, starts = schedule.locate(np.arange(n))
    for step in range(1, last_step + 1):  # the stage of a step: the last one started at or before it
        expected = [s for s in stages if s[1] <= step][-1]
        assert schedule.stage_at_step(step).name == expected[0]
        used = {names[i] for i in which[(step - 1) * gbs:step * gbs].tolist()}
        assert used <= {d for d, _ in expected[2]}
    # each dataset reads its samples 0, 1, 2, ... across all stages, and consumed() is the direct count
    for d, stream in schedule.streams.items():
        mine = starts[which == names.index(d)]
        assert mine.tolist() == stream.window_starts(np.arange(len(mine))).tolist()
    direct = np.zeros(len(names), dtype=np.int64)
    for m in range(n + 1):
        assert schedule.consumed(m) == dict(zip(names, direct.tolist()))
        if m < n:
            direct[which[m]] += 1
    # a pure function of the sample number: any subset, in any order, gives the same values
    subset = rnd.sample(range(n), min(n, 25))
    _, which_sub, starts_sub = schedule.locate(np.array(subset))
    assert which_sub.tolist() == which[subset].tolist() and starts_sub.tolist() == starts[subset].tolist()


@settings(PROPERTY, max_examples=80)
@given(blend_schedules(max_gap=5_000_000), st.integers(1, 2048), st.integers(0, 300), st.integers(1, 300))
def test_schedule_far_into_a_run_continues_each_dataset_from_its_consumed_count(schedule_and_stages, gbs, before,
                                                                                length):
    """Windows of sample numbers around each stage switch of a SmolLM2-length run (millions of steps of up to 2048
    samples): dataset d's samples there are its samples consumed(a)[d] .. consumed(b)[d]-1, in order."""
    schedule, stages = schedule_and_stages
    schedule = BlendSchedule(stages, gbs, schedule.streams)
    for plan in schedule.stages:
        a = max(0, plan.first_sample - before)
        b = a + length
        names, which, starts = schedule.locate(np.arange(a, b))
        first, last = schedule.consumed(a), schedule.consumed(b)
        for d, stream in schedule.streams.items():
            mine = starts[which == names.index(d)].tolist()
            assert mine == stream.window_starts(np.arange(first[d], last[d])).tolist()
        assert list(plan.carried) == [schedule.consumed(plan.first_sample)[d] for d in plan.datasets]


@settings(PROPERTY, max_examples=80)
@given(blend_schedules(), st.integers(1, 4), st.sampled_from([1, 2, 3, 4, 6, 8]), st.integers(0, 20))
def test_dp_ranks_read_the_global_batch_in_order_for_any_dp_size(schedule_and_stages, micro, dp, resumed_step):
    """A global step is the same samples for every DP size, split into contiguous rank slices, and a loader
    resumed after any step goes on from the next."""
    schedule, stages = schedule_and_stages
    gbs = micro * dp * schedule.global_batch_size
    schedule = BlendSchedule(stages, gbs, schedule.streams)
    loaders = [TrainLoader(schedule, {}, 8, micro, r, dp, consumed_samples=resumed_step * gbs) for r in range(dp)]
    assert all(ld.next_step == resumed_step + 1 for ld in loaders)
    for step in (1, resumed_step + 1):
        ids = np.concatenate([ld.global_sample_ids(step) for ld in loaders]).tolist()
        assert ids == list(range((step - 1) * gbs, step * gbs))
