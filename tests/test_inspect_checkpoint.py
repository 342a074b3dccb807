"""tools/inspect_checkpoint.py on a real run's checkpoints: the summary against what the run itself says (its
config's parameter count, its metrics' data position) and --verify against damage done to a file (~10 s)."""
from __future__ import annotations

import json

import pytest

from checkpoint_helpers import read_metrics
from helpers import load_tool
from nanotronix.config import load_config


@pytest.fixture(scope="module")
def tool():
    return load_tool("inspect_checkpoint")


def run_tool(tool, capsys, *args):
    """The command in this process (no interpreter start-up per call): (exit code, stdout, stderr)."""
    code = tool.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_summary_of_a_run_folder_is_its_latest_step(trained, tool, capsys):
    cfg, tmp = trained
    code, out, err = run_tool(tool, capsys, tmp / "ckpt", "--json", "--verify")
    assert code == 0, err
    report = json.loads(out)
    config = load_config(cfg, [])
    assert report["path"] == str(tmp / "ckpt" / "step_0000004") and report["step"] == 4
    assert report["parameters"] == config.model.num_parameters()  # DCP's tensor sizes vs the config's formula
    assert report["consumed_tokens"] == read_metrics(tmp / "logs")[4]["consumed_tokens"]
    assert report["optimizer_state"] and report["optimizer_step"] == 4
    assert report["run_steps"] == [2, 3, 4] and report["milestones"] == [3] and report["verified"] is True
    assert report["layout"] == {"tp": 1, "pp": 1, "dp": 1, "world_size": 1}

    code, out, err = run_tool(tool, capsys, tmp / "ckpt" / "step_0000002")
    assert code == 0, err
    assert "step           2\n" in out and "AdamW moments, 2 updates" in out
    assert "run steps      3 committed: 2, 3, 4" in out
    assert "milestones     1 kept for good (checkpoint.keep_every / keep_steps): 3" in out


def test_a_damaged_latest_pointer_is_stale(trained, tool, capsys, tmp_path):
    """`latest` holding bytes that are not text (a damaged pointer file): passed over for the newest complete step,
    as a pointer naming no step is, not a UnicodeDecodeError in every command that reads the folder."""
    import shutil

    _, tmp = trained
    shutil.copytree(tmp / "ckpt", tmp_path / "ckpt")
    (tmp_path / "ckpt" / "latest").write_bytes(b"\xff\xfe")
    code, out, err = run_tool(tool, capsys, tmp_path / "ckpt", "--json")
    assert code == 0, err
    assert json.loads(out)["path"] == str(tmp_path / "ckpt" / "step_0000004")


EDITED_SUMMARIES = {  # an edit of checkpoint.json the summary has a meaning for -> (consumed tokens, milestones)
    # a dataset's count gone: samples x seq_len (KeyError before)
    "tokens gone": (lambda m: m["data"]["datasets"]["arith"].pop("consumed_tokens"), 32 * 32, [3]),
    # no counts and a seq_len that is no length: unknown ("32" * 32 before, or a TypeError)
    "seq_len text": (lambda m: (m["data"].pop("datasets"), m["config"]["train"].update(seq_len="32")), None, [3]),
    # milestones settings of no meaning: none by them (a TypeError in `step % keep_every` before); step 3 is still one
    # by the keep_steps [3] its own manifest was saved with
    "keep_every text": (lambda m: m["config"]["checkpoint"].update(keep_every="2"), 1024, [3]),
    "keep_steps number": (lambda m: m["config"]["checkpoint"].update(keep_steps=3), 1024, [3]),
}


