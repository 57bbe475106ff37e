"""`users list`, `users delete`, and a listing piped into `head` that ends without a traceback."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

from smtpgate.users import Users, add_user
from tests.conftest import write_config
from tests.support.cli import CONFIG, ROOT, smtpgate


def test_users_list_and_delete(tmp_path):
    config = write_config(tmp_path, CONFIG.format(store="sqlite:smtpgate.db"))
    users = tmp_path / "users"
    add_user(users, "alice", "pw one", senders=["alice@corp.example", "uk-payroll+*@corp.example"])
    add_user(users, "scanner", "pw two")
    users.chmod(0o640)
    listed = smtpgate("users", "list", "-c", str(config))
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout == "alice\talice@corp.example, uk-payroll+*@corp.example\nscanner\tany sender\n"

    deleted = smtpgate("users", "delete", "scanner", "-c", str(config))
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.startswith(f"deleted scanner from {users}")
    assert '"event": "user.deleted"' in deleted.stderr and '"user": "scanner"' in deleted.stderr
    assert list(Users.load(users).entries) == ["alice"]
    assert users.stat().st_mode & 0o777 == 0o640  # kept, as `users add` keeps it

    missing = smtpgate("users", "delete", "scanner", "-c", str(config))
    assert (missing.returncode, missing.stderr) == (1, f"smtpgate: no user scanner in {users}\n")


def test_links_list_into_head_ends_quietly(tmp_path):
    config = write_config(tmp_path, CONFIG.format(store="sqlite:smtpgate.db"))
    assert smtpgate("db", "upgrade", "-c", str(config)).returncode == 0
    with sqlite3.connect(tmp_path / "smtpgate.db") as db:  # more than a pipe holds
        db.executemany("INSERT INTO links (source_reference, target_reference, lo, hi, created_at)"
                       " VALUES (?, ?, ?, ?, '2026-12-01T00:00:00.000000Z')",
                       [(f"{i}-T", f"{i}-C", f"{i}-C", f"{i}-T") for i in range(1, 4000)])
    piped = subprocess.run(f"{sys.executable} -m smtpgate links list -c {config} | head -2", shell=True,
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert piped.stdout.splitlines()[0].startswith("CREATED")
    assert piped.stderr == ""
