"""Cases found by a mutation review of the hang report (nanotronix/train/hang_report.py) and the job's rendezvous store
(nanotronix/rendezvous_store.py): what tests/test_hang_report.py and tests/test_rendezvous_store.py left open.

As in test_hang_report.py, several watches share one real c10d TCPStore, as the ranks of a job would; the expected
values come from the scenario each test plays (who is where, for how long, measured here), not from a report's
output. ~20 s (the stalls are deliberate)."""
from __future__ import annotations

import datetime
import re
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

from helpers import ROOT

from nanotronix.train.hang_report import LISTED, HangWatch


@pytest.fixture
def store():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def _client(store, timeout: float = 30):
    return dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=datetime.timedelta(seconds=timeout))


def _watches(store, world: int, after: float = 0.5, ranks=None) -> list[HangWatch]:
    # One client connection per "rank", as each process of a job has its own (30 s timeout: HangWatch.start's).
    return [HangWatch(after, _client(store), r, world) for r in (range(world) if ranks is None else ranks)]


def _close(watches) -> None:
    for w in watches:
        w.close()


def _accounted(err: str) -> int:
    """Ranks a report accounts for: named behind or not responding, counted in `... and N more`, and in `N rank(s)
    in` lines. Each rank of the job is one of these, once."""
    named = len(re.findall(r"^  (behind: rank \d+|not responding)", err, re.M))
    more = sum(int(n) for n in re.findall(r"\.\.\. and (\d+) more ranks", err))
    rest = sum(int(n) for n in re.findall(r"^  (\d+) rank\(s\) in ", err, re.M))
    return named + more + rest


def test_one_report_per_stuck_episode_and_a_rank_behind_twice_prints_its_stacks_twice(store, capsys):
    """Rank 1 is behind in two episodes with the run moving in between: rank 0 reports each episode once (not at every
    poll while it stays stuck), and rank 1 prints its stacks in each (its 'printed' mark is cleared when it moves)."""
    watches = _watches(store, 2)
    for step in (5, 7):
        for w in watches:
            w.at(step, "train step")
        watches[1].at(step, "data")
        time.sleep(1.5)  # 3 times `after`: 5 polls of a rank 0 that stays stuck
        for w in watches:
            w.at(step + 1, "train step")
        time.sleep(0.4)  # the run moves: 2 polls
    _close(watches)
    err = capsys.readouterr().err
    assert err.count("hang report: rank 0 has waited") == 2, err
    assert len(re.findall(r"hang report: rank 0 moving again", err)) == 2, err
    assert len(re.findall(r"hang report: rank 1 \(.*\) is behind the others", err)) == 2, err
    assert "is behind the others, in step 5 (data)" in err and "is behind the others, in step 7 (data)" in err, err


def test_a_rank_named_behind_is_not_named_again_once_the_run_moved(store, capsys):
    """Once rank 0 moves again the list of ranks behind is emptied: in the next long phase, rank 1 (there first, and
    not behind) prints no stacks before rank 0 has looked (a stale list had it print 'is behind the others')."""
    watches = _watches(store, 2, after=1.0)
    for w in watches:
        w.at(5, "train step")
    watches[1].at(5, "data")
    time.sleep(2.0)  # episode 1: rank 1 behind, named, prints its stacks
    watches[0].at(6, "data")  # rank 0 moves: says so, and clears the list
    time.sleep(0.3)
    watches[1].at(6, "train step")  # rank 1 starts the long phase first: it reaches `after` 0.4 s before rank 0
    time.sleep(0.4)
    watches[0].at(6, "train step")
    time.sleep(1.6)
    _close(watches)
    err = capsys.readouterr().err
    assert "hang report: rank 0 moving again" in err, err
    dumps = re.findall(r"hang report: rank 1 \(.*\) is behind the others, in (step \d+ \(.*?\))", err)
    assert dumps == ["step 5 (data)"], err


def test_the_times_in_a_report_are_how_long_each_rank_has_been_stuck(store, capsys):
    """'has waited N s', 'behind ... for N s' and 'moving again ... after N s' count from when the stuck phase began
    (measured here), not from a heartbeat's or the report's own time (which printed 0 s and a third short)."""
    after = 1.0
    watches = _watches(store, 2, after=after)
    began = time.monotonic()
    for w in watches:
        w.at(5, "train step")
    watches[1].at(5, "data")
    time.sleep(3.0)
    for w in watches:
        w.at(6, "data")
    stuck = time.monotonic() - began
    time.sleep(0.5)
    _close(watches)
    err = capsys.readouterr().err
    waited = re.search(r"hang report: rank 0 has waited (\d+) s in step 5 \(train step\)", err)
    behind = re.search(r"behind: rank 1 \(.*\) in step 5 \(data\) for (\d+) s", err)
    moved = re.search(r"hang report: rank 0 moving again, now at step 6 \(data\), after (\d+) s", err)
    assert waited and behind and moved, err
    assert int(waited[1]) >= after and int(behind[1]) >= after, err  # reported once stuck `after` seconds
    assert int(moved[1]) >= int(stuck), (stuck, err)  # moved on after the whole stall


def test_a_rank_that_never_published_is_named_and_the_others_still_reported(store, capsys):
    """A rank that died before its first heartbeat has no key in the store: the report names it 'never heard from'
    (asked key by key), rather than blocking on its key until the store's timeout and reporting nothing."""
    watches = [HangWatch(0.5, _client(store, timeout=5), r, 3) for r in (0, 1)]  # rank 2 never started watching
    for w in watches:
        w.at(4, "train step")
    time.sleep(1.5)
    _close(watches)
    err = capsys.readouterr().err
    assert "  not responding: rank 2, never heard from" in err, err
    assert "2 rank(s) in step 4 (train step)" in err and "stopped watching" not in err, err


