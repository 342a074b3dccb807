"""Bad token data met by some ranks of a distributed run: one error line from a rank that met it, the others stop
with at most a line saying why, and torchrun's root cause is the rank that said it."""
import numpy as np
import pytest

from helpers import tiny_config, torchrun, write_learnable_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_learnable_store(tmp_path_factory.mktemp("store") / "arith")


def test_bad_data_met_by_one_rank_stops_the_others_at_start_up(tmp_path, store):
    """The held-out store's token 300 (its sidecar says 256 tokens) lies in rank 1's validation windows only (windows
    2-3 of 4: tokens 64-128): rank 1 says its error, rank 0 stops at start-up with one line saying so (not in step
    1's collective, from the lost connection), and exits after rank 1, torchrun's root cause."""
    from nanotronix.data.megatron_store import MegatronWriter

    tokens = np.arange(1, 201, dtype=np.uint16)
    tokens[120] = 300
    writer = MegatronWriter(tmp_path / "held", np.uint16)
    writer.add_document(tokens)
    writer.finalize({"tokenizer": {"name": "synthetic", "vocab_size": 256, "eos_id": 0}})
    cfg = tiny_config(tmp_path, store)
    proc = torchrun(2, ["-m", "nanotronix.train", "--config", str(cfg), "validation.interval=5",
                        "validation.num_samples=4", f"validation.data=[{tmp_path / 'held'}]"])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and sorted(errors) == [  # said at the same moment: in either order, each whole
        "error: rank 0: at start-up (data): bad input stopped rank 1 (its error says why), so this one stops too",
        f"error: rank 1: validation.data: token id 300 in {tmp_path / 'held'} is outside the model's vocabulary (256)",
    ], proc.stderr[-3000:]
    root_cause = proc.stderr.split("Root Cause (first observed failure):")[1]
    assert "rank      : 1 (local_rank: 1)" in root_cause and "exitcode  : 2" in root_cause, root_cause


@pytest.mark.parametrize("nproc, layout, says", [(2, "parallel.tp=2", 0), (2, "parallel.pp=2", 0),
                                                  (2, "parallel.dp=2", 1), (4, "parallel.tp=2", 2)],
                         ids=["tp2", "pp2", "dp2", "tp2-dp2"])
def test_a_bad_batch_mid_training_is_said_once(tmp_path, nproc, layout, says):
    """A token outside the vocabulary in a window that step 18 reads, in data-parallel rank 1's half of its batch
    (at DP 1: the one replica's). The ranks of that replica (tensor- or pipeline-parallel) read that batch and meet
    it: its first rank (`says`) says it, the others exit later without a line (before: the same line from each, 32
    of them at TP 8 x PP 4). The other replica's ranks (DP 2) stop when their gradient reduction loses it, without
    a line either: that error said why (before: one "another rank stopped" line each, 7 at DP 8; at TP 2 x DP 2,
    rank 1's collective fails only when rank 3, quiet, is gone). One error line in all, and torchrun's root cause
    is the rank that said it."""
    from nanotronix.data.megatron_store import MegatronWriter

    rng = np.random.default_rng(0)
    writer = MegatronWriter(tmp_path / "arith", np.uint16)
    for doc in range(200):
        tokens = rng.integers(1, 255, size=60)
        if doc == 150:
            tokens[10] = 300
        writer.add_document(np.append(tokens, 0))
    writer.finalize({"tokenizer": {"name": "synthetic", "vocab_size": 256, "eos_id": 0}})
    cfg = tiny_config(tmp_path, tmp_path / "arith")
    proc = torchrun(nproc, ["-m", "nanotronix.train", "--config", str(cfg), "train.train_steps=60", layout])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    said = f"error: {f'rank {says}: ' if says else ''}token store {tmp_path / 'arith'}: token id 300 (in the window "
    assert errors[0].startswith(said) and "is outside the model's vocabulary (256)" in errors[0], errors
    root_cause = proc.stderr.split("Root Cause (first observed failure):")[1]
    assert f"rank      : {says} (local_rank: {says})" in root_cause and "exitcode  : 2" in root_cause, root_cause


def test_a_said_cause_is_found_in_the_job_store_and_a_lost_one_reads_as_unsaid(monkeypatch):
    """The rank that said the error notes it in the job's store (torch's TCPStore, as torchrun's agent hosts it), where
    a stopped rank finds it; with nothing noted (the rank that said it died first), or the store's host gone, a stopped
    rank finds nothing, at once (it then says its own line)."""
    import gc
    import time
    from datetime import timedelta

    from torch.distributed import TCPStore

    from nanotronix.distributed import CAUSE_SAID_KEY, cause_said_by, note_cause_said

    host = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    stopped = TCPStore("127.0.0.1", host.port, is_master=False, timeout=timedelta(seconds=60))
    assert cause_said_by(stopped) is None
    monkeypatch.setenv("RANK", "3")  # the rank that says it (no process group here: torchrun's RANK)
    note_cause_said(host)
    assert cause_said_by(stopped) == 3
    # The note is in the store when note_cause_said returns, not merely sent: TCPStore does not answer a set, so a
    # check on another connection, right after, was sometimes served first (this test failed under load; in a tight
    # loop, up to 4 notes in 10 were missed)
    for said_by in range(1000):
        stopped.delete_key(CAUSE_SAID_KEY)
        monkeypatch.setenv("RANK", str(said_by))
        note_cause_said(host)
        assert cause_said_by(stopped) == said_by
    del host
    gc.collect()
    asked = time.monotonic()
    assert cause_said_by(stopped) is None and time.monotonic() - asked < 5


def test_a_cause_noted_before_a_restart_does_not_quiet_the_next_attempt(tmp_path):
    """torchrun --max-restarts keeps its agent's store (the workers' c10d store) across the restarts it makes, under
    one name for every attempt: a note from attempt 0 (its rank said its error) must not quiet attempt 1's stopped
    ranks, whose cause nobody may have said (here: nothing noted). One rank: gloo's own keys, left in the store by
    attempt 0, would race attempt 1's connections between ranks (a torch matter, not this test's)."""
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import os, torch\n"
        "from nanotronix.distributed import cause_said_by, init_distributed, note_cause_said\n"
        "init_distributed(torch.device('cpu'), 1.0)\n"
        "attempt = os.environ['TORCHELASTIC_RESTART_COUNT']\n"
        "if attempt == '0':\n"
        "    note_cause_said()\n"
        "print(f'attempt {attempt}: noted by rank {cause_said_by()}', flush=True)\n"
        "os._exit(1 if attempt == '0' else 0)\n")
    proc = torchrun(1, ["--max-restarts=1", "--monitor-interval=0.1", str(worker)], timeout=120)
    seen = [line for line in proc.stdout.splitlines() if line.startswith("attempt ")]
    assert proc.returncode == 0 and seen == ["attempt 0: noted by rank 0", "attempt 1: noted by rank None"], \
        proc.stdout + proc.stderr[-3000:]
