"""Whether the tests run under CI, where a missing service fails a test instead of skipping it."""

from __future__ import annotations

import os
from collections.abc import Mapping

import pytest

__all__ = ["IN_CI", "in_ci", "needs"]

# The values CI systems and people set for "on" (compared case-insensitively).
TRUE_VALUES = frozenset({"1", "true", "yes", "on"})


def in_ci(environ: Mapping[str, str] = os.environ) -> bool:
    """True when CI holds one of the usual true values; CI=false, CI=0 or CI="" are not CI."""
    return environ.get("CI", "").strip().lower() in TRUE_VALUES


IN_CI = in_ci()


def needs(service: str, why: str) -> None:
    """A test cannot run here: skip it, or fail it under CI, naming the service and the reason."""
    if IN_CI:
        pytest.fail(f"{service} is needed under CI: {why}")
    pytest.skip(f"{service} not available: {why}")
