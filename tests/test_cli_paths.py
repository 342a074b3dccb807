"""The commands' output paths, as a careless user gives them: under a file, a folder where a file is to be written, a
special file system, a reader that goes away (`| head`). Each is one `error:` line (exit 2) before the work, no
traceback, and nothing half-written left behind (nanotronix/cli.py). Costs ~15 s."""
from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT, load_tool

from nanotronix.cli import replace_file
from nanotronix.errors import UserError


def one_error(capsys, code: int) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, lines)
    return lines[0]


@pytest.fixture()
def blocker(tmp_path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("x")
    return path


def test_preprocess_refuses_unusable_output_prefixes_before_tokenizing(tmp_path, tiny_tokenizer, blocker, capsys):
    tool = load_tool("preprocess")
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "hello world"}) + "\n")
    run = ["--input", str(src), "--tokenizer", tiny_tokenizer, "--no-progress", "--output-prefix"]
    said = one_error(capsys, tool.main([*run, str(blocker / "x")]))
    assert said == f"error: --output-prefix: cannot write to {blocker} (a part of that path is a file, not a folder)"
    said = one_error(capsys, tool.main([*run, str(blocker / "x"), "--format", "zarr"]))
    assert "a part of that path is a file" in said
    said = one_error(capsys, tool.main([*run, "/proc/self/x", "--shuffle"]))  # a folder no file can be made in
    assert said.startswith("error: --output-prefix: cannot write to /proc/self (")
    said = one_error(capsys, tool.main([*run, str(tmp_path / "out") + "/"]))  # would write out/.bin, out/.idx
    assert said.startswith(f"error: --output-prefix {tmp_path / 'out'}/: names a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "in.jsonl"]


def test_preprocess_refuses_a_prefix_whose_last_part_is_dot_or_dot_dot(tmp_path, tiny_tokenizer, monkeypatch, capsys):
    """`--output-prefix .` (or `data/.`, `..`) names a folder as `data/` does, but its last part is a name to the
    writer: it wrote the hidden files `..bin`, `..idx` and `..meta.json` (`..zarr`) into that folder. Refused in one
    line saying what a prefix is, before any work, in either format."""
    tool = load_tool("preprocess")
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    monkeypatch.chdir(work)
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "hello world"}) + "\n")
    for prefix in (".", "data/.", "..", "data/.."):
        for fmt in ("megatron", "zarr"):
            said = one_error(capsys, tool.main(["--input", str(src), "--tokenizer", tiny_tokenizer, "--no-progress",
                                                "--format", fmt, "--output-prefix", prefix]))
            assert said.startswith(f"error: --output-prefix {prefix}: names a folder; give DIR/NAME"), said
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["in.jsonl", "work", "work/data"]


@pytest.mark.parametrize("fmt, written", [("megatron", ["out.bin", "out.idx", "out.meta.json"]),
                                            ("zarr", ["out.zarr"])])
def test_preprocess_replaces_a_store_only_when_asked(tmp_path, tiny_tokenizer, capsys, fmt, written):
    """A store can be days of tokenizing: a second run into its prefix (a typo, a copied command) is refused before
    any work, the store untouched; --overwrite replaces it."""
    from nanotronix.data import open_store

    tool = load_tool("preprocess")
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "hello world"}) + "\n")
    run = ["--input", str(src), "--tokenizer", tiny_tokenizer, "--no-progress", "--format", fmt,
           "--output-prefix", str(tmp_path / "out")]
    assert tool.main(run) == 0
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == written
    before = open_store(tmp_path / written[0].replace(".bin", "")).num_tokens
    src.write_text(json.dumps({"text": "hello world, and more words than before"}) + "\n")
    said = one_error(capsys, tool.main(run))
    first = "out.idx" if fmt == "megatron" else "out.zarr"
    assert said == (f"error: --output-prefix {tmp_path / 'out'}: {tmp_path / first} already exists; pass "
                    "--overwrite to replace that store")
    assert open_store(tmp_path / written[0].replace(".bin", "")).num_tokens == before
    assert tool.main([*run, "--overwrite"]) == 0
    assert open_store(tmp_path / written[0].replace(".bin", "")).num_tokens > before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))) == written


