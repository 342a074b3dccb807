"""Property-based tests (hypothesis, configured in tests/properties.py) of every command's bad-input contract (README,
DESIGN.md): whatever arguments it is given, each command's `main(argv)`, called in this process, returns or exits
with 0, or with a non-zero code whose stderr ends in ONE `error: ...` line, and no exception but SystemExit escapes
it. The arguments are each command's own flags (argparse's), with values drawn from what a careless user types:
empty, negative, huge, float, nan and non-ASCII numbers, unicode, paths that do not exist, a file where a folder is
expected and the reverse, an empty folder, a file in place of a parent folder, trailing slashes, `-`, names longer
than 255 bytes, beside real inputs made once per module (a token store, a trained checkpoint, its logs, a
tokenizer, texts, a Hugging Face export). A missing input is always a failure; a command that writes leaves nothing
new where it was told to write when it fails. Each call runs in a fresh scratch folder (its cwd), so that relative
names land there. The bench_* tools (they time things) are left out. ~10 s on one core."""
from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import CORPUS, load_tool
from properties import PROPERTY

# --- paths --------------------------------------------------------------------------------------------------------

# Relative names, resolved in the call's scratch folder (its cwd), which holds `a_file` (a file) and `empty/` (an
# empty folder) and nothing else.
SCRATCH = {
    "missing": "nope", "missing/": "nope/", "nested": "new/deeper/out", "a_file": "a_file", "a_file/": "a_file/",
    "under_a_file": "a_file/x", "empty_folder": "empty", "empty_folder/": "empty/", "empty": "", "-": "-", ".": ".",
    "long": "n" * 300, "long_part": "\u00fc" * 130 + "/x",  # 260 bytes in one name
    "unicode": "\u65e5\u672c \u00fc\u200b\U0001f600", "dots": "..", "spaces": " ", "line_break": "a\nb",
}
# Names of inputs that are never there: a command given one must fail.
NEVER_THERE = {"missing", "missing/", "nested", "a_file/", "under_a_file", "empty", "long", "long_part", "unicode",
               "line_break"}
OUTPUT_NAMES = {"out.png": "out.png", "out.svg": "out.svg", "out.json": "out.json", "nested.png": "new/deeper/o.png",
                "under_a_file.png": "a_file/o.png"}


def scratch_paths() -> st.SearchStrategy[str]:
    return st.sampled_from(sorted(SCRATCH))


def paths(*real: str) -> st.SearchStrategy[str]:
    """A path's kind: one of the module's real inputs (`real`, keys of the `world` fixture, also with a trailing
    slash) or a scratch name."""
    if not real:
        return scratch_paths()
    # a real input as given twice as often as the rest: most calls then get past their first check
    return st.one_of(st.sampled_from(sorted(real)), st.sampled_from(sorted(real) + [f"{name}/" for name in real]),
                     scratch_paths())


def resolve(kind: str, world: dict[str, str]) -> str:
    if kind in world:
        return world[kind]
    if kind.endswith("/") and kind[:-1] in world:
        return world[kind[:-1]] + "/"
    return SCRATCH.get(kind) or OUTPUT_NAMES.get(kind, kind)


# --- values -------------------------------------------------------------------------------------------------------

# What a shell can pass (no NUL), line breaks too ($'a\nb')
TEXT = st.text(st.one_of(st.characters(exclude_categories=("Cs", "Cc")), st.sampled_from("\n\r\t\x0b\x1c\x85\u2028")),
               max_size=12)
NUMBERS = st.one_of(
    st.sampled_from(["0", "-1", "1", "2", "3", "7", "nan", "inf", "-inf", "1.5", "", "1e3", " 4", "\u0663", "0x10",
                     "1_0", "+5", "\u00b2", "\uff13", "99999999999999999999", "-99999999999", "4294967296", "1e400"]),
    st.integers(1, 64).map(str), st.integers(-10 ** 6, 10 ** 6).map(str), TEXT)


