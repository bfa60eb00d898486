"""pytest configuration: hypothesis profiles and shared fixtures (helpers live in tests/helpers.py)."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fuzz", deadline=None, max_examples=2000,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("CNNC_HYPOTHESIS_PROFILE", "ci"))

# The cost model (cnnc.cost) prices rewrites with the roofline cached in $CNNC_CACHE_DIR when `cnnc inspect --cost`
# measured one; tests get an empty cache, hence the built-in constants, so that every run decides alike.
os.environ["CNNC_CACHE_DIR"] = tempfile.mkdtemp(prefix="cnnc-test-cache-")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
