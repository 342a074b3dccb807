"""The conversion commands (tools/convert_to_hf.py, tools/convert_from_hf.py) on bad input and interruption:
--help, one-line errors (bad flags, a Hub push without token / offline or failing, weights that do not fit their
config), --output / --overwrite that never destroy the input or other files, and no half-written output after
SIGTERM, a SIGKILL or a step pruned while it is read. Costs ~10 s (a few CLI subprocesses)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import transformers

from convert_hf_helpers import _hf_original, cli, conversion_source, one_error_line, tool_main, trained_checkpoint
from helpers import ROOT

from nanotronix.checkpoint.hf_export import export_to_hf
from nanotronix.checkpoint.paths import MANIFEST_NAME


def test_cli_help_and_bad_input(tmp_path, capsys):
    for tool in ("convert_to_hf.py", "convert_from_hf.py"):
        assert cli(tool, "--help").returncode == 0
    (tmp_path / "weights_only_bin").mkdir()
    (tmp_path / "weights_only_bin" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    cases = [
        ("convert_to_hf", ["--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "o")],
         "error: checkpoint not found: "),
        ("convert_from_hf", ["--hf", str(tmp_path), "--output", str(tmp_path / "o")], "has no config.json"),
        ("convert_from_hf", ["--hf", str(tmp_path / "weights_only_bin"), "--output", str(tmp_path / "o")],
         "config.json: "),
        ("convert_to_hf", ["--checkpoint", str(tmp_path), "--output", str(tmp_path / "o"), "--max-shard-size",
                           "lots"], "--max-shard-size: cannot read 'lots'"),
        ("convert_to_hf", ["--checkpoint", str(tmp_path), "--output", str(tmp_path / "o"), "--max-shard-size",
                           "0GB"], "--max-shard-size: must be more than 0 bytes"),
        ("convert_to_hf", ["--checkpoint", str(tmp_path), "--output", str(tmp_path / "o"), "--private"],
         "--private: applies to the Hub repo that --push-to-hub creates"),
    ]
    for tool, args, message in cases:
        code = tool_main(tool)(args)
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "o").exists()



def test_a_tilde_in_every_path_flag_is_the_home_folder(tmp_path, capsys, monkeypatch):
    """`--output=~/hf` reaches the tool with its `~` (a shell expands it only in a word of its own): --checkpoint was
    expanded but --output made a folder named `~` in the working folder, reported as written to `~/hf`, and --hf
    said the folder had no config.json."""
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    trained_checkpoint(home / "run")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert tool_main("convert_to_hf")(["--checkpoint=~/run", "--output=~/hf", "--no-progress"]) == 0
    assert tool_main("convert_from_hf")(["--hf=~/hf", "--output=~/imported", "--no-progress"]) == 0
    assert f"to {home / 'hf'} " in capsys.readouterr().out
    assert (home / "hf" / "config.json").is_file() and (home / "imported").is_dir() and list(work.iterdir()) == []


@pytest.mark.parametrize("env, message", [
    ({"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_fake"}, "offline mode"),
    ({"HF_HUB_OFFLINE": "0"}, "no Hugging Face token"),
])
def test_push_to_hub_fails_early_with_one_line(tmp_path, env, message):
    trained_checkpoint(tmp_path / "run")
    clean = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    base = {**clean, "HF_HOME": str(tmp_path / "hf_home"), **env}
    proc = subprocess.run([sys.executable, "tools/convert_to_hf.py", "--checkpoint", str(tmp_path / "run"),
                           "--output", str(tmp_path / "hf"), "--push-to-hub", "someone/tiny"], env=base,
                          capture_output=True, text=True, cwd=ROOT, timeout=180)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "hf").exists()  # failed before converting



def test_push_to_hub_failure_keeps_the_complete_export(tmp_path):
    """The real huggingface_hub client up to its first request, against an endpoint where nothing listens (no
    network here): one error line naming the failure, exit 2, and the converted folder complete on disk."""
    import socket
    trained_checkpoint(tmp_path / "run")
    with socket.socket() as s:  # a free local port, closed again: connections to it are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    clean = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE")}
    env = {**clean, "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": "hf_fake", "HF_HUB_OFFLINE": "0",
           "HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    proc = subprocess.run([sys.executable, "tools/convert_to_hf.py", "--checkpoint", str(tmp_path / "run"),
                           "--output", str(tmp_path / "hf"), "--push-to-hub", "someone/tiny"], env=env,
                          capture_output=True, text=True, cwd=ROOT, timeout=180)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines[-1].startswith("error: --push-to-hub someone/tiny: upload failed")
    assert str(tmp_path / "hf") in lines[-1]  # where the complete export is
    assert transformers.AutoConfig.from_pretrained(tmp_path / "hf").model_type == "llama"
    assert list((tmp_path / "hf").glob("*.safetensors"))



def test_output_and_overwrite_never_destroy_the_input_or_other_files(tmp_path):
    """--overwrite replaces an earlier output of the same kind only: not the run being read (it used to delete the
    whole run and exit 0), not the HF folder being imported, not a training run, not someone's other files."""
    run = tmp_path / "run"
    trained_checkpoint(run)
    files = sorted(p.relative_to(tmp_path) for p in run.rglob("*"))
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("years of work")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")

    for output in (run, run / "step_0000002", tmp_path, run / "step_0000002" / "hf", run / "hf"):
        said = one_error_line("convert_to_hf", "--checkpoint", str(run), "--output", str(output), "--overwrite")
        assert "it is, holds or lies inside the input" in said
    assert "is not a Hugging Face model folder" in one_error_line(
        "convert_to_hf", "--checkpoint", str(run), "--output", str(notes), "--overwrite")
    assert "cannot write there" in one_error_line("convert_to_hf", "--checkpoint", str(run), "--output",
                                                  str(blocker / "hf"))
    link = tmp_path / "link"
    link.symlink_to(notes)
    assert "is a symbolic link" in one_error_line("convert_to_hf", "--checkpoint", str(run), "--output",
                                                  str(link), "--overwrite")
    assert sorted(p.relative_to(tmp_path) for p in run.rglob("*")) == files
    assert (notes / "thesis.tex").read_text() == "years of work"

    hf = tmp_path / "hf"
    assert tool_main("convert_to_hf")(["--checkpoint", str(run), "--output", str(hf), "--no-progress"]) == 0
    assert tool_main("convert_to_hf")(["--checkpoint", str(run), "--output", str(hf), "--overwrite",
                                       "--no-progress"]) == 0  # an earlier export is replaced
    assert "it is, holds or lies inside the input" in one_error_line("convert_from_hf", "--hf", str(hf), "--output",
                                                                     str(hf), "--overwrite")
    said = one_error_line("convert_from_hf", "--hf", str(hf), "--output", str(run), "--overwrite")
    assert "is not an earlier import" in said
    imported = tmp_path / "imported"
    for _ in range(2):  # the second replaces the first
        assert tool_main("convert_from_hf")(["--hf", str(hf), "--output", str(imported), "--overwrite",
                                             "--no-progress"]) == 0
    assert sorted(p.relative_to(tmp_path) for p in run.rglob("*")) == files
    assert (hf / "config.json").is_file() and not list(tmp_path.glob(".*tmp*"))



