"""For `make mutate` only (tests/support/mutate_children.py puts this folder on PYTHONPATH).

In a child process of a test, mutmut's stats run records the functions reached
into the file the parent names, instead of looking for mutmut's configuration in
the child's working directory.

And the child dies with the test process that started it: mutmut kills a test
that runs past its time limit, and an `smtpgate serve` left behind would hold
its ports (the demo configuration's are fixed) and fail the tests of every
mutant after it.
"""

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1
if ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) == 0 and os.getppid() == 1:
    os._exit(1)  # the test process was gone before the request was made

_HITS = os.environ.get("SMTPGATE_MUTATE_HITS")
if _HITS:
    from mutmut.mutation import trampoline

    def _record(name: str, caller: str | None = None) -> None:
        with open(_HITS, "a", encoding="utf-8") as hits:
            hits.write(name + "\n")

    trampoline.record_trampoline_hit = _record
