"""The hang report (nanotronix/train/hang_report.py): which rank a stuck run waits for, and where it is.

In-process cases run several watches over one real c10d TCPStore, as the ranks of a job would; the last case is
the real trainer under torchrun (2 ranks, gloo) with rank 1 stalled in its data read, then stopped (SIGSTOP).
Costs ~30 s (most of it the torchrun case's two deliberate stalls).
"""
from __future__ import annotations

import re
import time

import pytest
import torch.distributed as dist

from checkpoint_helpers import read_metrics
from helpers import tiny_config, torchrun, write_learnable_store

from nanotronix.config import ConfigError, load_config
from nanotronix.train.hang_report import HangWatch


@pytest.fixture
def store():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def _watches(store, world: int, after: float = 0.5) -> list[HangWatch]:
    # One client connection per "rank", as each process of a job has its own.
    return [HangWatch(after, dist.TCPStore("127.0.0.1", store.port, is_master=False), r, world) for r in range(world)]


def a_stalled_read() -> None:
    time.sleep(1.5)


def test_names_the_rank_behind_which_prints_its_stack_then_says_when_the_run_moves(store, capsys):
    watches = _watches(store, 3)
    for w in watches:
        w.at(5, "train step")
    watches[1].at(5, "data")  # the others finished their batch and wait for rank 1 in the step's collectives
    a_stalled_read()
    for w in watches:
        w.at(6, "data")
    time.sleep(0.4)
    for w in watches:
        w.close()
    err = capsys.readouterr().err
    assert re.search(r"hang report: rank 0 has waited \d+ s in step 5 \(train step\); of 3 ranks:", err), err
    assert re.search(r"behind: rank 1 \(.*, pid \d+\) in step 5 \(data\)", err), err
    assert "behind: rank 2" not in err and "behind: rank 0" not in err and "not responding" not in err, err
    assert "2 rank(s) in step 5 (train step)" in err, err
    # Rank 1 (and only it) printed where it is: this test's stalled read, on its main thread.
    dump = err.split("hang report: rank 1 ")[1]
    assert "is behind the others, in step 5 (data)" in dump
    assert 'thread "MainThread"' in dump and "in a_stalled_read" in dump
    assert err.count("is behind the others") == 1, err
    assert re.search(r"hang report: rank 0 moving again, now at step 6 \(data\), after \d+ s", err), err


def test_names_a_rank_that_stopped_responding(store, capsys):
    watches = _watches(store, 3)
    for w in watches:
        w.at(7, "train step")
    time.sleep(0.3)  # every rank has published at least once
    watches[2].close()  # its heartbeats stop, as when the process dies or is stopped
    # silent for more than 3 polls (0.6 s) before the others can report at all (the report comes 0.5 s after they
    # move on: without this wait, a loaded machine reported rank 2 as merely behind)
    time.sleep(0.8)
    for w in watches[:2]:
        w.at(8, "train step")
    time.sleep(1.5)
    for w in watches[:2]:
        w.close()
    err = capsys.readouterr().err
    assert re.search(r"not responding for \d+ s: rank 2 \(.*\), last heartbeat from step 7 \(train step\)", err), err
    assert "2 rank(s) in step 8 (train step)" in err, err  # ranks 0 and 1
    assert "behind:" not in err and "is behind the others" not in err, err


def test_all_ranks_at_the_same_point_is_one_line_and_no_stacks(store, capsys):
    watches = _watches(store, 2)
    for w in watches:
        w.at(1, "train step")  # e.g. the first compiled step, long on every rank
    time.sleep(1.2)
    for w in watches:
        w.close()
    err = capsys.readouterr().err
    assert "all 2 ranks are in step 1 (train step) and responding" in err, err
    assert "thread " not in err, err


def test_a_single_process_prints_its_own_stacks():
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stderr(out):
        watch = HangWatch(0.5)
        watch.at(3, "validation")
        a_stalled_read()
        watch.close()
    text = out.getvalue()
    assert re.search(r"hang report: no progress for \d+ s in step 3 \(validation\)", text), text
    assert "in a_stalled_read" in text
    assert "moving again" not in text  # it never moved again


def test_off_means_no_thread(tmp_path):
    before = {t.name for t in __import__("threading").enumerate()}
    HangWatch(0).close()
    assert "hang-watch" not in before
    cfg = tiny_config(tmp_path, write_learnable_store(tmp_path / "d"))
    with pytest.raises(ConfigError, match="logging.hang_report_seconds: must be >= 0"):
        load_config(cfg, ["logging.hang_report_seconds=-1"])


def test_trainer_under_torchrun_reports_a_stalled_then_a_stopped_rank(tmp_path):
    cfg = tiny_config(tmp_path, write_learnable_store(tmp_path / "d"), train={"train_steps": 8})
    proc = torchrun(2, ["tests/hang_worker.py", "--config", str(cfg), "logging.hang_report_seconds=2"], timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "done: 8 steps" in out, out[-4000:]
    # Step 3: rank 1 reads its batch for 6 s; rank 0 waits for it in the step.
    assert re.search(r"hang report: rank 0 has waited \d+ s in step 3 \(train step\); of 2 ranks:\n"
                     r"  behind: rank 1 \(.*, pid \d+\) in step 3 \(data\)", out), out[-4000:]
    dump = out.split("hang report: rank 1 ")[1]
    assert "is behind the others, in step 3 (data)" in dump and "in stalled_filesystem_read" in dump, dump[:3000]
    # The metrics name the slow rank too: step 3's data wait is rank 1's 6 s, and the console line says so.
    step3 = read_metrics(tmp_path / "logs")[3]
    assert step3["data_wait_rank"] == 1 and 6000 <= step3["data_wait_ms"] < 9000, step3
    assert re.search(r"step +3/8 \| .* \| data wait 6\d\d\d ms/step \(rank 1\)", out), out[-4000:]
    # Step 6: rank 1's process is stopped: no heartbeat, so it is named as not responding, with the last position it
    # published (a poll, 0.4 s here, can span several of these tiny steps, so which one is not asserted).
    assert re.search(r"hang report: rank 0 has waited \d+ s in step 6 \(train step\); of 2 ranks:\n"
                     r"  not responding for \d+ s: rank 1 \(.*\), last heartbeat from step \d+ ", out), out[-4000:]
    assert len(re.findall(r"hang report: rank 0 moving again", out)) >= 2, out[-4000:]


def test_the_collective_timeout_applies_to_every_group_and_follows_the_report(tmp_path):
    """parallel.collective_timeout_minutes reaches the training groups (torch's new_group does not inherit it from
    init_process_group): with 3 s, rank 0 reports rank 1 behind, then its step's collective times out."""
    cfg = tiny_config(tmp_path, write_learnable_store(tmp_path / "d"), train={"train_steps": 8})
    proc = torchrun(2, ["tests/hang_worker.py", "--config", str(cfg), "logging.hang_report_seconds=1",
                        "parallel.collective_timeout_minutes=0.05"], timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    report = re.search(r"hang report: rank 0 has waited \d+ s in step 3 \(train step\)", out)
    assert report and out.index("Timed out waiting 3000ms") > report.start(), out[-4000:]
    assert "done:" not in out


def test_a_report_after_the_collective_timeout_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, write_learnable_store(tmp_path / "d"))
    with pytest.raises(ConfigError, match=r"logging.hang_report_seconds: 600 s is not below the collective timeout "
                                          r"\(parallel.collective_timeout_minutes=10\)"):
        load_config(cfg, ["logging.hang_report_seconds=600"])
    assert load_config(cfg, ["logging.hang_report_seconds=900", "parallel.collective_timeout_minutes=20"])
