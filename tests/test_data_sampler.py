"""The deterministic blended multi-stage sampler: blend proportions, stage switches at start_step, resume
with another DP size, per-epoch reshuffling, dataset continuation across stages, permutation bijectivity.
~5 s (stores of random tokens, up to 100k samples per stage located vectorised)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from nanotronix.config import config_from_dict
from nanotronix.data import DataError, build_train_loader, open_store
from nanotronix.data.blend import BlendTree
from nanotronix.data.megatron_store import MegatronWriter
from nanotronix.data.permutation import permute
from nanotronix.data.schedule import BlendSchedule, PackedStream, window_starts

SEQ = 16


def _store(path, num_tokens, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 49152, size=num_tokens)
    lengths = np.full(max(1, num_tokens // 50), min(50, num_tokens))
    lengths[-1] += num_tokens - lengths.sum()
    writer = MegatronWriter(path, np.uint16)
    writer.add_documents(tokens, lengths)
    writer.finalize({"tokenizer": {"vocab_size": 49152, "eos_id": 0}})
    return str(path)


def _cfg(stages, gbs=8, mbs=1, seed=1234):
    return config_from_dict({
        "model": {"preset": "smollm2-135m", "num_hidden_layers": 1},
        "train": {"seq_len": SEQ, "global_batch_size": gbs, "micro_batch_size": mbs},
        "data": {"data_seed": seed, "stages": [
            {"name": n, "start_step": s, "datasets": [{"path": p, "weight": w} for p, w in ds]}
            for n, s, ds in stages]},
    })


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("sampler")
    return [_store(d / f"s{i}", n, i) for i, n in enumerate((20_000, 5_000, 40_000, 801, 3_000))]


def test_permutation_is_a_bijection_and_keyed():
    for n in (1, 2, 3, 17, 1000, 4097):
        p = permute(np.arange(n), n, 7)
        assert sorted(p.tolist()) == list(range(n))
    a, b = permute(np.arange(1000), 1000, 7), permute(np.arange(1000), 1000, 8)
    assert not np.array_equal(a, b) and not np.array_equal(a, np.arange(1000))
    # one key per element (a batch spanning epochs) equals separate calls per key
    mixed = permute(np.arange(2000) % 1000, 1000, np.repeat(np.array([7, 8], dtype=np.uint64), 1000))
    assert np.array_equal(mixed, np.concatenate([a, b]))


def test_permute_of_a_scalar_or_a_matrix_maps_each_value_as_a_flat_call():
    """A 0-d `i` failed in the cycle walk (IndexError: the round keys indexed as 1-d) and a 2-d one walked rows
    instead of elements (IndexError, or wrong values); each value is now permuted as in a flat call."""
    flat = permute(np.arange(12), 10**6 + 3, 7)
    assert [int(permute(np.int64(v), 10**6 + 3, 7)) for v in range(12)] == flat.tolist()
    assert permute(np.arange(12).reshape(3, 4), 10**6 + 3, 7).tolist() == flat.reshape(3, 4).tolist()
    assert permute(np.arange(12).reshape(3, 4), np.full((3, 4), 10**6 + 3), 7).tolist() == flat.reshape(3, 4).tolist()


def test_one_call_for_several_datasets_equals_one_call_per_dataset():
    """The schedule places the samples of all datasets in one vectorised call (a size, key, slack and window
    length per sample): the same permutations and window starts as separate calls per dataset, including sizes
    of 1 and 2, powers of two and their neighbours, and sizes whose domain needs long cycle walks."""
    rng = np.random.default_rng(3)
    sizes = [1, 2, 3, 4096, 4097, 65_537, 10**9, 7 * 10**11]
    n = np.repeat(sizes, 700)
    i = rng.integers(0, n)
    keys = rng.integers(0, 2**63, size=len(n)).astype(np.uint64) * np.uint64(2)  # above 2^63 too
    order = rng.permutation(len(n))  # datasets interleaved, as in a blended batch
    together = np.empty(len(n), dtype=np.int64)
    together[order] = permute(i[order], n[order], keys[order])
    apart = np.concatenate([permute(i[n == m], m, keys[n == m]) for m in sizes])  # n is grouped by size
    assert np.array_equal(together, apart)
    streams = [PackedStream(f"d{k}", m * 16 + 1 + k, 16, 1234) for k, m in enumerate((1, 5, 300, 4097))]
    owner = rng.integers(0, len(streams), size=4000)
    c = rng.integers(0, 10**6, size=4000)
    facts = [np.array(column, dtype=dtype)[owner] for column, dtype in (
        ([s.windows_per_epoch for s in streams], np.int64), ([s.key for s in streams], np.uint64),
        ([s.slack for s in streams], np.int64), ([s.seq_len for s in streams], np.int64))]
    expected = np.empty(len(c), dtype=np.int64)
    for k, stream in enumerate(streams):
        expected[owner == k] = stream.window_starts(c[owner == k])
    assert np.array_equal(window_starts(c, *facts), expected)
    # and the schedule's one call for a blended batch (keys above 2^63 among them: no float detour)
    assert max(stream.key for stream in streams) >= 2**63
    schedule = BlendSchedule([("one", 1, [(s.name, 1 + k) for k, s in enumerate(streams)])], 64,
                             {s.name: s for s in streams})
    g = np.arange(5000, 9000)
    names, which, starts = schedule.locate(g)
    source, rank = schedule.stages[0].tree.assign(g)
    for k, stream in enumerate(streams):
        assert np.array_equal(starts[source == k], stream.window_starts(rank[source == k]))
        assert set(np.array(names)[which[source == k]]) == {stream.name}


def test_window_starts_of_one_sample_is_the_batch_value():
    # a scalar took numpy's scalar path: an IndexError in the cycle walk, an overflow warning in the key hash
    stream = PackedStream("d", 300 * 16 + 9, 16, 1234)
    c = np.arange(0, 2000, 7)
    batch = stream.window_starts(c)
    with np.errstate(all="raise"):
        assert [int(stream.window_starts(int(x))) for x in c] == batch.tolist()
        assert [int(stream.window_starts(np.int64(x))) for x in c] == batch.tolist()


SMOLLM2_STAGES = [  # SmolLM2-1.7B stage mixtures (arXiv 2502.02737, Sec. 4), buckets flattened
    [0.54, 0.36, 0.10],
    [0.45, 0.30, 0.20, 0.05],
    [0.296, 0.444, 0.16, 0.10],
    [0.232, 0.348, 0.24, 0.14, 0.04],
]


@pytest.mark.parametrize("weights", SMOLLM2_STAGES + [[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [3, 1]])
def test_blend_proportions_within_one_percent_over_100k(weights):
    tree = BlendTree(weights)
    n = 100_000
    source, rank = tree.assign(np.arange(n))
    realised = np.bincount(source, minlength=len(weights)) / n
    expected = np.array(weights) / sum(weights)
    assert np.all(np.abs(realised - expected) <= 0.01 * expected), (realised, expected)
    # ranks are 0..count-1 in order within each source, and counts() agrees with assign() on prefixes
    for s in range(len(weights)):
        assert np.array_equal(rank[source == s], np.arange(np.sum(source == s)))
    for prefix in (0, 1, 1023, 1024, 77_777, n):
        assert tree.counts(prefix) == np.bincount(source[:prefix], minlength=len(weights)).tolist()
    # every 1024-sample global batch is close to the mixture too (deterministic, low discrepancy)
    per_batch = np.stack([np.bincount(source[i:i + 1024], minlength=len(weights)) for i in range(0, n - 1024, 1024)])
    assert np.abs(per_batch - expected * 1024).max() <= np.ceil(np.log2(len(weights))) + 1


def test_every_stage_of_the_smollm2_schedule_realises_its_weights(stores):
    """Four stages with the SmolLM2-1.7B mixtures, 100k samples each, through the whole schedule path."""
    gbs, steps_per_stage = 100, 1000
    stages = [(f"stage{k + 1}", 1 + k * steps_per_stage, list(zip(stores, w))) for k, w in enumerate(SMOLLM2_STAGES)]
    loader = build_train_loader(_cfg(stages, gbs=gbs), 0, 1)
    names, which, _ = loader.schedule.locate(np.arange(4 * steps_per_stage * gbs))
    for k, weights in enumerate(SMOLLM2_STAGES):
        part = which[k * steps_per_stage * gbs:(k + 1) * steps_per_stage * gbs]
        realised = np.array([np.mean(part == names.index(p)) for p in stores[:len(weights)]])
        assert np.all(np.abs(realised - np.array(weights)) <= 0.01 * np.array(weights)), (k, realised)
        assert loader.stats((k + 1) * steps_per_stage)["stage"] == f"stage{k + 1}"


def test_stage_proportions_and_switch_at_exact_start_step(stores):
    a, b, c, d = stores[:4]
    gbs = 32
    cfg = _cfg([("one", 1, [(a, 0.7), (b, 0.3)]), ("two", 101, [(c, 0.5), (d, 0.25), (a, 0.25)])], gbs=gbs)
    loader = build_train_loader(cfg, 0, 1)
    sched = loader.schedule
    names, which, _ = sched.locate(np.arange(0, 300 * gbs))
    step_of = np.arange(300 * gbs) // gbs + 1
    used = {n: set(step_of[which == i].tolist()) for i, n in enumerate(names)}
    assert max(used[b]) == 100 and min(used[c]) == 101 and min(used[d]) == 101
    assert loader.stats(100)["stage"] == "one" and loader.stats(101)["stage"] == "two"
    stage2 = which[100 * gbs:]
    share = np.bincount(stage2, minlength=4)[[names.index(c), names.index(d), names.index(a)]] / len(stage2)
    assert np.allclose(share, [0.5, 0.25, 0.25], rtol=0.01)


def _global_batches(cfg, dp, first_step, last_step, consumed=0):
    loaders = [build_train_loader(cfg, r, dp, consumed_samples=consumed) for r in range(dp)]
    out = []
    for step in range(first_step, last_step + 1):
        parts = [ld.batch(step).reshape(-1, SEQ + 1) for ld in loaders]
        out.append(np.concatenate([p.numpy() for p in parts]))
    return np.stack(out), loaders


def test_resume_with_other_dp_size_gives_identical_global_sequence(stores):
    a, b, c = stores[:3]
    cfg = _cfg([("one", 1, [(a, 2), (b, 1)]), ("two", 4, [(c, 1), (a, 1)])], gbs=8, mbs=1)
    full, (one,) = _global_batches(cfg, 1, 1, 8)
    assert one.state_dict() == {"consumed_samples": 64}
    for dp in (2, 4, 8):
        resumed, loaders = _global_batches(cfg, dp, 4, 8, consumed=3 * 8)
        assert np.array_equal(resumed, full[3:]), f"dp={dp}"
        assert all(ld.state_dict() == {"consumed_samples": 64} for ld in loaders)
    # micro-batch layout: [grad_accum, micro_batch, seq+1] with rank slices contiguous in the global batch
    cfg2 = _cfg([("one", 1, [(a, 2), (b, 1)]), ("two", 4, [(c, 1), (a, 1)])], gbs=8, mbs=2)
    batch = build_train_loader(cfg2, 1, 2).batch(5)
    assert batch.shape == (2, 2, SEQ + 1)
    assert np.array_equal(batch.reshape(-1, SEQ + 1).numpy(), full[4][4:8])


def test_samples_are_a_pure_function_and_match_the_store(stores):
    a, b = stores[:2]
    cfg = _cfg([("one", 1, [(a, 1), (b, 1)])], gbs=8)
    loader = build_train_loader(cfg, 0, 1)
    ids = np.array([5, 123, 7, 99_999, 5])
    rows = loader.read_samples(ids)
    assert np.array_equal(rows[0], rows[4])
    assert np.array_equal(build_train_loader(cfg, 0, 1).read_samples(ids[::-1]), rows[::-1])
    names, which, starts = loader.schedule.locate(ids)
    for row, w, s in zip(rows, which, starts):
        assert np.array_equal(row, open_store(names[w]).tokens(int(s), SEQ + 1))
    other_seed = build_train_loader(_cfg([("one", 1, [(a, 1), (b, 1)])], gbs=8, seed=99), 0, 1).read_samples(ids)
    assert not np.array_equal(other_seed, rows)


def test_epochs_cover_every_window_and_reshuffle(stores):
    small = stores[3]  # 801 tokens -> 50 windows of 17 tokens at seq_len 16
    stream = PackedStream(small, open_store(small).num_tokens, SEQ, seed=3)
    w = stream.windows_per_epoch
    assert w == (801 - 1) // SEQ == 50
    epochs = [stream.window_starts(np.arange(e * w, (e + 1) * w)) for e in range(4)]
    for starts in epochs:
        shift = int(starts.min()) % SEQ
        assert sorted(starts.tolist()) == [shift + k * SEQ for k in range(w)]  # each window exactly once
        assert starts.max() + SEQ + 1 <= 801
    orders = [tuple(np.argsort(s)) for s in epochs]
    assert len(set(orders)) == 4, "every epoch must have its own order"
    assert stream.epochs(125) == 2.5


def test_a_stage_past_the_samplers_reach_is_never_reached_not_an_error(stores):
    """A stage whose start_step lies past 2^38 samples (a typo: 471600100 for 4716001) starts after any run's last
    step (train_steps x global_batch_size <= 2^38 is checked), so it is never trained, as a stage past
    train.train_steps is: the run reads what it reads without that stage."""
    a, b = stores[:2]
    far = 2 ** 38 // 1024 + 2  # its first sample, (far - 1) * 1024, is past 2^38
    for stages in ([("one", 1, [(a, 1)]), ("typo", far, [(b, 1)])],
                   [("one", 1, [(a, 1)]), ("two", 5, [(a, 1), (b, 2)]), ("typo", far, [(b, 1)]),
                    ("later", far + 10, [(a, 1)])]):
        with_typo = build_train_loader(_cfg(stages, gbs=1024, mbs=64), 0, 2)
        without = build_train_loader(_cfg([s for s in stages if s[1] < far], gbs=1024, mbs=64), 0, 2)
        for step in (1, 6, 900):
            assert np.array_equal(with_typo.read_batch(step), without.read_batch(step))
            got, expected = with_typo.stats(step), without.stats(step)
            assert got["stage"] == expected["stage"]
            assert got["datasets"] == {**{d: {"consumed_tokens": 0, "epochs": 0.0} for d in got["datasets"]},
                                       **expected["datasets"]}  # a dataset of the unreached stages only: none read


def test_dataset_continues_across_stages_without_repeating(stores):
    a, b, c = stores[:3]
    cfg = _cfg([("one", 1, [(a, 1), (b, 1)]), ("two", 11, [(a, 1), (c, 1)])], gbs=16)
    loader = build_train_loader(cfg, 0, 1)
    names, which, starts = loader.schedule.locate(np.arange(0, 200 * 16))
    a_starts = starts[which == names.index(a)]
    windows_a = loader.schedule.streams[a].windows_per_epoch
    assert len(a_starts) > windows_a
    assert len(set(a_starts[:windows_a].tolist())) == windows_a  # the first epoch spans both stages
    stats = loader.stats(200)
    assert sum(v["consumed_tokens"] for v in stats["datasets"].values()) == 200 * 16 * SEQ
    assert stats["datasets"][a]["consumed_tokens"] == len(a_starts) * SEQ
    assert stats["datasets"][b]["consumed_tokens"] == int(np.sum(which == names.index(b))) * SEQ
    assert stats["datasets"][a]["epochs"] == pytest.approx(len(a_starts) / windows_a)


def test_a_resume_without_a_dataset_keeps_its_count_in_the_stats(stores):
    """A resume whose config no longer lists a dataset it had read (dropped, or renamed: another key): its count and
    epochs stay among the stats, so the run's consumed tokens (their sum) and its later checkpoints still hold what
    it gave (they dropped by that much); the dataset that took its place counts from 0."""
    a, b, c = stores[:3]
    saved = build_train_loader(_cfg([("one", 1, [(a, 1), (b, 1)])]), 0, 1).stats(10)
    resumed = build_train_loader(_cfg([("one", 1, [(a, 1), (c, 1)])]), 0, 1, consumed_samples=80)
    resumed.count_tokens_from(saved, 10)
    stats = resumed.stats(12)
    assert stats["datasets"][b] == saved["datasets"][b]
    assert stats["datasets"][c]["consumed_tokens"] == int(sum(resumed.schedule.locate(np.arange(80, 96))[1] == 1)) * SEQ
    assert sum(v["consumed_tokens"] for v in stats["datasets"].values()) == 12 * 8 * SEQ
    for epochs in (10 ** 400, "x", None, float("nan")):  # a hand-edited checkpoint.json: its count alone carries on
        resumed.count_tokens_from({"datasets": {**saved["datasets"], b: {"consumed_tokens": 5, "epochs": epochs}}}, 10)
        assert resumed.stats(12)["datasets"][b] == {"consumed_tokens": 5}


def test_a_resume_at_another_seq_len_counts_epochs_on_from_the_checkpoints(stores):
    """A resume with train.seq_len doubled (the 8k stage): each dataset's epochs are the checkpoint's plus the windows
    read since at the new length. Before, every sample consumed, the earlier ones at the old length too, was divided
    by the new windows per epoch (epochs nearly doubled at the resume; a start note said a store was read more than
    once when it was not). A run that resumes unchanged gives what an uninterrupted run does."""
    a, b = stores[:2]
    stages = [("one", 1, [(a, 1), (b, 1)])]
    saved = build_train_loader(_cfg(stages), 0, 1).stats(10)
    longer = _cfg(stages)
    longer.train.seq_len = 2 * SEQ
    resumed = build_train_loader(longer, 0, 1, consumed_samples=80)
    resumed.count_tokens_from(saved, 10)
    counts = {name: resumed.schedule.consumed(n * 8) for name, n in (("then", 10), ("now", 14))}
    for name in (a, b):
        stream = resumed.schedule.streams[name]
        since = counts["now"][name] - counts["then"][name]
        want = saved["datasets"][name]["epochs"] + since / stream.windows_per_epoch
        assert resumed.stats(14)["datasets"][name]["epochs"] == pytest.approx(want)
        assert resumed.epochs(14)[name] == pytest.approx(want)
        assert want < stream.epochs(counts["now"][name])  # what it said before: every sample at the new length
    same = build_train_loader(_cfg(stages), 0, 1, consumed_samples=80)
    same.count_tokens_from(saved, 10)
    whole = build_train_loader(_cfg(stages), 0, 1).stats(14)["datasets"]
    for name, got in same.stats(14)["datasets"].items():
        assert got["consumed_tokens"] == whole[name]["consumed_tokens"]
        assert got["epochs"] == pytest.approx(whole[name]["epochs"], rel=1e-12)


def test_loader_errors_are_one_clear_line(stores, tmp_path):
    with pytest.raises(DataError, match=f"token store not found: {tmp_path / 'missing'}"):
        build_train_loader(_cfg([("one", 1, [(str(tmp_path / "missing"), 1)])]), 0, 1)
    cfg = _cfg([("one", 1, [(stores[0], 1)])], gbs=8)
    with pytest.raises(DataError, match="not a multiple of the global batch size"):
        build_train_loader(cfg, 0, 1, consumed_samples=5)
    with pytest.raises(DataError, match="not divisible"):
        build_train_loader(cfg, 0, 3)
    tiny = _store(tmp_path / "tiny", 10, 0)
    with pytest.raises(DataError, match="cannot fill one window"):
        build_train_loader(_cfg([("one", 1, [(tiny, 1)])]), 0, 1)
    # one store under two spellings (a link, `./`, its .bin file) would be two datasets, weighted and counted apart
    from pathlib import Path
    (tmp_path / "link").symlink_to(Path(stores[0]).parent)
    for other in (str(tmp_path / "link" / Path(stores[0]).name), f"{stores[0]}.bin",
                  f"{Path(stores[0]).parent}/./{Path(stores[0]).name}"):
        with pytest.raises(DataError, match=f"datasets {stores[0]} and {other} are the same token store") as e:
            build_train_loader(_cfg([("one", 1, [(stores[0], 1)]), ("two", 3, [(stores[1], 1), (other, 1)])]), 0, 1)
        assert str(e.value).endswith(": spell it the same way in every stage (a dataset in several stages reads on "
                                     "where it stopped)")  # the two spellings are in two stages
    with pytest.raises(DataError, match=f"datasets {stores[0]} and {other} are the same token store") as e:
        build_train_loader(_cfg([("one", 1, [(stores[0], 1), (other, 1)])]), 0, 1)
    assert str(e.value).endswith(": list it once in data.stages.0, with the weights added")


def test_two_stores_with_one_order_key_are_refused(stores, tmp_path):
    """A Megatron store `x` and a zarr store `x.zarr` or datatrove store `x.ds` beside it are two stores, but one
    dataset key (a store file's suffix does not count): they would draw their windows in the same keyed order and be
    counted as one dataset in the stats (the metrics' and checkpoints' consumed tokens of one of them lost)."""
    import shutil
    from nanotronix.data.zarr_store import ZarrWriter
    for suffix in (".bin", ".idx"):
        shutil.copy(stores[0] + suffix, tmp_path / f"x{suffix}")
    tokens = np.random.default_rng(7).integers(1, 49152, size=3000)
    writer = ZarrWriter(str(tmp_path / "x.zarr"), np.uint16)
    writer.add_documents(tokens, np.array([3000]))
    writer.finalize({})
    (tmp_path / "x.ds").write_bytes(tokens.astype("<u2").tobytes())
    (tmp_path / "x.ds.index").write_bytes(np.array([3000], dtype="<u8").tobytes())
    mega, key = str(tmp_path / "x.bin"), str(tmp_path / "x")  # (`x` itself names three stores: refused as such)
    for other in (str(tmp_path / "x.zarr"), str(tmp_path / "x.ds")):
        for stages in ([("one", 1, [(mega, 1), (other, 1)])], [("one", 1, [(mega, 1)]), ("two", 3, [(other, 1)])]):
            with pytest.raises(DataError) as e:
                build_train_loader(_cfg(stages), 0, 1)
            assert str(e.value) == (f"data.stages: datasets {mega} and {other} are two token stores with one dataset "
                                    f"key, {key} (a store file's suffix does not count): they would be read in the "
                                    "same order and counted as one dataset; rename one of them")


def test_loader_blends_all_three_store_formats(stores, tmp_path):
    """One reader interface: a datatrove .ds and a zarr store in the same blend as a Megatron store."""
    from nanotronix.data.zarr_store import ZarrWriter
    tokens = np.random.default_rng(5).integers(1, 49152, size=3000)
    ds = tmp_path / "d.ds"
    ds.write_bytes(tokens.astype("<u2").tobytes())
    (tmp_path / "d.ds.index").write_bytes(np.array([1000, 3000], dtype="<u8").tobytes())
    writer = ZarrWriter(str(tmp_path / "z.zarr"), np.uint16)
    writer.add_documents(tokens[::-1].copy(), np.array([3000]))
    writer.finalize({})
    paths = [stores[0], str(ds), str(tmp_path / "z")]
    loader = build_train_loader(_cfg([("one", 1, [(p, 1) for p in paths])], gbs=12), 0, 1)
    rows = loader.read_samples(np.arange(60))
    names, which, starts = loader.schedule.locate(np.arange(60))
    assert set(which.tolist()) == {0, 1, 2} and {loader.stores[n].format for n in names} == {"megatron",
                                                                                              "datatrove", "zarr"}
    for row, w, s in zip(rows, which, starts):
        assert np.array_equal(row, loader.stores[names[w]].tokens(int(s), SEQ + 1))


@pytest.mark.parametrize("blend", [False, True])
def test_windows_read_in_blocks_match_the_store(stores, blend):
    """Stores gather windows in blocks of WINDOW_BLOCK rows: every row of a batch many blocks long equals the
    store's own tokens at its located start, whether the rows are all of one store (one contiguous run) or
    scattered among the datasets of a blend."""
    from nanotronix.data.store import WINDOW_BLOCK
    datasets = [(stores[0], 1), (stores[2], 2), (stores[4], 1)] if blend else [(stores[2], 1)]
    loader = build_train_loader(_cfg([("one", 1, datasets)], gbs=4 * WINDOW_BLOCK + 5), 0, 1)
    ids = loader.global_sample_ids(3)
    rows = loader.read_samples(ids)
    names, which, starts = loader.schedule.locate(ids)
    if blend:
        assert min(np.bincount(which)) > WINDOW_BLOCK  # every store reads more than one block, scattered
    for row, w, s in zip(rows, which, starts):
        assert np.array_equal(row, open_store(names[w]).tokens(int(s), SEQ + 1))


def test_moved_corpus_keeps_its_order_when_data_root_follows(stores, tmp_path):
    """A run requeued where the corpus is mounted elsewhere (data.root changed, recipe paths unchanged) reads the
    same samples, as does one that spells a path otherwise (`./`, `../b/`, a Megatron store's .bin file); the same
    store in another folder (no data.root: keyed by the full path) is another order."""
    import shutil
    from pathlib import Path

    def loader_at(root, names):
        cfg = config_from_dict({
            "model": {"preset": "smollm2-135m", "num_hidden_layers": 1},
            "train": {"seq_len": SEQ, "global_batch_size": 8, "micro_batch_size": 1},
            "data": {"root": str(root), "stages": [
                {"name": "one", "start_step": 1, "datasets": [{"path": n, "weight": w} for n, w in names]}]},
        })
        return build_train_loader(cfg, 0, 1)

    for copy in ("a", "b"):
        (tmp_path / copy).mkdir()
        for f in Path(stores[0]).parent.glob("s[02].*"):
            shutil.copy(f, tmp_path / copy)
    ids = np.arange(0, 4000, 7)
    mixture = [("s0", 2), ("s2", 1)]
    here = loader_at(tmp_path / "a", mixture).read_samples(ids)
    assert np.array_equal(loader_at(tmp_path / "b", mixture).read_samples(ids), here)
    respelled = [("./s0.bin", 2), ("../b/s2.idx", 1)]
    assert np.array_equal(loader_at(tmp_path / "b", respelled).read_samples(ids), here)
    absolute = [(str(tmp_path / "b" / n), w) for n, w in mixture]  # no data.root: keyed by the full path
    moved = build_train_loader(_cfg([("one", 1, absolute)]), 0, 1).read_samples(ids)
    assert not np.array_equal(moved, here)


@pytest.mark.parametrize("blend", [False, True])
@pytest.mark.parametrize("dtype,bad_id", [(np.int32, -1), (np.int32, 49152), (np.int32, 2**31 - 1),
                                          (np.int64, 2**32 + 5), (np.int64, 7 - 2**32)])
def test_token_ids_outside_the_vocabulary_name_the_store(stores, tmp_path, dtype, bad_id, blend):
    """Ids the embedding cannot look up (a damaged int32 store can hold negative ones too) are one DataError naming
    the store and window, not an IndexError on every rank; ids within the vocabulary, up to its last, pass. Alone,
    the store's rows are one run of the batch; blended with another store, they are scattered. An int64 store's
    2^32 + 5 and 7 - 2^32 are 5 and 7 in the int32 batch: the check reads the store's own values."""
    tokens = np.random.default_rng(0).integers(0, 49152, size=4000, dtype=dtype)
    tokens[100] = 49151
    path = tmp_path / np.dtype(dtype).name
    writer = MegatronWriter(path, dtype)
    writer.add_documents(tokens, np.full(40, 100))
    writer.finalize({"tokenizer": {"vocab_size": 49152, "eos_id": 0}})
    datasets = [(str(path), 1.0)] + ([(stores[2], 1.0)] if blend else [])
    loader = build_train_loader(_cfg([("a", 1, datasets)], gbs=500 if blend else 250), 0, 1)
    assert loader.batch(1).max() == 49151  # one epoch: 249 windows of 16+1 tokens, token 100 among them
    tokens[1234] = bad_id
    path.with_suffix(".bin").write_bytes(tokens.tobytes())
    with pytest.raises(DataError, match=rf"token store .*{path.name}: token id {bad_id} \(in the window at token \d+\) "
                                        r"is outside the model's vocabulary \(49152\)"):
        loader.batch(1)


@pytest.mark.parametrize("dtype", [np.int8, np.int16])
def test_negative_ids_of_narrow_signed_stores_are_outside_the_vocabulary(tmp_path, dtype):
    """Read as unsigned, an int8 -1 is 255 and an int16 -1 is 65535, inside a larger vocabulary (int8 inside
    SmolLM2's 49152, int16 inside a 128256 one): the batch check passed them and -1 went on to the embedding. The
    format has codes for both dtypes (Megatron's IndexedDatasetBuilder writes them)."""
    tokens = np.full(4000, 5, dtype=dtype)
    tokens[1234] = -1
    writer = MegatronWriter(tmp_path / "narrow", dtype)
    writer.add_documents(tokens, np.full(40, 100))
    writer.finalize({})
    cfg = _cfg([("a", 1, [(str(tmp_path / "narrow"), 1.0)])], gbs=250)
    cfg.model.vocab_size = 128256
    loader = build_train_loader(cfg, 0, 1)
    with pytest.raises(DataError, match=r"token store .*narrow: token id -1 \(in the window at token \d+\) is outside "
                                        r"the model's vocabulary \(128256\)"):
        loader.batch(1)


def test_a_store_of_floats_is_refused(tmp_path):
    """A Megatron file may hold float32 values (the format has a code for them); they are no token ids and would be
    truncated on their way into the int32 batch, so the trainer refuses such a store before it reads anything."""
    writer = MegatronWriter(tmp_path / "floats", np.float32)
    writer.add_documents(np.arange(1000, dtype=np.float32) + 0.5, np.full(10, 100))
    writer.finalize({})
    with pytest.raises(DataError, match=r"token store .*floats: holds float32 values, not integer token ids"):
        build_train_loader(_cfg([("a", 1, [(str(tmp_path / "floats"), 1.0)])]), 0, 1)


def test_blend_weights_beyond_its_resolution_are_refused():
    """Weights are quantised to 2^24 units of their sum: a sum that overflows (each weight finite) made every
    dataset one unit, a uniform blend; a weight below one unit was served as one (2^-24 instead of 1e-9). Both are
    one line now; weights within the resolution are served as their share of every prefix."""
    with pytest.raises(DataError, match=r"their sum is not finite"):
        BlendTree([1e308, 1e308, 1e300])
    with pytest.raises(DataError, match=r"1e-09 is below 2\^-24 of their sum"):
        BlendTree([1e-9, 1.0])
    with pytest.raises(DataError, match=r"their sum is not finite"):  # was OverflowError from float(sum(...))
        BlendTree([1, 10**400])
    counts = BlendTree([1e-7, 1.0]).counts(10**8)
    assert abs(int(counts[0]) - 10) <= 2 and int(sum(counts)) == 10**8


def test_a_relative_dataset_path_without_data_root_says_where_it_was_looked_for(tmp_path, monkeypatch):
    """README's own-text run sets data.root=my with a dataset path `tokens`; forgetting data.root made the trainer say
    only `token store not found: tokens`. Its error now names data.root and the folder relative paths were read
    from, as the launch preflight's does (and an absolute path, or a set data.root, gets no such hint)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=rf"token store not found: tokens .* \(data\.root is not set: relative paths "
                                        rf"are read from {re.escape(str(tmp_path))}\)$"):
        build_train_loader(_cfg([("a", 1, [("tokens", 1.0)])]), 0, 1)
    with pytest.raises(DataError) as e:
        build_train_loader(_cfg([("a", 1, [(str(tmp_path / "tokens"), 1.0)])]), 0, 1)
    assert "data.root" not in str(e.value)
