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


@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.pp=2"])
def test_a_bad_batch_mid_training_is_said_once_per_model_replica(tmp_path, layout):
    """A token outside the vocabulary in a window that step ~18 reads: both ranks of the one replica (tensor- or
    pipeline-parallel) read that batch and meet it; rank 0 says it, rank 1 exits later without a line (before: the
    same line from each, 32 of them at TP 8 x PP 4)."""
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
    proc = torchrun(2, ["-m", "nanotronix.train", "--config", str(cfg), "train.train_steps=60", layout])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"error: token store {tmp_path / 'arith'}: token id 300 (in the window at token ") \
        and "is outside the model's vocabulary (256)" in errors[0], errors
    root_cause = proc.stderr.split("Root Cause (first observed failure):")[1]
    assert "rank      : 0 (local_rank: 0)" in root_cause and "exitcode  : 2" in root_cause, root_cause
