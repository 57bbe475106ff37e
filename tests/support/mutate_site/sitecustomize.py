"""For `make mutate` only (tests/support/mutate_children.py puts this folder on PYTHONPATH).

In a child process of a test, mutmut's stats run records the functions reached
into the file the parent names, instead of looking for mutmut's configuration in
the child's working directory.
"""

import os

_HITS = os.environ.get("SMTPGATE_MUTATE_HITS")
if _HITS:
    from mutmut.mutation import trampoline

    def _record(name: str, caller: str | None = None) -> None:
        with open(_HITS, "a", encoding="utf-8") as hits:
            hits.write(name + "\n")

    trampoline.record_trampoline_hit = _record
