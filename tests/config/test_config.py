"""The config loader: valid files become immutable objects; every problem names file, line and key."""

from __future__ import annotations

import pydantic
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from smtpgate.config import ConfigError, load_config
from tests.conftest import write_config
from tests.support.sink import make_test_cert

ROOT = Path(__file__).resolve().parents[2]

MINIMAL = """\
listeners:
  - name: submission
    address: 127.0.0.1:2525
    relay_networks: [127.0.0.0/8]
upstream:
  url: smtp://mail.corp.example:25
internal_domains: [corp.example]
"""


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, text))
    return info.value.problems


def test_minimal_config_defaults(tmp_path):
    config = load_config(write_config(tmp_path, MINIMAL))
    assert config.upstream.scheme == "smtp" and config.upstream.port == 25
    assert config.upstream.timeout == 45 and config.upstream.pool_size == 16
    assert (config.upstream.timeouts.connect, config.upstream.timeouts.command,
            config.upstream.timeouts.data) == (10, 30, 40)
    assert config.upstream.max_connections == 100
    assert config.limits.max_message_size == 36700160 and config.limits.max_hops == 50
    assert config.references.pattern == "[0-9]{1,12}-[TCA]"
    assert config.references.headers == ("X-Enate-Reference",)
    assert config.separator == "+"
    assert config.allocator.kind == "local" and config.allocator.first_number == 900000
    assert config.store.url == "sqlite:var/smtpgate.db" and config.store.keep_messages_days == 400
    assert config.listeners[0].tls == "none" and config.listeners[0].auth == "none"
    with pytest.raises(pydantic.ValidationError):
        config.workers = 3  # type: ignore[misc]


def test_shipped_configs_are_valid():
    demo = load_config(ROOT / "config" / "smtpgate.yaml")
    assert demo.upstream.scheme == "maildir"
    assert demo.listeners[0].relays_for("127.0.0.1") and not demo.listeners[0].relays_for("10.1.2.3")
    assert len(demo.mailboxes) == 2


def test_example_config_loads_once_its_files_exist(tmp_path):
    """The production example names files under /etc/smtpgate; with them in place it is valid
    as a whole, and each file key points where the example says."""
    example = (ROOT / "config" / "smtpgate.example.yaml").read_text()
    etc = tmp_path / "etc"
    etc.mkdir()
    named = sorted(set(re.findall(r"/etc/smtpgate/[\w.-]+", example)))
    assert "/etc/smtpgate/tls.crt" in named and "/etc/smtpgate/upstream.secret" in named
    cert, key = make_test_cert(tmp_path / "pem")
    for name in named:
        path = etc / Path(name).name
        if name.endswith((".crt", ".pem")):
            shutil.copy(cert, path)
        elif name.endswith(".key"):
            shutil.copy(key, path)
        else:
            path.write_text("" if name.endswith("/users") else "a secret\n")
    config = load_config(write_config(tmp_path, example.replace("/etc/smtpgate/", f"{etc}/")))
    submission = config.listeners[0]
    assert (submission.tls_cert, submission.tls_key) == (etc / "tls.crt", etc / "tls.key")
    assert config.users_file == etc / "users"
    assert config.upstream.password_file == etc / "upstream.secret"
    assert config.upstream.password() == "a secret"


def test_example_config_without_its_files_names_each_one(tmp_path):
    """Where /etc/smtpgate lacks the files, the only problems are those files, each named."""
    example = (ROOT / "config" / "smtpgate.example.yaml").read_text()
    missing = tmp_path / "nowhere"
    found = problems(tmp_path, example.replace("/etc/smtpgate/", f"{missing}/"))
    assert found, "the example names files that do not exist here"
    assert all(f": cannot read {missing}/" in p for p in found), found
    assert {p.split(f"{missing}/")[1].split(":")[0] for p in found} == {"tls.crt", "tls.key", "upstream.secret"}


def test_wrong_type_names_file_line_and_key(tmp_path):
    text = MINIMAL.replace("  url: smtp://mail.corp.example:25\n",
                           "  url: smtp://mail.corp.example:25\n  timeout: soon\n")
    assert problems(tmp_path, text) == ['smtpgate.yaml:7: upstream.timeout: expected a number, got "soon"']