@st.composite
def argv(draw, options: list, positional: list = ()):
    """Arguments of a command: each (kind, strategy or None) positional drawn, then each option (flag, strategy,
    required) included (a required one almost always), with a drawn value unless its strategy is None (a switch).
    Values are (kind, text) pairs: kind names a path to resolve, text is literal."""
    args = [("path", draw(s)) if s is not None else ("text", draw(TEXT)) for s in positional]
    for flag, strategy, required in options:
        if draw(st.integers(0, 9)) < (9 if required else 4):
            args.append(("text", flag))
            if strategy is not None:
                args.append(draw(strategy))
    if draw(st.integers(0, 19)) == 0:
        args.insert(draw(st.integers(0, len(args))), ("text", draw(st.sampled_from(["--help", "--bogus", "--"]))))
    return args


def path_value(*real: str):
    return paths(*real).map(lambda kind: ("path", kind))


def text_value(strategy=TEXT):
    return strategy.map(lambda text: ("text", text))


def choice_value(*choices: str):
    return st.one_of(st.sampled_from(choices), TEXT).map(lambda text: ("text", text))


# --- the fixtures and the call ------------------------------------------------------------------------------------

def listing(root: Path) -> list[str]:
    found = []
    for folder, dirs, files in os.walk(root):
        found += [os.path.relpath(os.path.join(folder, name), root) + "/" for name in dirs]
        found += [os.path.relpath(os.path.join(folder, name), root) for name in files]
    return sorted(found)


@pytest.fixture(scope="module")
def world(trained, tiny_tokenizer, tmp_path_factory):
    """The real inputs, made once: name -> absolute path."""
    cfg, run = trained
    extra = tmp_path_factory.mktemp("cli_world")
    (extra / "texts").mkdir()
    (extra / "texts" / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in
                                                     ["one two three", "four five six seven"]))
    (extra / "texts" / "b.txt").write_text("\n".join(CORPUS))
    (extra / "bad.jsonl").write_text('{"text": 5}\n')
    with open(os.devnull, "w") as quiet, redirect_stdout(quiet):  # the export's own output is no test here
        assert load_tool("convert_to_hf").main(["--checkpoint", str(run / "ckpt"), "--output", str(extra / "hf"),
                                                "--no-progress"]) == 0
    made = {"store": run / "arith", "store.bin": run / "arith.bin", "ckpt": run / "ckpt",
             "step": run / "ckpt" / "step_0000002", "logs": run / "logs", "metrics": run / "logs" / "metrics.jsonl",
             "config": cfg, "tokenizer": Path(tiny_tokenizer), "tokenizer_folder": Path(tiny_tokenizer).parent,
             "texts": extra / "texts", "text.jsonl": extra / "texts" / "a.jsonl", "text.txt": extra / "texts" / "b.txt",
             "bad.jsonl": extra / "bad.jsonl", "hf": extra / "hf"}
    return {name: str(path) for name, path in made.items()}


@pytest.fixture(scope="module")
def sandbox(world, commands_in_process, tmp_path_factory):
    """Where each call runs (a fresh scratch folder per call, below it), commands called as conftest's
    `commands_in_process` sets them up."""
    return tmp_path_factory.mktemp("cli_scratch")


