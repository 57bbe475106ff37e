"""The exact problem lines for every configuration mistake the other tests make.

Each case is one broken file and the complete list of lines `load_config` (and so
`check-config`) gives for it: file, line, key path and what is wrong, in the order
of the file. The TLS certificate and key cases are in test_check_config.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpgate.config import ConfigError, load_config
from tests.conftest import write_config
from tests.support.configs import UPSTREAM_HEAD as HEAD, UPSTREAM_TAIL as TAIL, XOAUTH2
from tests.support.pki import client_certs  # noqa: F401 - fixture

# Line numbers: 1 listeners, 2 name, 3 address, 4 relay_networks, 5 upstream, 6 url.
URL = "  url: smtp://mail.corp.example:25\n"
BASE = HEAD + URL + TAIL  # 7 lines

FROM_MX = ("applies to mx: upstreams only (for TLS to one server use smtp+starttls:// or smtps://)")
URL_SHAPES = ("expected smtp://host:port, smtp+starttls://host:port, smtps://host:port, "
              "mx:domain or maildir:path")


def problems(folder: Path, text: str) -> list[str]:
    (folder / "oauth.secret").write_text("s3cret\n")
    (folder / "up.secret").write_text("pw\n")
    with pytest.raises(ConfigError) as info:
        load_config(write_config(folder, text))
    return info.value.problems


CASES = {
    # --- types, ranges, choices and unknown keys
    "number": (HEAD + URL + "  timeout: soon\n" + TAIL,
               ['smtpgate.yaml:7: upstream.timeout: expected a number, got "soon"']),
    "whole number": (BASE + "workers: many\n",
                     ['smtpgate.yaml:8: workers: expected a whole number, got "many"']),
    "several at once": (BASE + "limits:\n  max_recipient: 10\n  max_hops: -1\nlogging:\n  level: loud\n", [
        "smtpgate.yaml:9: limits.max_recipient: unknown key (did you mean max_recipients?)",
        "smtpgate.yaml:10: limits.max_hops: must be at least 1, got -1",
        'smtpgate.yaml:12: logging.level: expected one of debug | info | warning | error, got "loud"',
    ]),
    "unknown top-level key": (BASE + "colour: blue\n", ["smtpgate.yaml:8: colour: unknown key"]),
    "unknown nested key": (HEAD + URL + "  timeouts: {dot: 5}\n" + TAIL,
                           ["smtpgate.yaml:7: upstream.timeouts.dot: unknown key"]),
    "more than 0": (HEAD + URL + "  timeouts: {connect: 0}\n" + TAIL,
                    ["smtpgate.yaml:7: upstream.timeouts.connect: must be more than 0"]),
    "at least 1": (HEAD + URL + "  max_connections: 0\n" + TAIL,
                   ["smtpgate.yaml:7: upstream.max_connections: must be at least 1, got 0"]),
    "a mapping": (BASE + "limits: 5\n", ['smtpgate.yaml:8: limits: expected a mapping, got "5"']),
    "a null listener": (BASE.replace("listeners:\n", "listeners:\n  -\n"),
                        ["smtpgate.yaml:2: listeners[0]: expected a mapping, got nothing"]),
    "a list": (BASE.replace("[corp.example]", "corp.example"),
               ['smtpgate.yaml:7: internal_domains: expected a list, got "corp.example"']),
    "a mapping for a list": ("listeners:\n  submission: {address: '127.0.0.1:2525'}\n" + BASE[BASE.index("upstream:"):],
                             ["smtpgate.yaml:2: listeners: expected a list, got a mapping"]),
    "true or false": (BASE + "references:\n  subject: maybe\n",
                      ['smtpgate.yaml:9: references.subject: expected true or false, got "maybe"']),
    "duplicate key": (BASE + "workers: 2\nworkers: 3\n", ["smtpgate.yaml:9: workers: duplicate key"]),
    "empty file": ("# nothing yet\n", ["smtpgate.yaml:1: (top level): the file is empty"]),
    # --- listeners
    "network": (BASE.replace("[127.0.0.0/8]", "[10.0.0.0/33]"),
                ['smtpgate.yaml:4: listeners[0].relay_networks[0]: not a network: "10.0.0.0/33"']),
    "host:port": (BASE.replace("127.0.0.1:2525", "localhost"),
                  ['smtpgate.yaml:3: listeners[0].address: expected host:port (or [v6]:port), got "localhost"']),
    "tls choice": (BASE.replace("    relay_networks", "    tls: sometimes\n    relay_networks"),
                   ['smtpgate.yaml:4: listeners[0].tls: expected one of none | starttls | implicit, '
                    'got "sometimes"']),
    "no listener": (BASE.replace(BASE[:BASE.index("upstream:")], "listeners: []\n"),
                    ["smtpgate.yaml:1: listeners: at least one listener is needed"]),
    "missing name": (BASE.replace("  - name: submission\n    address", "  - address"),
                     ["smtpgate.yaml:2: listeners[0].name: required key is missing"]),
    "cipher string": (BASE.replace("    relay_networks", "    tls_ciphers: NO-SUCH-SUITE\n    relay_networks"),
                      ["smtpgate.yaml:4: listeners[0].tls_ciphers: OpenSSL selects no cipher suite "
                       "from 'NO-SUCH-SUITE'"]),
    # --- upstream
    "mx domain": (HEAD + "  url: 'mx:'\n" + TAIL,
                  ['smtpgate.yaml:6: upstream.url: mx: needs a domain, e.g. mx:corp.example, got "mx:"']),
    "mx port": (HEAD + "  url: mx:corp.example:99999\n" + TAIL,
                ['smtpgate.yaml:6: upstream.url: bad port in "mx:corp.example:99999"']),
    "resolver": (HEAD + "  url: mx:corp.example\n  resolver: dns.corp.example\n" + TAIL,
                 ["smtpgate.yaml:7: upstream.resolver: expected a DNS server's IP address, optionally "
                  'with :port, got "dns.corp.example"']),
    "tls off mx": (HEAD + URL + "  tls: required\n" + TAIL, [f"smtpgate.yaml:7: upstream.tls: {FROM_MX}"]),
    "resolver off mx": (HEAD + URL + "  resolver: 127.0.0.1\n" + TAIL,
                        ["smtpgate.yaml:7: upstream.resolver: applies to mx: upstreams only"]),
    "url shape": (HEAD + "  url: ftp://x\n" + TAIL, [f'smtpgate.yaml:6: upstream.url: {URL_SHAPES}, got "ftp://x"']),
    "credentials in url": (HEAD + "  url: smtp://u:p@mail.corp.example\n" + TAIL,
                           ["smtpgate.yaml:6: upstream.url: credentials go in username and password_file, "
                            "not the URL"]),
    "maildir folder": (HEAD + "  url: 'maildir:'\n" + TAIL,
                       ["smtpgate.yaml:6: upstream.url: maildir: needs a folder, e.g. maildir:var/outbox"]),
    "missing url": (HEAD + "  pool_size: 4\n" + TAIL, ["smtpgate.yaml:6: upstream.url: required key is missing"]),
    # --- upstream.auth and oauth2
    "oauth misspelt": (HEAD + XOAUTH2.replace("  oauth2:\n", "  oauth:\n") + TAIL, [
        "smtpgate.yaml:6: upstream.oauth2: auth: xoauth2 needs oauth2: {token_url, client_id, "
        "client_secret_file, scope}",
        "smtpgate.yaml:9: upstream.oauth: unknown key (did you mean oauth2?)",
    ]),
    "xoauth2 without oauth2": (HEAD + "  url: smtp://m.corp.example\n  auth: xoauth2\n  username: r@corp.example\n"
                               + TAIL, ["smtpgate.yaml:6: upstream.oauth2: auth: xoauth2 needs oauth2: "
                                        "{token_url, client_id, client_secret_file, scope}"]),
    "xoauth2 without username": (HEAD + XOAUTH2.replace("  username: relay@corp.example\n", "") + TAIL,
                                 ["smtpgate.yaml:6: upstream.username: auth: xoauth2 needs username "
                                  "(the mailbox the token acts as)"]),
    "password without username": (HEAD + "  url: smtp://m.corp.example\n  auth: password\n" + TAIL,
                                  ["smtpgate.yaml:6: upstream.username: auth: password needs username "
                                   "and password_file"]),
    "username without password_file": (HEAD + "  url: smtp://m.corp.example\n  username: relay\n" + TAIL,
                                       ["smtpgate.yaml:6: upstream.password_file: username is set but "
                                        "password_file is missing"]),
    "auth none with username": (HEAD + "  url: smtp://m.corp.example\n  username: relay\n  auth: none\n" + TAIL,
                                ["smtpgate.yaml:8: upstream.auth: auth: none but username is set; remove "
                                 "username or choose password | xoauth2"]),
    "oauth2 with password": (HEAD + XOAUTH2.replace("  auth: xoauth2\n", "  auth: password\n"
                                                    "  password_file: up.secret\n") + TAIL,
                             ["smtpgate.yaml:11: upstream.oauth2: oauth2 is used only with auth: xoauth2 "
                              "(auth is password)"]),
    "password_file with xoauth2": (HEAD + XOAUTH2 + "  password_file: up.secret\n" + TAIL,
                                   ["smtpgate.yaml:13: upstream.password_file: password_file is used only "
                                    "with auth: password (auth is xoauth2)"]),
    "token_url over http": (HEAD + XOAUTH2.replace("https://login", "http://login") + TAIL,
                            ["smtpgate.yaml:10: upstream.oauth2.token_url: the client secret is sent to the "
                             "token endpoint: use https (http only on loopback)"]),
    "token_url not http": (HEAD + XOAUTH2.replace("https://login", "ftp://login") + TAIL,
                           ['smtpgate.yaml:10: upstream.oauth2.token_url: expected an http(s) URL, got '
                            '"ftp://login.microsoftonline.com/0f1e2d3c/oauth2/v2.0/token"']),
    "client_id missing": (HEAD + XOAUTH2.replace("    client_id: 6a1b2c3d\n", "") + TAIL,
                          ["smtpgate.yaml:10: upstream.oauth2.client_id: required key is missing"]),
    "oauth2 not a mapping": (HEAD + XOAUTH2.replace("  oauth2:\n    token_url", "  oauth2: yes\n  ignored:\n"
                                                    "    token_url") + TAIL, [
        'smtpgate.yaml:9: upstream.oauth2: expected a mapping, got "yes"',
        "smtpgate.yaml:10: upstream.ignored: unknown key",
    ]),
    # --- linking
    "mailboxes": (HEAD.replace("upstream:", "upstream:\n  url: smtp://mail.corp.example:25") + TAIL + (
        "mailboxes:\n  - address: not an address\n    team: A\n"
        "  - address: pl-payroll+1-T@corp.example\n    team: B\n"
        "  - address: x@elsewhere.example\n    team: C\n"
        "  - address: pl-payroll@corp.example\n    team: D\n"
        "  - address: PL-Payroll@corp.example\n    team: E\n"), [
        'smtpgate.yaml:9: mailboxes[0].address: not a mailbox address: "not an address": '
        "white space, comment or bracket in path",
        'smtpgate.yaml:11: mailboxes[1].address: not a mailbox address: "pl-payroll+1-T@corp.example": '
        'a mailbox address must be untagged (it contains the separator "+")',
        "smtpgate.yaml:13: mailboxes[2].address: x@elsewhere.example is not in internal_domains",
        "smtpgate.yaml:17: mailboxes[4].address: duplicate mailbox pl-payroll@corp.example",
    ]),
    "template": (BASE + "mailboxes:\n  - address: a@corp.example\n    team: A\n    new_reference: 'T-{m}'\n",
                 ['smtpgate.yaml:11: mailboxes[0].new_reference: expected a template using only {n}, '
                  "got \"T-{m}\" ('m')"]),
    "template without n": (BASE + "mailboxes:\n  - address: a@corp.example\n    team: A\n    new_reference: T\n",
                           ['smtpgate.yaml:11: mailboxes[0].new_reference: template must contain {n}, got "T"']),
    "pattern": (BASE + "references:\n  pattern: '[0-9]*'\n",
                ["smtpgate.yaml:9: references.pattern: must not match the empty string"]),
    "separator": (BASE + "separator: '@'\n",
                  ['smtpgate.yaml:8: separator: expected one of the characters ! # $ % & \' * + - / = ? ^ _ ` { | } ~, got "@"']),
    "domain": (BASE.replace("[corp.example]", "['corp..example']"),
               ['smtpgate.yaml:7: internal_domains[0]: not a domain: "corp..example" (invalid domain label \'\')']),
    # --- the other sections
    "allocator url": (BASE + "allocator:\n  kind: http\n",
                      ["smtpgate.yaml:9: allocator.url: kind: http needs url"]),
    "store url": (BASE + "store:\n  url: mysql://u:pw@db/x\n",
                  ['smtpgate.yaml:9: store.url: expected sqlite:PATH or postgresql://..., '
                   'got "mysql://u:[redacted]@db/x"']),
    "admin listen": (BASE + "admin:\n  listen: 9925\n",
                     ['smtpgate.yaml:9: admin.listen: expected host:port (or [v6]:port), got "9925"']),
    "admin tokens": (BASE + "mailboxes:\n  - address: a@corp.example\n    team: Team A\nadmin:\n  tokens:\n"
                     "    - team: Team B\n      token_file: up.secret\n    - team: admin\n      token_file: empty\n", [
        'smtpgate.yaml:13: admin.tokens[0].team: "Team B" is neither a team of mailboxes: nor admin',
        "smtpgate.yaml:16: admin.tokens[1].token_file: {folder}/empty is empty",
    ]),
    "auth_backend upstream": (BASE.replace("smtp://", "smtp://") + "auth_backend: upstream\n",
                              ["smtpgate.yaml:8: auth_backend: upstream sends each client's password to the "
                               "upstream, so upstream.url must be smtps:// or smtp+starttls:// (it is smtp:)"]),
    "auth required without tls": (BASE.replace("    relay_networks", "    auth: required\n    relay_networks"),
                                  ["smtpgate.yaml:4: listeners[0].auth: auth: required needs tls: starttls or "
                                   "implicit: AUTH is offered only over TLS, so no client could ever "
                                   "authenticate"]),
    "tls without files": (BASE.replace("    relay_networks", "    tls: starttls\n    relay_networks"),
                          ["smtpgate.yaml:2: listeners[0].tls: tls: starttls needs tls_cert and tls_key"]),
    # --- files
    "unreadable file": (HEAD + URL + "  username: relay\n  password_file: missing.secret\n" + TAIL,
                        ["smtpgate.yaml:8: upstream.password_file: cannot read {folder}/missing.secret: "
                         "No such file or directory"]),
    "users file": (BASE + "users_file: users\n",
                   ["smtpgate.yaml:8: users_file: {folder}/users:1: expected "
                    "NAME:$scrypt$n=N,r=R,p=P$SALT$HASH[:SENDER,...] (as `smtpgate users add` writes it)"]),
    # --- YAML syntax
    "unclosed list": (BASE + "limits: [unclosed\n",
                      ['smtpgate.yaml:9: column 1: a [list] is not closed with "]", or its items lack commas '
                       "(the [list] starts on line 8)"]),
    "tab": (BASE + "limits:\n\tmax_hops: 5\n",
            ["smtpgate.yaml:9: column 1: a tab character; YAML indents with spaces only"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_problem_lines(tmp_path, name):
    text, expected = CASES[name]
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "users").write_text("jane:not-a-hash\n")
    assert problems(tmp_path, text) == [line.replace("{folder}", str(tmp_path)) for line in expected]


def test_text_is_taken_as_written(tmp_path):
    """Where text is expected, what YAML would read as a number or true/false is the text
    written: a team called 007 or yes, a reference header called 2024."""
    config = load_config(write_config(tmp_path, BASE + (
        "references:\n  headers: [2024, X-Ref]\nmailboxes:\n  - address: a@corp.example\n    team: 007\n"
        "  - address: b@corp.example\n    team: yes\n")))
    assert [m.team for m in config.mailboxes] == ["007", "yes"]
    assert config.references.headers == ("2024", "X-Ref")


@pytest.mark.parametrize("url,cert,key,expected", [
    ("smtp://mail.corp.example", "cert", "key",
     ["smtpgate.yaml:7: upstream.tls_client_cert: a client certificate needs a TLS upstream: "
      "smtp+starttls://, smtps:// or mx:"]),
    ("smtps://mail.corp.example", "cert", "other_key",
     ["smtpgate.yaml:7: upstream.tls_client_cert: cannot use {cert} with {other_key}: "
      "the key does not belong to the certificate"]),
    ("smtps://mail.corp.example", "key", "key",
     ["smtpgate.yaml:7: upstream.tls_client_cert: cannot use {key} with {key}: "
      "not a PEM certificate and PEM private key"]),
    ("smtps://mail.corp.example", "cert", "encrypted_key",
     ["smtpgate.yaml:8: upstream.tls_client_key: cannot use {encrypted_key}: the private key is encrypted; "
      "smtpgate needs an unencrypted key file (root:smtpgate 0640)"]),
    ("smtps://mail.corp.example", "cert", None,
     ["smtpgate.yaml:6: upstream.tls_client_cert: tls_client_cert and tls_client_key go together"]),
])
def test_client_certificate_problem_lines(tmp_path, client_certs, url, cert, key, expected):
    upstream = f"  url: {url}\n  tls_client_cert: {client_certs[cert]}\n"
    if key:
        upstream += f"  tls_client_key: {client_certs[key]}\n"
    assert problems(tmp_path, HEAD + upstream + TAIL) == [line.format(**client_certs) for line in expected]


def test_a_missing_file_is_named_with_why(tmp_path):
    """(check-config's own lines and exit status: test_config.py runs it as a process.)"""
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert info.value.problems == [f"{tmp_path}/nope.yaml: cannot read: No such file or directory"]
