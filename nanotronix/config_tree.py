"""YAML file -> nested dict -> dotted overrides -> typed dataclasses, for any dataclass tree (the schema is
nanotronix/config.py's, its checks nanotronix/config_checks.py's). Written here rather than taken from a library
(omegaconf, dacite, pydantic) because the config contract needs exactly this: strict types without coercion surprises
(`true` is not an int, `1.5` is not a step count), one-line errors naming the dotted field, and overrides that index
lists (`data.stages.1.start_step=500`); the whole is ~120 lines.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

import yaml

from nanotronix.errors import ConfigError


class _IntText(int):
    """An integer as YAML 1.1 read it, with the text it was read from (`text`): `2024_01` is 202401, `010` is 8,
    `0x10` is 16, `1:30` is 90. A string field (a dataset path, a stage's name) takes the text as written."""


class _FloatText(float):
    """A float as YAML read it, with its text (`1_0.5` is 10.5): for a string field, as _IntText."""


def _with_text(number_type: type, construct):
    def constructor(loader, node):
        value = number_type(construct(loader, node))
        value.text = node.value
        return value
    return constructor


# A config field of step numbers as text ("1000", "20-40": train.skip_steps, logging.profile_steps): a number YAML read
# there is its value (`1_000` is step 1000, as YAML says), not its text, which a step field would refuse.
StepText = typing.NewType("StepText", str)


class _TextKeepingLoader(yaml.SafeLoader):
    """PyYAML's safe loader whose numbers keep their text (_IntText, _FloatText): a config's string field given what
    YAML 1.1 reads as a number (`path: 2024_01`) must not become another string ('202401', another folder)."""


_TextKeepingLoader.add_constructor("tag:yaml.org,2002:int",
                                   _with_text(_IntText, yaml.constructor.SafeConstructor.construct_yaml_int))
_TextKeepingLoader.add_constructor("tag:yaml.org,2002:float",
                                   _with_text(_FloatText, yaml.constructor.SafeConstructor.construct_yaml_float))


class _StrictLoader(_TextKeepingLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last: a
    second `train:` section appended to a recipe would silently replace the first, every field back to defaults)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            # A merge key (`<<: *defaults`) is no key of its own: its entries may be overridden here, as YAML says.
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                given_twice = key in seen
            except TypeError:  # an unhashable key (`? [1, 2]`): PyYAML's own one-line error below says so
                continue
            if given_twice:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} given twice in the same mapping")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node, deep=False):
        # PyYAML's constructors raise a bare ValueError for a scalar its resolver typed but Python cannot build (a
        # date such as 2023-02-30, an integer past int()'s digit limit): said with its line, like invalid YAML
        try:
            return super().construct_object(node, deep=deep)
        except ConfigError:  # one of ours from a nested node (a ValueError too): already says where
            raise
        except ValueError as e:
            text = node.value if isinstance(node.value, str) else ""
            shown = text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"
            raise ConfigError(f"line {node.start_mark.line + 1}: {shown} cannot be read as YAML "
                              f"({str(e).split(';')[0]}); quote it if it is text") from None


def _unshared(value: Any) -> Any:
    """The tree with new containers at every place: a YAML alias (`*mix`) becomes a copy of its anchor's value, so
    that an override of one place does not change the others."""
    if isinstance(value, dict):
        return {k: _unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshared(v) for v in value]
    return value


def read_yaml_tree(path: str | Path) -> dict[str, Any]:
    """A YAML file of sections as a nested dict."""
    p = Path(path)
    try:  # a path the OS refuses to look up (a name over 255 bytes: ENAMETOOLONG) is bad input as a missing one is
        p.stat()
    except OSError as e:
        if not isinstance(e, FileNotFoundError):  # a missing one is said below, as any path that is no file
            raise ConfigError(f"config file {p} cannot be read: {e.strerror or e}") from None
    if p.is_dir():
        raise ConfigError(f"config file {p} is a folder (give a YAML file, e.g. examples/configs/quickstart.yaml)")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        tree = yaml.load(p.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{at} is not valid YAML") from None
    if tree is None:
        raise ConfigError(f"config file {p} is empty")
    if not isinstance(tree, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections")
    return _unshared(tree)


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return build_dataclass(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{where}.{i}") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value) and tp in (int, float):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # 3e-4: YAML 1.1 reads a float without a dot as a string
            try:
                if not value.isascii():  # float() reads other scripts' digits too: float("\u0663e-4") is 3e-4
                    raise ValueError
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
            if not math.isfinite(value):
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except OverflowError:  # an integer past a float's range (not printed: it may have too many digits to print)
            raise ConfigError(f"{where}: expected a finite number, got an integer beyond a float's range") \
                from None
    if tp in (str, StepText):
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        if tp is StepText and isinstance(value, int):
            return str(int(value))
        return getattr(value, "text", None) or str(value)  # a number YAML read: the text as written
    return value


def build_dataclass(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """`cls` from a nested dict, every value checked against its field's type; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in fields:
            shown = name if name.isprintable() else repr(name)  # a YAML key may hold a line break
            raise ConfigError(f"{shown}: unknown config key (known: {', '.join(sorted(fields))})")
        if typing.get_origin(hints[key]) is list and isinstance(value, dict) and value \
                and all(isinstance(k, str) and k.isascii() and k.isdigit() for k in value):
            value = _items_onto_default(fields[key], value, name)
        kwargs[key] = _convert(value, hints[key], name)
    return cls(**kwargs)


def _items_onto_default(field: dataclasses.Field, items: dict[str, Any], where: str) -> list:
    """`optimizer.betas.1=0.99` where the config file leaves the list at its default: apply_override made
    {'1': 0.99} (it cannot know the default), set here onto the field's default list, [0.9, 0.99]."""
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else []
    merged = list(default) if isinstance(default, list) else []
    for part, value in items.items():
        merged[_list_index(part, merged, f"{where}.{part}")] = value
    return merged


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Apply one `dotted.key=value` override to a nested dict; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected dotted.key=value")
    key, raw = override.split("=", 1)
    if not key.isprintable():  # a line break or tab typed into a key: no config key has one, and messages name it
        raise ConfigError(f"override {override!r}: the key holds a control character")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: empty key part")
    try:
        value = yaml.load(raw, Loader=_TextKeepingLoader) if raw.strip() else None
    except (yaml.YAMLError, ValueError):  # ValueError: typed by YAML, not buildable (2023-02-30): the text as written
        value = raw
    # repr, not json.dumps: a YAML alias inside its own anchor (`&a [*a]`) is a value holding itself, which repr
    # prints as `[[...]]` and json refuses with a traceback; every '#' of a string or key shows in either
    if raw.count("#") > repr(value).count("#"):
        # YAML read a comment: `checkpoint.dir=/runs/exp #2` was `/runs/exp`, another folder, without a word
        raise ConfigError(f"override {override!r}: YAML reads ' #' as the start of a comment, which drops "
                          f"{raw[raw.index('#'):]!r} from the value: quote it ({key}='...')")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(part, node, where)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"{where}: is a value, cannot set {key}")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(last, node, key)] = value
    else:
        node[last] = value


def _list_index(part: str, node: list, where: str) -> int:
    if not (part.isascii() and part.isdigit()) or int(part) >= len(node):
        raise ConfigError(f"{where}: no list item {part!r} (the list has {len(node)})")
    return int(part)
