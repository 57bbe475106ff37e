"""`make mutate`'s summary line: the mutation score of the mutants mutmut has judged so far.

A mutant is killed when a test failed (or it ran past its time limit, mutmut's "timeout");
it survived when every test passed. Mutants not yet run (a run stopped by MUTATE_SECONDS)
are counted apart, not as survivors.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

STATS = Path("mutants/mutmut-cicd-stats.json")


def summary(stats: dict[str, int]) -> str:
    killed = stats["killed"] + stats["timeout"] + stats.get("segfault", 0)
    judged = killed + stats["survived"] + stats.get("suspicious", 0)
    not_run = stats["total"] - judged - stats.get("skipped", 0) - stats.get("no_tests", 0)
    score = f"{100 * killed / judged:.1f} %" if judged else "n/a"
    return (f"mutation score {score}: {killed} of {judged} mutants killed, {stats['survived']} survived"
            f" ({stats.get('no_tests', 0)} without a test, {not_run} not run yet, {stats['total']} in all)")


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a proportion ``hits / n`` (n > 0)."""
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def sample_summary(statuses: list[str], total: int) -> str:
    """The score of a random sample of mutants: a mutant without a test counts as a survivor here."""
    killed = sum(status in ("killed", "timeout", "segfault") for status in statuses)
    survived = sum(status in ("survived", "suspicious", "no tests") for status in statuses)
    judged = killed + survived
    not_run = len(statuses) - judged
    if not judged:
        return f"sample of {len(statuses)} of {total} mutants: none judged"
    low, high = wilson(killed, judged)
    return (f"mutation score {100 * killed / judged:.1f} % (95 % interval {100 * low:.0f}-{100 * high:.0f} %) in a sample:"
            f" {killed} of {judged} killed, {survived} survived"
            f" ({statuses.count('no tests')} without a test, {not_run} not run yet, sample of {len(statuses)} of {total})")


def main() -> int:
    mutmut = Path(sys.executable).with_name("mutmut")
    subprocess.run([str(mutmut), "export-cicd-stats"], check=True, capture_output=True)
    print(summary(json.loads(STATS.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