def test_unknown_key_and_every_problem_reported(tmp_path):
    text = MINIMAL + "limits:\n  max_recipient: 10\n  max_hops: -1\nlogging:\n  level: loud\n"
    found = problems(tmp_path, text)
    assert "smtpgate.yaml:9: limits.max_recipient: unknown key (did you mean max_recipients?)" in found
    assert "smtpgate.yaml:10: limits.max_hops: must be at least 1, got -1" in found
    assert any(p.startswith("smtpgate.yaml:12: logging.level: expected one of") for p in found)


@pytest.mark.parametrize("fragment,expected", [
    ("    relay_networks: [10.0.0.0/33]", "listeners[0].relay_networks[0]: not a network"),
    ("    address: localhost", "listeners[0].address: expected host:port"),
    ("    tls: sometimes", "listeners[0].tls: expected one of none | starttls | implicit"),
])
def test_listener_problems(tmp_path, fragment, expected):
    key = fragment.strip().split(":")[0]
    lines = [line for line in MINIMAL.splitlines() if not line.strip().startswith(key + ":")]
    lines.insert(3, fragment)
    found = problems(tmp_path, "\n".join(lines) + "\n")
    assert any(expected in p for p in found), found


def test_mx_upstream_resolver_and_timeouts(tmp_path):
    text = MINIMAL.replace("  url: smtp://mail.corp.example:25\n", """\
  url: mx:Corp.Example
  resolver: 127.0.0.1:5353
  tls: required
  timeout: 20
  timeouts: {connect: 5, data: 90}
""")
    upstream = load_config(write_config(tmp_path, text)).upstream
    assert (upstream.scheme, upstream.mx_domain, upstream.port) == ("mx", "corp.example", 25)
    assert upstream.resolver == "127.0.0.1:5353" and upstream.tls == "required"
    # Each phase is capped by upstream.timeout, the longest a client waits on the upstream.
    assert (upstream.timeouts.connect, upstream.timeouts.command, upstream.timeouts.data) == (5, 20, 20)
    lab = load_config(write_config(tmp_path, text.replace("mx:Corp.Example", "mx:corp.example:2525")
                                   .replace("127.0.0.1:5353", "'::1'"))).upstream
    assert lab.port == 2525 and lab.resolver == "[::1]:53"


@pytest.mark.parametrize("fragment,expected", [
    ("  url: 'mx:'", "upstream.url: mx: needs a domain"),
    ("  url: mx:corp.example:99999", 'upstream.url: bad port in "mx:corp.example:99999"'),
    ("  resolver: dns.corp.example", "upstream.resolver: expected a DNS server's IP address"),
    ("  timeouts: {connect: 0}", "upstream.timeouts.connect: must be more than 0"),
    ("  timeouts: {dot: 5}", "upstream.timeouts.dot: unknown key"),
    ("  max_connections: 0", "upstream.max_connections: must be at least 1"),
    ("  tls: required", "upstream.tls: applies to mx: upstreams only (for TLS to one server use smtp+starttls://"),
    ("  resolver: 127.0.0.1", "upstream.resolver: applies to mx: upstreams only"),
])
def test_upstream_problems(tmp_path, fragment, expected):
    lines = MINIMAL.splitlines()
    at = lines.index("  url: smtp://mail.corp.example:25")
    if fragment.startswith("  url:"):
        lines[at] = fragment
    else:
        lines.insert(at + 1, fragment)
    found = problems(tmp_path, "\n".join(lines) + "\n")
    assert any(expected in p for p in found), found


def test_unreadable_secret_file(tmp_path):
    text = MINIMAL.replace("  url: smtp://mail.corp.example:25\n",
                           "  url: smtp://mail.corp.example:25\n  username: relay\n  password_file: missing.secret\n")
    found = problems(tmp_path, text)
    assert len(found) == 1
    assert found[0].startswith("smtpgate.yaml:8: upstream.password_file: cannot read ")
    assert str(tmp_path / "missing.secret") in found[0]