def test_weights_that_do_not_fit_their_config_are_one_line(tmp_path):
    """A config beside the weights that does not describe them (an edited checkpoint.json or config.json), damaged
    safetensors, a config.json that is not an object: one line naming the tensor or file, never a traceback."""
    run = tmp_path / "run"
    folder, _ = trained_checkpoint(run)
    hf = export_to_hf(run, tmp_path / "hf", progress=False, log=lambda _: None)

    edited = tmp_path / "edited"
    edited.mkdir()
    shutil.copytree(folder, edited / folder.name)
    manifest = json.loads((edited / folder.name / "checkpoint.json").read_text())
    manifest["config"]["model"]["intermediate_size"] *= 2
    (edited / folder.name / "checkpoint.json").write_text(json.dumps(manifest))
    said = one_error_line("convert_to_hf", "--checkpoint", str(edited), "--output", str(tmp_path / "o"))
    assert "tensor layers.0.mlp.gate_up_proj.weight is [" in said and "but the model config in checkpoint.json" in said

    config = json.loads((hf / "config.json").read_text())
    wrong = tmp_path / "wrong"
    shutil.copytree(hf, wrong)
    (wrong / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] * 2}))
    said = one_error_line("convert_from_hf", "--hf", str(wrong), "--output", str(tmp_path / "o"))
    assert said.startswith(f"error: --hf: {wrong}: tensor model.layers.0.mlp.gate_proj.weight is [")
    (wrong / "config.json").write_text(json.dumps(config))
    weights = wrong / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert one_error_line("convert_from_hf", "--hf", str(wrong), "--output", str(tmp_path / "o")).startswith(
        f"error: --hf: {weights}: cannot be read as safetensors (")
    (wrong / "config.json").write_text("[1]")
    assert one_error_line("convert_from_hf", "--hf", str(wrong), "--output", str(tmp_path / "o")) == (
        f"error: --hf: {wrong / 'config.json'}: a JSON array, not an object")
    (wrong / "config.json").write_text(json.dumps(config)[:-1] + ', "vocab_size": ' + "1" * 5000 + "}")
    assert one_error_line("convert_from_hf", "--hf", str(wrong), "--output", str(tmp_path / "o")) == (
        f"error: --hf: {wrong / 'config.json'}: holds an integer of 5000 digits, more than Python's JSON reader (and "
        "so transformers) reads (4300)")  # was json's advice to raise the interpreter's limit
    assert not (tmp_path / "o").exists()



