"""The one hypothesis configuration of the property-based test files: derandomized with no example database, and
hypothesis' home folder (its caches) outside the checkout, not ./.hypothesis. Derandomized is not quite "the same
examples every run": hypothesis also draws (now and then) constants it finds in the project's modules already
imported, which differ with the test files an xdist worker ran first. So a failure prints its
`@reproduce_failure` blob (print_blob) beside the minimal example, to replay exactly that case."""
from __future__ import annotations

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
