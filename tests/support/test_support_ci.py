"""CI turns skips into failures only when CI holds one of the usual true values."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.ci import in_ci

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "True", "yes", "Yes", "on", "ON", " true "])
def test_the_usual_true_values_mean_ci(value):
    assert in_ci({"CI": value}) is True


@pytest.mark.parametrize("value", ["", "0", "false", "False", "no", "off", "nope", "2"])
def test_other_values_do_not(value):
    assert in_ci({"CI": value}) is False


def test_unset_is_not_ci():
    assert in_ci({}) is False


@pytest.mark.parametrize("value,outcome", [("false", "skipped"), ("true", "failed")])
def test_a_missing_service_skips_or_fails(tmp_path, value, outcome):
    """The whole path: a test whose service is missing, run by pytest with CI set to value."""
    test = tmp_path / "test_needs.py"
    test.write_text(textwrap.dedent("""\
        from tests.support.ci import needs

        def test_needs_a_service():
            needs("a service", "not installed here")
    """))
    env = {"PATH": "/usr/bin:/bin", "CI": value, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                          "-c", "/dev/null", str(test)], capture_output=True, text=True, env=env, timeout=120)
    assert f"1 {outcome}" in run.stdout, run.stdout + run.stderr
