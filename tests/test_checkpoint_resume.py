"""Resume through the real trainer, against an uninterrupted run (resharded resume: test_checkpoint_reshard.py).

- exact: `python -m nanotronix.train` with asynchronous saves, SIGKILLed at a random step after its first
  checkpoint (possibly in the middle of a save) and restarted, reproduces the uninterrupted run's per-step loss,
  grad norm, learning rate and data position bit for bit (fp32, same layout);
- a run started from a Hugging Face import (weights only, a new rope_theta), and a requeue of the same command
  that keeps the run's own progress instead of going back to checkpoint.resume;
- checkpoint.resume naming an earlier step of the run's own folder is refused (a requeue would go back again);
- a step that two ranks cannot read (damaged on their shared disk, or denied to one rank) is said once (~30 s: six
  two-rank torchrun starts).
Costs ~90 s of CPU (training subprocesses; the rest runs in this process).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoint_helpers import read_metrics, train_in_process
from helpers import ROOT, load_tool, run, tiny_config, torchrun, write_learnable_store

STEPS = 24


def _config(folder: Path, store: Path, **sections) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return tiny_config(folder, store, **sections)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_learnable_store(tmp_path_factory.mktemp("store") / "arith")


def test_sigkill_at_a_random_step_then_resume_is_bit_exact(tmp_path, store):
    train_in_process(_config(tmp_path / "ref", store, train={"train_steps": STEPS}))
    expected = read_metrics(tmp_path / "ref" / "logs")

    cfg = _config(tmp_path / "run", store, train={"train_steps": STEPS},
                  checkpoint={"dir": str(tmp_path / "run" / "ckpt"), "interval": 5, "async_save": True})
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "nanotronix.train", "--config", str(cfg)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kill_at = random.Random().randint(6, STEPS - 5)  # after the first checkpoint (step 5), before the end
    log = tmp_path / "run" / "logs" / "metrics.jsonl"
    # and once a save has committed: step 5's is written in the background, which on a loaded machine can end
    # steps later (a kill before it leaves nothing to resume from; CI met that)
    latest = tmp_path / "run" / "ckpt" / "latest"
    while not (log.is_file() and len(log.read_text().splitlines()) >= kill_at and latest.is_file()):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_after = len(log.read_text().splitlines())
    assert killed_after < STEPS, "the run finished before it could be killed"

    second = run(["-m", "nanotronix.train", "--config", str(cfg)])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "checkpoint: resumed from" in second.stdout and "RNG restored" in second.stdout
    assert "data order:" not in second.stdout  # same config: nothing changes the coming samples
    got = read_metrics(tmp_path / "run" / "logs")
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for key in ("loss", "grad_norm", "lr", "consumed_tokens", "stage"):
            assert got[step][key] == expected[step][key], (f"killed after step {killed_after}", step, key)


def test_start_from_hf_import_and_requeue_keeps_progress(tmp_path, store, capsys):
    """convert_from_hf -> checkpoint.resume=PATH (weights only, step 1, a new rope_theta); a requeue of the same
    command continues from the run's own checkpoint instead of going back to PATH."""
    from nanotronix.checkpoint.hf_export import export_to_hf
    from nanotronix.checkpoint.hf_import import import_from_hf

    base = _config(tmp_path / "base", store, train={"train_steps": 3}, checkpoint={"dir": str(tmp_path / "ckpt")})
    train_in_process(base)
    export_to_hf(tmp_path / "ckpt", tmp_path / "hf", progress=False, log=lambda _: None)
    import_from_hf(tmp_path / "hf", tmp_path / "imported", log=lambda _: None)
    capsys.readouterr()

    cfg = _config(tmp_path / "cont", store, train={"train_steps": 2}, model={"rope_theta": 130000.0},
                  checkpoint={"dir": str(tmp_path / "cont" / "ckpt"), "resume": str(tmp_path / "imported")})
    train_in_process(cfg)
    out = capsys.readouterr().out
    assert "model.rope_theta: 10000.0 in the checkpoint, 130000.0 now" in out
    assert "at step 0: weights only" in out
    assert "data order:" not in out  # a fresh data position: the import's default data config is no reference
    assert sorted(read_metrics(tmp_path / "cont" / "logs")) == [1, 2]
    # the imported model's HF config and generation config travel with the run's checkpoints into its export
    imported = json.loads((tmp_path / "imported" / "step_0000000" / "checkpoint.json").read_text())["source"]
    trained = json.loads((tmp_path / "cont" / "ckpt" / "step_0000002" / "checkpoint.json").read_text())
    assert trained["source"] == imported and trained["optimizer"] is True
    export_to_hf(tmp_path / "cont" / "ckpt", tmp_path / "hf_cont", progress=False, log=lambda _: None)
    assert (tmp_path / "hf_cont" / "generation_config.json").read_text() == \
        (tmp_path / "hf" / "generation_config.json").read_text()
    train_in_process(cfg, "train.train_steps=3")  # the requeued job, with the same checkpoint.resume
    assert "already holds this run's checkpoints: continuing from step_0000002" in capsys.readouterr().out
    lines = (tmp_path / "cont" / "logs" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and '"step": 3' in lines[-1]


def test_resume_says_when_a_store_it_read_from_has_changed(tmp_path, capsys):
    """A store rewritten with more documents between a save and the resume: its windows are cut and shuffled from
    its token count, so the run would silently read other samples; resume says so in one line (one, though its
    content fingerprint changed too). Then the same store rewritten with its documents in another order: as many
    tokens, other ones in each window, said in one line too. An unchanged store, and a store of a stage not begun yet
    (nothing read from it) that changed, resume without a note."""
    from nanotronix.data import open_store
    from nanotronix.data.megatron_store import MegatronWriter

    grown = write_learnable_store(tmp_path / "data" / "arith")
    later = write_learnable_store(tmp_path / "data" / "later", seed=1)
    data = {"root": str(tmp_path / "data"), "stages": [
        {"name": "one", "start_step": 1, "datasets": [{"path": "arith", "weight": 1.0}]},
        {"name": "two", "start_step": 50, "datasets": [{"path": "later", "weight": 1.0}]}]}
    cfg = _config(tmp_path / "run", grown, train={"train_steps": 2}, data=data,
                  checkpoint={"dir": str(tmp_path / "run" / "ckpt")})
    train_in_process(cfg)
    before = open_store(grown).num_tokens
    write_learnable_store(later, num_docs=300, seed=1)  # not read yet: no note
    capsys.readouterr()
    train_in_process(cfg, "train.train_steps=3")
    assert "data order:" not in capsys.readouterr().out
    write_learnable_store(grown, num_docs=300)
    train_in_process(cfg, "train.train_steps=4")
    notes = [line for line in capsys.readouterr().out.splitlines() if "data order:" in line]
    assert notes == [f"data order: dataset arith: its store holds {open_store(grown).num_tokens:,} tokens, "
                     f"{before:,} when the checkpoint was saved, so its windows are cut and shuffled anew: some it "
                     "gave repeat, some are passed over"]
    reading = open_store(grown)
    docs, sidecar = [reading.document(i) for i in range(reading.num_documents)], reading.metadata
    writer = MegatronWriter(grown, reading.dtype)
    for doc in reversed(docs):  # the same documents in another order: the same token count
        writer.add_document(doc)
    writer.finalize(sidecar)
    assert open_store(grown).num_tokens == reading.num_tokens
    train_in_process(cfg, "train.train_steps=5")
    notes = [line for line in capsys.readouterr().out.splitlines() if "data order:" in line]
    assert notes == ["data order: dataset arith: its store holds other tokens than when the checkpoint was saved (as "
                     "many, but another content fingerprint: rewritten, reordered or re-tokenized), so its windows "
                     "hold other data: some it gave may repeat, some be passed over"]


def test_each_start_leaves_the_config_it_trains_with(tmp_path, store):
    """LOGGING_DIR/config/step_N.yaml: the whole config of each start, named by its first step, which loads back to
    the config that trained those steps (here a requeue that changed the learning rate and the step count)."""
    from nanotronix.config import load_config

    cfg = _config(tmp_path / "run", store, train={"train_steps": 2}, checkpoint={"dir": str(tmp_path / "ckpt")})
    train_in_process(cfg)
    train_in_process(cfg, "train.train_steps=4", "optimizer.lr=0.001")
    folder = tmp_path / "run" / "logs" / "config"
    assert sorted(p.name for p in folder.iterdir()) == ["step_0000001.yaml", "step_0000003.yaml"]
    assert load_config(folder / "step_0000001.yaml") == load_config(cfg)
    assert load_config(folder / "step_0000003.yaml") == load_config(cfg, ["train.train_steps=4", "optimizer.lr=0.001"])


def test_resume_refuses_another_global_batch_size(tmp_path, store):
    """A step's samples are fixed by its number and the global batch size, so resuming with another global batch
    size would silently skip (or repeat) samples: one clear line instead, exit 2."""
    cfg = _config(tmp_path, store, train={"train_steps": 2}, checkpoint={"dir": str(tmp_path / "ckpt")})
    train_in_process(cfg)
    proc = run(["-m", "nanotronix.train", "--config", str(cfg), "train.train_steps=4", "train.global_batch_size=16"])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "consumed 16 samples in 2 steps (global batch 8), but train.global_batch_size is 16" in lines[0]


def test_a_checkpoint_whose_saved_stages_were_edited_is_one_line(tmp_path, store):
    """A checkpoint.json whose config.data was edited out of shape (a dataset's `path` key renamed): the resume's data
    order notes walked its stages, a KeyError traceback; now one line naming the field, before any weight is read."""
    from nanotronix.checkpoint import CheckpointError

    cfg = _config(tmp_path, store, train={"train_steps": 2}, checkpoint={"dir": str(tmp_path / "ckpt")})
    train_in_process(cfg)
    step = tmp_path / "ckpt" / "step_0000002"
    manifest = json.loads((step / "checkpoint.json").read_text())
    dataset = manifest["config"]["data"]["stages"][0]["datasets"][0]
    dataset["paths"] = dataset.pop("path")
    (step / "checkpoint.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError) as err:
        train_in_process(cfg, "train.train_steps=3")
    assert str(err.value).startswith(f"checkpoint {step}: checkpoint.json: data.stages.0.datasets.0.paths: unknown "
                                     "config key"), err.value


def test_tokens_are_counted_at_the_length_each_step_trained(tmp_path, store):
    """A resume with another train.seq_len (the 8k context stage does so): steps 1-2 trained 8 x 32 tokens each, steps
    3-4 8 x 64; the metrics and the checkpoint count 512 + 1,024 tokens, not 4 x 8 x 64 (every step at the new
    length), in total and per dataset, and tools/inspect_checkpoint.py says the same."""
    ckpt = tmp_path / "ckpt"
    cfg = _config(tmp_path, store, train={"train_steps": 2}, checkpoint={"dir": str(ckpt)})
    train_in_process(cfg)
    train_in_process(cfg, "train.train_steps=4", "train.seq_len=64")
    rows = read_metrics(tmp_path / "logs")
    expected = {1: 256, 2: 512, 3: 1024, 4: 1536}
    assert {step: rows[step]["consumed_tokens"] for step in expected} == expected
    assert {step: rows[step]["datasets"]["arith"]["consumed_tokens"] for step in expected} == expected
    report = load_tool("inspect_checkpoint").summarise(ckpt / "step_0000004")
    assert report["consumed_tokens"] == 1536
    # a resume whose stage blends in another dataset: it counts from the resume on (before, the samples the new blend
    # would have given it in steps 1-4 were counted too, and the wrong total went into the checkpoints)
    other = write_learnable_store(tmp_path / "other" / "more", seed=1)
    train_in_process(cfg, "train.train_steps=6", "train.seq_len=64",
                     f"data.stages.0.datasets=[{{path: arith, weight: 0.5}}, {{path: {other}, weight: 0.5}}]")
    rows = read_metrics(tmp_path / "logs")
    assert {step: rows[step]["consumed_tokens"] for step in (5, 6)} == {5: 2048, 6: 2560}
    assert sum(d["consumed_tokens"] for d in rows[6]["datasets"].values()) == 2560
    assert 0 < rows[6]["datasets"][str(other)]["consumed_tokens"] < 1024
    assert load_tool("inspect_checkpoint").summarise(ckpt / "step_0000006")["consumed_tokens"] == 2560


def test_resume_at_or_past_the_last_step(tmp_path, store):
    """A checkpoint past train.train_steps (the step count lowered by mistake): one line, exit 2, not a silent exit 0
    that trained nothing; at the last step exactly (a finished job submitted again): exit 0, saying so."""
    cfg = _config(tmp_path, store, train={"train_steps": 2}, checkpoint={"dir": str(tmp_path / "ckpt")})
    train_in_process(cfg)
    proc = run(["-m", "nanotronix.train", "--config", str(cfg), "train.train_steps=1"])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].endswith("train.train_steps=1, but the checkpoint resumed from is at step 2: past the end of "
                             "the run, nothing to train"), lines
    proc = run(["-m", "nanotronix.train", "--config", str(cfg)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step 2 = train.train_steps: the run is complete, nothing left to train" in proc.stdout


def test_resume_to_an_earlier_step_of_the_own_run_is_refused(tmp_path, store):
    """checkpoint.resume=DIR/step_X with a later step in DIR would be honoured on every requeue of the job, throwing
    its progress away each time: one line pointing at tools/rollback.py, exit 2. The latest step itself is fine."""
    ckpt = tmp_path / "ckpt"
    cfg = _config(tmp_path, store, train={"train_steps": 4}, checkpoint={"dir": str(ckpt), "interval": 2})
    train_in_process(cfg)
    proc = run(["-m", "nanotronix.train", "--config", str(cfg), "train.train_steps=6",
                f"checkpoint.resume={ckpt / 'step_0000002'}"])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "is an earlier step of this run's own checkpoint.dir (latest: step_0000004)" in lines[0]
    assert f"python tools/rollback.py {ckpt} --to-step 2" in lines[0]
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_0000002", "step_0000004"]  # nothing touched
    # the same step kept under another name inside the run (a copy as ckpt/best): its step is in its manifest
    shutil.copytree(ckpt / "step_0000002", ckpt / "best")
    proc = run(["-m", "nanotronix.train", "--config", str(cfg), "train.train_steps=6",
                f"checkpoint.resume={ckpt / 'best'}"])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "is an earlier step of this run's own checkpoint.dir (latest: step_0000004)" in lines[0]
    assert "--to-step 2`" in lines[0]
    shutil.rmtree(ckpt / "best")
    proc = run(["-m", "nanotronix.train", "--config", str(cfg), "train.train_steps=6",
                f"checkpoint.resume={ckpt / 'step_0000004'}"])
    assert proc.returncode == 0 and "resumed from" in proc.stdout and "at step 4" in proc.stdout, proc.stderr[-2000:]


# The trainer as torchrun's script (argv: a rank that cannot open DCP's .metadata, or -1 for none, then the trainer's
# arguments), that rank denied it as a node whose mount of the checkpoint folder lacks the permission would be.
METADATA_DENIED_ON_ONE_RANK = f"""
import errno, os, sys
sys.path.insert(0, {str(ROOT)!r})
if os.environ["RANK"] == sys.argv[1]:
    from torch.distributed.checkpoint.filesystem import FileSystem
    real = FileSystem.create_stream
    def denied(self, path, mode):
        if os.path.basename(str(path)) == ".metadata":
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(self, path, mode)
    FileSystem.create_stream = denied
from nanotronix.train.main import main
sys.argv = ["nanotronix.train", *sys.argv[2:]]
sys.exit(main())
"""


def test_a_step_that_cannot_be_read_on_resume_is_said_once(tmp_path, store):
    """The step a two-rank run resumes from cannot be read: where both ranks meet it (a file damaged on the file system
    they share), rank 0 alone says it (before: the same line from each rank, thousands on a big job); where one rank
    does (its node's mount denies it), that rank says its own line and the other that it stopped because of it."""
    ckpt = tmp_path / "ckpt"
    cfg = _config(tmp_path, store, train={"train_steps": 2}, checkpoint={"dir": str(ckpt), "interval": 2})
    train_in_process(cfg)
    step, kept = ckpt / "step_0000002", tmp_path / "kept"
    shutil.copytree(step, kept)
    metadata, manifest, data = step / ".metadata", step / "checkpoint.json", step / "__0_0.distcp"
    script = tmp_path / "train_denied.py"
    script.write_text(METADATA_DENIED_ON_ONE_RANK)

    def errors_said(damage, denied_rank: int = -1) -> list[str]:
        shutil.rmtree(step)
        shutil.copytree(kept, step)
        damage()
        proc = torchrun(2, [str(script), str(denied_rank), "--config", str(cfg), "train.train_steps=4"], timeout=240)
        assert proc.returncode != 0, proc.stderr[-3000:]
        return sorted(line for line in proc.stderr.splitlines() if line.startswith("error:"))

    def flip_a_byte(path):
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))

    size = metadata.stat().st_size
    assert errors_said(lambda: metadata.write_bytes(b"\x00" * size)) == [  # of the right size: unpickled, and fails
        f"error: checkpoint file damaged: {metadata} cannot be read (UnpicklingError)"]
    assert errors_said(lambda: metadata.write_bytes(metadata.read_bytes()[:-10])) == [
        f"error: checkpoint file damaged: {metadata} has {size - 10} bytes, expected {size} (truncated or overwritten)"]
    assert errors_said(lambda: manifest.write_text("{")) == [
        f"error: checkpoint {manifest} is damaged: not valid JSON"]
    # found by the hashing that the ranks share (.metadata is rank 0's to hash, the data file rank 1's): the line
    # names the rank and host that met it, the others having found their files intact
    assert errors_said(lambda: flip_a_byte(data)) == [
        f"error: checkpoint file damaged: {data} does not match its SHA-256 in checkpoint.json (corrupted) (met by "
        f"rank 1 ({socket.gethostname()}))"]

    def unlist_data():  # a file the load reads that the manifest leaves out: every rank finds it so, one line as before
        listed = json.loads(manifest.read_text())
        del listed["files"][data.name]
        manifest.write_text(json.dumps(listed))

    assert errors_said(unlist_data) == [f"error: checkpoint file missing from checkpoint.json: {data}"]
    assert errors_said(lambda: None, denied_rank=1) == [
        f"error: rank 0: loading checkpoint {step}: bad input stopped rank 1 (its error says why), so this one stops "
        "too", f"error: rank 1: cannot read {metadata}: [Errno 13] Permission denied"]

def test_milestones_are_saved_off_the_interval_and_kept(tmp_path, store):
    """checkpoint.keep_steps [6] and keep_every 5 with interval 4 and keep_last 1 over 12 steps: steps 4, 8 and 12 are
    saved on the interval (4 and 8 then pruned), steps 5, 6 and 10 off it, and those stay; a resume from the
    milestone of step 6 (what the next phase of a WSD run starts from) continues the run, and a branch from it with a
    decay and a new data stage (an annealing ablation) follows them."""
    ckpt = tmp_path / "ckpt"
    cfg = _config(tmp_path, store, train={"train_steps": 12},
                  checkpoint={"dir": str(ckpt), "interval": 4, "keep_last": 1, "keep_every": 5, "keep_steps": [6]})
    train_in_process(cfg)
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_0000005", "step_0000006", "step_0000010",
                                                           "step_0000012"]
    other = _config(tmp_path / "branch", store, train={"train_steps": 7},
                    checkpoint={"dir": str(tmp_path / "branch" / "ckpt"), "resume": str(ckpt / "step_0000006")})
    train_in_process(other)
    branch = read_metrics(tmp_path / "branch" / "logs")
    assert sorted(branch) == [7] and branch[7]["loss"] == read_metrics(tmp_path / "logs")[7]["loss"]
    # an annealing branch (smollm2_1p7b_anneal_math.yaml in small): the LR decays linearly to 0 from the milestone,
    # and a stage added from the next step feeds it
    stages = [{"name": "arith", "start_step": 1, "datasets": [{"path": store.name, "weight": 1.0}]},
              {"name": "anneal", "start_step": 7, "datasets": [{"path": store.name, "weight": 1.0}]}]
    anneal = _config(tmp_path / "anneal", store, train={"train_steps": 9},
                     lr_schedule={"warmup_steps": 2, "decay_start_step": 6, "decay_steps": 3},
                     data={"root": str(store.parent), "stages": stages},
                     checkpoint={"dir": str(tmp_path / "anneal" / "ckpt"), "resume": str(ckpt / "step_0000006")})
    train_in_process(anneal)
    rows = read_metrics(tmp_path / "anneal" / "logs")
    assert sorted(rows) == [7, 8, 9] and {rows[s]["stage"] for s in rows} == {"anneal"}
    assert [rows[s]["lr"] for s in (7, 8, 9)] == pytest.approx([2e-3, 1e-3, 0.0])  # 3e-3 x (1 - k/3)
    # a resume that leaves keep_every / keep_steps out (a requeue with trimmed overrides) keeps the milestones saved
    # under them: only the step that was no milestone is pruned (before, 5, 6 and 10 went without a word)
    longer = _config(tmp_path, store, train={"train_steps": 16},
                     checkpoint={"dir": str(ckpt), "interval": 4, "keep_last": 1})
    train_in_process(longer)
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_0000005", "step_0000006", "step_0000010",
                                                           "step_0000016"]


