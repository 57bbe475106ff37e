"""pytest plugin for `make mutate` only: mutants run in the `smtpgate serve` children too.

Tests of the supervisor (and of `serve`) start `python -m smtpgate` children in a
temporary folder. Under mutmut those children must import the mutated copy of
smtpgate, not the installed one, and mutmut's stats run must learn which tests
reach a module's functions through a child: mutmut's own recorder in a child
would look for pyproject.toml in that temporary folder and fail, and what it
recorded would stay in the child anyway.

So this plugin (named in the [tool.mutmut] table tests/support/mutate_io.py
writes, never in a normal test run) puts the mutated tree and
tests/support/mutate_site (its sitecustomize.py) first on the children's
PYTHONPATH, and gives them a file to write the functions they reach into; after
each test the names in that file join the ones mutmut recorded in this process.

It also orders a mutant's tests quickest first (by the durations mutmut's stats
run recorded), file by file so that a file's fixtures are set up once: mutmut
stops at the first failure, so a mutant most tests kill is judged in the time of
its quickest test instead of in whatever order the test names came.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

TREE = Path(__file__).resolve().parents[2]  # the mutated copy: smtpgate/ and tests/
SITE = Path(__file__).resolve().with_name("mutate_site")
HITS_VARIABLE = "SMTPGATE_MUTATE_HITS"


def pytest_configure(config: pytest.Config) -> None:
    hits = TREE / f"child-hits-{os.getpid()}.txt"
    hits.write_text("", encoding="utf-8")
    config.stash[_HITS] = hits
    os.environ[HITS_VARIABLE] = str(hits)
    paths = [str(TREE), str(SITE)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Before mutmut files this test's hits: add the ones its children wrote."""
    hits: Path = item.config.stash[_HITS]
    names = {line for line in hits.read_text(encoding="utf-8").splitlines() if line}
    hits.write_text("", encoding="utf-8")
    if names:
        from mutmut.state import state

        state()._stats.update(names)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Quickest files first, and in each file its quickest tests first."""
    try:
        durations: dict[str, float] = json.loads((TREE / "mutmut-stats.json").read_text())["duration_by_test"]
    except (OSError, ValueError, KeyError):  # the stats run itself: nothing measured yet
        return
    by_file: dict[str, list[pytest.Item]] = {}
    for item in items:
        by_file.setdefault(item.nodeid.split("::", 1)[0], []).append(item)

    def cost(item: pytest.Item) -> float:
        return durations.get(item.nodeid, 0.0)

    files = sorted(by_file.values(), key=lambda tests: sum(map(cost, tests)) / len(tests))
    items[:] = [item for tests in files for item in sorted(tests, key=cost)]


_HITS = pytest.StashKey[Path]()
