"""The `smtpgate` command's store and user subcommands, run as a user would run them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from smtpgate.users import Users
from tests.conftest import write_config
from tests.support.cli import CONFIG as CLI_CONFIG, smtpgate

CONFIG = CLI_CONFIG.format(store="sqlite:state/smtpgate.db")


def run(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return smtpgate(*args, "-c", str(config), stdin=stdin)


def test_db_upgrade_then_empty_views(tmp_path):
    config = write_config(tmp_path, CONFIG)
    upgraded = run(config, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout.startswith("schema version 0 -> ")
    again = run(config, "db", "upgrade")
    assert again.stdout.startswith("schema is current")
    listed = run(config, "links", "list", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == []
    missing = run(config, "links", "show", "101203-T")
    assert missing.returncode == 1 and "no activity 101203-T" in missing.stderr
    assert run(config, "db", "prune").stdout.startswith("pruned 0 message record(s)")


def test_links_list_bad_since(tmp_path):
    config = write_config(tmp_path, CONFIG)
    result = run(config, "links", "list", "--since", "last tuesday")
    assert result.returncode == 2 and "--since" in result.stderr


def test_users_add_reads_password_from_stdin(tmp_path):
    config = write_config(tmp_path, CONFIG)
    added = run(config, "users", "add", "jane", stdin="correct horse\n")
    assert added.returncode == 0 and added.stdout.startswith("added jane")
    replaced = run(config, "users", "add", "jane", stdin="battery staple\n")
    assert replaced.stdout.startswith("replaced jane")
    users = Users.load(tmp_path / "users")
    assert users.verify("jane", "battery staple") and not users.verify("jane", "correct horse")
    empty = run(config, "users", "add", "bob", stdin="\n")
    assert empty.returncode == 2 and "empty password" in empty.stderr
    bad = run(config, "users", "add", "a:b", stdin="pw\n")
    assert bad.returncode == 2 and "bad user name" in bad.stderr


def test_store_unreachable_is_a_clear_error(tmp_path):
    config = write_config(tmp_path, CONFIG.replace("sqlite:state/smtpgate.db",
                                                   "postgresql://postgres@127.0.0.1:1/nothing"))
    result = run(config, "links", "list")
    assert result.returncode == 1
    assert result.stderr.startswith("smtpgate: store: postgresql://postgres@127.0.0.1:1/nothing: ")
    assert "Traceback" not in result.stderr