def test_one_run_per_checkpoint_dir(tmp_path, store, monkeypatch):
    """A second run into a checkpoint.dir that a live run holds (a job submitted twice) would resume from the first's
    steps and replace them with its own: refused in one line naming the holder, after waiting a while (NFS keeps a
    dead node's lock until its lease ends). The lock goes with the run: the next run in the same process takes it."""
    import fcntl

    from nanotronix.checkpoint import CheckpointError, checkpointer

    ckpt = tmp_path / "ckpt"
    cfg = _config(tmp_path, store, train={"train_steps": 2}, checkpoint={"dir": str(ckpt)})
    train_in_process(cfg)
    monkeypatch.setattr(checkpointer, "LOCK_WAIT_S", 0.5)
    with open(ckpt / ".lock", "r+") as other:  # another live run's hold on the folder
        fcntl.flock(other, fcntl.LOCK_EX)
        other.truncate(0)
        other.write("host elsewhere pid 4242 since then\n")
        other.flush()
        with pytest.raises(CheckpointError, match=f"checkpoint.dir {ckpt} is in use by another run \\(host elsewhere "
                                                  "pid 4242 since then;"):
            train_in_process(cfg, "train.train_steps=4")
    # the failed run handed back SIGTERM (its preemption handler, left behind, swallowed a later SIGTERM: a
    # conversion in the same process then ran on instead of stopping)
    import signal
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_0000002"]
    train_in_process(cfg, "train.train_steps=3")
    train_in_process(cfg, "train.train_steps=4")  # the lock of the run before was let go
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_0000002", "step_0000003", "step_0000004"]


