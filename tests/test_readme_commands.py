"""README's `## Commands` block against the commands themselves: every `--flag` it shows for a tool or a
`python -m nanotronix.*` command is one that command's `--help` lists, so a renamed or dropped option cannot stay
in the README; likewise the `## Config` block's field names, and the fields of a `metrics.jsonl` record. In-process
(no interpreter start-up): ~5 s."""
from __future__ import annotations

import importlib
import re

import pytest

from helpers import ROOT

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def readme_commands() -> dict[str, set[str]]:
    """{command: flags} from the code block under `## Commands`; an indented line continues the command above it."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("\n## Commands\n", 1)[1].split("```", 2)[1]
    commands: dict[str, set[str]] = {}
    current = None
    for line in block.splitlines():
        tool = re.search(r"(?:^python tools/(\w+)\.py|-m (nanotronix\.\w+))", line)  # also torchrun ... -m ...
        if tool:
            current, line = tool.group(1) or tool.group(2), line[tool.end():]  # not torchrun's own flags
        elif not line.startswith(" "):
            current = None  # another kind of line (sbatch ...): its flags are not a command's of ours
        if current:
            commands.setdefault(current, set()).update(FLAG.findall(line))
    return commands


def help_text(command: str, capsys, monkeypatch) -> str:
    if command.startswith("nanotronix."):
        module = importlib.import_module(command + (".main" if command == "nanotronix.train" else ""))
        main = module.parse_args if command == "nanotronix.train" else module.main
    else:
        monkeypatch.syspath_prepend(str(ROOT / "tools"))  # imported by name: bench_train's dataclasses need it
        main = importlib.import_module(command).main
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0, command
    return capsys.readouterr().out


def test_readme_block_is_read():
    commands = readme_commands()
    assert {"preprocess", "convert_to_hf", "nanotronix.train", "nanotronix.evaluate"} <= set(commands)
    assert "--output-prefix" in commands["preprocess"] and "--print-config" in commands["nanotronix.train"]
    assert all(not command.startswith("sbatch") for command in commands)


@pytest.mark.parametrize("command", sorted(readme_commands()))
def test_readme_flags_exist(command, capsys, monkeypatch):
    listed = set(FLAG.findall(help_text(command, capsys, monkeypatch)))
    assert readme_commands()[command] <= listed, (command, readme_commands()[command] - listed)


def readme_config_fields() -> dict[str, list[str]]:
    """{section: top-level field names} from the YAML block under `## Config` (`name` or `name: choices` items)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("\n## Config\n", 1)[1].split("```", 2)[1]
    body = "\n".join(line.split("#")[0] for line in block.splitlines()[1:])  # no comments, no ```yaml
    sections: dict[str, list[str]] = {}
    for name, fields in re.findall(r"^(\w+):\s*\{(.*?)\}\s*$", body, flags=re.M | re.S):
        items, depth, part = [], 0, ""
        for ch in fields.replace("\n", " ") + ",":
            depth += (ch in "[{") - (ch in "]}")
            if ch == "," and depth == 0:
                items.append(part.split(":")[0].strip())
                part = ""
            else:
                part += ch
        sections[name] = items
    return sections


def test_readme_config_block_names_every_field():
    """The Config block lists each section's fields, no more and no fewer than the dataclasses hold."""
    import dataclasses
    import typing
    from nanotronix.config import Config

    sections = typing.get_type_hints(Config)  # {section: its dataclass}
    want = {name: [f.name for f in dataclasses.fields(section)] for name, section in sections.items()}
    assert readme_config_fields() == want


def test_readme_names_every_metrics_field():
    """The `metrics.jsonl` paragraph under `## Commands` names (in backticks) every field of a trained step's record,
    the set tests/test_train_cli.py holds the trainer's records to, and the keys a validation or a skipped update
    adds."""
    from helpers import METRICS_FIELDS

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    paragraph = text.split("- Training writes `LOGGING_DIR/metrics.jsonl`", 1)[1].split("\n- ", 1)[0].split("\n\n")[0]
    named = set(re.findall(r"`(\w+)`", paragraph))
    assert METRICS_FIELDS | {"val_loss", "val_losses", "update_skipped"} <= named, METRICS_FIELDS - named


@pytest.mark.parametrize("command", sorted(readme_commands()))
def test_help_says_its_summary_once(command, capsys, monkeypatch):
    """A `--help` says what the command does once: a help whose details repeat its summary line reads as two texts."""
    lines = [line.strip() for line in help_text(command, capsys, monkeypatch).splitlines() if line.strip()]
    summary = next(line for line in lines[1:] if not line.startswith(("[", "usage:")) and line.endswith("."))
    assert lines.count(summary) == 1, (command, summary)


def test_readme_layout_names_every_module():
    """The `## Layout` block names each module and package of nanotronix/ (a newcomer's map of the code)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("\n## Layout\n", 1)[1].split("```", 2)[1].split("\ntools/", 1)[0]
    named = set(re.findall(r"\b(\w+)(?:\.py\b|/)", block))
    modules = {path.stem for path in (ROOT / "nanotronix").glob("*.py") if path.stem != "__init__"}
    packages = {path.parent.name for path in (ROOT / "nanotronix").glob("*/__init__.py")}
    assert modules | packages <= named, (modules | packages) - named


def test_readme_layout_names_the_tools_modules():
    """The `## Layout` block's tools/ entry names each module that is not a command of its own (tools/_*.py: what
    the tools share, or a part split off one), as its nanotronix/ part names every module."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("\n## Layout\n", 1)[1].split("```", 2)[1].split("\ntools/", 1)[1].split("\nexamples/", 1)[0]
    named = set(re.findall(r"\b(\w+)\.py\b", block))
    modules = {path.stem for path in (ROOT / "tools").glob("_*.py")}
    assert modules and modules <= named, modules - named