def test_bad_upstream_url_and_mailbox(tmp_path):
    text = MINIMAL.replace("smtp://mail.corp.example:25", "ftp://x") + (
        "mailboxes:\n  - address: not an address\n    team: A\n"
        "  - address: pl-payroll+1-T@corp.example\n    team: B\n"
        "  - address: x@elsewhere.example\n    team: C\n"
    )
    found = problems(tmp_path, text)
    assert any(p.startswith("smtpgate.yaml:6: upstream.url: expected smtp://") for p in found)
    assert any(p.startswith('smtpgate.yaml:9: mailboxes[0].address: not a mailbox address: "not an address"')
               for p in found)
    assert any(p.startswith("smtpgate.yaml:11: mailboxes[1].address: not a mailbox address") and
               p.endswith("a mailbox address must be untagged (it contains the separator \"+\")") for p in found)
    assert any("mailboxes[2].address: x@elsewhere.example is not in internal_domains" in p for p in found)


def test_mailbox_address_normalised(tmp_path):
    text = MINIMAL.replace("[corp.example]", "[corp.example, bücher.example]") + (
        "mailboxes:\n  - address: UK-Payroll@CORP.example\n    team: A\n"
        "  - address: info@BÜCHER.example\n    team: B\n    new_links: never\n    new_reference: 'C-{n}'\n"
    )
    config = load_config(write_config(tmp_path, text))
    assert [m.address for m in config.mailboxes] == ["uk-payroll@corp.example", "info@xn--bcher-kva.example"]
    assert config.mailboxes[1].new_links == "never" and config.mailboxes[1].new_reference == "C-{n}"
    assert config.teams()["uk-payroll@corp.example"] == "A"


def test_yaml_syntax_error(tmp_path):
    found = problems(tmp_path, MINIMAL + "limits: [unclosed\n")
    assert found == ['smtpgate.yaml:9: column 1: a [list] is not closed with "]", or its items lack commas '
                     '(the [list] starts on line 8)']


def test_relative_paths_from_config_folder(tmp_path):
    (tmp_path / "secret").write_text("pw\n")
    text = MINIMAL.replace("  url: smtp://mail.corp.example:25\n",
                           "  url: smtp://mail.corp.example:25\n  username: relay\n  password_file: secret\n")
    config = load_config(write_config(tmp_path, text))
    assert config.upstream.password_file == (tmp_path / "secret").resolve()
    assert config.upstream.password() == "pw"


def test_credentials_in_url_refused(tmp_path):
    found = problems(tmp_path, MINIMAL.replace("smtp://mail", "smtp://u:p@mail"))
    assert any("credentials go in username and password_file" in p for p in found)


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smtpgate", *args], capture_output=True, text=True,
                          input=stdin, cwd=ROOT, timeout=60)


def test_check_config_ok_and_errors(tmp_path):
    good = write_config(tmp_path, MINIMAL)
    result = run_cli("check-config", "-c", str(good))
    assert result.returncode == 0
    assert result.stdout.count("\n") == 1 and "ok" in result.stdout and "mail.corp.example" in result.stdout
    bad = write_config(tmp_path, MINIMAL + "workers: many\nfoo: 1\n", name="bad.yaml")
    result = run_cli("check-config", "-c", str(bad))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        'bad.yaml:8: workers: expected a whole number, got "many"',
        "bad.yaml:9: foo: unknown key",
    ]


def test_check_config_missing_file(tmp_path):
    result = run_cli("check-config", "-c", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "nope.yaml: cannot read" in result.stderr


def test_config_from_environment(tmp_path):
    good = write_config(tmp_path, MINIMAL)
    env_result = subprocess.run([sys.executable, "-m", "smtpgate", "check-config"], capture_output=True, text=True,
                                cwd=ROOT, timeout=60, env={"SMTPGATE_CONFIG": str(good), "PATH": "/usr/bin:/bin"})
    assert env_result.returncode == 0, env_result.stderr


def test_inbound_share_with_thread_is_a_boolean_off_by_default(tmp_path):
    assert load_config(write_config(tmp_path, MINIMAL)).inbound.share_with_thread is False
    on = load_config(write_config(tmp_path, MINIMAL + "inbound:\n  share_with_thread: true\n"))
    assert on.inbound.share_with_thread is True and on.inbound.unknown_tags == "pass"
    line = MINIMAL.count("\n") + 2  # the key's line, after "inbound:"
    assert problems(tmp_path, MINIMAL + "inbound:\n  share_with_thread: \"yes\"\n") == [
        f"smtpgate.yaml:{line}: inbound.share_with_thread: expected true or false, got \"yes\""]