@pytest.mark.parametrize("edit", sorted(EDITED_SUMMARIES))
def test_a_hand_edited_manifest_is_summarised_by_what_it_still_says(trained, tool, capsys, tmp_path, edit):
    import shutil

    _, tmp = trained
    change, tokens, milestones = EDITED_SUMMARIES[edit]
    shutil.copytree(tmp / "ckpt", tmp_path / "ckpt")
    manifest_file = tmp_path / "ckpt" / "step_0000004" / "checkpoint.json"
    manifest = json.loads(manifest_file.read_text())
    change(manifest)
    manifest_file.write_text(json.dumps(manifest))
    code, out, err = run_tool(tool, capsys, tmp_path / "ckpt", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["consumed_tokens"] == tokens and report["milestones"] == milestones


def test_verify_names_a_corrupted_or_truncated_file(trained, tool, capsys, tmp_path):
    import shutil

    _, tmp = trained
    step = tmp_path / "step_0000004"
    shutil.copytree(tmp / "ckpt" / "step_0000004", step)
    data = max((p for p in step.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte: the size is right, the content is not
    data.write_bytes(bytes(raw))
    assert run_tool(tool, capsys, step)[0] == 0  # the summary reads only metadata
    code, _, err = run_tool(tool, capsys, step, "--verify", "--no-progress")
    assert code == 2 and err.strip() == (
        f"error: checkpoint file damaged: {data} does not match its SHA-256 in checkpoint.json (corrupted)")
    data.write_bytes(bytes(raw[:-10]))
    for flags in (["--verify", "--no-progress"], []):  # a size is checked even without --verify (it costs nothing)
        code, _, err = run_tool(tool, capsys, step, *flags)
        assert code == 2 and err.strip() == (
            f"error: checkpoint file damaged: {data} has {len(raw) - 10} bytes, expected {len(raw)} "
            "(truncated or overwritten)")
    data.write_bytes(bytes(raw))
    metadata = step / ".metadata"
    size = metadata.stat().st_size
    metadata.write_bytes(b"\x00" * size)  # garbage of the right size: --verify names it, no UnpicklingError
    code, _, err = run_tool(tool, capsys, step, "--verify", "--no-progress")
    assert code == 2 and err.strip() == (
        f"error: checkpoint file damaged: {metadata} does not match its SHA-256 in checkpoint.json (corrupted)")
    code, _, err = run_tool(tool, capsys, step)
    assert code == 2 and err.strip() == f"error: checkpoint file damaged: {metadata} cannot be read (UnpicklingError)"
    metadata.unlink()
    code, _, err = run_tool(tool, capsys, step)
    assert code == 2 and err.startswith("error: checkpoint file missing: ") and str(metadata) in err, err


def test_verify_refuses_a_file_the_manifest_leaves_out(trained, tool, capsys, tmp_path):
    """A data file's entry deleted from checkpoint.json: --verify said "OK: every file matches its size and SHA-256"
    without reading it (flipped bits there went unnoticed); it names the file instead, as a resume does."""
    import shutil

    _, tmp = trained
    step = tmp_path / "step_0000004"
    shutil.copytree(tmp / "ckpt" / "step_0000004", step)
    manifest = json.loads((step / "checkpoint.json").read_text())
    del manifest["files"]["__0_0.distcp"]
    (step / "checkpoint.json").write_text(json.dumps(manifest))
    code, out, err = run_tool(tool, capsys, step, "--verify", "--no-progress")
    assert code == 2 and err.strip().splitlines() == [
        f"error: checkpoint file missing from checkpoint.json: {step / '__0_0.distcp'} (it cannot be verified)"]
    assert run_tool(tool, capsys, step)[0] == 0  # the summary alone reads no file's bytes: it still says what it can


@pytest.mark.parametrize("errno_code", ["EIO", "EACCES"])
def test_metadata_that_cannot_be_read_is_said_as_the_os_error_not_damage(trained, tool, capsys, monkeypatch,
                                                                         errno_code):
    """An I/O or permission error opening DCP's .metadata is said as itself, in one line, by every command that reads
    it (before: "checkpoint file damaged: ... cannot be read (OSError)", for a file that may be whole)."""
    import errno
    import os

    from torch.distributed.checkpoint.filesystem import FileSystem

    from nanotronix.evaluate import main as evaluate_main

    _, tmp = trained
    step = tmp / "ckpt" / "step_0000004"
    metadata = step / ".metadata"
    code = getattr(errno, errno_code)
    real = FileSystem.create_stream

    def failing_on_metadata(self, path, mode):
        if str(path) == str(metadata):
            raise OSError(code, os.strerror(code), str(path))
        return real(self, path, mode)

    monkeypatch.setattr(FileSystem, "create_stream", failing_on_metadata)
    said = f"error: cannot read {metadata}: [Errno {code}] {os.strerror(code)}"
    assert run_tool(tool, capsys, step)[::2] == (2, said + "\n")
    assert evaluate_main(["--checkpoint", str(step), "--data", str(tmp / "arith"), "--seq-len", "8",
                          "--num-samples", "1", "--no-progress"]) == 2
    assert capsys.readouterr().err == said + "\n"
    convert = load_tool("convert_to_hf")
    assert convert.main(["--checkpoint", str(step), "--output", str(tmp / f"hf_{errno_code}")]) == 2
    assert capsys.readouterr().err == said + "\n" and not (tmp / f"hf_{errno_code}").exists()


def test_errors_and_help(tool, capsys, tmp_path):
    code, _, err = run_tool(tool, capsys, tmp_path / "missing")
    assert code == 2 and err == f"error: checkpoint not found: {tmp_path / 'missing'}\n"
    with pytest.raises(SystemExit) as done:
        tool.main(["--help"])
    assert done.value.code == 0 and "--verify" in capsys.readouterr().out


@pytest.mark.parametrize("which", ["manifest", "size", "hash"])
def test_a_manifest_or_data_file_that_cannot_be_read_is_said_as_the_os_error(trained, tool, capsys, monkeypatch,
                                                                             which):
    """An I/O error reading checkpoint.json, stat-ing a data file (the size check) or reading it (the --verify hash)
    is the one line .metadata's is: the file and the OS error (it was Python's OSError text)."""
    import errno
    import os
    from pathlib import Path

    from nanotronix.checkpoint import manifest

    _, tmp = trained
    step = tmp / "ckpt" / "step_0000004"
    target = step / "checkpoint.json" if which == "manifest" else next(step.glob("*.distcp"))

    def failing_on_target(real):
        def call(path, *args, **kwargs):
            if str(path) == str(target):
                raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
            return real(path, *args, **kwargs)
        return call

    if which == "hash":  # manifest.file_digest opens the file with the builtin open
        monkeypatch.setattr(manifest, "open", failing_on_target(open), raising=False)
    else:
        method = {"manifest": "read_text", "size": "stat"}[which]
        monkeypatch.setattr(Path, method, failing_on_target(getattr(Path, method)))
    code, _, err = run_tool(tool, capsys, step, "--verify", "--no-progress")
    assert (code, err) == (2, f"error: cannot read {target}: [Errno {errno.EIO}] {os.strerror(errno.EIO)}\n")


@pytest.mark.parametrize("verify", [False, True])
def test_a_step_pruned_while_it_is_inspected_is_said_as_pruned(trained, tool, capsys, tmp_path, monkeypatch, verify):
    """A running run's keep_last prunes the step while it is summarised or verified (a --verify of a large step takes
    minutes): it said "checkpoint ... is incomplete: checkpoint.json is missing" (damage), after hashing every file."""
    import shutil

    from nanotronix.checkpoint import manifest

    _, tmp = trained
    step = tmp_path / "step_0000004"
    shutil.copytree(tmp / "ckpt" / "step_0000004", step)
    real, reads = manifest.read_manifest, []

    def pruned_after_the_first_read(folder, *args, **kwargs):
        reads.append(folder)
        if len(reads) == 2:  # what paths.prune does: rename aside, then delete
            step.rename(step.with_name(".pruned"))
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(manifest, "read_manifest", pruned_after_the_first_read)
    monkeypatch.setattr(tool, "read_manifest", pruned_after_the_first_read, raising=False)
    code, _, err = run_tool(tool, capsys, step, *(["--verify", "--no-progress"] if verify else []))
    assert (code, err.strip()) == (2, f"error: checkpoint {step} was removed while it was being read (a running run's "
                                      "checkpoint.keep_last prunes its older steps): read a step it keeps (a "
                                      "milestone: checkpoint.keep_every / keep_steps) or a copy of the step")