def call_and_check(main, args, world, root: Path, writes: bool = False, copies: dict | None = None,
                   inputs: tuple[str, ...] = ()):
    """Run main(argv) in a fresh scratch folder and check the contract. `writes`: the command writes where it is told
    (else it must write nothing at all). `copies`: world names copied into the scratch folder first (what the command
    may change: a run's checkpoint folder, its logs), under the name given. `inputs`: the flags ("" for the first
    positional) whose value must exist for the command to succeed. Returns the exit code, stdout and stderr."""
    scratch = Path(tempfile.mkdtemp(dir=root))
    (scratch / "a_file").write_text("x\n")
    (scratch / "empty").mkdir()
    local = dict(world)
    for name, copy in (copies or {}).items():
        (shutil.copytree if Path(world[name]).is_dir() else shutil.copy)(world[name], scratch / copy)
        local[name] = str(scratch / copy)
    strings = [resolve(text, local) if kind == "path" else text for kind, text in args]
    world_before, before = {name: listing(Path(path)) for name, path in world.items() if Path(path).is_dir()}, \
        listing(scratch)
    cwd = os.getcwd()
    os.chdir(scratch)
    try:
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            with redirect_stdout(out), redirect_stderr(err):
                try:
                    code = main(list(strings))
                except SystemExit as e:
                    code = e.code
            err.seek(0)
            said = err.read()
            out.seek(0)
            printed = out.read()
        code = 0 if code is None else code
        lines = [line for line in said.strip().splitlines() if line.strip()]
        assert "Traceback" not in said, (strings, said[-3000:])
        if code != 0:
            assert isinstance(code, int) and lines and lines[-1].startswith("error: "), (strings, code, said[-2000:])
        if code != 0 or not writes:  # a command that only reads writes nothing, failed or not
            assert listing(scratch) == before, (strings, said[-2000:])
        missing = [s for (kind, text), s in zip(args, strings) if kind == "path" and text in NEVER_THERE
                   and s in inputs_of(strings, inputs)]
        assert code != 0 or not missing or "--help" in strings, (strings, "exit 0 with missing inputs", missing)
        assert {name: listing(Path(path)) for name, path in world.items() if Path(path).is_dir()} == world_before, \
            strings
        return code, printed, said
    finally:
        os.chdir(cwd)
        shutil.rmtree(scratch, ignore_errors=True)


def inputs_of(strings: list[str], flags: tuple[str, ...]) -> list[str]:
    """The values of the input options `flags` ("" for the first positional) in argv `strings` (argparse's last
    one wins for a plain option; `--input` extends)."""
    found = []
    for i, s in enumerate(strings):
        if s in flags and i + 1 < len(strings):
            found.append(strings[i + 1])
    if "" in flags and strings:
        found.append(strings[0])
    return found


# --- the commands -------------------------------------------------------------------------------------------------

@settings(PROPERTY, max_examples=40)
@given(args=argv([("--doc", text_value(NUMBERS), False), ("--json", None, False), ("--verify", None, False)],
                 positional=[paths("store", "store.bin", "ckpt", "texts", "tokenizer")]))
def test_inspect_store(sandbox, world, args):
    call_and_check(load_tool("inspect_store").main, args, world, sandbox, inputs=("",))


@settings(PROPERTY, max_examples=30)
@given(args=argv([("--verify", None, False), ("--json", None, False), ("--no-progress", None, False)],
                 positional=[paths("ckpt", "step", "store", "logs", "hf")]))
def test_inspect_checkpoint(sandbox, world, args):
    call_and_check(load_tool("inspect_checkpoint").main, args, world, sandbox, inputs=("",))


@settings(PROPERTY, max_examples=30)
@given(args=argv([("--gpus", text_value(NUMBERS), True), ("--mfu", text_value(NUMBERS), False),
                  ("--gpu", choice_value("H100 SXM", "A100", "cpu"), False),
                  ("--net-gbps", text_value(NUMBERS), False), ("--gpus-per-node", text_value(NUMBERS), False),
                  ("--json", None, False)],
                 positional=[paths("config", "store", "ckpt")]))
def test_plan(sandbox, world, args):
    call_and_check(load_tool("plan").main, args, world, sandbox, inputs=("",))


@settings(PROPERTY, max_examples=30)
@given(args=argv([("--checkpoint", path_value("ckpt", "step", "store", "hf"), True),
                  ("--data", path_value("store", "store.bin", "ckpt", "text.jsonl"), True),
                  ("--seq-len", text_value(NUMBERS), True), ("--num-samples", text_value(NUMBERS), True),
                  ("--batch-size", text_value(NUMBERS), False), ("--device", choice_value("auto", "cpu", "cuda"),
                                                                 False),
                  ("--json", None, False), ("--no-progress", None, True)]))
