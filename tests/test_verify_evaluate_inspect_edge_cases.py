"""Cases a mutation review found untested: verify_step's split of the hashing over ranks, evaluate's window bounds,
tools/inspect_checkpoint.py's report. Each test is in-process and takes well under 3 s."""
from __future__ import annotations

import threading
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import pytest

from nanotronix.checkpoint import manifest as mf
from nanotronix.checkpoint.errors import CheckpointError
from nanotronix.checkpoint.storage import verify_step

_Index = namedtuple("_Index", "fqn offset")


class _ThreadGroup:
    """`size` threads standing in for the ranks of a group: all_gather as torch.distributed's (every rank gets every
    rank's object, in rank order), through a barrier."""

    def __init__(self, size: int):
        self.size, self.slots, self.barrier = size, [None] * size, threading.Barrier(size, timeout=20)

    def member(self, rank: int):
        group = self

        class _Coll:
            def __init__(self):
                self.rank, self.size, self.distributed = rank, group.size, True

            def all_gather(self, obj):
                group.slots[rank] = obj
                group.barrier.wait()
                out = list(group.slots)
                group.barrier.wait()
                return out
        return _Coll()


# what each of 3 ranks loads: DCP keys (-> data files, by the metadata below) and its own extra files
_HOLDERS = {"a": "__0_0.distcp", "b": "__1_0.distcp", "c": "__2_0.distcp", "d": "__3_0.distcp",
            "e": "__4_0.distcp"}
_RANK_KEYS = [{"a"}, {"b", "c"}, {"d"}]  # nobody loads "e": its file is not read, so not hashed
_RANK_EXTRA = [[f"rng_{r}.pt", f"extra_{r}.pt"] for r in range(3)]  # 11 files read in all: more than 3 x 3


def _step(tmp_path: Path):
    folder = tmp_path / "step"
    folder.mkdir()
    names = [".metadata", *_HOLDERS.values(), *(n for extra in _RANK_EXTRA for n in extra)]
    for i, name in enumerate(names):
        (folder / name).write_bytes(bytes([i]) * (100 + i))
    manifest = {"files": mf.digest_files(folder, names)}
    metadata = SimpleNamespace(storage_data={_Index(k, 0): SimpleNamespace(relative_path=v) for k, v in
                                             _HOLDERS.items()})
    return folder, manifest, metadata


def _verify_on_every_rank(folder, manifest, metadata) -> list:
    """verify_step on 3 thread-ranks: each rank's outcome (None, or its CheckpointError's text)."""
    group, outcome = _ThreadGroup(3), [None] * 3

    def rank(r):
        try:
            verify_step(folder, manifest, metadata, _RANK_KEYS[r], _RANK_EXTRA[r], group.member(r))
        except CheckpointError as e:
            outcome[r] = str(e)
        except BaseException as e:  # noqa: BLE001 (reported by the assertion below)
            outcome[r] = f"unexpected {type(e).__name__}: {e}"
            group.barrier.abort()
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return outcome


def test_verify_step_finds_damage_in_every_file_any_rank_reads_and_every_rank_says_it(tmp_path):
    """The hashing of a load's files is split over the ranks, each rank reading different files: every file some
    rank reads (the union of what each needs: its keys' data files by DCP's metadata, its extra files, .metadata)
    must be hashed by one rank, and the damage that rank finds must stop every rank with the same line. Brute
    force: flip a byte in each such file in turn; a file nobody reads is not hashed (no error)."""
    folder, manifest, metadata = _step(tmp_path)
    read = {".metadata"} | {_HOLDERS[k] for keys in _RANK_KEYS for k in keys} | {n for e in _RANK_EXTRA for n in e}
    assert _verify_on_every_rank(folder, manifest, metadata) == [None, None, None]
    for name in sorted(read) + ["__4_0.distcp"]:
        path = folder / name
        original = path.read_bytes()
        path.write_bytes(bytes([original[0] ^ 0xFF]) + original[1:])
        try:
            outcome = _verify_on_every_rank(folder, manifest, metadata)
        finally:
            path.write_bytes(original)
        if name not in read:
            assert outcome == [None, None, None], (name, outcome)
            continue
        assert all(o is not None for o in outcome), (name, outcome)
        assert len(set(outcome)) == 1, (name, outcome)  # one line, said alike by every rank
        assert f"checkpoint file damaged: {path} does not match its SHA-256" in outcome[0], (name, outcome)
        assert outcome[0].count("rank ") == 1 and "met by rank" in outcome[0], (name, outcome)  # hashed by one rank


def test_verify_step_hashes_every_file_where_the_metadata_names_no_storage_layout(tmp_path):
    """DCP metadata of an unknown layout (no storage_data): the files a load reads cannot be told, so every file
    the manifest lists is hashed (damage in any data file stops every rank)."""
    folder, manifest, _ = _step(tmp_path)
    path = folder / "__4_0.distcp"  # read by nobody by the known layout: found here all the same
    path.write_bytes(b"\xff" + path.read_bytes()[1:])
    outcome = _verify_on_every_rank(folder, manifest, SimpleNamespace())
    assert all(o is not None and f"checkpoint file damaged: {path} does not match" in o for o in outcome), outcome


def _one_document_store(prefix: Path, tokens) -> str:
    import numpy as np

    from nanotronix.data.megatron_store import MegatronWriter
    writer = MegatronWriter(prefix, np.uint16)
    writer.add_documents(np.asarray(tokens, dtype=np.uint16), [len(tokens)])
    writer.finalize({})
    return str(prefix)


