"""A checkpoint that does not fit on its disk (a real 3 MB tmpfs, where one tiny checkpoint of ~2.1 MB fits): the
2-rank run stops at the failed save with one line from rank 0 (DCP fails on every rank alike) naming the disk's
error, the checkpoint before it stays committed and verifiable, and once there is room the same command resumes
from it, clears the partial folder and finishes. Needs root (mount), as CI runs. ~20 s."""
import subprocess

import pytest

from helpers import NANOTRONIX_FRAME, load_tool, tiny_config, torchrun, two_gloo_ranks, write_learnable_store


@pytest.fixture
def small_disk(tmp_path):
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a small tmpfs needs root: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_stops_the_run_in_one_line_and_it_resumes_once_there_is_room(tmp_path, small_disk, capsys):
    store = write_learnable_store(tmp_path / "arith")
    ckpt = small_disk / "ckpt"
    cfg = tiny_config(tmp_path, store, checkpoint={"dir": str(ckpt), "interval": 2, "keep_last": 1})
    proc = torchrun(2, ["-m", "nanotronix.train", "--config", str(cfg), "train.train_steps=6"])
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]  # rank 0 says it for both
    assert errors[0].startswith(f"error: cannot write checkpoint {ckpt / '.step_0000004.tmp'} (on rank "), errors
    # torch's zip writer says "No space left on device" or, where the disk filled under it, "unexpected pos"
    assert " MB free on its filesystem); the checkpoints committed before it are intact" in errors[0], errors
    free = float(errors[0].split(" MB free on its filesystem")[0].rsplit("; ", 1)[1])
    assert free < 1.0, errors
    assert not NANOTRONIX_FRAME.search(proc.stderr.split("ChildFailedError")[0])  # no traceback of a worker's
    assert (ckpt / "latest").read_text().strip() == "step_0000002"
    assert load_tool("inspect_checkpoint").main([str(ckpt), "--verify"]) == 0  # every file's size and SHA-256
    capsys.readouterr()

    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
    again = torchrun(2, ["-m", "nanotronix.train", "--config", str(cfg), "train.train_steps=6"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "checkpoint: resumed from" in again.stdout and "step_0000002" in again.stdout, again.stdout[-2000:]
    assert sorted(p.name for p in ckpt.iterdir()) == [".lock", "latest", "step_0000006"]  # partial gone, keep_last 1


def test_a_read_that_fails_under_dcp_is_a_checkpoint_error(tmp_path):
    """DCP raises its CheckpointException (a BaseException, which `except Exception` misses) when the storage fails
    during a load: it comes out as one CheckpointError naming the folder and the rank's error."""
    import torch

    from nanotronix.checkpoint import storage
    from nanotronix.checkpoint.errors import CheckpointError
    coll = storage.Collective(single_process=True)
    coll.save({"w": torch.ones(3)}, tmp_path)
    data, = tmp_path.glob("*.distcp")
    data.write_bytes(b"damaged after it was verified")
    with pytest.raises(CheckpointError, match=rf"^cannot read checkpoint {tmp_path} \(on rank 0: ") as caught:
        coll.load({"w": torch.empty(3)}, tmp_path)
    assert caught.value.every_rank


def test_a_full_log_disk_costs_metrics_lines_not_the_run(tmp_path, capsys):
    """metrics.jsonl on a device that says 'No space left on device' (/dev/full) mid-run: one warning, the training
    goes on (before: an OSError traceback, and every step since the last checkpoint lost), and the records are written
    again, whole lines only, once the disk takes them."""
    from nanotronix.config import load_config
    from nanotronix.train.metrics import MetricsLog

    cfg = load_config(tiny_config(tmp_path, write_learnable_store(tmp_path / "arith")))
    log = MetricsLog(cfg, enabled=True)
    log.write({"step": 1, "loss": 5.0})
    log.path.rename(tmp_path / "kept.jsonl")
    log.path.symlink_to("/dev/full")
    log.write({"step": 2, "loss": 4.0})
    log.write({"step": 3, "loss": 3.0})
    log.path.unlink()
    (tmp_path / "kept.jsonl").rename(log.path)
    log.write({"step": 4, "loss": 2.0})
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith(f"warning: step 2: cannot write {log.path}: No space left on device")
    assert err[1] == f"{log.path}: written again from step 4"
    assert log.path.read_text() == '{"step": 1, "loss": 5.0}\n{"step": 4, "loss": 2.0}\n'


ONE_RANK_CANNOT_READ_BACK = """
import sys
from datetime import timedelta
from pathlib import Path
import torch, torch.distributed as dist
from nanotronix.checkpoint import manifest, paths, rng, storage
from nanotronix.checkpoint.errors import CheckpointError

rank, run_dir, rendezvous = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2,
                        timeout=timedelta(seconds=60))
if rank == 1:  # an I/O error reading its own files back (a flaky network file system)
    def unreadable(folder, names):
        raise OSError(5, "Input/output error")
    manifest.digest_files = unreadable
try:
    storage.write_step(run_dir, 1, {f"w{rank}": torch.ones(100)}, {"step": 1}, rng.capture_rng(), rank,
                       storage.Collective(), paths.Retention())
except CheckpointError as e:
    print(f"rank {rank}: every_rank={e.every_rank}: {e}", flush=True)
"""


def test_a_read_back_failing_on_one_rank_is_every_ranks_error_at_once(tmp_path):
    """A rank that cannot hash what it wrote (an I/O error) fails the save on every rank at once, with one message
    naming it; before, its OSError went up alone (a traceback) and the other ranks waited in the gather of the files'
    digests: on NCCL until the collective timeout, here on gloo until the failed rank's exit broke the connection."""
    run_dir = tmp_path / "run"
    outs = [out for _, out in two_gloo_ranks(ONE_RANK_CANNOT_READ_BACK, tmp_path, timeout=45)]
    temp = run_dir / ".step_0000001.tmp"
    for rank, out in enumerate(outs):
        assert (f"rank {rank}: every_rank=True: cannot read back checkpoint {temp} to checksum it (on rank 1: "
                "OSError: [Errno 5] Input/output error); the checkpoints committed before it are intact") in out, outs
    assert not (run_dir / "step_0000001").exists()


def test_a_console_on_a_full_disk_costs_its_lines_not_the_run(tmp_path):
    """Rank 0's console on a disk that says 'No space left on device' (`torchrun ... > run.log` on a full disk; here
    /dev/full, buffered as a file is): one warning on stderr, the run trains to its end and exits 0 (before: an
    OSError traceback at its first line), metrics.jsonl holds every step. --print-config into it: one error line."""
    import os
    import sys

    cfg = tiny_config(tmp_path, write_learnable_store(tmp_path / "arith"), train={"train_steps": 4})
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "nanotronix.train", "--config", str(cfg)], stdout=full,
                              stderr=subprocess.PIPE, text=True, env=env, timeout=300)
        printed = subprocess.run([sys.executable, "-m", "nanotronix.train", "--config", str(cfg), "--print-config"],
                                 stdout=full, stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "console" in line]
    assert warnings == ["warning: cannot write the console output (No space left on device): training goes on, its "
                        "console lines stop here (the metrics file keeps every record)"], proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    import json
    records = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4], records
    assert printed.returncode == 2 and printed.stderr == ("error: cannot write the config to standard output: No space "
                                                          "left on device\n"), printed.stderr