def test_evaluate(sandbox, world, args):
    from nanotronix.evaluate import main
    call_and_check(main, args, world, sandbox, inputs=("--checkpoint", "--data"))


OVERRIDES = st.one_of(
    st.tuples(st.sampled_from(["train.seq_len", "train.train_steps", "parallel.tp", "parallel.pp", "model.preset",
                               "data.tokenizer", "checkpoint.dir", "logging.dir", "optimizer.lr", "nope", "",
                               "train", "model.hidden_size", "data.stages.0.name",
                               "data.stages.\u00b2.name"]),
              st.one_of(NUMBERS, TEXT, st.sampled_from(sorted(SCRATCH.values()))))
    .map(lambda kv: ("text", f"{kv[0]}={kv[1]}")),
    text_value(TEXT))


@settings(PROPERTY, max_examples=30)
@given(args=argv([("--config", path_value("config", "store", "ckpt", "text.jsonl", "bad.jsonl"), True)]),
       overrides=st.lists(OVERRIDES, max_size=3), print_config=st.booleans())
def test_train_fails_before_training(sandbox, world, args, overrides, print_config):
    """`python -m nanotronix.train`: with --print-config any config and overrides (it never trains); without, only a
    config path that cannot be a config (training is not what this tests)."""
    from nanotronix.train.main import main

    if not print_config:
        args = [a for a in args if a[0] != "path"] + [("path", "missing")]
        if ("text", "--config") not in args:
            args.insert(0, ("text", "--config"))
    call_and_check(main, [*args, *([("text", "--print-config")] if print_config else []), *overrides], world,
                   sandbox, inputs=("--config",))


@settings(PROPERTY, max_examples=25)
@given(args=argv([("--checkpoint", path_value("ckpt", "step", "store", "hf"), True),
                  ("--output", path_value(), True),
                  ("--dtype", choice_value("float32", "bfloat16", "float16"), False),
                  ("--max-shard-size", choice_value("5GB", "1KB", "0", "-1GB", "nanGB", "1e400GB", "10", "GB",
                                                            "\u00b2GB"),
                   False),
                  ("--tokenizer", path_value("tokenizer", "tokenizer_folder", "store"), False),
                  ("--overwrite", None, False), ("--private", None, False),
                  ("--push-to-hub", choice_value("a/b", "a", "/b"), False), ("--no-progress", None, True)]))
def test_convert_to_hf(sandbox, world, args):
    call_and_check(load_tool("convert_to_hf").main, args, world, sandbox, writes=True,
                   inputs=("--checkpoint", "--tokenizer"))


@settings(PROPERTY, max_examples=25)
@given(args=argv([("--hf", path_value("hf", "ckpt", "tokenizer", "store"), True), ("--output", path_value(), True),
                  ("--overwrite", None, False), ("--no-progress", None, True)]))
def test_convert_from_hf(sandbox, world, args):
    call_and_check(load_tool("convert_from_hf").main, args, world, sandbox, writes=True, inputs=("--hf",))


@settings(PROPERTY, max_examples=30)
@given(args=argv([("--to-step", text_value(NUMBERS), True)], positional=[paths("ckpt", "step", "logs")]))
def test_rollback(sandbox, world, args):
    """On a copy of the run's checkpoint folder (a rollback to a real step succeeds and moves the later ones). That
    copy holds the run's .lock, as a run's folder does; a step folder copied alone into the scratch folder would make
    a refused rollback's .lock (made by design) look like a leftover."""
    call_and_check(load_tool("rollback").main, args, world, sandbox, writes=True, copies={"ckpt": "run_ckpt"},
                   inputs=("",))


