"""check-config on what a real deployment got wrong while it printed "ok": an error (exit 2)
where serve would fail or linking would silently break, a warning (exit 0) where it can be
meant; each names the fix."""

from __future__ import annotations

import pytest

from smtpgate.config import ConfigError, load_config
from smtpgate.users import add_user
from tests.conftest import write_config
from tests.support.sink import make_test_cert
from tests.config.test_check_config import BASE, check

SECOND = "  - name: second\n    address: {address}\n"


def problems(tmp_path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, text))
    return caught.value.problems


@pytest.mark.parametrize(("second", "clash"), [
    ("127.0.0.1:2525", True), ("0.0.0.0:2525", True), ("127.0.0.1:2526", False), ("'[::1]:2525'", False),
])
def test_two_listeners_on_one_address(tmp_path, second, clash):
    text = BASE.replace("upstream:", SECOND.format(address=second) + "upstream:")
    if not clash:
        load_config(write_config(tmp_path, text))
        return
    assert problems(tmp_path, text) == [
        f"smtpgate.yaml:8: listeners[1].address: {second} overlaps listener submission's 127.0.0.1:2525: serve "
        "could not listen on both (address already in use); give each listener its own port"]


def test_a_relay_network_with_host_bits(tmp_path):
    text = BASE.replace("[127.0.0.0/8]", "[127.0.0.0/8, 10.1.2.3/8]")
    assert problems(tmp_path, text) == [
        'smtpgate.yaml:6: listeners[0].relay_networks[1]: "10.1.2.3/8" has host bits set: write 10.0.0.0/8 for '
        "the whole network, or 10.1.2.3/32 for that one host"]


def test_a_new_reference_the_pattern_does_not_match(tmp_path):
    mailboxes = ("mailboxes:\n  - address: pl-payroll@corp.example\n    team: B\n    new_reference: 'T{n}'\n"
                 "  - address: fr-payroll@corp.example\n    team: D\n    new_links: never\n"
                 "    new_reference: 'X{n}'\n")
    assert problems(tmp_path, BASE + mailboxes) == [
        'smtpgate.yaml:13: mailboxes[0].new_reference: "T{n}" makes references such as T900000, which '
        "references.pattern does not match: smtpgate would tag addresses its own replies cannot recognise; "
        "change the template or the pattern"]
    # The pattern widened to match: fine.
    load_config(write_config(tmp_path, BASE + mailboxes + "references:\n  pattern: '[0-9]{1,12}-[TCA]|T[0-9]+'\n"))


@pytest.mark.parametrize("key", ["upstream.password_file", "allocator.token_file", "store.password_file",
                                 "upstream.oauth2.client_secret_file"])
def test_an_empty_secret_file(tmp_path, key):
    (tmp_path / "secret").write_text("\n")
    extra = {
        "upstream.password_file": ("  url: smtp://mail.corp.example:25\n",
                                   "  url: smtp+starttls://mail.corp.example:587\n  username: relay\n"
                                   "  password_file: secret\n"),
        "upstream.oauth2.client_secret_file": ("  url: smtp://mail.corp.example:25\n",
                                               "  url: smtp+starttls://mail.corp.example:587\n  auth: xoauth2\n"
                                               "  username: relay@corp.example\n  oauth2: {token_url: "
                                               "'https://login.example/t', client_id: c, client_secret_file: "
                                               "secret}\n"),
    }
    text = BASE.replace(*extra[key]) if key in extra else BASE + {
        "allocator.token_file": "allocator:\n  kind: http\n  url: http://127.0.0.1:8025/x\n  token_file: secret\n",
        "store.password_file": "store:\n  url: postgresql://smtpgate@db.corp.example/smtpgate\n"
                               "  password_file: secret\n"}[key]
    [problem] = problems(tmp_path, text)
    assert problem.split(": ", 1)[1] == f"{key}: {tmp_path / 'secret'} is empty: write the secret in it (one line)"


def test_store_password_file_and_a_password_in_the_url(tmp_path):
    (tmp_path / "secret").write_text("pw\n")
    text = BASE + "store:\n  url: postgresql://smtpgate:pw@db.corp.example/smtpgate\n  password_file: secret\n"
    assert problems(tmp_path, text) == [
        "smtpgate.yaml:11: store.url: holds a password and store.password_file is set too: remove the password "
        "from the URL"]
    config = load_config(write_config(tmp_path, text.replace(":pw@", "@")))
    assert config.store.password() == "pw"


def test_auth_required_without_a_users_file(tmp_path):
    cert, key = make_test_cert(tmp_path / "tls")
    text = BASE.replace("    tls: none\n    auth: none\n",
                        f"    tls: starttls\n    tls_cert: {cert}\n    tls_key: {key}\n    auth: required\n")
    expected = ("smtpgate.yaml:6: listeners[0].auth: required, but {} no client could log in; "
                "`smtpgate users add NAME` creates it")
    assert problems(tmp_path, text) == [expected.format("users_file is not set:")]
    assert problems(tmp_path, text + "users_file: users\n") == [
        expected.format(f"{tmp_path / 'users'} does not exist:")]
    add_user(tmp_path / "users", "jane", "pw")
    load_config(write_config(tmp_path, text + "users_file: users\n"))


def test_a_hostname_with_spaces(tmp_path):
    assert problems(tmp_path, BASE + "hostname: mail relay\n") == [
        'smtpgate.yaml:10: hostname: "mail relay" is not a host name (letters, digits, hyphens and dots, no '
        "spaces): it goes into the greeting, EHLO and Received:; write one such as relay.corp.example"]


def test_warnings_exit_0_and_name_the_fix(tmp_path):
    (tmp_path / "secret").write_text("pw\n")
    text = BASE.replace("  url: smtp://mail.corp.example:25\n",
                        "  url: smtp://mail.corp.example:25\n  username: relay\n  password_file: secret\n") + (
        "admin:\n  listen: 0.0.0.0:9925\nstore:\n  url: postgresql://smtpgate:pw@db.corp.example/smtpgate\n")
    result = check(write_config(tmp_path, text))
    assert result.returncode == 0 and result.stdout.startswith(f"{tmp_path / 'smtpgate.yaml'}: ok:")
    assert result.stderr.splitlines() == [
        "warning: smtpgate.yaml:8: upstream.auth: password over plain smtp://mail.corp.example:25 sends the "
        "password in clear: use smtp+starttls:// or smtps://",
        "warning: smtpgate.yaml:13: admin.listen: 0.0.0.0:9925 is reachable from other hosts over plain HTTP: "
        "tokens and sign-ins cross the network in clear; listen on 127.0.0.1 behind a TLS proxy, or give it TLS",
        "warning: smtpgate.yaml:15: store.url: holds the password, in a file others may read: put it in "
        "store.password_file (mode 0640, group smtpgate)"]
    # The same upstream on loopback (a local Postfix), the admin on loopback: no warning.
    quiet = text.replace("mail.corp.example", "127.0.0.1").replace("0.0.0.0:9925", "127.0.0.1:9925")
    quiet = quiet.replace("smtpgate:pw@", "smtpgate@")
    assert check(write_config(tmp_path, quiet)).stderr == ""


def test_a_refused_case_exits_2(tmp_path):
    result = check(write_config(tmp_path, BASE + "hostname: mail relay\n"))
    assert result.returncode == 2 and "hostname:" in result.stderr