def test_a_step_folder_as_checkpoint_dir_is_refused_before_anything_is_written_in_it(tmp_path, store):
    """checkpoint.dir naming a step folder (the step to continue from, given where its run folder belongs): the run
    saved its steps inside that step folder, beside its files, and every restart resumed from the step folder itself
    again (a folder holding a manifest means itself), so a requeued job went back to it each time. Refused in one
    line, by the trainer and preflight alike, before the step folder gets a lock, a `latest` or steps."""
    from nanotronix.checkpoint import CheckpointError
    from nanotronix.checkpoint.checkpointer import choose_resume_source

    ckpt = tmp_path / "ckpt"
    train_in_process(_config(tmp_path, store, train={"train_steps": 2}, checkpoint={"dir": str(ckpt)}))
    step = ckpt / "step_0000002"
    before = sorted(p.relative_to(step) for p in step.rglob("*"))
    again = _config(tmp_path / "again", store, train={"train_steps": 4}, checkpoint={"dir": str(step), "interval": 1})
    said = f"checkpoint.dir {step} is a step folder"
    with pytest.raises(CheckpointError, match=f"^{said}"):
        train_in_process(again)
    with pytest.raises(CheckpointError, match=f"^{said}"):  # what preflight asks
        choose_resume_source(step, "auto", print)
    assert sorted(p.relative_to(step) for p in step.rglob("*")) == before


