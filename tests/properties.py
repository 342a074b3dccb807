"""The one hypothesis configuration of the property-based test files: derandomized with no example database, so CI
sees the same examples every run, and hypothesis' home folder (its caches) outside the checkout, not ./.hypothesis."""
from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "nanotronix-hypothesis")
PROPERTY = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
