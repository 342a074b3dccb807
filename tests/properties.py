"""The one hypothesis configuration of the property-based test files: derandomized with no example database, and
hypothesis' home folder (its caches) outside the checkout, not ./.hypothesis. Derandomized is not quite "the same
examples every run": hypothesis also draws (now and then) constants it finds in the project's modules already
imported, which differ with the test files an xdist worker ran first. So a failure prints its
`@reproduce_failure` blob (print_blob) beside the minimal example, to replay exactly that case."""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "nanotronix-hypothesis")
PROPERTY = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def log_uniform(low: float, high: float) -> st.SearchStrategy[float]:
    """Floats spread over the orders of magnitude between LOW and HIGH (10 ** uniform exponent), the bounds included."""
    return st.floats(math.log10(low), math.log10(high)).map(lambda e: float(10 ** e))


@st.composite
def damaged_json(draw, value) -> tuple[bytes, str]:
    """The JSON text of `value`, then perhaps damaged as a hand edit, a full disk or a bad copy leaves it (truncated,
    non-UTF-8 bytes put in, not an object, nested deeper than the JSON reader recurses, empty), with what was done."""
    data = json.dumps(value, indent=1).encode()
    damage = draw(st.sampled_from(["none"] * 10 + ["truncate", "bytes", "not_an_object", "nested", "empty"]))
    if damage == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif damage == "bytes":
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] + draw(st.sampled_from([b"\xff", b"\x80\x80", b"\xc3", b"\xef\xbb\xbf", b"\x00"])) + \
            data[cut:]
    elif damage == "not_an_object":
        data = json.dumps(draw(st.sampled_from([[value], None, 4, "checkpoint", [], True]))).encode()
    elif damage == "nested":
        data = data[:-2] + b', "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    elif damage == "empty":
        data = b""
    return data, damage