@pytest.fixture
def saved_tiny(tmp_path):
    """A saved single-process checkpoint of TINY and the model object it holds (the reference's model)."""
    from checkpoint_helpers import adamw, plain_model, save_single
    model = plain_model()
    save_single(tmp_path / "run", 1, model, adamw(model))
    return tmp_path / "run", model.eval()


def _brute_force_loss(model, stream, seq_len: int, windows: int) -> float:
    """The format's definition, written out: window i is stream tokens [i*L, i*L + L + 1), one forward each, the
    mean over all K*L targets."""
    import torch
    total = 0.0
    with torch.no_grad():
        for i in range(windows):
            w = torch.as_tensor(stream[i * seq_len:i * seq_len + seq_len + 1], dtype=torch.long)
            assert len(w) == seq_len + 1
            logits = model(w[None, :-1]).float()[0]
            total += torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum").item()
    return total / (windows * seq_len)


@pytest.mark.parametrize("windows,batch", [(5, 4), (9, 4), (3, 2), (4, 4)])
def test_evaluate_scores_every_window_whatever_the_batch_split(saved_tiny, tmp_path, windows, batch):
    """K windows in batches of B: a last batch of a single window (K = n*B + 1) is scored like any other; the loss is
    the brute-force mean over every window, one forward per window."""
    import numpy as np

    from nanotronix.evaluate import evaluate
    run, model = saved_tiny
    seq = 8
    stream = (np.arange(windows * seq + 1) * 7 + 3) % 95 + 1
    store = _one_document_store(tmp_path / "s" / "tok", stream)
    result = evaluate(str(run), store, seq, windows, batch_size=batch, device="cpu")
    assert result["tokens"] == windows * seq
    reference = _brute_force_loss(model, stream, seq, windows)
    assert abs(result["loss"] - reference) < 1e-5, (result["loss"], reference)


def test_evaluate_needs_exactly_k_times_l_plus_one_tokens(saved_tiny, tmp_path):
    """K windows of L inputs read K*L + 1 tokens (the last window's last target is one past K*L): a store of
    exactly that many is scored, one token fewer is refused naming --num-samples (not a short last window), and
    L = max_position_embeddings is allowed (only longer is refused)."""
    import numpy as np

    from nanotronix.errors import UserError
    from nanotronix.evaluate import evaluate
    run, model = saved_tiny
    seq, windows = 8, 5
    stream = (np.arange(windows * seq + 1) * 5 + 1) % 95 + 1
    exact = _one_document_store(tmp_path / "exact" / "tok", stream)
    result = evaluate(str(run), exact, seq, windows, batch_size=2, device="cpu")
    assert abs(result["loss"] - _brute_force_loss(model, stream, seq, windows)) < 1e-5
    short = _one_document_store(tmp_path / "short" / "tok", stream[:-1])
    with pytest.raises(UserError, match="^--num-samples: 5 windows of 8 tokens need 41 tokens"):
        evaluate(str(run), short, seq, windows, device="cpu")
    longest = model.config.max_position_embeddings
    full = (np.arange(longest + 1) * 3) % 95 + 1
    one = _one_document_store(tmp_path / "full" / "tok", full)
    result = evaluate(str(run), one, longest, 1, device="cpu")
    assert abs(result["loss"] - _brute_force_loss(model, full, longest, 1)) < 1e-5


def test_inspect_consumed_tokens_uses_the_saved_counts_only_when_every_dataset_has_one():
    """tools/inspect_checkpoint.py's token count: the datasets' saved counts summed when every dataset has one, else
    samples x seq_len (one dataset without a count cannot be summed), and none without a usable seq_len."""
    from helpers import load_tool
    consumed_tokens = load_tool("inspect_checkpoint").consumed_tokens
    both = {"data": {"datasets": {"a": {"consumed_tokens": 70}, "b": {"consumed_tokens": 30}}}}
    assert consumed_tokens(both, 3, 64) == 70 + 30
    partial = {"data": {"datasets": {"a": {"consumed_tokens": 70}, "b": {}}}}
    assert consumed_tokens(partial, 3, 64) == 3 * 64
    assert consumed_tokens({}, 3, 64) == 3 * 64
    for seq_len in (0, -1, None, 64.0, True):
        assert consumed_tokens({}, 3, seq_len) is None, seq_len


def test_inspect_reports_the_step_files_count_and_bytes_as_on_disk(saved_tiny, capsys):
    """--json's files and bytes: the step folder's files (checkpoint.json aside) counted and their sizes summed
    with os.stat, as they lie on disk."""
    import json

    from helpers import load_tool
    run, _ = saved_tiny
    assert load_tool("inspect_checkpoint").main([str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    step = Path(report["path"])
    on_disk = [p for p in step.rglob("*") if p.is_file() and p.name != "checkpoint.json"]
    assert report["step"] == 1 and report["files"] == len(on_disk)
    assert report["bytes"] == sum(p.stat().st_size for p in on_disk)


def test_inspect_verify_finds_a_flipped_byte_in_every_file(saved_tiny, capsys):
    """--verify hashes every file the manifest lists: a byte flipped in any one of them (size unchanged) fails it
    with one line naming that file, each file in turn."""
    from helpers import load_tool
    tool = load_tool("inspect_checkpoint")
    run, _ = saved_tiny
    step = next(run.glob("step_*"))
    files = sorted(p for p in step.rglob("*") if p.is_file() and p.name != "checkpoint.json")
    assert len(files) >= 2
    for path in files:
        original = path.read_bytes()
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
        try:
            code = tool.main([str(run), "--verify", "--no-progress"])
        finally:
            path.write_bytes(original)
        err = capsys.readouterr().err
        assert code != 0 and f"{path} does not match its SHA-256" in err, (path, code, err)