def test_a_manifest_model_config_the_trainer_refuses_is_not_exported(tmp_path, capsys):
    """A checkpoint.json whose model section was edited into values the trainer refuses, with the weights' shapes
    unchanged (rope_theta 0, a non-number, a string for a bool): one line naming the field, as the import says it,
    not a config.json that transformers and the import refuse (before: exported, exit code 0)."""
    folder, _ = trained_checkpoint(tmp_path / "run")
    manifest_file = folder / "checkpoint.json"
    manifest = json.loads(manifest_file.read_text())
    for field, value, message in [("rope_theta", 0.0, "model.rope_theta: must be positive"),
                                  ("rope_theta", "big", "model.rope_theta: expected a number, got 'big'"),
                                  ("tie_word_embeddings", "yes", "model.tie_word_embeddings: expected true or false"),
                                  ("rms_norm_eps", -1e-5, "model.rms_norm_eps: must be positive")]:
        edited = json.loads(json.dumps(manifest))
        edited["config"]["model"][field] = value
        manifest_file.write_text(json.dumps(edited))
        capsys.readouterr()
        code = tool_main("convert_to_hf")(["--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "o"),
                                           "--no-progress"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith(
            f"error: checkpoint {folder}: {MANIFEST_NAME}: {message}"), (field, value, code, lines)
        assert not (tmp_path / "o").exists()



@pytest.mark.timeout(60)
def test_a_layer_count_edited_in_the_manifest_is_refused_before_the_model_is_built(tmp_path, capsys):
    """num_hidden_layers 4 -> 400000 in checkpoint.json: one line at once, from the layers the weights hold, instead
    of building a 400000-layer model on the meta device (half an hour) to compare its shapes with them."""
    folder, _ = trained_checkpoint(tmp_path / "run")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    layers = manifest["config"]["model"]["num_hidden_layers"]
    manifest["config"]["model"]["num_hidden_layers"] = 400_000
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    code = tool_main("convert_to_hf")(["--checkpoint", str(folder), "--output", str(tmp_path / "o"), "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines == [
        f"error: checkpoint {folder} holds {layers} decoder layers, but the model config in {MANIFEST_NAME} has "
        "num_hidden_layers=400000 (the manifest was edited, or the files mixed up)"]
    assert not (tmp_path / "o").exists()


def test_overwrite_of_an_import_a_live_run_trains_from_is_refused(tmp_path):
    """A run whose checkpoint.dir is the import's folder holds its lock until it ends, its first save maybe hours
    away: --overwrite then would put another import's step 0 under it, beside which its steps (trained from the old
    weights) would land, and its lock would no longer cover the folder. Refused in one line naming the holder; once
    the run has let go, the same command replaces the folder."""
    import fcntl

    hf = _hf_original(tmp_path / "hf", untied=False)
    imported = tmp_path / "imported"
    assert tool_main("convert_from_hf")(["--hf", str(hf), "--output", str(imported), "--no-progress"]) == 0
    before = (imported / "step_0000000" / MANIFEST_NAME).read_text()
    with open(imported / ".lock", "a+") as run:  # the live run's hold (Checkpointer: rank 0, for the run's life)
        fcntl.flock(run, fcntl.LOCK_EX)
        run.write("host trainer pid 4242 since then\n")
        run.flush()
        said = one_error_line("convert_from_hf", "--hf", str(hf), "--output", str(imported), "--overwrite")
    assert said.startswith(f"error: --output {imported} is in use by another run (host trainer pid 4242 since then;")
    assert (imported / "step_0000000" / MANIFEST_NAME).read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "imported"]  # no staging folder left beside it
    assert tool_main("convert_from_hf")(["--hf", str(hf), "--output", str(imported), "--overwrite",
                                         "--no-progress"]) == 0
    assert (imported / "step_0000000" / MANIFEST_NAME).read_text() != before  # saved_at: a new import


def test_overwrite_replaces_only_a_bare_import_and_dot_is_refused(tmp_path, capsys, monkeypatch):
    """--overwrite of an import's folder: only when it holds the import's step 0, `latest` and a run's lock alone, not
    when steps set aside by tools/rollback.py (a run rolled back to its imported step 0) or the user's files lie
    beside them. `--output .` (the current folder) is one line for both converters, not a traceback."""
    hf = _hf_original(tmp_path / "hf", untied=False)
    capsys.readouterr()  # transformers' own progress bar
    imported = tmp_path / "imported"
    assert tool_main("convert_from_hf")(["--hf", str(hf), "--output", str(imported), "--no-progress"]) == 0
    capsys.readouterr()
    assert tool_main("convert_from_hf")(["--hf", str(hf), "--output", str(imported)]) == 2  # with its progress bar
    assert capsys.readouterr().err == f"error: output {imported} already exists (remove it or pass --overwrite)\n"
    (imported / "rolled_back_after_step_0000000-20261204-000000").mkdir()
    (imported / "rolled_back_after_step_0000000-20261204-000000" / "keep").write_text("trained steps")
    code = tool_main("convert_from_hf")(["--hf", str(hf), "--output", str(imported), "--overwrite", "--no-progress"])
    assert code == 2 and "is not an earlier import" in capsys.readouterr().err
    assert (imported / "rolled_back_after_step_0000000-20261204-000000" / "keep").is_file()
    shutil.rmtree(imported / "rolled_back_after_step_0000000-20261204-000000")
    (imported / ".lock").write_text("host h pid 1\n")  # left by a run that trained from it and saved nothing
    assert tool_main("convert_from_hf")(["--hf", str(hf), "--output", str(imported), "--overwrite",
                                         "--no-progress"]) == 0
    capsys.readouterr()
    assert tool_main("inspect_checkpoint")([str(imported)]) == 0  # where it came from, not its whole config.json
    assert f"imported from  {hf.resolve()} (Hugging Face)\n" in capsys.readouterr().out

    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    for tool, source in (("convert_from_hf", ["--hf", str(hf)]), ("convert_to_hf", ["--checkpoint", str(imported)])):
        code = tool_main(tool)([*source, "--output", ".", "--no-progress"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and lines == ["error: --output .: it is or holds the current folder; name a folder "
                                       "(e.g. ../NAME)"], lines
    assert not list(here.iterdir())



@pytest.mark.parametrize("tool", ["convert_to_hf", "convert_from_hf"])
def test_sigterm_leaves_no_half_written_output(tmp_path, capsys, monkeypatch, tool):
    """SIGTERM (kill, timeout, a Slurm time limit) in the middle of a conversion cleans up as Ctrl-C does: one line,
    exit 143, and neither the output nor its hidden staging folder is left (before, SIGTERM ended the process on
    the spot and left the staging folder, hundreds of MB, behind)."""
    import signal

    from nanotronix.checkpoint import output_folder
    source = conversion_source(tool, tmp_path)
    capsys.readouterr()
    def commit_when_killed(*args, **kwargs):  # the signal arrives while the output is still being written
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the conversion")

    monkeypatch.setattr(output_folder, "commit", commit_when_killed)
    out = tmp_path / "out"
    assert tool_main(tool)([*source, "--output", str(out), "--no-progress"]) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == "terminated"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handed back when the command ended



@pytest.mark.parametrize("tool", ["convert_to_hf", "convert_from_hf"])
def test_a_failed_conversion_leaves_no_folders_it_made(tmp_path, capsys, monkeypatch, tool):
    """--output in folders yet to be made, and a failure after they were made (an export's --tokenizer that is not
    there, an import's full disk): one line, and neither the output nor the folders above it are left (they were,
    empty: the property test of test_cli_properties found it). A folder above that holds anything stays."""
    import errno

    from nanotronix.checkpoint import hf_import
    if tool == "convert_to_hf":
        trained_checkpoint(tmp_path / "run")
        args = ["--checkpoint", str(tmp_path / "run"), "--tokenizer", str(tmp_path / "no_tokenizer.json")]
        said = f"error: tokenizer not found: {tmp_path / 'no_tokenizer.json'}"
    else:
        args = ["--hf", str(_hf_original(tmp_path / "hf", untied=False))]
        said = "error: No space left on device: __0_0.distcp"

        def full_disk(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "__0_0.distcp")
        monkeypatch.setattr(hf_import, "from_hf", full_disk)
    before = sorted(p.name for p in tmp_path.iterdir())
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "a_file").write_text("x")
    for out in (tmp_path / "new" / "deeper" / "out", tmp_path / "kept" / "new" / "out"):
        capsys.readouterr()
        assert tool_main(tool)([*args, "--output", str(out), "--no-progress"]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == said
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "kept"])
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["a_file"]


@pytest.mark.parametrize("failure, code, said", [
    ("sigterm", 143, "terminated"),
    ("full_disk", 2, "error: No space left on device: __0_0.distcp")])
def test_what_stops_the_import_while_it_writes_is_one_line(tmp_path, capsys, monkeypatch, failure, code, said):
    """SIGTERM (or Ctrl-C) or a full disk while the import writes its weights, most of its time: the same line and
    exit code as at any other moment, and nothing left (before: DCP wrapped it in its CheckpointException, whose
    multi-line traceback the command printed, exit 1)."""
    import errno
    import signal

    from nanotronix.checkpoint import hf_import
    source = _hf_original(tmp_path / "hf", untied=False)
    real = hf_import.from_hf

    def stopped_while_writing(*args, **kwargs):  # DCP asks for each tensor as it writes it
        if failure == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "__0_0.distcp")
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_import, "from_hf", stopped_while_writing)
    capsys.readouterr()
    out = tmp_path / "out"
    assert tool_main("convert_from_hf")(["--hf", str(source), "--output", str(out), "--no-progress"]) == code
    assert capsys.readouterr().err.strip().splitlines() == [said]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]


