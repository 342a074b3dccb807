"""Property-based tests of the data path end to end: generated Megatron token stores (empty documents, stores of
exactly one window or too few tokens for one, a small vocabulary) read through the trainer's loader, its
validation and `nanotronix.evaluate`, against plain references written here. A store's token stream is the numpy
concatenation of its documents as the spec's reader reads them (`helpers.read_megatron_plainly`); a dataset's
windows are cut where `PackedStream.window_starts` says (that index math has its own properties in
test_data_properties.py: here it only says where the reference cuts)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from checkpoint_helpers import TINY, adamw, plain_model, save_single, train_steps
from helpers import read_megatron_plainly, write_megatron

from nanotronix.config import config_from_dict
from nanotronix.data import DataError, build_train_loader
from nanotronix.data.schedule import PackedStream
from nanotronix.errors import UserError
from nanotronix.evaluate import evaluate
from nanotronix.parallel import ParallelContext
from nanotronix.parallel.pipeline import PAD_LABEL
from nanotronix.train.validation import Validator
from properties import PROPERTY

# Store k holds the ids [k*IDS_PER_STORE, (k+1)*IDS_PER_STORE): any id of a served window says which store it came
# from. Four stores fill TINY's vocabulary (96), which the evaluated checkpoint has.
IDS_PER_STORE = 24
MAX_STORES = 4

lengths = st.one_of(st.just(0), st.integers(0, 4), st.integers(0, 100))  # empty and short documents drawn often


@st.composite
def document_lengths(draw, seq_len: int) -> list[int]:
    """One store's 1-40 document lengths; now and then a store of seq_len + 1 tokens in all (one window) or fewer
    (none), cut into documents anywhere, empty ones included."""
    count = draw(st.integers(1, 40))
    if draw(st.integers(0, 3)):
        return draw(st.lists(lengths, min_size=count, max_size=count))
    total = draw(st.one_of(st.just(seq_len + 1), st.just(seq_len), st.integers(0, seq_len + 1)))
    cuts = sorted(draw(st.lists(st.integers(0, total), min_size=count - 1, max_size=count - 1)))
    return np.diff([0, *cuts, total]).tolist()


@st.composite
def held_out_stores(draw) -> tuple[int, list[int]]:
    seq_len = draw(st.integers(1, 16))
    return seq_len, draw(document_lengths(seq_len))


@st.composite
def training_runs(draw) -> dict:
    """Stores, 1-3 stages (each a weighted subset of the stores), seq_len and the batch layout of a run."""
    seq_len = draw(st.integers(1, 16))
    stores = draw(st.lists(document_lengths(seq_len), min_size=1, max_size=MAX_STORES))
    stages, step = [], 1
    for k in range(draw(st.integers(1, 3))):
        step = 1 if k == 0 else step + draw(st.integers(1, 3))
        chosen = draw(st.lists(st.integers(0, len(stores) - 1), min_size=1, max_size=len(stores), unique=True))
        stages.append((step, [(d, draw(st.floats(0.1, 10.0))) for d in chosen]))
    micro, dp, accum = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    return {"seq_len": seq_len, "stores": stores, "stages": stages, "micro": micro, "dp": dp,
            "global_batch_size": micro * dp * accum}


def write_stores(root: Path, stores: list[list[int]], seed: int) -> list[np.ndarray]:
    """Store k (documents of the given lengths) at root/s{k}; each store's token stream (int64) as the spec's reader
    reads its files."""
    streams = []
    for k, doc_lengths in enumerate(stores):
        rng = np.random.default_rng([seed, k])
        docs = [rng.integers(k * IDS_PER_STORE, (k + 1) * IDS_PER_STORE, n).astype(np.uint16) for n in doc_lengths]
        write_megatron(root / f"s{k}", docs, np.uint16, batching_seed=seed)
        _, read = read_megatron_plainly(root / f"s{k}")
        streams.append(np.concatenate([np.zeros(0, np.int64), *read]).astype(np.int64))
    return streams


def run_config(root: Path, run: dict, seed: int, **sections):
    return config_from_dict({
        "model": {"preset": "smollm2-135m", "num_hidden_layers": 1},  # only its vocabulary counts here
        "train": {"seq_len": run["seq_len"], "global_batch_size": run["global_batch_size"],
                  "micro_batch_size": run["micro"]},
        "data": {"root": str(root), "data_seed": seed, "stages": [
            {"name": f"stage{k}", "start_step": step, "datasets": [{"path": f"s{d}", "weight": w} for d, w in ds]}
            for k, (step, ds) in enumerate(run["stages"])]},
        **sections})


def global_steps(loaders, first: int, last: int) -> list[np.ndarray]:
    """Steps first..last as served by the dp ranks' loaders, their shares concatenated in rank order."""
    steps = []
    for step in range(first, last + 1):
        shares = [loader.batch(step) for loader in loaders]
        for share in shares:
            assert share.dtype == torch.int32
            assert share.shape == (loaders[0].grad_accum, loaders[0].micro_batch_size, loaders[0].seq_len + 1)
        steps.append(np.concatenate([share.reshape(-1, loaders[0].seq_len + 1).numpy() for share in shares]))
    return steps


