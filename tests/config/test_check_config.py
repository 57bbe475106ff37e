"""`smtpgate check-config` on configs that serve would trip over or that are unsafe:
one broken file per case, run as an admin runs it, the exact message asserted."""

from __future__ import annotations

import contextlib
import io
import subprocess
from pathlib import Path

import pytest
import structlog
import yaml

from smtpgate.cli import main
from smtpgate.config import load_config
from smtpgate.users import add_user
from tests.conftest import write_config
from tests.support.sink import make_test_cert

ROOT = Path(__file__).resolve().parents[2]

# Line 3 is the listener's tls line, line 4 its auth line: the cases edit these.
BASE = """\
listeners:
  - name: submission
    tls: none
    auth: none
    address: 127.0.0.1:2525
    relay_networks: [127.0.0.0/8]
upstream:
  url: smtp://mail.corp.example:25
internal_domains: [corp.example]
"""


def check(config: Path, *args: str) -> subprocess.CompletedProcess:
    """`smtpgate check-config -c config`, run by the command's own entry point in this
    process (test_config.py and test_config_messages.py run it as a process too)."""
    argv = ["check-config", "-c", str(config), *args]
    out, err = io.StringIO(), io.StringIO()
    logging = structlog.get_config()  # the command sets up its own: the tests' comes back after
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(argv)
    finally:
        structlog.configure(**logging)
    return subprocess.CompletedProcess(argv, status, out.getvalue(), err.getvalue())


def refused(tmp_path: Path, text: str) -> list[str]:
    """check-config's problem lines for text (it must exit 2)."""
    result = check(write_config(tmp_path, text))
    assert result.returncode == 2, result.stdout
    assert result.stdout == ""
    return result.stderr.splitlines()


def with_tls(cert: Path, key: Path) -> str:
    return BASE.replace("    tls: none\n", f"    tls: starttls\n    tls_cert: {cert}\n    tls_key: {key}\n")


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    cert, key = make_test_cert(tmp_path / "tls")
    return Path(cert), Path(key)


# --- TLS certificate and key


def test_a_good_certificate_and_key_pass(tmp_path, pair):
    result = check(write_config(tmp_path, with_tls(*pair)))
    assert result.returncode == 0, result.stderr


def test_certificate_that_is_not_pem(tmp_path, pair):
    cert = tmp_path / "tls.crt"
    cert.write_text("this is a certificate, honest\n")
    assert refused(tmp_path, with_tls(cert, pair[1])) == [
        f"smtpgate.yaml:4: listeners[0].tls_cert: {cert} is not a PEM certificate "
        "(no -----BEGIN CERTIFICATE----- block)",
    ]


def test_certificate_that_is_damaged(tmp_path, pair):
    cert = tmp_path / "tls.crt"
    good = pair[0].read_text()
    body = good.splitlines()
    body[2] = "A" * len(body[2])  # keeps the PEM frame, breaks the DER inside
    cert.write_text("\n".join(body) + "\n")
    assert refused(tmp_path, with_tls(cert, pair[1])) == [
        f"smtpgate.yaml:4: listeners[0].tls_cert: {cert}: a certificate in it is damaged and does not parse",
    ]


def test_key_that_is_not_pem(tmp_path, pair):
    key = tmp_path / "tls.key"
    key.write_text(pair[0].read_text())  # the certificate given twice: a classic slip
    assert refused(tmp_path, with_tls(pair[0], key)) == [
        f"smtpgate.yaml:5: listeners[0].tls_key: {key} is not a PEM private key "
        "(no -----BEGIN PRIVATE KEY----- block)",
    ]


def test_key_that_is_encrypted(tmp_path, pair):
    key = tmp_path / "tls.key"
    subprocess.run(["openssl", "pkey", "-in", str(pair[1]), "-aes256", "-passout", "pass:secret",
                    "-out", str(key)], check=True, capture_output=True)
    assert refused(tmp_path, with_tls(pair[0], key)) == [
        f"smtpgate.yaml:5: listeners[0].tls_key: {key} is encrypted with a passphrase; "
        "smtpgate needs the key unencrypted",
    ]


def test_key_of_another_certificate(tmp_path, pair):
    _, other_key = make_test_cert(tmp_path / "other")
    assert refused(tmp_path, with_tls(pair[0], Path(other_key))) == [
        f"smtpgate.yaml:5: listeners[0].tls_key: {other_key} does not match the certificate in {pair[0]}",
    ]


def test_key_that_is_damaged(tmp_path, pair):
    key = tmp_path / "tls.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nAAAAAAAAAAAAAAAA\n-----END PRIVATE KEY-----\n")
    assert refused(tmp_path, with_tls(pair[0], key)) == [
        f"smtpgate.yaml:5: listeners[0].tls_key: {key}: the private key is damaged and does not parse",
    ]


# --- users file


