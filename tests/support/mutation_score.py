"""`make mutate`'s summary line: the mutation score of the mutants mutmut has judged so far.

A mutant is killed when a test failed (or it ran past its time limit, mutmut's "timeout");
it survived when every test passed. Mutants not yet run (a run stopped by MUTATE_SECONDS)
are counted apart, not as survivors.
"""

from __future__ import annotations

import json
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


def main() -> int:
    mutmut = Path(sys.executable).with_name("mutmut")
    subprocess.run([str(mutmut), "export-cicd-stats"], check=True, capture_output=True)
    print(summary(json.loads(STATS.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