def _assert_export_says_the_step_was_pruned(folder, tmp_path, capsys) -> None:
    """convert_to_hf of `folder`, pruned while it runs: exit 2, the one line a prune gets, no output left."""
    capsys.readouterr()
    code = tool_main("convert_to_hf")(["--checkpoint", str(folder), "--output", str(tmp_path / "hf"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: checkpoint {folder} was removed while it was being read (a running run's "
                                 "checkpoint.keep_last prunes its older steps): read a step it keeps (a milestone: "
                                 "checkpoint.keep_every / keep_steps) or a copy of the step"], err
    assert not [p.name for p in tmp_path.iterdir() if "hf" in p.name]


@pytest.mark.parametrize("at_call", [1, 3])
def test_a_step_pruned_while_it_is_exported_is_said_in_one_line(tmp_path, capsys, monkeypatch, at_call):
    """A running run's keep_last prunes the step an export is reading (an export of a large model takes minutes):
    one line saying so, exit 2, no output (before: DCP's tracebacks, then "metadata is None"). At the first read,
    while the files are hashed, too (that said "checkpoint file missing": damage, not a prune)."""
    from nanotronix.checkpoint.reader import CheckpointReader
    folder, _ = trained_checkpoint(tmp_path / "run")
    real, calls = CheckpointReader.tensors, []

    def pruned_meanwhile(self, names, dtype=None):
        calls.append(names)
        if len(calls) == at_call:  # what paths.prune does: rename aside, then delete
            folder.rename(folder.with_name(".pruned"))
        return real(self, names, dtype)

    monkeypatch.setattr(CheckpointReader, "tensors", pruned_meanwhile)
    _assert_export_says_the_step_was_pruned(folder, tmp_path, capsys)


@pytest.mark.parametrize("module, read", [("manifest", "read_manifest"), ("manifest", "check_sizes"),
                                          ("storage", "dcp_metadata")])
def test_a_step_pruned_before_the_reader_opens_it_is_said_as_pruned(tmp_path, capsys, monkeypatch, module, read):
    """The step is pruned after the command chose it but before the reader read its manifest, sizes or DCP .metadata:
    the same line as a prune during the tensor reads (before: "cannot read .../.metadata: [Errno 2] No such file or
    directory", or the manifest said missing, as if the step were damaged)."""
    import importlib

    folder, _ = trained_checkpoint(tmp_path / "run")
    where = importlib.import_module(f"nanotronix.checkpoint.{module}")
    real = getattr(where, read)

    def pruned_first(*args, **kwargs):
        if folder.is_dir():  # what paths.prune does: rename aside, then delete
            folder.rename(folder.with_name(".pruned"))
        return real(*args, **kwargs)

    monkeypatch.setattr(where, read, pruned_first)
    _assert_export_says_the_step_was_pruned(folder, tmp_path, capsys)


@pytest.mark.parametrize("failure, code, said", [
    ("sigterm", 143, "terminated"),
    ("ctrl_c", 130, "interrupted"),
    ("eio", 2, "error: cannot read checkpoint {folder} (on rank 0: OSError: [Errno 5] Input/output error: "
               "'__0_0.distcp')")])
def test_what_stops_the_export_while_it_reads_is_one_line(tmp_path, capsys, monkeypatch, failure, code, said):
    """SIGTERM, Ctrl-C or an I/O error while DCP reads the checkpoint, most of an export's time: the command's own line
    and exit code, and no output left (before: DCP wrapped the signal's exception in its CheckpointException, said as
    "error: cannot read checkpoint ... (on rank 0: Terminated: )", exit 2, which a scheduler takes for bad input)."""
    import errno
    import signal

    from torch.distributed.checkpoint import FileSystemReader
    folder, _ = trained_checkpoint(tmp_path / "run")
    real = FileSystemReader.read_data

    def stopped_while_reading(self, plan, planner):
        if failure == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        elif failure == "ctrl_c":
            raise KeyboardInterrupt
        else:
            raise OSError(errno.EIO, os.strerror(errno.EIO), "__0_0.distcp")
        return real(self, plan, planner)

    monkeypatch.setattr(FileSystemReader, "read_data", stopped_while_reading)
    capsys.readouterr()
    assert tool_main("convert_to_hf")(["--checkpoint", str(folder), "--output", str(tmp_path / "hf"),
                                       "--no-progress"]) == code
    assert capsys.readouterr().err.strip().splitlines() == [said.format(folder=folder)]
    assert not [p.name for p in tmp_path.iterdir() if "hf" in p.name]



def test_what_a_killed_conversion_left_is_removed(tmp_path, capsys):
    """SIGKILL (the OOM killer, scancel -s KILL) gives a converter no chance to remove its staging folder; the next
    conversion to that output removes the ones whose process is gone, and says so, leaving a live one alone."""
    dead = subprocess.Popen(["true"])  # its process id names no process once it has ended
    dead.wait()
    out = tmp_path / "out"
    for pid in (dead.pid, 1):  # 1: a process that is alive (init), maybe another conversion
        (tmp_path / f".out.tmp-{pid}").mkdir()
        (tmp_path / f".out.tmp-{pid}" / "model.safetensors").write_bytes(b"half")
    source = _hf_original(tmp_path / "hf", untied=False)
    capsys.readouterr()
    assert tool_main("convert_from_hf")(["--hf", str(source), "--output", str(out), "--no-progress"]) == 0
    assert f"note: removed what an interrupted run left beside the output (its process is gone): .out.tmp-{dead.pid}" \
        in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == [".out.tmp-1"]


@pytest.mark.parametrize("tool", ["convert_to_hf", "convert_from_hf"])
def test_an_output_that_appeared_during_the_conversion_is_left_as_it_is(tmp_path, capsys, monkeypatch, tool):
    """--output was free when the conversion started, and something was written there before it ended (a training run
    started in an import's folder, another conversion that finished first): commit() moved it aside and deleted it
    (a live run's steps and .lock), or the later conversion replaced the earlier one's, both saying they wrote it.
    Without --overwrite it is now left as it is, in one line, and the conversion's staging folder goes."""
    from nanotronix.checkpoint import output_folder
    source = conversion_source(tool, tmp_path)
    out = tmp_path / "out"
    real_commit = output_folder.commit

    def a_run_started_there_first(temp, final, **kwargs):
        (out / "step_0000001").mkdir(parents=True)
        (out / ".lock").write_text("4242")
        real_commit(temp, final, **kwargs)

    monkeypatch.setattr(output_folder, "commit", a_run_started_there_first)
    capsys.readouterr()
    assert tool_main(tool)([*source, "--output", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: output {out} appeared while converting (another process writing there?): left as it is; nothing "
        "written")
    assert sorted(p.name for p in out.iterdir()) == [".lock", "step_0000001"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_an_export_refuses_a_data_tokenizer_rewritten_since_the_run_trained(tmp_path, capsys):
    """A run tokenized and trained with TOK; then TOK was retrained in place (another corpus or vocabulary): the
    export shipped the new file as the model's tokenizer, with no word (generate() then decodes its ids as other
    tokens). The checkpoint keeps the sha256 of the tokenizer the stores were written with: the run's own
    data.tokenizer that is another file now is refused in one line; --tokenizer naming it ships it, with a warning."""
    from checkpoint_helpers import train_in_process
    from helpers import load_tool, tiny_config, train_tiny_tokenizer

    tok = train_tiny_tokenizer(tmp_path / "tok" / "tokenizer.json", vocab_size=300)
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": f"the cat {i} sat on the mat"}) + "\n"
                                                  for i in range(200)))
    assert load_tool("preprocess").main(["--input", str(tmp_path / "texts.jsonl"), "--tokenizer", str(tok),
                                         "--output-prefix", str(tmp_path / "tokens"), "--no-progress"]) == 0
    train_in_process(tiny_config(tmp_path, tmp_path / "tokens", data={"tokenizer": str(tok)}, model={"vocab_size": 320},
                                 train={"train_steps": 2}, checkpoint={"dir": str(tmp_path / "ckpt")}))
    run = ["--checkpoint", str(tmp_path / "ckpt"), "--no-progress"]
    assert tool_main("convert_to_hf")([*run, "--output", str(tmp_path / "hf_same")]) == 0  # unchanged: shipped
    capsys.readouterr()
    was = tok.read_text()
    train_tiny_tokenizer(tok, vocab_size=280)  # retrained into the same path
    assert tok.read_text() != was
    assert tool_main("convert_to_hf")([*run, "--output", str(tmp_path / "hf")]) == 2
    said = capsys.readouterr().err.strip()
    assert said.startswith(f"error: tokenizer {tok} (") and said.endswith(
        "rewritten since the run trained? Pass --tokenizer with the stores' tokenizer (or this one, to ship it all "
        "the same)") and "another file than the one the run's token stores were written with" in said, said
    assert not (tmp_path / "hf").exists()
    assert tool_main("convert_to_hf")([*run, "--output", str(tmp_path / "hf"), "--tokenizer", str(tok)]) == 0
    assert "warning: tokenizer" in capsys.readouterr().out and (tmp_path / "hf" / "tokenizer.json").is_file()
    # --tokenizer naming another file that cannot be the model's (more tokens than its vocabulary): the refusal
    # alone, not the "shipped as asked" warning above it
    big = train_tiny_tokenizer(tmp_path / "big" / "tokenizer.json", vocab_size=400)
    assert tool_main("convert_to_hf")([*run, "--output", str(tmp_path / "hf_big"), "--tokenizer", str(big)]) == 2
    out, err = capsys.readouterr()
    assert "warning" not in out + err and err.startswith(f"error: tokenizer {big} has ") and err.count("\n") == 1, \
        (out, err)
    assert not (tmp_path / "hf_big").exists()
