"""upstream.auth, upstream.oauth2 and the upstream TLS client certificate in the config file."""

from __future__ import annotations

import pytest

from smtpgate.config import ConfigError, load_config
from tests.conftest import write_config
from tests.support.configs import UPSTREAM_HEAD as HEAD, UPSTREAM_TAIL as TAIL, XOAUTH2
from tests.support.pki import client_certs  # noqa: F401 - fixture


def load(tmp_path, upstream: str):
    (tmp_path / "oauth.secret").write_text("s3cret\n")
    (tmp_path / "up.secret").write_text("pw\n")
    return load_config(write_config(tmp_path, HEAD + upstream + TAIL))


def problems(tmp_path, upstream: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, upstream)
    return info.value.problems


def test_xoauth2_settings_and_defaults(tmp_path):
    upstream = load(tmp_path, XOAUTH2).upstream
    assert upstream.auth == "xoauth2" and upstream.username == "relay@corp.example"
    assert upstream.oauth2.scope == "https://outlook.office365.com/.default"
    assert upstream.oauth2.client_secret() == "s3cret"
    assert upstream.oauth2.client_secret_file == (tmp_path / "oauth.secret").resolve()


def test_auth_defaults_follow_username(tmp_path):
    assert load(tmp_path, "  url: smtp://mail.corp.example\n").upstream.auth == "none"
    with_password = load(tmp_path, "  url: smtp://mail.corp.example\n  username: relay\n  password_file: up.secret\n")
    assert with_password.upstream.auth == "password" and with_password.upstream.password() == "pw"


@pytest.mark.parametrize("upstream,expected", [
    (XOAUTH2.replace("  oauth2:\n", "  oauth:\n"),
     "upstream.oauth: unknown key"),
    ("  url: smtp://m.corp.example\n  auth: xoauth2\n  username: r@corp.example\n",
     "upstream.oauth2: auth: xoauth2 needs oauth2: {token_url, client_id, client_secret_file, scope}"),
    (XOAUTH2.replace("  username: relay@corp.example\n", ""),
     "upstream.username: auth: xoauth2 needs username (the mailbox the token acts as)"),
    ("  url: smtp://m.corp.example\n  auth: password\n",
     "upstream.username: auth: password needs username and password_file"),
    ("  url: smtp://m.corp.example\n  username: relay\n",
     "upstream.password_file: username is set but password_file is missing"),
    ("  url: smtp://m.corp.example\n  auth: none\n  username: relay\n",
     "upstream.auth: auth: none but username is set; remove username or choose password | xoauth2"),
    (XOAUTH2.replace("  auth: xoauth2\n", "  auth: password\n  password_file: up.secret\n"),
     "upstream.oauth2: oauth2 is used only with auth: xoauth2 (auth is password)"),
    (XOAUTH2 + "  password_file: up.secret\n",
     "upstream.password_file: password_file is used only with auth: password (auth is xoauth2)"),
    (XOAUTH2.replace("https://login.microsoftonline.com", "http://login.microsoftonline.com"),
     "upstream.oauth2.token_url: the client secret is sent to the token endpoint: use https (http only on loopback)"),
    (XOAUTH2.replace("https://login.microsoftonline.com", "ftp://login.microsoftonline.com"),
     "upstream.oauth2.token_url: expected an http(s) URL"),
    (XOAUTH2.replace("    client_id: 6a1b2c3d\n", ""),
     "upstream.oauth2.client_id: required key is missing"),
    (XOAUTH2.replace("oauth.secret", "missing.secret"),
     "upstream.oauth2.client_secret_file: cannot read"),
    (XOAUTH2.replace("  oauth2:\n    token_url", "  oauth2: yes\n  ignored:\n    token_url"),
     'upstream.oauth2: expected a mapping, got "yes"'),
])
def test_auth_problems(tmp_path, upstream, expected):
    found = problems(tmp_path, upstream)
    assert any(expected in p for p in found), found


def test_problem_lines_point_at_the_key(tmp_path):
    found = problems(tmp_path, "  url: smtp://m.corp.example\n  username: relay\n  auth: none\n")
    assert found == ["smtpgate.yaml:8: upstream.auth: auth: none but username is set; "
                     "remove username or choose password | xoauth2"]


def test_token_url_over_http_on_loopback(tmp_path):
    for host in ("127.0.0.1:8080", "localhost", "[::1]:9000"):
        config = load(tmp_path, XOAUTH2.replace("https://login.microsoftonline.com", f"http://{host}"))
        assert config.upstream.oauth2.token_url.startswith(f"http://{host}/")


def cert_keys(cert: str, key: str) -> str:
    return f"  tls_client_cert: {cert}\n  tls_client_key: {key}\n"


def test_client_certificate_loaded(tmp_path, client_certs):
    cert, key = client_certs["cert"], client_certs["key"]
    upstream = load(tmp_path, "  url: smtps://mail.corp.example\n" + cert_keys(cert, key)).upstream
    assert str(upstream.tls_client_cert) == cert and str(upstream.tls_client_key) == key
    for url in ("smtp+starttls://mail.corp.example:25", "mx:corp.example"):
        assert load(tmp_path, f"  url: {url}\n" + cert_keys(cert, key)).upstream.tls_client_cert
