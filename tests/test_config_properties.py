"""Property-based tests (hypothesis) of the config contract: any `dotted.key=value` override a user can type, of any
field and any YAML value, either gives a config or one `ConfigError` line (never another exception: a traceback on
every rank after the rendezvous), also once the layout is checked against a world size; and a config that loads
reloads from its `--print-config` dump (`dump_config`) as the same config. References: the dataclasses' own fields
(every leaf is tried), PyYAML for what a value means."""
from __future__ import annotations

import dataclasses
import typing

import yaml
from hypothesis import given
from hypothesis import strategies as st
from properties import PROPERTY
from test_config import TINY

from nanotronix.config import Config, ConfigError, dump_config, load_config
from nanotronix.config_checks import resolve_layout
from nanotronix.errors import UserError


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Every settable dotted key of the config dataclasses (a list of dataclasses: its first item)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if dataclasses.is_dataclass(tp):
            keys += _leaf_keys(tp, key + ".")
        elif typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
            keys += [key] + _leaf_keys(args[0], key + ".0.")
        else:
            keys.append(key)
    return keys


LEAF_KEYS = _leaf_keys(Config)
# what a value typed on a command line can be: YAML scalars and collections, numbers at and past every edge, text
# YAML cannot parse (kept as a string), anchors and tags
yaml_texts = st.one_of(
    st.sampled_from(["", "~", "null", "true", "false", "yes", "0", "-1", "1", "2", "3", "7", "8", "1e400", "-1e400",
                     ".inf", "-.inf", ".nan", "1e-400", "0x10", "0o7", "1_000", "2.5", "-0.0", "[]", "{}", "[1, 2]",
                     "[[1]]", "{a: 1}", "[{}]", "'1'", "auto", "none", "bfloat16", "cpu", "1-3", "3-1", "[1-3, 5]",
                     "&a [*a]", "!!binary aGk=", "!!python/name:os.system", "[", "{", "a: b: c", "'", "é",
                     "1" + "0" * 400, "1" * 5000, "-" + "9" * 30, "2024-01-01", "2023-02-30", "12:30:00", "\t",
                     "a\nb"]),
    st.integers(-(2 ** 70), 2 ** 70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=12),
)
keys = st.one_of(st.sampled_from(LEAF_KEYS), st.sampled_from(LEAF_KEYS).map(lambda k: k + ".x"),
                 st.sampled_from(LEAF_KEYS).map(lambda k: k.rsplit(".", 1)[0] + ".0"), st.text(max_size=8))


def _loaded_or_one_line(path, overrides: list[str]):
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e), (overrides, str(e))
        return None


@PROPERTY
@given(overrides=st.lists(st.tuples(keys, yaml_texts).map("=".join), min_size=1, max_size=3),
       world_size=st.sampled_from([1, 2, 3, 4, 8]))
def test_any_override_gives_a_config_or_one_error_line(tmp_path_factory, overrides, world_size):
    path = tmp_path_factory.getbasetemp() / "tiny_properties.yaml"
    if not path.exists():
        path.write_text(yaml.safe_dump(TINY))
    cfg = _loaded_or_one_line(path, overrides)
    if cfg is None:
        return
    try:
        resolve_layout(cfg, world_size)
    except UserError as e:
        assert str(e) and "\n" not in str(e), (overrides, world_size, str(e))


@PROPERTY
@given(overrides=st.lists(st.tuples(st.sampled_from(LEAF_KEYS), yaml_texts).map("=".join), max_size=3))
def test_a_config_reloads_from_its_dump_as_itself(tmp_path_factory, overrides):
    base = tmp_path_factory.getbasetemp()
    path = base / "tiny_properties.yaml"
    if not path.exists():
        path.write_text(yaml.safe_dump(TINY))
    cfg = _loaded_or_one_line(path, overrides)
    if cfg is None:
        return
    dumped = base / "dumped.yaml"
    dumped.write_text(dump_config(cfg))
    assert load_config(dumped).to_dict() == cfg.to_dict(), overrides
