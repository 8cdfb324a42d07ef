"""Shared test configuration. Fixtures users can reuse live in gateway.testing."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# "ci" keeps the suite quick; HYPOTHESIS_PROFILE=long searches much harder.
settings.register_profile("ci", max_examples=60, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=2000, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