def test_a_held_lock_is_one_line_on_a_run_whose_collective_timeout_is_shorter_than_the_wait(tmp_path, store):
    """Rank 0 waits for a held checkpoint.dir lock while the other ranks wait in the checkpoint group's broadcast: with
    parallel.collective_timeout_minutes under the 150 s wait, rank 1 died first of gloo's timeout (a traceback) and
    rank 0, still waiting, was killed by torchrun; the wait now ends within the timeout, with the lock's one line."""
    import fcntl

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    cfg = _config(tmp_path, store, train={"train_steps": 2}, checkpoint={"dir": str(ckpt)},
                  parallel={"collective_timeout_minutes": 0.1}, logging={"hang_report_seconds": 0})
    with open(ckpt / ".lock", "a+") as other:  # another live run's hold on the folder
        fcntl.flock(other, fcntl.LOCK_EX)
        other.write("host elsewhere pid 4242 since then\n")
        other.flush()
        proc = torchrun(2, ["-m", "nanotronix.train", "--config", str(cfg)], timeout=240)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and "Timed out" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith(f"error: checkpoint.dir {ckpt} is in use by another run (host "
                                                     "elsewhere pid 4242 since then;"), proc.stderr[-3000:]


def test_a_folder_in_place_of_latest_stops_the_start_and_a_rollback(tmp_path, store, capsys):
    """A folder named `latest` in checkpoint.dir fails every save after its commit: the run trained up to its first
    save before saying so; now it stops before step 1, in one line, and starts once the folder is moved."""
    from nanotronix.checkpoint import CheckpointError

    ckpt = tmp_path / "ckpt"
    cfg = _config(tmp_path, store, train={"train_steps": 2}, checkpoint={"dir": str(ckpt)})
    train_in_process(cfg)
    (ckpt / "latest").unlink()
    (ckpt / "latest").mkdir()
    with pytest.raises(CheckpointError, match=f"^{ckpt / 'latest'} is a folder where the run's `latest` pointer file "
                                              "goes: move it out of the way$"):
        train_in_process(cfg, "train.train_steps=3")
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_0000002"]
    capsys.readouterr()
    assert load_tool("rollback").main([str(ckpt), "--to-step", "2"]) == 2  # a rollback says so too
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {ckpt / 'latest'} is a folder where the run's `latest` pointer file goes: move it out of the way"]
    (ckpt / "latest").rmdir()  # no `latest` at all: the run takes its newest step folder
    train_in_process(cfg, "train.train_steps=3")
    assert (ckpt / "latest").read_text() == "step_0000003\n"


