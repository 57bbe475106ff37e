"""The operator's commands run as an admin runs them: read-only views that never
write, links corrected by hand and exported, `users add` that keeps the file usable."""

from __future__ import annotations

import grp
import json
import os
import pwd
from pathlib import Path

import pytest

from smtpgate.users import Users, add_user
from tests.conftest import write_config
from tests.store_helpers import pg_database, store_url  # noqa: F401  (fixtures)
from tests.support.cli import CONFIG, smtpgate


def events(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def me() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


# --- read-only commands never write


@pytest.mark.parametrize("command", [["links", "show", "101203-T"], ["links", "list"], ["links", "export", "--json"]])
def test_read_only_commands_on_a_missing_store(tmp_path, command):
    config = write_config(tmp_path, CONFIG.format(store="sqlite:state/smtpgate.db"))
    result = smtpgate(*command, "-c", str(config))
    assert result.returncode == 2
    assert result.stderr == (f"smtpgate: store: {tmp_path / 'state' / 'smtpgate.db'} does not exist; "
                             "`smtpgate db upgrade` creates the store\n")
    assert not (tmp_path / "state").exists()


def test_read_only_command_on_a_database_without_schema(store_url, tmp_path):  # noqa: F811
    if store_url.startswith("sqlite:"):
        path = Path(store_url[len("sqlite:"):])
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
        label = str(path)
    else:
        label = store_url
    config = write_config(tmp_path, CONFIG.format(store=store_url))
    result = smtpgate("links", "list", "-c", str(config))
    assert result.returncode == 2
    assert result.stderr == f"smtpgate: store: {label} has no smtpgate schema; `smtpgate db upgrade` creates it\n"
    if store_url.startswith("sqlite:"):
        assert [p.name for p in path.parent.iterdir()] == ["smtpgate.db"] and path.read_bytes() == b""


def test_config_option_before_or_after_the_command(tmp_path):
    config = str(write_config(tmp_path, CONFIG.format(store="sqlite:smtpgate.db")))
    assert smtpgate("db", "upgrade", "-c", config).returncode == 0
    for args in (["-c", config, "links", "list", "--json"], ["links", "-c", config, "list", "--json"],
                 ["links", "list", "--json", "-c", config], ["--config", config, "links", "list", "--json"]):
        result = smtpgate(*args)
        assert result.returncode == 0 and json.loads(result.stdout) == [], (args, result.stderr)
    # The one after the command wins over the one before it.
    result = smtpgate("-c", str(tmp_path / "nowhere.yaml"), "check-config", "-c", config)
    assert result.returncode == 0, result.stderr


# --- links corrected by hand, shown case-insensitively, exported


def test_links_add_show_export_delete_round_trip(store_url, tmp_path):  # noqa: F811
    config = str(write_config(tmp_path, CONFIG.format(store=store_url)))
    assert smtpgate("db", "upgrade", "-c", config).returncode == 0

    added = smtpgate("links", "add", "101203-t", "900001-T", "--mailbox", "PL-Payroll@corp.example", "-c", config)
    assert added.returncode == 0, added.stderr
    assert added.stdout == "linked 101203-T and 900001-T (pl-payroll@corp.example)\n"
    [event] = [e for e in events(added.stderr) if e["event"] == "link.added"]
    assert (event["source_reference"], event["reference"], event["by"]) == ("101203-T", "900001-T", me())
    again = smtpgate("links", "add", "101203-T", "900001-T", "--mailbox", "pl-payroll@corp.example", "-c", config)
    assert again.returncode == 0 and again.stdout == "101203-T and 900001-T were already linked\n"

    shown = smtpgate("links", "show", "101203-t", "--json", "-c", config)
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    assert view["reference"] == "101203-T"
    assert [(link["reference"], link["mailbox"], link["team"]) for link in view["links"]] == [
        ("900001-T", "pl-payroll@corp.example", "Team B (Poland)")]

    exported = smtpgate("links", "export", "--json", "-c", config)
    assert exported.returncode == 0, exported.stderr
    backup = json.loads(exported.stdout)
    assert [(a["reference"], a["mailbox"], a["team"]) for a in backup["activities"]] == [
        ("101203-T", None, None), ("900001-T", "pl-payroll@corp.example", "Team B (Poland)")]
    assert [(row["source"]["reference"], row["target"]["reference"]) for row in backup["links"]] == [
        ("101203-T", "900001-T")]

    deleted = smtpgate("links", "delete", "900001-t", "101203-T", "-c", config)
    assert deleted.returncode == 0 and deleted.stdout == "unlinked 900001-T and 101203-T\n"
    [event] = [e for e in events(deleted.stderr) if e["event"] == "link.deleted"]
    assert (event["source_reference"], event["reference"], event["by"]) == ("101203-T", "900001-T", me())
    missing = smtpgate("links", "delete", "900001-T", "101203-T", "-c", config)
    assert missing.returncode == 1 and missing.stderr.endswith("smtpgate: no link between 900001-T and 101203-T\n")
    assert json.loads(smtpgate("links", "export", "--json", "-c", config).stdout)["links"] == []

    # The export is a backup: replayed with `links add` into a new store it gives the same links.
    restored = str(write_config(tmp_path, CONFIG.format(store="sqlite:restored.db"), name="restored.yaml"))
    assert smtpgate("db", "upgrade", "-c", restored).returncode == 0
    for row in backup["links"]:
        replay = smtpgate("links", "add", row["source"]["reference"], row["target"]["reference"],
                          "--mailbox", row["target"]["mailbox"], "-c", restored)
        assert replay.returncode == 0, replay.stderr
    again = json.loads(smtpgate("links", "export", "--json", "-c", restored).stdout)
    assert [(r["source"], r["target"]) for r in again["links"]] == [(r["source"], r["target"]) for r in backup["links"]]


def test_links_add_refusals(tmp_path):
    config = str(write_config(tmp_path, CONFIG.format(store="sqlite:smtpgate.db")))
    assert smtpgate("db", "upgrade", "-c", config).returncode == 0
    assert smtpgate("links", "add", "1-T", "2-T", "--mailbox", "uk-payroll@corp.example", "-c", config).returncode == 0

    other = smtpgate("links", "add", "3-T", "2-T", "--mailbox", "pl-payroll@corp.example", "-c", config)
    assert (other.returncode, other.stderr.splitlines()[-1]) == (
        1, "smtpgate: 2-T belongs to uk-payroll@corp.example, not pl-payroll@corp.example")
    unknown = smtpgate("links", "add", "3-T", "4-T", "--mailbox", "hr@corp.example", "-c", config)
    assert (unknown.returncode, unknown.stderr) == (
        2, "smtpgate: --mailbox: hr@corp.example is not one of the mailboxes in smtpgate.yaml\n")
    bad = smtpgate("links", "add", "3-T", "ticket 4", "--mailbox", "pl-payroll@corp.example", "-c", config)
    assert (bad.returncode, bad.stderr) == (
        2, "smtpgate: ticket 4 is not a reference (references.pattern: [0-9]{1,12}-[TCA])\n")


# --- users add keeps the file usable by the service


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_users_add_keeps_owner_group_and_mode(tmp_path):
    config = str(write_config(tmp_path, CONFIG.format(store="sqlite:smtpgate.db")))
    users = tmp_path / "users"
    add_user(users, "jane", "correct horse")
    os.chown(users, 65534, 65534)
    os.chmod(users, 0o604)
    inode = users.stat().st_ino

    result = smtpgate("users", "add", "bob", "-c", config, stdin="battery staple\n")
    assert result.returncode == 0, result.stderr
    st = users.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (65534, 65534, 0o604)
    assert st.st_ino != inode  # replaced by a rename, never rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smtpgate.yaml", "users"]  # no temporary left
    loaded = Users.load(users)
    assert loaded.verify("jane", "correct horse") and loaded.verify("bob", "battery staple")


def test_users_add_creates_the_file_for_the_service_group(tmp_path):
    try:
        group = grp.getgrgid(os.getegid() if os.geteuid() != 0 else 65534).gr_name
    except KeyError:
        pytest.skip("no group to give the file to")
    users = tmp_path / "etc" / "users"
    add_user(users, "jane", "correct horse", group=group)
    st = users.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (os.geteuid(), grp.getgrnam(group).gr_gid, 0o640)


def test_users_add_leaves_a_broken_file_alone(tmp_path):
    config = str(write_config(tmp_path, CONFIG.format(store="sqlite:smtpgate.db")))
    users = tmp_path / "users"
    users.write_text("jane:not-a-hash\n")
    result = smtpgate("users", "add", "bob", "-c", config, stdin="pw\n")
    # check-config refuses it first, naming the file and line, and the file is unchanged.
    assert result.returncode == 2
    assert result.stderr.startswith(f"smtpgate.yaml:12: users_file: {users}:1: expected NAME:$scrypt$")
    assert users.read_text() == "jane:not-a-hash\n"


def test_users_add_says_a_reload_picks_the_user_up(tmp_path):
    config = str(write_config(tmp_path, CONFIG.format(store="sqlite:smtpgate.db")))
    result = smtpgate("users", "add", "jane", "-c", config, stdin="correct horse\n")
    assert result.stdout == (f"added jane in {tmp_path / 'users'}, sending as any address; "
                             "`systemctl reload smtpgate` makes serve use it\n")
