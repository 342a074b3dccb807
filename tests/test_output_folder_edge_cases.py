"""Cases found by a mutation review of the converters' output folder (nanotronix/checkpoint/output_folder.py), the Hub
upload (nanotronix/checkpoint/hub.py) and tools/inspect_store.py's text summary: cases the other tests left open.
~10 s (a few in-process conversions of the tiny checkpoint)."""
from __future__ import annotations

import numpy as np
import pytest
import transformers

from convert_hf_helpers import conversion_source, one_error_line, tool_main, trained_checkpoint
from helpers import load_tool

from nanotronix.data.megatron_store import MegatronWriter
from nanotronix.errors import UserError


def test_an_empty_folder_is_a_free_output(tmp_path, capsys):
    """An output folder made beforehand and still empty (`mkdir out`, a job script's mkdir -p) is as good as an absent
    one: written without --overwrite (an empty folder counted as existing asked for --overwrite)."""
    trained_checkpoint(tmp_path / "run")
    out = tmp_path / "hf"
    out.mkdir()
    assert tool_main("convert_to_hf")(["--checkpoint", str(tmp_path / "run"), "--output", str(out),
                                       "--no-progress"]) == 0, capsys.readouterr().err
    assert transformers.AutoConfig.from_pretrained(out).model_type == "llama"  # transformers reads what was written


def test_an_output_holding_the_current_folder_is_refused_even_when_replaceable(tmp_path, monkeypatch):
    """`--output ..` (or its full path) from inside an earlier export (which --overwrite may replace) holds the
    current folder: refused in one line, and the earlier export, with the shell's folder in it, stays (only
    `--output .` was tested; a parent of the current folder went through to the replace)."""
    run = tmp_path / "run"
    trained_checkpoint(run)
    hf = tmp_path / "hf"
    assert tool_main("convert_to_hf")(["--checkpoint", str(run), "--output", str(hf), "--no-progress"]) == 0
    (hf / "notes").mkdir()
    (hf / "notes" / "keep.txt").write_text("mine")
    monkeypatch.chdir(hf / "notes")
    for output in (str(hf), ".."):
        said = one_error_line("convert_to_hf", "--checkpoint", str(run), "--output", output, "--overwrite")
        assert "it is or holds the current folder" in said, said
        assert (hf / "notes" / "keep.txt").read_text() == "mine" and (hf / "config.json").is_file()
    assert (hf / "notes" / "keep.txt").read_text() == "mine" and (hf / "config.json").is_file()


@pytest.mark.parametrize("tool", ["convert_to_hf", "convert_from_hf"])
def test_overwrite_leaves_a_run_that_appeared_during_the_conversion(tmp_path, capsys, monkeypatch, tool):
    """As test_convert_hf_cli's test of an output that appeared while converting, but with --overwrite: what appeared
    (a training run's steps and lock, there by the time the conversion ends) is no earlier output, so the check made
    again before the replace leaves it as it is, in one line (without that second check, --overwrite replaced the
    live run's folder: only the case without --overwrite, caught by commit() itself, was tested)."""
    from nanotronix.checkpoint import output_folder
    source = conversion_source(tool, tmp_path)
    out = tmp_path / "out"
    real_check = output_folder._check_output
    checks = []

    def a_run_started_there_during_the_conversion(output, *args):
        checks.append(output)
        if len(checks) == 2:  # the check after the body: the conversion has written its staging folder by now
            (out / "step_0000001").mkdir(parents=True)
            (out / ".lock").write_text("4242")
        real_check(output, *args)

    monkeypatch.setattr(output_folder, "_check_output", a_run_started_there_during_the_conversion)
    capsys.readouterr()
    assert tool_main(tool)([*source, "--output", str(out), "--overwrite", "--no-progress"]) == 2
    assert "is not " in capsys.readouterr().err and len(checks) == 2
    assert sorted(p.name for p in out.iterdir()) == [".lock", "step_0000001"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("repo_id", ["a/b/c", "/name", "owner/", "name"])
def test_a_repo_id_not_of_the_form_owner_name_is_refused_before_any_work(repo_id):
    """check_hub_access refuses what the Hub would refuse only after the conversion (minutes later): exactly one `/`
    with a non-empty owner and name (huggingface_hub's repo id rule)."""
    from nanotronix.checkpoint.hub import check_hub_access
    with pytest.raises(UserError, match="is not a repository id of the form owner/name"):
        check_hub_access(repo_id)


def test_summary_shows_zero_values_and_document_zero(tmp_path, capsys):
    """The text summary prints a 0 as 0 (an EOS id of 0, no skipped records), not as '-' (missing), and `--doc 0`
    prints document 0 (a falsy 0 printed nothing). The expected tokens are the ones written."""
    docs = [[5, 6, 7, 0], [9, 0]]
    writer = MegatronWriter(tmp_path / "s", np.uint16)
    writer.add_documents(np.concatenate([np.array(d) for d in docs]), np.array([len(d) for d in docs]))
    writer.finalize({"tokenizer": {"name": "tiny", "sha256": "ab" * 32, "vocab_size": 400, "eos_id": 0},
                     "eos_appended": True, "num_documents": 2, "num_tokens": 6})
    assert load_tool("inspect_store").main([str(tmp_path / "s"), "--doc", "0"]) == 0
    out = capsys.readouterr().out
    assert "\neos_id            0\n" in out, out
    assert "document 0 (4 tokens): 5 6 7 0" in out, out


def test_an_output_whose_staging_name_is_too_long_leaves_no_folders_it_made(tmp_path):
    """An output name the file system takes (250 bytes) whose staging name (`.NAME.tmp-HOST-PID`) it does not: one
    line, and the folders made above the output for it go again (they stayed: only a file in the path, the other
    failure of the same mkdir, was cleaned up after)."""
    trained_checkpoint(tmp_path / "run")
    out = tmp_path / "new" / "deeper" / ("n" * 250)
    said = one_error_line("convert_to_hf", "--checkpoint", str(tmp_path / "run"), "--output", str(out))
    assert "cannot write there" in said, said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