def test_train_tokenizer_reads_what_preprocess_reads_and_says_what_is_wrong(tmp_path, blocker, capsys):
    tool = load_tool("train_tokenizer")
    good, bad = tmp_path / "good", tmp_path / "bad.jsonl"
    good.mkdir()  # a folder of inputs, as preprocess takes
    (good / "a.jsonl").write_text("".join(json.dumps({"text": f"line {i} of some text"}) + "\n" for i in range(50)))
    (good / "b.txt").write_text("plain text, one document\n")
    (good / "__init__.py").write_text("")  # empty: passed over (nothing to learn), not an error
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": 5}) + "\n")
    out = tmp_path / "tok.json"
    said = one_error(capsys, tool.main(["--input", str(bad), "--output", str(out), "--vocab-size", "300"]))
    assert said == f"error: {bad}:2: text not a string (int)"
    # --input given twice, as preprocess takes it: both are read (argparse kept only the last)
    said = one_error(capsys, tool.main(["--input", str(bad), "--input", str(good), "--output", str(out),
                                        "--vocab-size", "300"]))
    assert said == f"error: {bad}:2: text not a string (int)"
    said = one_error(capsys, tool.main(["--input", str(good), "--output", str(out), "--vocab-size", "4294967295"]))
    assert said == "error: --vocab-size must be between 300 (256 bytes + specials + merges) and 1,000,000"
    said = one_error(capsys, tool.main(["--input", str(good), "--output", str(tmp_path), "--vocab-size", "300"]))
    assert said == f"error: --output {tmp_path} is a folder; name the tokenizer.json to write"
    said = one_error(capsys, tool.main(["--input", str(good), "--output", f"{tmp_path}/new/", "--vocab-size", "300"]))
    assert said == f"error: --output {tmp_path}/new/ is a folder; name the tokenizer.json to write"
    assert not (tmp_path / "new").exists()
    said = one_error(capsys, tool.main(["--input", str(good), "--output", str(blocker / "t.json")]))
    assert said.startswith("error: --output: cannot write to")
    (tmp_path / "empty.jsonl").write_text("")
    said = one_error(capsys, tool.main(["--input", str(tmp_path / "empty.jsonl"), "--output", str(out)]))
    assert said == f"error: no text in {tmp_path / 'empty.jsonl'}"
    assert not out.exists()
    assert tool.main(["--input", str(good), "--output", str(out), "--vocab-size", "300"]) == 0
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(out)).token_to_id("<|endoftext|>") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "bad.jsonl", "empty.jsonl", "good", "tok.json"]
    # a second run would silently unmatch every store tokenized with the first: refused unless --overwrite
    saved = out.read_bytes()
    (good / "c.txt").write_text("zebra quokka " * 40)  # new words: the tokenizer it trains differs
    said = one_error(capsys, tool.main(["--input", str(good), "--output", str(out), "--vocab-size", "320"]))
    assert said == (f"error: --output {out} already exists (token stores made with it would no longer match it); "
                    "pass --overwrite to replace it")
    assert out.read_bytes() == saved
    assert tool.main(["--input", str(good), "--output", str(out), "--vocab-size", "320", "--overwrite"]) == 0
    assert out.read_bytes() != saved


def test_a_tilde_in_a_flag_is_the_home_folder(tmp_path, capsys, monkeypatch):
    """`--output=~/tok.json` reaches the tool with its `~` (a shell expands it only in a word of its own): it wrote a
    folder named `~` into the working folder, and the next command, given the same path, did not find the file."""
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": f"text number {i}"}) + "\n" for i in range(50)))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert load_tool("train_tokenizer").main([f"--input={tmp_path / 'in.jsonl'}", "--output=~/t/tokenizer.json",
                                              "--vocab-size", "300"]) == 0, capsys.readouterr().err
    assert load_tool("preprocess").main([f"--input={tmp_path / 'in.jsonl'}", "--tokenizer=~/t/tokenizer.json",
                                         "--output-prefix=~/s/tokens", "--no-progress"]) == 0, capsys.readouterr().err
    assert (home / "s" / "tokens.idx").is_file() and list(work.iterdir()) == []