def test_async_saves_survive_a_failed_step_and_their_failure_is_said_at_once(tmp_path, store, monkeypatch):
    """checkpoint.async_save: a step that fails while the background save of a good step is still writing lets that
    save commit first (before, the process exited mid-write and the step was lost: a whole interval); a background
    save that fails is raised at the next step, not when the next save is due an interval later."""
    from nanotronix.checkpoint import CheckpointError
    from nanotronix.checkpoint.checkpointer import Checkpointer
    from nanotronix.train import trainer

    ckpt = tmp_path / "ckpt"
    cfg = _config(tmp_path, store, train={"train_steps": 12},
                  checkpoint={"dir": str(ckpt), "interval": 3, "async_save": True})
    write = Checkpointer._write
    monkeypatch.setattr(Checkpointer, "_write", lambda self, snap: time.sleep(1.0) or write(self, snap))  # slow disk
    train_step = trainer.train_step
    calls = []

    def failing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("a kernel failed in step 7")
        return train_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", failing_step)
    with pytest.raises(RuntimeError, match="step 7"):
        train_in_process(cfg)
    assert (ckpt / "latest").read_text().strip() == "step_0000006"  # committed before train() gave up

    monkeypatch.setattr(trainer, "train_step", train_step)
    failed = []

    def failing_write(self, snap):
        if snap.step == 9 and not failed:
            failed.append(snap.step)
            raise CheckpointError("cannot write checkpoint step 9 (a full disk)")
        return write(self, snap)

    monkeypatch.setattr(Checkpointer, "_write", failing_write)
    with pytest.raises(CheckpointError, match="step 9"):
        train_in_process(cfg, "checkpoint.resume=auto")
    assert max(read_metrics(tmp_path / "logs")) <= 10  # said at once, not at step 12's save


