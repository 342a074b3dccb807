"""tools/preprocess.py when a run fails or is stopped: a stopped run (SIGTERM, SIGKILL) leaves no worker running and no
partial output; a failed one leaves no half-written store, no old index beside new tokens, and none of the output
folders it made (only those: a folder already there, or one something else filled, stays); what cannot work (zarr
not installed, more workers than the cores can use) is refused before any folder is made or process started. The
inputs and the reference tokenizer: tests/test_preprocess.py. ~5 s (the stopped runs are processes of their own)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nanotronix.data import DataError, open_store
import test_preprocess as preprocess
from test_preprocess import TEXTS, _jsonl, _outputs
from helpers import ROOT

tok = preprocess.tok  # the fixture: the tiny tokenizer's path


def test_a_failed_overwrite_leaves_no_old_index_beside_new_tokens_and_puts_the_old_store_back(tmp_path, monkeypatch):
    """--overwrite of a Megatron store that fails after its new .bin is in place (a full disk while the sidecar is
    written, here after the .bin so that both orders are covered): the old .idx must not stay to describe the new
    tokens (it opened, and read other documents, without a word). abort() then puts the old store back whole
    (before, it was gone: removed .idx, replaced .bin), and removes the new .bin."""
    from nanotronix.data import DataError, megatron_store
    from nanotronix.data.megatron_store import MegatronWriter

    writer = MegatronWriter(tmp_path / "s", np.uint16)
    writer.add_documents(np.array([5, 6, 0, 7, 0]), np.array([3, 2]))
    writer.finalize({"old": True})
    real_commit = megatron_store.commit

    def full_disk_after_the_bin(temp, final):
        real_commit(temp, final)
        if str(final).endswith(".bin"):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(megatron_store, "commit", full_disk_after_the_bin)
    writer = MegatronWriter(tmp_path / "s", np.uint16)
    writer.add_documents(np.arange(1, 101), np.array([50, 50]))
    with pytest.raises(OSError):
        writer.finalize({"old": False})
    with pytest.raises(DataError, match=r"s.idx is missing"):
        open_store(tmp_path / "s")
    writer.abort()
    old = open_store(tmp_path / "s")
    assert [old.document(i).tolist() for i in range(old.num_documents)] == [[5, 6, 0], [7, 0]]
    assert json.loads((tmp_path / "s.meta.json").read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin", "s.idx", "s.meta.json"]


@pytest.mark.parametrize("stop_at", [".meta.json", ".bin", ".idx"])
def test_ctrl_c_while_overwrite_renames_the_new_store_keeps_the_old_one(tmp_path, tok, preprocess_tool, capsys,
                                                                      monkeypatch, stop_at):
    """Ctrl-C while --overwrite renames a new Megatron store into place (its sidecar, .bin or .idx about to go in):
    before, the old store was gone (its .idx removed, its .bin replaced) and nothing new was written, under
    "no output was written". Now the old store is back whole and that line is true."""
    from nanotronix.data import files, megatron_store

    src = _jsonl(tmp_path / "in.jsonl", [json.dumps({"text": t}) for t in TEXTS])
    prefix = tmp_path / "out"
    args = ["--input", str(src), "--tokenizer", tok, "--output-prefix", str(prefix), "--workers", "1", "--no-progress"]
    _jsonl(tmp_path / "old.jsonl", [json.dumps({"text": "the old store"})])
    assert preprocess_tool.main(args[:1] + [str(tmp_path / "old.jsonl")] + args[2:]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("out")}
    real_commit = files.commit

    def stopped(temp, final):
        if str(final).endswith(stop_at):
            raise KeyboardInterrupt
        real_commit(temp, final)

    monkeypatch.setattr(files, "commit", stopped)
    monkeypatch.setattr(megatron_store, "commit", stopped)
    capsys.readouterr()
    assert preprocess_tool.main(args + ["--overwrite"]) == 130
    assert capsys.readouterr().err.strip() == "preprocess: interrupted; no output was written"
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name not in ("in.jsonl", "old.jsonl")} == before
    assert open_store(prefix).num_documents == 1


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the parent-death signal is Linux's")
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_stopped_preprocess_leaves_no_workers_and_no_partial_output(tmp_path, tok, how):
    """With more workers than one process takes (12: two forked processes of 6 threads), `kill` (SIGTERM, also
    what scancel sends) removes the partial output and ends the workers, exit 143; SIGKILL (the OOM killer) gives
    no chance to clean up, but the kernel ends the workers with it (before, they went on encoding, orphaned)."""
    text = " ".join(TEXTS)
    src = _jsonl(tmp_path / "in.jsonl", [json.dumps({"text": f"{i} {text}"}) for i in range(60_000)])  # ~25 MB
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parents[1] / "tools" / "preprocess.py"),
                             "--input", str(src), "--tokenizer", tok, "--output-prefix", str(out / "store"),
                             "--workers", "12", "--no-progress"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (len(_children(proc.pid)) >= 2 and any(out.iterdir())):  # the workers forked, the output begun
        assert proc.poll() is None and time.monotonic() < deadline, "preprocess ended before it could be stopped"
        time.sleep(0.05)
    workers = _children(proc.pid)
    proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=60)
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [w for w in workers if _alive(w)], f"workers left running after {how}"
    if how == "SIGTERM":
        assert proc.returncode == 143 and err.strip() == "preprocess: terminated; no output was written", err
        assert not list(out.iterdir()), list(out.iterdir())
    else:
        assert proc.returncode == -signal.SIGKILL
        # what it left (its staging files, as large as the store) goes with the next run to that output, said
        assert [p.name for p in out.iterdir() if ".tmp-" not in p.name] == [] and any(out.iterdir())
        small = _jsonl(tmp_path / "small.jsonl", [json.dumps({"text": TEXTS[0]})])
        again = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "tools" / "preprocess.py"),
                                "--input", str(small), "--tokenizer", tok, "--output-prefix", str(out / "store"),
                                "--workers", "1", "--no-progress"], env=env, capture_output=True, text=True)
        assert again.returncode == 0 and "note: removed what an interrupted run left beside the output" in again.stderr
        assert not [p.name for p in out.iterdir() if ".tmp-" in p.name], list(out.iterdir())


def test_a_writer_that_cannot_start_stops_the_workers_and_gives_back_tokenizers_parallelism(tmp_path, tok,
                                                                                           monkeypatch):
    """A writer that fails to start (its temporary token file cannot be opened: a folder holds that name) fails once
    the workers (two forked processes) are started: they are stopped and the caller's TOKENIZERS_PARALLELISM is
    back, as after any other failure (before, both were left)."""
    import multiprocessing
    from nanotronix.data.files import temp_path
    from nanotronix.data.pipeline import PreprocessOptions, preprocess
    blocked = temp_path(tmp_path / "out.bin")  # the Megatron writer's token file in this process
    blocked.mkdir()
    src = _jsonl(tmp_path / "in.jsonl", [json.dumps({"text": t}) for t in TEXTS])
    before = set(multiprocessing.active_children())
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    with pytest.raises(IsADirectoryError) as failed:
        preprocess(PreprocessOptions([str(src)], tok, str(tmp_path / "out"), workers=2, threads_per_process=1,
                                     progress=False))
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    deadline = time.monotonic() + 10
    while set(multiprocessing.active_children()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    # (the traceback, held here as by a caller that reports it, holds the executor: it is not what stops them)
    assert not set(multiprocessing.active_children()) - before, f"workers left running after {failed.value}"
    assert _outputs(tmp_path) == [blocked.name]


def test_format_zarr_without_zarr_is_refused_before_any_folder_is_made(tmp_path, tok, preprocess_tool, capsys,
                                                                         monkeypatch):
    """--format zarr where zarr is not installed: one line, exit 2, and the new --output-prefix folders are not made
    (before, the writer found zarr missing after they were, and left them empty)."""
    monkeypatch.setitem(sys.modules, "zarr", None)  # `import zarr` raises ImportError: not installed
    src = _jsonl(tmp_path / "in.jsonl", [json.dumps({"text": t}) for t in TEXTS])
    code = preprocess_tool.main(["--input", str(src), "--tokenizer", tok, "--output-prefix",
                                 str(tmp_path / "new" / "dir" / "out"), "--format", "zarr", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err == ("error: --format zarr needs the Python package 'zarr': pip install "
                                 "'nanotronix[data]'\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize("fmt", ["megatron", "zarr"])
def test_a_failed_run_removes_the_output_folders_it_made_and_only_those(tmp_path, tok, preprocess_tool, capsys, fmt):
    """A bad record, and input with no document, fail after the new --output-prefix folders were made: each leaves
    none of them behind (before, `new/dir` stayed, empty), nor a half-written store; a folder that was already
    there stays (only the levels this run made are removed)."""
    bad = _jsonl(tmp_path / "bad.jsonl", [json.dumps({"text": "fine"}), "{not json}"])
    empty = _jsonl(tmp_path / "empty.jsonl", [json.dumps({"text": " "})])
    (tmp_path / "kept").mkdir()
    runs = [([bad], tmp_path / "new" / "dir" / "out", "bad.jsonl:2: invalid JSON"),
            ([empty, "--skip-bad"], tmp_path / "new" / "dir" / "out", "no documents"),
            ([bad], tmp_path / "kept" / "sub" / "out", "bad.jsonl:2: invalid JSON")]
    for (src, *extra), prefix, why in runs:
        code = preprocess_tool.main(["--input", str(src), "--tokenizer", tok, "--output-prefix", str(prefix),
                                     "--format", fmt, "--workers", "1", "--no-progress", *extra])
        err = capsys.readouterr().err.strip()
        assert code != 0 and err.startswith("error: ") and why in err and "\n" not in err, err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "empty.jsonl", "kept"], why
        assert list((tmp_path / "kept").iterdir()) == []


def test_a_made_folder_that_something_else_filled_stays(tmp_path):
    """The folders a failed run made are removed with rmdir only: one that holds a file written there meanwhile (not
    this run's) stays, and so do the levels above it; the empty one below it goes."""
    from nanotronix.data.files import make_folder_durably, remove_made_folders
    (tmp_path / "a").mkdir()
    made = make_folder_durably(tmp_path / "a" / "b" / "c" / "d")
    assert made == [tmp_path / "a" / "b" / "c" / "d", tmp_path / "a" / "b" / "c", tmp_path / "a" / "b"]
    (tmp_path / "a" / "b" / "someone-elses").write_text("x")
    remove_made_folders(made + [tmp_path / "gone"])  # one already removed: nothing to say
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["a", "a/b", "a/b/someone-elses"]


def test_a_writer_that_fails_half_started_leaves_nothing(tmp_path, tok, preprocess_tool, capsys, monkeypatch):
    """A writer that fails while starting, after it made part of its temporary output, removes that part itself (no
    caller holds it to abort): a zarr store on a full disk (its group made, its arrays not), and a Megatron writer
    whose second staging file cannot be opened (a folder holds that name; the first was open). Before, the hidden
    half-made store stayed, and with it the `new` folder made for it, and the first staging file stayed."""
    from nanotronix.data import zarr_store
    from nanotronix.data.files import temp_path

    def full_disk():
        raise OSError(28, "No space left on device")
    src = _jsonl(tmp_path / "in.jsonl", [json.dumps({"text": t}) for t in TEXTS])
    args = ["--input", str(src), "--tokenizer", tok, "--workers", "1", "--no-progress"]
    with monkeypatch.context() as patch:
        patch.setattr(zarr_store, "_codecs", full_disk)
        assert preprocess_tool.main(args + ["--output-prefix", str(tmp_path / "new" / "out"), "--format", "zarr"]) != 0
    assert capsys.readouterr().err == "error: No space left on device\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    blocked = temp_path(tmp_path / "out.lengths")  # the Megatron writer's lengths file in this process
    blocked.mkdir()
    assert preprocess_tool.main(args + ["--output-prefix", str(tmp_path / "out")]) != 0
    assert capsys.readouterr().err == f"error: Is a directory: {blocked}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [blocked.name, "in.jsonl"]


def test_workers_past_what_the_cores_can_use_are_refused_before_any_process_starts(tmp_path, tok, preprocess_tool,
                                                                                    capsys):
    """Tokenizing is CPU-bound: a --workers typo (100000) would fork that many processes (it forked them). The most
    taken: 4 per core, at least 64 (more threads than cores still splits the work over processes, as a test does)."""
    src = _jsonl(tmp_path / "in.jsonl", [json.dumps({"text": t}) for t in TEXTS])
    limit = max(64, 4 * os.cpu_count())
    assert preprocess_tool.main(["--input", str(src), "--tokenizer", tok, "--output-prefix",
                                 str(tmp_path / "new" / "out"), "--workers", str(limit + 1), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --workers {limit + 1}: ") and f"at most {limit}" in err and err.count("\n") == 1
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("staging", ["out.bin", "out.unshuffled"])
def test_a_full_disk_while_tokens_are_written_leaves_nothing(tmp_path, tok, preprocess_tool, capsys, staging):
    """A disk that fills while the tokens are staged: the bytes still buffered fail again when the staging file is
    closed, and that second error stopped the clean-up (before, the hidden staging files, as large as what the disk
    held, stayed until a later run, and so did the folders this run made, which this test cannot show; with
    --shuffle the store writer's files too), and the line said no path. /dev/full stands in for the full disk:
    every write to it fails with ENOSPC."""
    from nanotronix.data.files import temp_path
    # a first document that the staging file's write buffer holds, then more than its 8 KiB: that write fails
    (tmp_path / "first.txt").write_text(TEXTS[0])
    src = _jsonl(tmp_path / "in.jsonl", [json.dumps({"text": t}) for t in TEXTS * 40])
    prefix = tmp_path / "new" / "out"
    prefix.parent.mkdir()
    full = temp_path(prefix.parent / staging)  # the name this process stages those tokens under
    full.symlink_to("/dev/full")
    shuffle = ["--shuffle"] if staging == "out.unshuffled" else []
    code = preprocess_tool.main(["--input", str(tmp_path / "first.txt"), str(src), "--tokenizer", tok,
                                 "--output-prefix", str(prefix), "--workers", "1", "--no-progress", *shuffle])
    err = capsys.readouterr().err
    assert sorted(p.name for p in prefix.parent.iterdir()) == []  # the staging files, the link to the "disk" too
    assert (code, err) == (2, f"error: No space left on device: {full}\n")  # which disk: the file's path


def test_a_full_disk_while_the_sidecar_is_written_leaves_nothing_and_a_retry_runs(tmp_path, tok, preprocess_tool,
                                                                                   capsys):
    """A fresh Megatron store whose .bin is in place when its sidecar's write fails (a full disk): before, that .bin
    (as large as the store) and the sidecar's half-written staging file stayed, the folder holding them too, and the
    retry was refused for the .bin in its way; the line named no file. /dev/full stands in for the full disk."""
    from nanotronix.data.files import temp_path
    src = _jsonl(tmp_path / "in.jsonl", [json.dumps({"text": t}) for t in TEXTS])
    prefix = tmp_path / "out" / "store"
    prefix.parent.mkdir()
    full = temp_path(prefix.parent / "store.meta.json")  # where this process stages the sidecar
    full.symlink_to("/dev/full")
    args = ["--input", str(src), "--tokenizer", tok, "--output-prefix", str(prefix), "--workers", "1",
            "--no-progress"]
    assert (preprocess_tool.main(args), capsys.readouterr().err) == (2, f"error: No space left on device: {full}\n")
    assert list(prefix.parent.iterdir()) == []
    assert preprocess_tool.main(args) == 0, capsys.readouterr().err
    assert open_store(prefix).num_documents == len(TEXTS)


def test_a_stop_while_overwrite_replaces_a_zarr_store_leaves_none_that_reads_wrong(tmp_path, tok, preprocess_tool,
                                                                                     monkeypatch, capsys):
    """--overwrite of a zarr store (a folder) removed the old folder file by file where the new one was to go: a
    SIGTERM (raised as an interrupt) or a SIGKILL in the middle left the old store with some chunk files gone, which
    opens, and zarr reads a missing chunk as fill values (zeros, SmolLM2's EOS): a later run trained on them without a
    word. Whatever the moment, the store at the prefix must be the old one, the new one, or none."""
    import shutil
    import types
    from nanotronix.data import DataError, files
    calls = []

    def stopped_midway(path, *args, **kwargs):  # removes a chunk file of the tokens, then the signal arrives
        calls.append(path)
        if len(calls) > 1:
            return shutil.rmtree(path, *args, **kwargs)
        (Path(path) / "tokens" / "c" / "0").unlink()
        raise KeyboardInterrupt

    stores = {}
    for name, texts in (("old", TEXTS), ("new", TEXTS[::-1])):
        src = _jsonl(tmp_path / f"{name}.jsonl", [json.dumps({"text": t}) for t in texts])
        args = ["--input", str(src), "--tokenizer", tok, "--output-prefix", str(tmp_path / "out"), "--format", "zarr",
                "--workers", "1", "--no-progress", "--overwrite"]
        if name == "new":  # only files' own removals (zarr clears folders with shutil.rmtree too)
            monkeypatch.setattr(files, "shutil", types.SimpleNamespace(rmtree=stopped_midway))
        assert preprocess_tool.main(args) == (0 if name == "old" else 130), capsys.readouterr().err
        stores[name] = preprocess._reference(tok, texts)
    assert calls, "the old store was not removed"
    try:
        held = preprocess._docs(tmp_path / "out.zarr")
    except DataError:
        held = None
    assert held in (stores["old"], stores["new"], None)


def test_a_run_removes_its_outputs_leftovers_not_another_outputs_nor_another_hosts(tmp_path, tok, preprocess_tool,
                                                                                  capsys):
    """What killed runs at this prefix left (each staging file of either format, with --shuffle's too) is removed;
    the staging files of `tokens.v2` (a name extending `tokens` with a dot) and of a writer of `tokens` on another
    node of a shared file system (its pid is not this host's) are not: deleting them failed that writer at its
    final rename, after hours of work."""
    import socket
    dead = subprocess.Popen(["true"])  # its process id names no process once it has ended
    dead.wait()
    host = socket.gethostname()
    ours = [f".tokens.{kind}.tmp-{dead.pid}" for kind in ("bin", "lengths", "idx", "meta.json", "unshuffled",
                                                          "unshuffled-lengths", "zarr", "zarr.replaced")]
    ours.append(f".tokens.bin.tmp-{host}-{dead.pid}")
    theirs = [f".tokens.v2.bin.tmp-{dead.pid}", f".tokens.v2.idx.tmp-{host}-{dead.pid}",
              f".tokens.bin.tmp-node-2-{dead.pid}"]
    for name in ours + theirs:
        (tmp_path / name).write_text("x\n")
    src = _jsonl(tmp_path / "in.jsonl", [json.dumps({"text": t}) for t in TEXTS])
    capsys.readouterr()
    assert preprocess_tool.main(["--input", str(src), "--tokenizer", tok, "--output-prefix", str(tmp_path / "tokens"),
                                 "--no-progress", "--workers", "1"]) == 0
    assert "note: removed what an interrupted run left beside the output" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted(theirs)


@pytest.mark.parametrize("fmt", ["megatron", "zarr"])
def test_a_stop_that_lands_once_the_store_is_complete_says_so(tmp_path, tok, preprocess_tool, capsys, monkeypatch,
                                                             fmt):
    """Ctrl-C or SIGTERM after the last rename (while the staging files are cleaned up, or the folder fsynced) stops a
    run whose store is complete: it said 'no output was written', which was untrue; the exit code stays the
    signal's. Stopped just before that rename, it is still no output."""
    from nanotronix.cli import Terminated
    from nanotronix.data import files, megatron_store
    from nanotronix.data.zarr_store import zarr_output_path

    final = Path(zarr_output_path(str(tmp_path / "out"))) if fmt == "zarr" else tmp_path / "out.idx"
    real_commit = files.commit

    def stop_around_the_last_rename(when, signal_class):
        def commit(temp, target, **kwargs):
            if Path(target) == final and when == "before":
                raise signal_class()
            real_commit(temp, target, **kwargs)
            if Path(target) == final:
                raise signal_class()
        return commit

    src = _jsonl(tmp_path / "in.jsonl", [json.dumps({"text": t}) for t in TEXTS])
    args = ["--input", str(src), "--tokenizer", tok, "--output-prefix", str(tmp_path / "out"), "--no-progress",
            "--workers", "1", "--format", fmt, "--overwrite"]
    for when, signal_class, code, word in (("after", KeyboardInterrupt, 130, "interrupted"),
                                           ("after", Terminated, 143, "terminated"),
                                           ("before", KeyboardInterrupt, 130, "interrupted")):
        stop = stop_around_the_last_rename(when, signal_class)
        monkeypatch.setattr(files, "commit", stop)
        monkeypatch.setattr(megatron_store, "commit", stop)
        if fmt == "zarr":
            from nanotronix.data import zarr_store
            monkeypatch.setattr(zarr_store, "commit", stop)
        files.remove_quietly(final)
        capsys.readouterr()
        assert preprocess_tool.main(args) == code
        err = capsys.readouterr().err.strip()
        if when == "after":
            written = final if fmt == "zarr" else tmp_path / "out"  # what the summary line names
            assert err == f"preprocess: {word} once the store was complete: {written} is written whole", err
            assert preprocess._docs(tmp_path / "out") == preprocess._reference(tok, TEXTS)
        else:
            assert err == "preprocess: interrupted; no output was written", err
            assert not final.exists()
        assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_store_of_another_kind_by_the_same_name_is_refused_and_never_read_by_choice(tmp_path, tok, preprocess_tool,
                                                                                      capsys):
    """`--format zarr` onto a prefix holding a Megatron store (with --overwrite too), or `--shard 0/1` (a folder of
    that name): before, it wrote PREFIX.zarr (PREFIX/) beside PREFIX.bin/.idx and said so, and every reader of PREFIX
    went on reading the old Megatron store. Now refused; --overwrite of the same kind still replaces. A name that
    opens two stores anyway (copied in) is one line in every reader, not open_store's first pick."""
    src = _jsonl(tmp_path / "in.jsonl", [json.dumps({"text": t}) for t in TEXTS])
    prefix = tmp_path / "d" / "tokens"
    common = ["--input", str(src), "--tokenizer", tok, "--no-progress", "--workers", "1"]
    assert preprocess_tool.main(common + ["--output-prefix", str(prefix)]) == 0
    for extra in (["--format", "zarr"], ["--format", "zarr", "--overwrite"], ["--shard", "0/1"]):
        capsys.readouterr()
        assert preprocess_tool.main(common + ["--output-prefix", str(prefix), *extra]) == 2, extra
        assert capsys.readouterr().err == (
            f"error: --output-prefix {prefix}: {prefix}.bin/.idx is another token store by this name (a run would not "
            "know which to read; --overwrite replaces only a store of the kind written): write to another prefix, or "
            "remove it first\n"), extra
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["tokens.bin", "tokens.idx", "tokens.meta.json"]
    assert preprocess_tool.main(common + ["--output-prefix", str(prefix), "--overwrite"]) == 0
    assert preprocess_tool.main(common + ["--output-prefix", str(tmp_path / "z" / "tokens"), "--format", "zarr"]) == 0
    (tmp_path / "z" / "tokens.zarr").rename(prefix.parent / "tokens.zarr")
    with pytest.raises(DataError, match=rf"^token store {prefix}: names 2 stores \({prefix}.bin/.idx, "
                                        rf"{prefix}.zarr\): name one by its own path"):
        open_store(prefix)
    assert open_store(f"{prefix}.zarr").num_documents == open_store(f"{prefix}.bin").num_documents == len(TEXTS)


def test_what_a_run_killed_between_its_renames_left_is_said_as_such(tmp_path, tok, preprocess_tool, capsys):
    """A SIGKILL (or a power loss) between the sidecar's or .bin's rename and the .idx's leaves a .bin and sidecar
    without .idx: no store. The rerun said "PREFIX.bin already exists ... to replace that store"; it now says what
    that is, and --overwrite writes the store."""
    src = _jsonl(tmp_path / "in.jsonl", [json.dumps({"text": t}) for t in TEXTS])
    prefix = tmp_path / "out"
    (tmp_path / "out.bin").write_bytes(b"\0" * 64)
    (tmp_path / "out.meta.json").write_text("{}")
    args = ["--input", str(src), "--tokenizer", tok, "--output-prefix", str(prefix), "--workers", "1", "--no-progress"]
    assert preprocess_tool.main(args) == 2
    assert capsys.readouterr().err == (
        f"error: --output-prefix {prefix}: {prefix}.bin is there without {prefix}.idx, which is no store (what a run "
        "killed as it renamed its files into place leaves); pass --overwrite to write it\n")
    assert preprocess_tool.main(args + ["--overwrite"]) == 0
    assert open_store(prefix).num_documents == len(TEXTS)


@pytest.mark.parametrize("fmt", ["megatron", "zarr"])
def test_a_store_another_run_wrote_to_the_prefix_meanwhile_is_left_as_it_is(tmp_path, tok, preprocess_tool, capsys,
                                                                           monkeypatch, fmt):
    """Two runs started on one --output-prefix without --overwrite: both found it free at the start, and the later
    to finish replaced the other's store, both saying "wrote" (another run's 200 documents read as this run's). Now
    the later one is refused in one line and the first one's store stays whole."""
    from nanotronix.data.megatron_store import MegatronWriter
    from nanotronix.data.zarr_store import ZarrWriter

    src = _jsonl(tmp_path / "in.jsonl", [json.dumps({"text": t}) for t in TEXTS])
    other = _jsonl(tmp_path / "other.jsonl", [json.dumps({"text": "the other run"})])
    prefix = tmp_path / "out"
    common = ["--tokenizer", tok, "--output-prefix", str(prefix), "--workers", "1", "--no-progress", "--format", fmt]
    writer_class = MegatronWriter if fmt == "megatron" else ZarrWriter
    real_finalize = writer_class.finalize

    def another_run_finished_first(self, sidecar=None):  # a process of its own, as another job's run is
        done = subprocess.run([sys.executable, "tools/preprocess.py", "--input", str(other), *common], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        real_finalize(self, sidecar)

    monkeypatch.setattr(writer_class, "finalize", another_run_finished_first)
    capsys.readouterr()
    assert preprocess_tool.main(["--input", str(src), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: --output-prefix {prefix}") and err.endswith(
        " while this run tokenized (another run writing the same prefix?): left as it is; this run's store is not "
        "written"), err
    assert open_store(f"{prefix}.zarr" if fmt == "zarr" else prefix).num_documents == 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