@settings(PROPERTY, max_examples=300)
@given(training_runs(), st.integers(0, 2**31 - 1), st.integers(0, 2), st.data())
def test_the_loader_serves_each_datasets_windows_in_order_and_resumes_anywhere(run, seed, extra_steps, data):
    """Every row served is seq_len + 1 consecutive tokens of its store's stream (inputs its first seq_len, labels
    its last: train/step.py), from a dataset of the step's stage; each dataset's rows, in global sample order across
    stages, are its windows 0, 1, 2, ...; the dp ranks' shares in rank order are the global step, for any dp; a
    loader built at consumed_samples = k steps serves the same steps from k + 1 on; a store too small for one
    window is one DataError line naming it, before anything is read."""
    seq_len, gbs = run["seq_len"], run["global_batch_size"]
    with tempfile.TemporaryDirectory() as tmp:
        streams = write_stores(Path(tmp), run["stores"], seed)
        cfg = run_config(Path(tmp), run, seed)
        in_config_order = list(dict.fromkeys(d for _, ds in run["stages"] for d, _ in ds))
        too_small = [d for d in in_config_order if len(streams[d]) < seq_len + 1]
        event("refused: a store too small for one window" if too_small else "served")
        if too_small:
            with pytest.raises(DataError) as refused:
                build_train_loader(cfg, 0, run["dp"])
            message = str(refused.value)
            path = next(ds.path for stage in cfg.data.stages for ds in stage.datasets
                        if ds.path.endswith(f"/s{too_small[0]}"))
            assert "\n" not in message and message.startswith(f"dataset {path}: {len(streams[too_small[0]])} tokens")
            return

        last_step = run["stages"][-1][0] + extra_steps
        loaders = [build_train_loader(cfg, r, run["dp"]) for r in range(run["dp"])]
        served = global_steps(loaders, 1, last_step)
        assert all(loader.state_dict() == {"consumed_samples": last_step * gbs} for loader in loaders)

        windows = {d: PackedStream(f"s{d}", len(streams[d]), seq_len, seed, order_key=f"s{d}")
                   for d in in_config_order}
        taken = dict.fromkeys(in_config_order, 0)
        for step, rows in enumerate(served, 1):
            assert rows.shape == (gbs, seq_len + 1)
            stage_datasets = {d for d, _ in [s for s in run["stages"] if s[0] <= step][-1][1]}
            for row in rows:
                d = int(row[0]) // IDS_PER_STORE
                assert d in stage_datasets and (row // IDS_PER_STORE == d).all()
                start = int(windows[d].window_starts(taken[d]))
                assert row.tolist() == streams[d][start:start + seq_len + 1].tolist()
                taken[d] += 1
        datasets = loaders[0].stats(last_step)["datasets"]
        assert {key: v["consumed_tokens"] for key, v in datasets.items()} == \
            {f"s{d}": n * seq_len for d, n in taken.items()}

        resumed_at = data.draw(st.integers(0, last_step - 1), label="resumed after step")
        dp = data.draw(st.sampled_from([n for n in (1, 2, 3, 4) if gbs % (run["micro"] * n) == 0]), label="dp")
        resumed = [build_train_loader(cfg, r, dp, consumed_samples=resumed_at * gbs) for r in range(dp)]
        assert all(loader.next_step == resumed_at + 1 for loader in resumed)
        again = global_steps(resumed, resumed_at + 1, last_step)
        assert all(np.array_equal(a, b) for a, b in zip(again, served[resumed_at:], strict=True))


def leading_windows(stream: np.ndarray, seq_len: int, count: int) -> np.ndarray:
    """The documented held-out windows: window i is stream tokens [i*L, i*L + L + 1)."""
    return np.stack([stream[i * seq_len:i * seq_len + seq_len + 1] for i in range(count)])


def num_samples_around(data, stream: np.ndarray, seq_len: int) -> int:
    """1-30 windows, or exactly what the store holds, or one more."""
    capacity = max(0, len(stream) - 1) // seq_len
    return data.draw(st.one_of(st.integers(1, 30), st.just(max(1, capacity)), st.just(capacity + 1)),
                     label="num_samples")


@settings(PROPERTY, max_examples=300)
@given(held_out_stores(), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**31 - 1),
       st.data())