def test_a_step_not_finite_during_a_failing_background_save_says_both(tmp_path, store, monkeypatch, capsys):
    """A step whose loss is not finite while the background save of an earlier step is still writing waits for that
    save; when the save fails too, the run's error is still the step's (where it stopped, the skip_steps advice) and
    the save's failure is said beside it, not raised in its place."""
    from nanotronix.checkpoint import CheckpointError
    from nanotronix.checkpoint.checkpointer import Checkpointer
    from nanotronix.train import trainer
    from nanotronix.train.step import StepResult

    cfg = _config(tmp_path, store, train={"train_steps": 8},
                  checkpoint={"dir": str(tmp_path / "ckpt"), "interval": 3, "async_save": True})

    def failing_write(self, snap):
        time.sleep(1.0)  # a slow disk: still writing when step 4 fails
        raise CheckpointError(f"cannot write checkpoint step {snap.step} (a full disk)")

    monkeypatch.setattr(Checkpointer, "_write", failing_write)
    train_step = trainer.train_step
    calls = []

    def diverging_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # what train_step returns for a loss that is not finite: the weights left as they were
            return StepResult(float("nan"), float("nan"), applied=False)
        return train_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", diverging_step)
    with pytest.raises(FloatingPointError, match="^step 4: the loss"):
        train_in_process(cfg)
    assert "the save in progress failed too: cannot write checkpoint step 3 (a full disk)" in capsys.readouterr().out