def test_train_tokenizer_leaves_no_folders_behind_when_its_input_is_bad(tmp_path, capsys):
    """--output in folders yet to be made and an input found bad after the output check: nothing is left (the check
    made the folders and kept them)."""
    tool = load_tool("train_tokenizer")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": 5}) + "\n")
    said = one_error(capsys, tool.main(["--input", str(bad), "--output", str(tmp_path / "new" / "deeper" / "t.json"),
                                        "--vocab-size", "300"]))
    assert said == f"error: {bad}:1: text not a string (int)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_train_tokenizer_neither_replaces_its_input_nor_fails_on_a_full_disk_with_a_traceback(tmp_path, capsys,
                                                                                                monkeypatch):
    """--output naming one of the inputs, with --overwrite (a link to it too): refused, the corpus kept (before: the
    tokenizer replaced it). A full disk while the tokenizer is written: one line, no folders left (before: the
    `tokenizers` library's own "Exception: No space left on device (os error 28)" traceback, exit 1). /dev/full
    stands in for the disk: the tool's staging file is linked to it."""
    from nanotronix.data.files import temp_path
    tool = load_tool("train_tokenizer")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 20)
    (tmp_path / "link.txt").symlink_to(corpus)
    for output in (corpus, tmp_path / "link.txt"):
        said = one_error(capsys, tool.main(["--input", str(corpus), "--output", str(output), "--vocab-size", "300",
                                            "--overwrite"]))
        assert said == f"error: --output {output} is one of the --input files, which --overwrite would replace"
    assert corpus.read_text() == "the cat sat on the mat. " * 20
    out = tmp_path / "tok.json"
    temp_path(out).symlink_to("/dev/full")
    said = one_error(capsys, tool.main(["--input", str(corpus), "--output", str(out), "--vocab-size", "300"]))
    assert said == f"error: cannot write {out}: No space left on device"
    assert not out.exists() and not temp_path(out).exists()


def test_train_tokenizer_says_when_the_texts_give_fewer_tokens_than_asked(tmp_path, capsys):
    tool = load_tool("train_tokenizer")
    (tmp_path / "a.txt").write_text("the cat sat on the mat. " * 20)
    assert tool.main(["--input", str(tmp_path / "a.txt"), "--output", str(tmp_path / "tok.json"),
                      "--vocab-size", "8192"]) == 0
    from tokenizers import Tokenizer

    made = Tokenizer.from_file(str(tmp_path / "tok.json")).get_vocab_size()  # tokenizers' own count
    assert made < 8192
    assert capsys.readouterr().out == (f"tokenizer: {made} tokens (of --vocab-size 8192: the texts hold no more "
                                       f"merges) -> {tmp_path / 'tok.json'}\n")