@settings(PROPERTY, max_examples=30)
@given(args=argv([("--input", path_value("texts", "text.jsonl", "text.txt", "bad.jsonl", "store.bin"), True),
                  ("--input", path_value("texts", "text.jsonl"), False),
                  ("--output", st.one_of(path_value(), st.just(("path", "out.json"))), True),
                  ("--vocab-size", text_value(NUMBERS), False), ("--text-key", text_value(), False),
                  ("--overwrite", None, False)]))
def test_train_tokenizer(sandbox, world, args):
    call_and_check(load_tool("train_tokenizer").main, args, world, sandbox, writes=True, inputs=("--input",))


@pytest.mark.filterwarnings("ignore:Glyph")  # matplotlib's font lacks some drawn title characters: drawn as boxes
@settings(PROPERTY, max_examples=30)
@given(args=argv([("--output", st.one_of(path_value(), st.sampled_from(sorted(OUTPUT_NAMES))
                                         .map(lambda k: ("path", k))), False),
                  ("--title", choice_value("$$", "$\\frac{$", "run $1$"), False)],  # "$" pairs: matplotlib's mathtext
                 positional=[st.one_of(st.sampled_from(["logs", "metrics"]),  # half the time a real run's logs
                                       paths("logs", "metrics", "ckpt", "store.bin", "text.jsonl"))]))
def test_plot_run(sandbox, world, args):
    """On a copy of the run's logs (without --output, the plot is written beside metrics.jsonl)."""
    call_and_check(load_tool("plot_run").main, args, world, sandbox, writes=True,
                   copies={"logs": "run_logs", "metrics": "metrics.jsonl"}, inputs=("",))


@settings(PROPERTY, max_examples=15)
@given(args=argv([("--input", path_value("texts", "text.jsonl", "text.txt", "bad.jsonl", "store.bin"), True),
                  ("--tokenizer", path_value("tokenizer", "tokenizer_folder", "store.bin", "texts"), True),
                  ("--output-prefix", path_value(), True), ("--text-key", text_value(), False),
                  ("--workers", choice_value("1", "0", "-1", "2", "nan", "", "1.5", "\u0663"), False),
                  ("--format", choice_value("megatron", "zarr"), False), ("--skip-bad", None, False),
                  ("--shuffle", text_value(NUMBERS), False),
                  ("--shard", choice_value("0/1", "1/2", "2/2", "1/0", "-1/2", "a/b", "0/99999999999", "1", "\u00b2/3"),
                   False),
                  ("--overwrite", None, False), ("--no-progress", None, True)]))
def test_preprocess(sandbox, world, args):
    call_and_check(load_tool("preprocess").main, args, world, sandbox, writes=True, inputs=("--input", "--tokenizer"))


@settings(PROPERTY, max_examples=30)
@given(args=argv([("--config", path_value("config", "store", "ckpt", "text.jsonl", "bad.jsonl"), True),
                  ("--nnodes", text_value(NUMBERS), False), ("--nproc-per-node", text_value(NUMBERS), False)]),
       overrides=st.lists(OVERRIDES, max_size=3))
def test_preflight(sandbox, world, args, overrides):
    """`python -m nanotronix.preflight` (the Slurm scripts' check before torchrun): it reads, and makes no folder it
    checks (checkpoint.dir, logging.dir) to stay behind."""
    from nanotronix.preflight import main
    call_and_check(main, [*args, *overrides], world, sandbox, inputs=("--config",))