def test_a_preemption_right_after_a_failed_background_save_still_saves_its_step(tmp_path, store, monkeypatch):
    """SIGTERM at the step after a background save failed (a disk full for a moment): the step is saved before the
    save's failure is raised, as for any save after a failed one; before, the failure was raised first and the
    preempted run lost every step since the last committed one."""
    from nanotronix.checkpoint import CheckpointError
    from nanotronix.checkpoint.checkpointer import Checkpointer
    from nanotronix.train import trainer

    ckpt = tmp_path / "ckpt"
    cfg = _config(tmp_path, store, train={"train_steps": 8},
                  checkpoint={"dir": str(ckpt), "interval": 3, "async_save": True})
    write = Checkpointer._write

    def failing_write(self, snap):
        if snap.step == 3:
            raise CheckpointError("cannot write checkpoint step 3 (a full disk)")
        return write(self, snap)

    monkeypatch.setattr(Checkpointer, "_write", failing_write)
    train_step = trainer.train_step
    calls = []

    def preempted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            time.sleep(0.5)  # the background save of step 3 has failed by the end of this step
            os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's notice, during step 4
        return train_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", preempted_step)
    with pytest.raises(CheckpointError, match="step 3"):
        train_in_process(cfg)
    assert (ckpt / "latest").read_text() == "step_0000004\n"


