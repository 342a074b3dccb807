"""Data edge cases, each against a reference written plainly here or the format spec
(shared/formats/megatron_indexed.md), not our own output (cases a mutation review of nanotronix/data/ found no test
for): every epoch offset of the slack, a loader's load_state_dict, verify over many chunks, --shuffle's default seed.
~2 s."""
from __future__ import annotations

import numpy as np

from nanotronix.data.schedule import PackedStream


def test_every_epoch_offset_in_the_slack_is_reached_so_the_streams_last_token_is_trained_on():
    """schedule.py: each epoch starts its windows at its own offset in [0, T-1-W*L] (the slack), so that over the epochs
    every token of the stream, its last ones included, falls inside some window. The property tests check that an
    epoch's offset lies in that range, not that the whole range is used: an offset drawn modulo the slack instead of
    slack + 1 never reaches the largest one, and the stream's last token is then never trained on. Reference: the
    set of offsets over 200 epochs (each missing one would be missed with probability < (1 - 1/4)^200) and a plain
    count of which tokens some window covers."""
    seq_len = 8
    for slack in (1, 2, 3):
        windows = 5
        num_tokens = windows * seq_len + 1 + slack
        for seed in (0, 1, 7):
            stream = PackedStream("d", num_tokens, seq_len, seed)
            assert (stream.windows_per_epoch, stream.slack) == (windows, slack)
            epochs = 200
            starts = stream.window_starts(np.arange(epochs * windows)).reshape(epochs, windows)
            offsets = {int(row.min()) for row in starts}
            assert offsets == set(range(slack + 1)), (slack, seed, sorted(offsets))
            covered = np.zeros(num_tokens, dtype=bool)
            for start in starts.ravel().tolist():
                covered[start:start + seq_len + 1] = True
            assert covered.all(), np.flatnonzero(~covered).tolist()


def test_a_loader_given_a_saved_state_goes_on_from_its_step(tmp_path):
    """loader.py: the resume state is one integer (`state_dict()`: consumed samples, the global count), and
    `load_state_dict` of a fresh loader must make it go on where the saved one stopped (next_step, state_dict and
    the batches of the following steps), exactly as a loader built with that consumed count. Nothing else tested
    `load_state_dict`: one that ignored the state left a loader at step 1. Reference: an uninterrupted loader's
    batches of the same steps."""
    from nanotronix.config import config_from_dict
    from nanotronix.data import build_train_loader
    from nanotronix.data.megatron_store import MegatronWriter

    tokens = np.random.default_rng(0).integers(1, 1000, size=3000)
    writer = MegatronWriter(tmp_path / "s", np.uint16)
    writer.add_documents(tokens, np.full(30, 100))
    writer.finalize({"tokenizer": {"vocab_size": 1000, "eos_id": 0}})
    cfg = config_from_dict({
        "model": {"preset": "smollm2-135m", "num_hidden_layers": 1},
        "train": {"seq_len": 16, "global_batch_size": 8, "micro_batch_size": 2},
        "data": {"stages": [{"name": "one", "start_step": 1, "datasets": [{"path": str(tmp_path / "s")}]}]}})
    for dp_rank, dp in ((0, 1), (1, 2)):
        first = build_train_loader(cfg, dp_rank, dp)
        uninterrupted = [first.batch(step) for step in range(1, 7)]
        saved = build_train_loader(cfg, dp_rank, dp)
        for step in range(1, 4):
            saved.batch(step)
        fresh = build_train_loader(cfg, dp_rank, dp)
        fresh.load_state_dict(saved.state_dict())
        assert fresh.state_dict() == {"consumed_samples": 3 * 8} and fresh.next_step == 4
        for step in range(fresh.next_step, 7):
            assert np.array_equal(fresh.batch(step).numpy(), uninterrupted[step - 1].numpy()), step
        assert fresh.state_dict() == first.state_dict()


def _eos_store(prefix, docs: list[list[int]], vocab: int = 100):
    from nanotronix.data import open_store
    from nanotronix.data.megatron_store import MegatronWriter

    writer = MegatronWriter(prefix, np.uint16)
    for doc in docs:
        writer.add_document(np.array(doc, dtype=np.uint16))
    writer.finalize({"tokenizer": {"vocab_size": vocab, "eos_id": 0}, "eos_appended": True})
    return open_store(prefix)


def test_verify_reads_a_store_of_many_chunks_as_one(tmp_path, monkeypatch):
    """verify.py streams the index and the documents' last tokens in chunks (_CHUNK sequences, _DOC_CHUNK documents);
    a store larger than one chunk (4M sequences, 65536 documents: every SmolLM2 source) must verify as it does in one
    chunk. Each later chunk's pointers go on from the bytes of the chunks before it (the spec: ptr[i] = sum of the
    lengths before i, times the itemsize), and each later chunk's document ends from the tokens before it: a running
    offset not carried over would call a sound store damaged, or look for EOS at the wrong tokens. The existing
    verify tests use stores of one chunk. Reference: the same store verified in one chunk, and damage written by
    hand into the last document."""
    from nanotronix.data import verify
    from nanotronix.errors import UserError

    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 100, size=int(rng.integers(1, 9))).tolist() + [0] for _ in range(11)]
    store = _eos_store(tmp_path / "s", docs)
    store.verify()  # one chunk
    monkeypatch.setattr(verify, "_CHUNK", 3)
    monkeypatch.setattr(verify, "_DOC_CHUNK", 3)
    store.verify()  # many chunks: the same verdict
    damaged = _eos_store(tmp_path / "d", docs[:-1] + [docs[-1][:-1] + [5]])
    try:
        damaged.verify()
    except UserError as e:
        assert "document 10 does not end with the EOS id 0" in str(e), e
    else:
        raise AssertionError("a last document without EOS passed --verify")


def test_shuffle_without_a_seed_uses_the_documented_seed_1234(tmp_path, tiny_tokenizer, preprocess_tool):
    """tools/preprocess.py: `--shuffle` with no SEED stores the documents in the order of seed 1234 (its --help and
    docstring, and shuffle.py: document j of the store is input document order[j], order =
    numpy.random.default_rng([seed]).permutation(n)). The existing test only checked that it differs from seed 7, so
    another default would silently give every store made without a seed (and every rerun of one) another document
    order than the one documented. Reference: numpy's permutation of the documented seed over the unshuffled store."""
    import json

    from nanotronix.data import open_store

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i} " + "word " * i}) + "\n" for i in range(12)))
    common = ["--input", str(src), "--tokenizer", tiny_tokenizer, "--no-progress", "--workers", "1"]
    assert preprocess_tool.main(common + ["--output-prefix", str(tmp_path / "plain")]) == 0
    assert preprocess_tool.main(common + ["--output-prefix", str(tmp_path / "default"), "--shuffle"]) == 0
    plain, shuffled = open_store(tmp_path / "plain"), open_store(tmp_path / "default")
    order = np.random.default_rng([1234]).permutation(plain.num_documents)
    assert [shuffled.document(j).tolist() for j in range(len(order))] == [plain.document(i).tolist() for i in order]
    assert shuffled.metadata["shuffled"] == {"seed": [1234]}