def test_users_file_that_does_not_parse(tmp_path):
    users = tmp_path / "users"
    add_user(users, "jane", "correct horse")
    with users.open("a") as fh:
        fh.write("bob:hunter2\n")  # a clear-text password: never echoed back
    lines = refused(tmp_path, BASE + "users_file: users\n")
    assert lines == [
        f"smtpgate.yaml:10: users_file: {users}:2: expected NAME:$scrypt$n=N,r=R,p=P$SALT$HASH[:SENDER,...] "
        "(as `smtpgate users add` writes it)",
    ]
    assert "hunter2" not in "\n".join(lines)


def test_users_file_written_by_users_add_passes(tmp_path):
    add_user(tmp_path / "users", "jane", "correct horse")
    assert check(write_config(tmp_path, BASE + "users_file: users\n")).returncode == 0


# --- AUTH that can never be offered


def test_auth_required_without_tls(tmp_path):
    assert refused(tmp_path, BASE.replace("    auth: none\n", "    auth: required\n")) == [
        "smtpgate.yaml:4: listeners[0].auth: auth: required needs tls: starttls or implicit: "
        "AUTH is offered only over TLS, so no client could ever authenticate",
    ]


# --- relay networks


@pytest.mark.parametrize("network", ["0.0.0.0/0", "::/0", "8.8.8.0/24", "10.0.0.0/7", "2001:db8::/32"])
def test_public_relay_network(tmp_path, network):
    text = BASE.replace("[127.0.0.0/8]", f'[127.0.0.0/8, "{network}"]')
    assert refused(tmp_path, text) == [
        f"smtpgate.yaml:6: listeners[0].relay_networks[1]: {network} is not a private network: every host "
        "in it could relay through smtpgate without AUTH (set allow_public_relay_networks: true on this "
        "listener if that is intended)",
    ]


def test_public_relay_network_when_allowed(tmp_path):
    text = BASE.replace("[127.0.0.0/8]", '[0.0.0.0/0]\n    allow_public_relay_networks: true')
    assert check(write_config(tmp_path, text)).returncode == 0


@pytest.mark.parametrize("network", ["10.1.0.0/16", "172.16.0.0/12", "192.168.1.0/24", "100.64.0.0/10",
                                     "::1/128", "fd00:1::/64", "169.254.0.0/16"])
def test_private_relay_networks_pass(tmp_path, network):
    text = BASE.replace("[127.0.0.0/8]", f'["{network}"]')
    assert check(write_config(tmp_path, text)).returncode == 0


# --- YAML syntax and unknown keys


def test_yaml_tab_names_line_and_column(tmp_path):
    assert refused(tmp_path, BASE + "limits:\n\tmax_hops: 5\n") == [
        "smtpgate.yaml:11: column 1: a tab character; YAML indents with spaces only",
    ]


def test_yaml_colon_in_a_value(tmp_path):
    assert refused(tmp_path, BASE + "hostname: relay: corp\n") == [
        'smtpgate.yaml:10: column 16: a ": " where a value was expected: put the value in quotes if it '
        'contains ": ", or check the indentation of this line',
    ]


def test_yaml_unclosed_quote(tmp_path):
    assert refused(tmp_path, BASE + "hostname: 'relay.corp.example\n") == [
        "smtpgate.yaml:11: column 1: the file ends inside a quoted value: a closing quote is missing "
        "(the quoted value starts on line 10)",
    ]


def test_unknown_key_suggests_the_nearest(tmp_path):
    text = BASE.replace("    relay_networks:", "    relay_network:")
    assert refused(tmp_path, text) == [
        "smtpgate.yaml:6: listeners[0].relay_network: unknown key (did you mean relay_networks?)",
    ]


def test_unknown_key_without_a_near_one(tmp_path):
    assert refused(tmp_path, BASE + "colour: blue\n") == ["smtpgate.yaml:10: colour: unknown key"]


def test_problems_come_in_file_order(tmp_path):
    text = BASE.replace("    relay_networks:", "    relay_network:") + "workers: many\n"
    assert refused(tmp_path, text) == [
        "smtpgate.yaml:6: listeners[0].relay_network: unknown key (did you mean relay_networks?)",
        'smtpgate.yaml:10: workers: expected a whole number, got "many"',
    ]


# --- --show


def test_show_fills_in_defaults_and_redacts_secrets(tmp_path):
    text = BASE + "store:\n  url: postgresql://smtpgate:Tr0ub4dor@db.corp.example/smtpgate?sslpassword=k3y\n"
    result = check(write_config(tmp_path, text), "--show")
    assert result.returncode == 0, result.stderr
    assert "Tr0ub4dor" not in result.stdout and "k3y" not in result.stdout
    shown = yaml.safe_load(result.stdout)
    assert shown["store"] == {
        "url": "postgresql://smtpgate:[redacted]@db.corp.example/smtpgate?sslpassword=[redacted]",
        "password_file": None, "keep_messages_days": 400, "auto_upgrade": False, "timeout": 30,
    }
    assert shown["listeners"][0]["mode"] == "enforce" and shown["listeners"][0]["tls_ciphers"] == ""
    assert shown["limits"]["max_message_size"] == 36700160
    assert shown["references"]["pattern"] == "[0-9]{1,12}-[TCA]"
    assert shown["upstream"]["url"] == "smtp://mail.corp.example:25" and shown["upstream"]["timeout"] == 45
    assert shown["upstream"]["timeouts"] == {"connect": 10, "command": 30, "data": 40}