@pytest.mark.parametrize("name", ["a\nb", "a\r\nb", "a\u2028b", "a\x85b"])
def test_a_line_break_in_a_path_or_argument_is_escaped_in_the_one_error_line(tmp_path, capsys, name):
    """A path (or an unknown argument) holding a line break, as a shell passes $'a\\nb': the error line that names
    it stays one line by str.splitlines()'s own reckoning (before: the message broke where the name did)."""
    escaped = repr(name)[1:-1]
    code = load_tool("inspect_store").main([str(tmp_path / name)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: token store not found: {tmp_path}/{escaped} (looked for "), err
    with pytest.raises(SystemExit) as exited:  # argparse's own error
        load_tool("inspect_checkpoint").main([str(tmp_path), name])
    assert exited.value.code == 2 and capsys.readouterr().err == f"error: unrecognized arguments: {escaped}\n"


def test_bench_json_path_is_checked_before_the_runs(tmp_path, blocker, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_train as tool  # imported, not loaded by path: its dataclasses need their module registered
    tiny = ["model.preset=smollm2-135m", "model.num_hidden_layers=1", "model.hidden_size=32",
            "model.intermediate_size=48", "model.num_attention_heads=2", "model.num_key_value_heads=1",
            "model.vocab_size=64", "train.seq_len=8"]
    code = tool.main([*tiny, "--steps", "1", "--warmup", "0", "--json", str(blocker / "b.json")])
    out, err = capsys.readouterr()
    assert code == 2 and err == f"error: --json: cannot write to {blocker} (a part of that path is a file, not a " \
        "folder)\n"
    assert "[hf-transformers]" not in out  # nothing ran
    code = tool.main([*tiny, "--steps", "1", "--warmup", "0", "--json", str(tmp_path)])
    assert code == 2 and capsys.readouterr().err.startswith(f"error: --json {tmp_path} is a folder")
    said = one_error(capsys, tool.main([*tiny, "--no-baseline", "--baseline-only"]))
    assert "leave nothing to run" in said


def test_replace_file_leaves_no_temp_behind(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")

    def broken(temp: str) -> None:
        Path(temp).write_text("half")
        raise OSError(28, "No space left on device")
    with pytest.raises(UserError, match=f"cannot write {target}: No space left on device"):
        replace_file(target, broken)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="cannot write"):  # a folder where the file is to be
        replace_file(tmp_path / "folder", lambda temp: Path(temp).write_text("x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "report.json"]


def test_replace_file_leaves_no_folder_it_made_and_writes_into_a_device(tmp_path, monkeypatch):
    """A write that fails (a full disk, Ctrl-C) under new folders leaves none of them (they stayed, empty: plot_run
    --output, train_tokenizer, --json reports); the folders it makes are durable (their parents fsynced, as
    make_folder_durably does). A device at the path (`--json /dev/null`, `/dev/stdout`) is written into: before, the
    rename replaced the device node with a regular file (root's /dev/null, once)."""
    from nanotronix.data import files

    def broken(temp: str) -> None:
        Path(temp).write_text("half")
        raise OSError(28, "No space left on device")
    with pytest.raises(UserError, match="No space left on device"):
        replace_file(tmp_path / "new" / "deeper" / "plot.png", broken)
    with pytest.raises(KeyboardInterrupt):
        replace_file(tmp_path / "new" / "deeper" / "plot.png", lambda temp: (_ for _ in ()).throw(KeyboardInterrupt))
    assert list(tmp_path.iterdir()) == []
    synced = []
    monkeypatch.setattr(files, "fsync_folder_if_allowed", lambda folder: synced.append(Path(folder)))
    replace_file(tmp_path / "new" / "deeper" / "plot.png", lambda temp: Path(temp).write_text("x"))
    assert synced[:2] == [tmp_path, tmp_path / "new"] and (tmp_path / "new" / "deeper" / "plot.png").read_text() == "x"
    device = tmp_path / "null"
    try:
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs root, as CI runs")
    replace_file(device, lambda temp: Path(temp).write_text("report"))
    assert device.is_char_device()


def test_an_output_under_a_file_or_on_a_read_only_file_system_is_named(tmp_path, blocker, monkeypatch):
    """The path the user gave, in the words of the commands' other path checks: not mkdir's `File exists`, nor
    (on a read-only file system, where removing the temp file fails too) the hidden temp file's name."""
    from nanotronix.checkpoint.output_folder import staged_output
    with pytest.raises(UserError) as said:
        replace_file(blocker / "plot.png", lambda temp: Path(temp).write_text("x"))
    assert str(said.value) == f"cannot write {blocker / 'plot.png'} (a part of that path is a file, not a folder)"
    with pytest.raises(UserError) as said:
        with staged_output(blocker / "hf", tmp_path / "ckpt", False, lambda p: False, "a model folder"):
            raise AssertionError("a folder was staged under a file")
    assert str(said.value) == f"--output {blocker / 'hf'}: cannot write there (a part of that path is a file, not " \
                              "a folder)"

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(UserError) as said:
        replace_file(tmp_path / "plot.png", read_only)
    assert str(said.value) == f"cannot write {tmp_path / 'plot.png'}: Read-only file system"


def test_a_reader_that_goes_away_is_not_an_error(tmp_path):
    """`inspect_store.py PREFIX --doc 0 | head -c 10` of a document longer than the pipe's buffer: the reader closes
    the pipe while the tool still writes; the tool exits 0 without a BrokenPipeError traceback."""
    from nanotronix.data.megatron_store import MegatronWriter

    writer = MegatronWriter(tmp_path / "long", np.uint16)
    writer.add_document(np.append(np.arange(1, 60_000) % 1000 + 1, 0))  # ~300 KB of printed ids
    writer.finalize({"tokenizer": {"name": "synthetic", "vocab_size": 1024, "eos_id": 0}})
    command = f"{shlex.quote(sys.executable)} tools/inspect_store.py {shlex.quote(str(tmp_path / 'long'))} --doc 0"
    proc = subprocess.run(["bash", "-c", f"set -o pipefail; {command} | head -c 10"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and len(proc.stdout) == 10 and proc.stderr == "", proc.stderr


# Every tool in tools/ (not its _modules), found there: one added later is held to these tests without being listed.
TOOLS = sorted(path.stem for path in (ROOT / "tools").glob("*.py") if not path.name.startswith("_"))


@pytest.mark.parametrize("command", TOOLS + ["nanotronix.train.main", "nanotronix.evaluate", "nanotronix.preflight",
                                             "nanotronix.rendezvous_store"])
def test_bad_arguments_are_one_error_line(command, capsys, monkeypatch):
    """An option the command does not have is one `error:` line and exit 2, as every other bad input, not argparse's
    usage text before `prog: error:` (and, under torchrun, once per rank)."""
    import importlib
    if command in TOOLS:
        monkeypatch.syspath_prepend(str(ROOT / "tools"))  # imported by name: bench_train's dataclasses need it
    module = importlib.import_module(command)
    main = module.parse_args if command == "nanotronix.train.main" else module.main  # (its main needs a real stderr)
    with pytest.raises(SystemExit) as done:
        main(["--no-such-option", "1"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines


@pytest.mark.parametrize("tool", TOOLS)
def test_help_shows_docstring_commands_as_written(tool):
    """`--help` prints the docstring's example commands; a line continued with a lone `\\` in the source is joined
    to the next by Python (one line of wide gaps that does not paste into a shell): write `\\\\`."""
    import ast
    source = (ROOT / "tools" / f"{tool}.py").read_text()
    literal = ast.get_source_segment(source, ast.parse(source).body[0].value)  # the docstring as written
    shown = ast.literal_eval(literal)  # as Python reads it: the module's __doc__, which --help prints
    continued = [line for line in literal.splitlines() if line.endswith("\\")]
    assert [line for line in shown.splitlines() if line.endswith("\\")] == [line.replace("\\\\", "\\")
                                                                         for line in continued], tool


def required_by_setup() -> list[str]:
    """setup.py's install_requires, by name, read from setup.py itself: an installed nanotronix's metadata is not
    there where the checkout is not pip-installed (the GPU machine's PYTHONPATH=checkout), and lags an edit of
    setup.py until the next install."""
    import ast
    import re
    setup = ast.parse((ROOT / "setup.py").read_text())
    listed = next(keyword.value for node in ast.walk(setup) if isinstance(node, ast.Call)
                  for keyword in node.keywords if keyword.arg == "install_requires")
    return [re.match(r"[\w.-]+", requirement).group(0) for requirement in ast.literal_eval(listed)]


@pytest.mark.parametrize("command", [f"tools/{tool}.py" for tool in TOOLS] + [f"-m nanotronix.{module}" for module in (
    "train", "evaluate", "preflight", "launch", "rendezvous_store")])
def test_a_python_without_the_project_packages_says_so_in_one_line(command):
    """The commonest newcomer mistake, a Python without the project's packages (the system python3 instead of
    .venv/bin/python): here this one without its site-packages (-S). One line naming every package it lacks (those
    of setup.py) and how to get them, exit 2, where each command ended in a ModuleNotFoundError traceback (the
    `python -m nanotronix.*` commands other than train, which the Slurm scripts run with their PYTHON, too)."""
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}  # (a cluster's module system
    # may put a site-packages there, which -S keeps)
    proc = subprocess.run([sys.executable, "-S", *command.split(), "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=env)
    lacks = ", ".join(f"`{name}`" for name in required_by_setup())
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        2, "", f"error: the Python at {sys.executable} lacks {lacks}: run `make install` and use .venv/bin/python "
               "(or `source .venv/bin/activate` first)\n")


def test_a_folder_named_like_a_missing_package_does_not_count_as_it(tmp_path):
    """`python -m nanotronix.X` run from a folder that holds a `torch/` or `yaml/` folder (Python finds each as a
    namespace package where the real one is not installed): those packages are still named as missing, in the one
    line, not passed over to end in a traceback at their first use."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "yaml").mkdir()
    env = {**{name: value for name, value in os.environ.items() if name != "PYTHONPATH"}, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-S", "-m", "nanotronix.evaluate", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, env=env)
    lacks = ", ".join(f"`{name}`" for name in required_by_setup())
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        2, "", f"error: the Python at {sys.executable} lacks {lacks}: run `make install` and use .venv/bin/python "
               "(or `source .venv/bin/activate` first)\n")


def test_a_module_file_named_like_a_required_package_is_said_to_shadow_it(tmp_path):
    """`python -m nanotronix.X` run from a folder holding a `torch.py` (a user's own script): Python imports that file
    in place of the installed torch (the folder comes first on sys.path), so the package check passed it and the
    command ended in a traceback at its first `import torch.distributed` ("'torch' is not a package"). One line naming
    the file, exit 2, with this Python that has every package."""
    (tmp_path / "torch.py").write_text("raise SystemExit('imported ./torch.py')\n")
    proc = subprocess.run([sys.executable, "-m", "nanotronix.train", "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        2, "", f"error: {tmp_path / 'torch.py'} shadows the `torch` package nanotronix needs (Python finds it first, "
               "in the folder the command runs from or on PYTHONPATH): rename it\n")


def test_every_required_package_is_a_package_not_a_single_module():
    """What the shadowing check above relies on: each required package, as installed here, is a regular package (an
    __init__.py), so a single module file found under its name is never the real one."""
    import importlib.util

    from nanotronix.python_check import REQUIRED_PACKAGES
    for name in REQUIRED_PACKAGES:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.submodule_search_locations is not None, (name, spec)

@pytest.mark.parametrize("command", ["tools/preprocess.py", "-m nanotronix.train", "-m nanotronix.launch"])
def test_help_under_the_project_python_is_shown(command):
    """... while the Python that has them (.venv/bin/python in a checkout, as run by a user) starts the command; a
    `python -m` command's usage line says it so (torchrun's parser under nanotronix.launch said "launch.py")."""
    proc = subprocess.run([sys.executable, *command.split(), "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: ") and proc.stderr == "", proc.stderr
    if command.startswith("-m "):
        assert proc.stdout.startswith(f"usage: python {command} "), proc.stdout[:200]


def test_a_stop_once_the_output_is_renamed_into_place_says_it_is_whole(tmp_path, capsys, monkeypatch):
    """Ctrl-C or SIGTERM that lands after the final rename (while the folder is fsynced) of a tokenizer, a plot, a
    converted model or checkpoint: the command said "interrupted" (exit 130) with the whole output in place, which
    the rerun then refused as existing. It now says the output is whole, as preprocess does; a stop before the
    rename still leaves nothing."""
    from nanotronix.checkpoint.output_folder import staged_output
    from nanotronix.cli import Terminated, one_line_errors
    from nanotronix.data.files import commit
    from nanotronix.errors import StoppedWhenComplete

    def commit_then(stop):
        def commit_stopped(temp, final):
            commit(temp, final)
            raise stop
        return commit_stopped

    import nanotronix.cli
    target = tmp_path / "tok.json"
    monkeypatch.setattr(nanotronix.cli, "commit", commit_then(KeyboardInterrupt()))
    with pytest.raises(StoppedWhenComplete) as said:
        replace_file(target, lambda temp: Path(temp).write_text("x"))
    assert (said.value.output, said.value.terminated, target.read_text()) == (str(target), False, "x")
    monkeypatch.undo()
    output = tmp_path / "new" / "hf"
    for stop, committed in ((Terminated(), True), (KeyboardInterrupt(), False)):
        with pytest.raises(KeyboardInterrupt) as said:
            with staged_output(output, tmp_path / "ckpt", True, lambda old: True, "a model folder") as staging:
                (staging / "config.json").write_text("{}")
                if committed:
                    commit_then(stop)(staging, output)
                raise stop
        if committed:
            assert type(said.value) is StoppedWhenComplete and said.value.terminated
            assert (output / "config.json").is_file()
            import shutil
            shutil.rmtree(tmp_path / "new")
        else:
            assert type(said.value) is KeyboardInterrupt and not (tmp_path / "new").exists()

    @one_line_errors
    def tool() -> int:
        raise StoppedWhenComplete(str(output), terminated=False)
    assert tool() == 130
    assert capsys.readouterr().err == f"interrupted once the output was complete: {output} is written whole\n"
