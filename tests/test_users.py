"""The users file and its sender lists without a socket (smtpgate/users.py): the patterns,
what they match, the file and the `users add` command.

What a client hears when its sender is outside its list (at MAIL and at the end of DATA) is
in tests/frontends/smtp/test_sender_rights.py.
"""

from __future__ import annotations

import io
import sys

import pytest

from smtpgate.frontends.smtp.server import from_refusal
from smtpgate.mail.addresses import parse_path
from smtpgate.mail.headers import parse_header_block
from smtpgate.users import SenderPattern, Users, UsersError, hash_password, parse_senders
from tests.conftest import write_config

JANE_LIST = "jane@corp.example, uk-payroll+*@corp.example, *@team.example, *@bücher.example"


def may(patterns: str, address: str | None) -> bool:
    users = Users({"jane": "x"}, {"jane": parse_senders(patterns)})
    return users.may_send_as("jane", None if address is None else parse_path(f"<{address}>"))


@pytest.mark.parametrize("address", [
    "jane@corp.example",
    "Jane@CORP.example",  # local parts match whatever their case
    "uk-payroll@corp.example",  # the mailbox itself
    "uk-payroll+101203-T@corp.example",  # and any tag of it
    "UK-Payroll+101203-T@corp.example",
    "anyone@team.example",
    "x@TEAM.example",
    "info@xn--bcher-kva.example",  # a U-label in the list matches the A-label, and the other way
    "info@bücher.example",
    None,  # the null sender names nobody
])
def test_the_list_lets_a_user_send_as(address: str | None) -> None:
    assert may(JANE_LIST, address)


@pytest.mark.parametrize("address", [
    "boss@corp.example",
    "jane+x@corp.example",  # a tag only where the list says mailbox+*
    "janet@corp.example",
    "uk-payroll-x@corp.example",
    "uk-payrol@corp.example",
    "jane@corp.example.evil.example",
    "anyone@sub.team.example",  # *@domain is that domain only
    "uk-payroll+1-T@other.example",
])
def test_the_list_refuses(address: str) -> None:
    assert not may(JANE_LIST, address)


def test_a_user_without_a_list_may_send_as_anyone() -> None:
    users = Users({"bob": "x", "jane": "x"}, {"jane": parse_senders("jane@corp.example")})
    assert users.may_send_as("bob", parse_path("<boss@corp.example>"))
    assert users.may_send_as("nobody-known", parse_path("<boss@corp.example>"))
    assert not users.may_send_as("jane", parse_path("<boss@corp.example>"))


@pytest.mark.parametrize(("text", "local", "domain", "separator"), [
    ("jane@corp.example", "jane", "corp.example", None),
    (" Jane@CORP.example ", "jane", "corp.example", None),
    ("*@team.example", None, "team.example", None),
    ("uk-payroll+*@corp.example", "uk-payroll", "corp.example", "+"),
    ("uk-payroll-*@corp.example", "uk-payroll", "corp.example", "-"),
    ("info@bücher.example", "info", "xn--bcher-kva.example", None),
])
def test_sender_pattern_parse(text: str, local: str | None, domain: str, separator: str | None) -> None:
    pattern = SenderPattern.parse(text)
    assert (pattern.local, pattern.domain, pattern.separator, pattern.text) == (local, domain, separator, text.strip())


@pytest.mark.parametrize("text", [
    "jane", "@corp.example", "jane@", "a*b@corp.example", "*a@corp.example", "a+*b@corp.example",
    "+*@corp.example", "ab*@corp.example", "**@corp.example", "jane@-bad.example", "ja ne@corp.example",
    "a+**@corp.example",
])
def test_sender_pattern_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        SenderPattern.parse(text)


def test_parse_senders_names_the_entry_by_position_unless_told_to_show_it() -> None:
    assert [p.text for p in parse_senders("a@x.example, ,b@x.example")] == ["a@x.example", "b@x.example"]
    with pytest.raises(ValueError, match=r"^sender list entry 2: "):
        parse_senders("a@x.example,secret")
    with pytest.raises(ValueError, match=r"^sender 'secret': "):
        parse_senders("a@x.example,secret", show=True)
    with pytest.raises(ValueError, match="empty sender list"):
        parse_senders(" , ")