def test_a_report_names_at_most_eight_ranks_and_counts_the_rest_each_rank_once(store, capsys):
    """With more than LISTED (8) ranks behind, or not responding, the report names 8 and counts the rest; every rank
    behind still prints its stacks; and each of the job's ranks is accounted for exactly once (behind ranks are not
    counted again among the `N rank(s) in` lines)."""
    world = LISTED + 2
    watches = _watches(store, world)
    for w in watches:
        w.at(5, "data")
    watches[0].at(5, "train step")  # ranks 1..9 behind
    time.sleep(1.2)
    for w in watches:
        w.at(6, "data")
    time.sleep(0.4)
    _close(watches)
    err = capsys.readouterr().err
    report = err.split("hang report: rank 0 has waited")[1].split("hang report:")[0]
    assert re.findall(r"behind: rank (\d+) ", report) == [str(r) for r in range(1, LISTED + 1)], report
    assert "... and 1 more ranks behind or not responding" in report, report
    assert "1 rank(s) in step 5 (train step)" in report, report
    assert _accounted(report) == world, report
    assert len(re.findall(r"is behind the others, in step 5 \(data\)", err)) == world - 1, err

    watches = _watches(store, world)  # a fresh job on the same store: every rank publishes, then 9 go silent
    for w in watches:
        w.at(7, "train step")
    time.sleep(0.3)
    _close(watches[1:])
    time.sleep(0.8)  # silent for more than 3 polls before rank 0 can report
    watches[0].at(8, "train step")
    time.sleep(1.2)
    _close(watches[:1])
    err = capsys.readouterr().err
    report = err.split("hang report: rank 0 has waited")[-1].split("hang report:")[0]  # (the first: all at step 7)
    assert len(re.findall(r"not responding for \d+ s: rank \d+ ", report)) == LISTED, report
    assert "... and 1 more ranks behind or not responding" in report, report
    assert _accounted(report) == world, report


def test_a_dead_ranks_last_position_ahead_makes_no_live_rank_behind(store, capsys):
    """Rank 2 stopped responding at a later phase of the step (its checkpoint) than the live ranks are in: it is named
    not responding, and the live ranks, all at one point, are not 'behind' a rank that no longer runs (and print no
    stacks)."""
    watches = _watches(store, 3)
    watches[2].at(7, "checkpoint")  # rank 2 went on to its checkpoint
    for i, (step, phase) in enumerate([(6, "data"), (6, "train step"), (7, "data"), (7, "train step"),
                                       (7, "validation")]):  # the others are busy (each phase shorter than `after`)
        for w in watches[:2]:
            w.at(step, phase)
        time.sleep(0.25)
        if i == 0:
            watches[2].close()  # rank 2 has published; it stops there
    time.sleep(1.0)  # stuck in validation; rank 2 has been silent for more than 3 polls when rank 0 reports
    _close(watches[:2])
    err = capsys.readouterr().err
    assert re.search(r"not responding for \d+ s: rank 2 \(.*\), last heartbeat from step 7 \(checkpoint\)", err), err
    assert "2 rank(s) in step 7 (validation)" in err, err
    assert "behind:" not in err and "is behind the others" not in err, err


def test_a_watch_whose_store_fails_says_so_once_and_a_normal_close_says_nothing(capsys):
    """The store failing while the run goes on (its connection lost) ends the watch with one line saying why; closing a
    watch whose store works says nothing (the line was printed at the close instead, and never for a failure)."""

    class LostConnection:
        def set(self, key, value):
            raise RuntimeError("Connection reset by peer")

    watch = HangWatch(0.5, LostConnection(), 3, 4)
    time.sleep(0.5)  # two polls
    watch.close()
    err = capsys.readouterr().err
    assert err == "hang report: rank 3 stopped watching (RuntimeError: Connection reset by peer)\n", err

    class Working:
        def set(self, key, value):
            pass

    watch = HangWatch(0.5, Working(), 3, 4)
    time.sleep(0.3)
    watch.close()
    assert capsys.readouterr().err == ""


def test_a_phase_without_a_step_stays_in_the_step_the_rank_was_at():
    """`at(None, phase)` (the trainer's "finish") is the step the rank was at: an error raised there names it ("in
    step 7 (finish)", not "at start-up (finish)"), and the heartbeat keeps a step rank 0 can compare (a None step
    made its report fail)."""
    watch = HangWatch(0)
    watch.at(7, "train step")
    watch.at(None, "finish")
    assert watch.where == "in step 7 (finish)"
    beat = watch._beat()
    assert (beat["step"], beat["phase"]) == (7, "finish")
    watch.close()


@pytest.mark.parametrize("port", ["0", "65536"])
def test_the_store_refuses_a_port_outside_1_to_65535_in_one_line(port):
    """Port 0 is no port the agents can be told (TCPStore would listen on a random one, and the job would wait for a
    rendezvous that never comes); 65536 does not exist. Either: one line, exit 2, before listening."""
    proc = subprocess.Popen([sys.executable, "-m", "nanotronix.rendezvous_store", "--port", port], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"--port {port}: still running after 30 s (it listened)")
    assert proc.returncode == 2 and out == "", (proc.returncode, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"--port {port}: not a TCP port (1-65535)" in lines[0], err
