"""The `smtpgate` command run as an operator runs it, and a config for its commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.configs import TEAMS_A_B

__all__ = ["CONFIG", "ROOT", "smtpgate"]

ROOT = Path(__file__).resolve().parent.parent.parent

# A listener the commands never open, a maildir upstream, Teams A and B, a users file; store.url is {store}.
CONFIG = """\
listeners:
  - name: submission
    address: 127.0.0.1:2525
upstream:
  url: maildir:outbox
""" + TEAMS_A_B + """\
users_file: users
store:
  url: {store}
"""


def smtpgate(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m smtpgate ARGS` from the repository's folder, its output captured as text."""
    return subprocess.run([sys.executable, "-m", "smtpgate", *args], input=stdin, capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env=env)
