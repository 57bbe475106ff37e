"""`smtpgate serve` with `workers:` as tests run it: the supervisor's waits given on the command line.

    python -m tests.support.supervised CONFIG BACKOFF_FIRST BACKOFF_MAX STABLE_AFTER STOP_MARGIN [SHARING]

PROMETHEUS_MULTIPROC_DIR must be set by the caller (serve sets it with an exec).
"""

from __future__ import annotations

import sys
from pathlib import Path

from smtpgate.config import load_config
from smtpgate.log import setup_logging
from smtpgate.runtime.supervisor import Supervisor, Timings


def main(argv: list[str]) -> int:
    path = Path(argv[0])
    config = load_config(path)
    setup_logging(config.logging.format, config.logging.level)
    timings = Timings(*(float(a) for a in argv[1:5]))
    sharing = argv[5] if len(argv) > 5 else "shared"
    return Supervisor(path, config, sharing=sharing, timings=timings).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