def test_show_is_a_config_that_means_the_same(tmp_path, pair):
    """Saved next to the original, --show's output loads into an equal configuration:
    every section, the defaults it filled in and the values it derived (a listener's
    mode, the capped upstream timeouts, the upstream auth) included."""
    add_user(tmp_path / "users", "jane", "correct horse")
    for name in ("oauth.secret", "admin.token", "allocator.token"):
        (tmp_path / name).write_text(f"value-of-{name}\n")
    text = with_tls(*pair).replace("  url: smtp://mail.corp.example:25\n", (
        "  url: mx:corp.example\n  resolver: 127.0.0.1:5353\n  timeout: 20\n  timeouts: {data: 90}\n"
        "  auth: xoauth2\n  username: relay@corp.example\n"
        "  oauth2: {token_url: 'https://login.example/t', client_id: 42, client_secret_file: oauth.secret}\n"
    )) + (
        "users_file: users\nmode: observe\nmailboxes:\n  - address: UK-Payroll@corp.example\n    team: Team A\n"
        "    new_reference: 'C-{n}'\nallocator:\n  kind: http\n  url: https://numbers.corp.example/next\n"
        "  token_file: allocator.token\nadmin:\n  listen: '[::1]:9925'\n  tokens:\n"
        "    - {team: Team A, token_file: admin.token}\nlimits:\n  idle_timeout: 2.5\n"
        "references:\n  headers: [X-Ref, X-Other]\n"
    )
    original = load_config(write_config(tmp_path, text))
    result = check(original.path, "--show")
    assert result.returncode == 0, result.stderr
    assert "value-of-" not in result.stdout  # file paths are shown, never what the files hold
    again = load_config(write_config(tmp_path, result.stdout, name="shown.yaml"))
    assert again.model_dump() == original.model_dump()
    assert again.upstream.scheme == "mx" and again.upstream.timeouts.data == 20
    assert again.listeners[0].mode == "observe" and again.upstream.oauth2.client_id == "42"


def test_show_redacts_a_password_in_a_url_and_the_rest_loads_the_same(tmp_path):
    text = BASE + "store:\n  url: postgresql://smtpgate:Tr0ub4dor@db.corp.example/smtpgate\n"
    original = load_config(write_config(tmp_path, text))
    shown = original.show()
    assert "Tr0ub4dor" not in shown
    again = load_config(write_config(tmp_path, shown, name="shown.yaml"))
    assert again.store.url == "postgresql://smtpgate:[redacted]@db.corp.example/smtpgate"
    assert again.model_copy(update={"store": original.store}).model_dump() == original.model_dump()


def test_a_section_with_every_key_commented_out_takes_the_defaults(tmp_path):
    config = load_config(write_config(tmp_path, BASE + "admin:\n  # listen: 127.0.0.1:9925\nlimits:\n"))
    assert config.admin.listen is None and config.limits.max_hops == 50


def test_a_null_listener_is_still_an_error(tmp_path):
    assert refused(tmp_path, BASE.replace("listeners:\n", "listeners:\n  -\n")) == [
        'smtpgate.yaml:2: listeners[0]: expected a mapping, got nothing',
    ]


def test_the_example_config_documents_every_key(tmp_path):
    """Every key the loader reads appears in config/smtpgate.example.yaml (set or commented)."""
    for name in ("secret", "token"):
        (tmp_path / name).write_text("x\n")
    text = BASE.replace("  url: smtp://mail.corp.example:25\n", (
        "  url: smtp://mail.corp.example:25\n  auth: xoauth2\n  username: relay@corp.example\n"
        "  oauth2: {token_url: 'https://login.example/token', client_id: c, client_secret_file: secret}\n"
    )) + (
        "mailboxes:\n  - address: uk-payroll@corp.example\n    team: A\n"
        "admin:\n  tokens:\n    - team: A\n      token_file: token\n"
    )
    config = load_config(write_config(tmp_path, text))

    def keys(tree, path=""):
        if isinstance(tree, dict):
            for key, value in tree.items():
                yield f"{path}.{key}".lstrip(".")
                yield from keys(value, f"{path}.{key}")
        elif isinstance(tree, list):
            for item in tree:
                yield from keys(item, path)

    example = (ROOT / "config" / "smtpgate.example.yaml").read_text()
    missing = sorted({key for key in keys(config.effective) if f"{key.rsplit('.', 1)[-1]}:" not in example})
    assert missing == [], missing