def test_a_fresh_run_into_a_logging_dir_with_records_says_so(tmp_path, store, capsys):
    """Two runs with their own checkpoint.dir but one logging.dir: the second's records go after the first's in one
    metrics.jsonl (two curves in one file); it says so in a note. A resumed run appends without one."""
    cfg = _config(tmp_path, store, train={"train_steps": 2}, checkpoint={"dir": str(tmp_path / "a")})
    train_in_process(cfg)
    assert "already holds records" not in capsys.readouterr().out
    train_in_process(cfg, f"checkpoint.dir={tmp_path / 'b'}")
    assert (f"note: {tmp_path / 'logs' / 'metrics.jsonl'} already holds records (another run's, or this run's before "
            "it was restarted without a checkpoint)") in capsys.readouterr().out
    train_in_process(cfg, "train.train_steps=3")  # resumes from a's step 2
    out = capsys.readouterr().out
    assert "resumed from" in out and "already holds records" not in out


def test_a_resume_with_other_learning_rate_settings_says_so(tmp_path, store, capsys):
    """A requeue with edited overrides that change the learning rate jumps it at the resumed step: each changed
    setting is a note (an annealing branch changes them on purpose); an unchanged resume says nothing of it."""
    cfg = _config(tmp_path, store, train={"train_steps": 2}, checkpoint={"dir": str(tmp_path / "ckpt")})
    train_in_process(cfg)
    train_in_process(cfg, "train.train_steps=3")
    assert "learning rate:" not in capsys.readouterr().out
    train_in_process(cfg, "train.train_steps=4", "optimizer.lr=0.001", "lr_schedule.warmup_steps=5")
    out = capsys.readouterr().out
    assert "checkpoint: learning rate: optimizer.lr: 0.003 in the checkpoint, 0.001 now" in out, out
    assert "checkpoint: learning rate: lr_schedule.warmup_steps: 2 in the checkpoint, 5 now" in out, out