def test_validation_scores_the_first_windows_split_over_the_ranks(held_out, dp, micro_batches, micro, seed, data):
    """The ranks' blocks, in rank order and without their padding rows, are the store's first num_samples
    windows (inputs the first L tokens, labels the last L); padding rows have only PAD_LABEL labels; every rank runs
    as many rounds of [micro_batches, micro] rows; num_samples beyond what the store holds is one DataError line
    naming it (not capped)."""
    seq_len, doc_lengths = held_out
    with tempfile.TemporaryDirectory() as tmp:
        (stream,) = write_stores(Path(tmp), [doc_lengths], seed)
        num_samples = num_samples_around(data, stream, seq_len)
        run = {"seq_len": seq_len, "micro": micro, "global_batch_size": micro * dp * micro_batches,
               "stages": [(1, [(0, 1.0)])]}
        cfg = run_config(Path(tmp), run, seed, validation={"interval": 1, "num_samples": num_samples, "data": ["s0"]})
        contexts = [ParallelContext(tp=1, pp=1, dp=dp, rank=r, world_size=dp) for r in range(dp)]
        event("refused: num_samples beyond the store" if num_samples * seq_len + 1 > len(stream) else "read")
        if num_samples * seq_len + 1 > len(stream):
            with pytest.raises(DataError) as refused:
                Validator.from_config(cfg, contexts[0], model=None)
            message = str(refused.value)
            assert "\n" not in message and message.startswith("validation.num_samples: ")
            assert message.endswith(f"{cfg.validation.data[0]} has {len(stream)}")
            return

        inputs, labels, rounds = [], [], set()
        for ctx in contexts:
            (block_inputs, block_labels), = Validator.from_config(cfg, ctx, model=None).blocks
            assert block_inputs.shape == block_labels.shape
            assert block_inputs.shape[1:] == (micro_batches, micro, seq_len)
            rounds.add(block_inputs.shape[0])
            rows_in, rows_out = block_inputs.reshape(-1, seq_len), block_labels.reshape(-1, seq_len)
            real = int((rows_out != PAD_LABEL).all(dim=1).sum())
            assert (rows_out[real:] == PAD_LABEL).all()  # padding after the rank's windows, and only there
            inputs.append(rows_in[:real])
            labels.append(rows_out[:real])
        assert len(rounds) == 1
        expected = torch.from_numpy(leading_windows(stream, seq_len, num_samples))
        assert torch.equal(torch.cat(inputs), expected[:, :-1]) and torch.equal(torch.cat(labels), expected[:, 1:])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny trained checkpoint and its model, for evaluate's windows."""
    model = plain_model()
    optimizer = adamw(model)
    train_steps(model, optimizer, range(1, 2))
    folder = tmp_path_factory.mktemp("evaluate") / "run"
    save_single(folder, 1, model, optimizer)
    return folder, model.eval()


@settings(PROPERTY, max_examples=100)
@given(held_out_stores(), st.integers(1, 8), st.integers(0, 2**31 - 1), st.data())
def test_evaluate_scores_the_first_windows_at_any_batch_size(checkpoint, held_out, batch_size, seed, data):
    """evaluate's loss is the mean cross-entropy over the store's first num_samples windows (the model's own
    forward on the reference windows), whatever the batch size; num_samples beyond what the store holds is one
    UserError line naming the store (not capped)."""
    folder, model = checkpoint
    seq_len, doc_lengths = held_out
    with tempfile.TemporaryDirectory() as tmp:
        (stream,) = write_stores(Path(tmp), [doc_lengths], seed)
        num_samples = num_samples_around(data, stream, seq_len)
        prefix = f"{tmp}/s0"
        event("refused: num_samples beyond the store" if num_samples * seq_len + 1 > len(stream) else "scored")
        if num_samples * seq_len + 1 > len(stream):
            with pytest.raises(UserError) as refused:
                evaluate(str(folder), prefix, seq_len, num_samples, batch_size, device="cpu")
            message = str(refused.value)
            assert "\n" not in message and message.startswith("--num-samples: ")
            assert message.endswith(f"{prefix} has {len(stream)}")
            return
        result = evaluate(str(folder), prefix, seq_len, num_samples, batch_size, device="cpu")
    windows = torch.from_numpy(leading_windows(stream, seq_len, num_samples))
    assert windows.max() < TINY.vocab_size
    with torch.no_grad():
        logits = model(windows[:, :-1]).float()
    reference = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    assert result["tokens"] == num_samples * seq_len and result["num_samples"] == num_samples
    assert result["loss"] == pytest.approx(reference, rel=1e-5, abs=1e-6)