# Digits str.isdigit() takes but int() refuses (a superscript two), where each command reads a number out of a text:
# drawn above too, but derandomized draws need not meet them. Each was a ValueError traceback.
SUPERSCRIPT_NUMBERS = {
    "override list index": ("nanotronix.train.main", [("text", "--config"), ("path", "config"),
                                                      ("text", "--print-config"),
                                                      ("text", "data.stages.\u00b2.name=x")]),
    "max shard size": ("convert_to_hf", [("text", "--checkpoint"), ("path", "ckpt"), ("text", "--output"),
                                         ("path", "missing"), ("text", "--max-shard-size"), ("text", "\u00b2GB")]),
    "preprocess shard": ("preprocess", [("text", "--input"), ("path", "texts"), ("text", "--tokenizer"),
                                        ("path", "tokenizer"), ("text", "--output-prefix"), ("path", "missing"),
                                        ("text", "--shard"), ("text", "\u00b2/3")]),
    "bench documents": ("bench_train", [("text", "--documents"), ("text", "\u00b2:4")]),
}


@pytest.mark.parametrize("case", sorted(SUPERSCRIPT_NUMBERS))
def test_superscript_digits_are_refused_in_one_line(sandbox, world, case):
    tool, args = SUPERSCRIPT_NUMBERS[case]
    main = (importlib.import_module(tool) if "." in tool else load_tool(tool)).main  # a module, or a tools/ script
    code, _, said = call_and_check(main, args, world, sandbox, writes=True)
    assert code == 2 and "\u00b2" in said.strip().splitlines()[-1], (case, code, said)


# Decimal digits of other scripts, which int() and float() read as numbers (int("\u0663") is 3, float("\u0664.\u0665")
# 4.5): each was taken as that number where a command reads a number out of a flag's or an override's text (a
# rollback went to step 2, a tokenizer of vocabulary 300 was trained); each is refused in one line, as other text that
# is not a number. Arabic-Indic, fullwidth and Devanagari digits; (command, its argv, copies as call_and_check's).
FOREIGN_DIGITS = {
    "rollback --to-step": ("rollback", [("path", "ckpt"), ("text", "--to-step"), ("text", "\u0662")],
                           {"ckpt": "run_ckpt"}),
    "inspect_store --doc": ("inspect_store", [("path", "store"), ("text", "--doc"), ("text", "\uff10")], None),
    "evaluate --seq-len": ("nanotronix.evaluate", [("text", "--checkpoint"), ("path", "ckpt"), ("text", "--data"),
                                                  ("path", "store"), ("text", "--seq-len"), ("text", "\u0968"),
                                                  ("text", "--num-samples"), ("text", "1"),
                                                  ("text", "--no-progress")], None),
    "plan --gpus": ("plan", [("path", "config"), ("text", "--gpus"), ("text", "\u0661")], None),
    "plan --mfu": ("plan", [("path", "config"), ("text", "--gpus"), ("text", "1"), ("text", "--mfu"),
                            ("text", "\u0660.\u0665")], None),
    "preflight --nproc-per-node": ("nanotronix.preflight", [("text", "--config"), ("path", "config"),
                                                            ("text", "--nproc-per-node"), ("text", "\u0661")], None),
    "train_tokenizer --vocab-size": ("train_tokenizer", [("text", "--input"), ("path", "texts"), ("text", "--output"),
                                                         ("path", "out.json"), ("text", "--vocab-size"),
                                                         ("text", "\uff13\uff10\uff10")], None),
    "override of a float": ("nanotronix.train.main", [("text", "--config"), ("path", "config"),
                                                      ("text", "--print-config"), ("text", "optimizer.lr=\u0663e-4")],
                            None),
}


@pytest.mark.parametrize("case", sorted(FOREIGN_DIGITS))
def test_decimal_digits_of_other_scripts_are_refused_in_one_line(sandbox, world, case):
    tool, args, copies = FOREIGN_DIGITS[case]
    main = (importlib.import_module(tool) if "." in tool else load_tool(tool)).main  # a module, or a tools/ script
    code, _, said = call_and_check(main, args, world, sandbox, writes=True, copies=copies)
    digits = next(text for kind, text in args if not text.isascii()).split("=")[-1]  # an override's value
    assert code == 2 and digits in said.strip().splitlines()[-1], (case, code, said)