def test_users_file_without_lists_still_reads(tmp_path):
    # A file written before sender lists existed.
    path = tmp_path / "users"
    path.write_text(f"# old\nalice:{hash_password('pw', n=2**10)}\n")
    users = Users.load(path)
    assert users.verify("alice", "pw")
    assert users.may_send_as("alice", parse_path("<anyone@anywhere.example>"))


def test_users_add_cli_writes_keeps_and_clears_sender_lists(tmp_path, monkeypatch, capsys):
    from smtpgate.cli import main

    config = write_config(tmp_path, "listeners:\n  - name: s\n    address: 127.0.0.1:0\n"
                                    "users_file: users\nupstream:\n  url: maildir:out\n")
    path = tmp_path / "users"

    def run(*args: str, password: str = "pw") -> int:
        monkeypatch.setattr(sys, "stdin", io.StringIO(password + "\n"))
        return main(["users", "add", *args, "-c", str(config)])

    assert run("jane", "--sender", "jane@corp.example", "*@team.example", "--sender", "uk-payroll+*@corp.example") == 0
    assert "sending as jane@corp.example, *@team.example, uk-payroll+*@corp.example" in capsys.readouterr().out
    line = path.read_text().strip()
    assert line.startswith("jane:$scrypt$") and line.endswith(":jane@corp.example,*@team.example,uk-payroll+*@corp.example")
    users = Users.load(path)
    assert users.may_send_as("jane", parse_path("<x@TEAM.example>"))
    assert not users.may_send_as("jane", parse_path("<x@corp.example>"))
    # A new password keeps the list: it never widens what the user may send as.
    assert run("jane", password="new") == 0
    users = Users.load(path)
    assert users.verify("jane", "new") and users.senders["jane"][0].text == "jane@corp.example"
    assert run("jane", "--any-sender") == 0
    assert "jane" not in Users.load(path).senders
    assert run("jane", "--sender", "not an address") == 2
    assert "sender 'not an address'" in capsys.readouterr().err


def test_bad_sender_list_in_the_file_names_file_line_and_user(tmp_path):
    path = tmp_path / "users"
    path.write_text(f"alice:{hash_password('pw', n=2**10)}:alice@corp.example,a*b@corp.example\n")
    with pytest.raises(UsersError) as info:
        Users.load(path)
    assert str(info.value).startswith(f"{path}:1: user alice: sender list entry 2: ")
    # Nothing of the line is echoed: it may hold a password typed in the wrong place.
    path.write_text(f"alice:{hash_password('pw', n=2**10)}:hunter2\n")
    with pytest.raises(UsersError) as info:
        Users.load(path)
    assert "hunter2" not in str(info.value)


# ---------------------------------------------------------------- every From: field (GateSMTP.check_from)

ALLOWED = {"jane@corp.example", "payroll@corp.example"}


def _from_refusal(head: bytes):
    return from_refusal(parse_header_block(head + b"\r\n"), lambda a: str(a).lower() in ALLOWED)


@pytest.mark.parametrize("head", [
    b"From: jane@corp.example\r\n",
    b"From: Jane <jane@corp.example>, Payroll <payroll@corp.example>\r\n",
    b"From: jane@corp.example\r\nFrom: payroll@corp.example\r\n",
    b"Subject: no From at all\r\n",
])
def test_every_from_address_allowed_is_no_refusal(head):
    assert _from_refusal(head) is None


@pytest.mark.parametrize(("head", "named"), [
    (b"From: ceo@corp.example\r\n", "ceo@corp.example"),
    (b"From: jane@corp.example, ceo@corp.example\r\n", "ceo@corp.example"),
    (b"From: jane@corp.example\r\nFrom: ceo@corp.example\r\n", "ceo@corp.example"),  # not only the first field
])
def test_any_from_address_not_allowed_is_refused_and_named(head, named):
    refusal = _from_refusal(head)
    assert refusal is not None and refusal.reply.code == 550 and refusal.reply.enhanced == "5.7.1"
    assert refusal.log_fields == {"header_from": named}


def test_an_unparseable_from_is_refused():
    refusal = _from_refusal(b"From: <<<not an address\r\n")
    assert refusal is not None and refusal.reply.code == 550 and "cannot be parsed" in refusal.reason
