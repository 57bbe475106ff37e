"""One redactor for logs, check-config and store errors."""

from __future__ import annotations

import pytest

from smtpgate.log import get_logger
from smtpgate.redact import is_secret_key, redact_url


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://smtpgate:pw@db/smtpgate", "postgresql://smtpgate:[redacted]@db/smtpgate"),
    ("postgresql://smtpgate:p@ss:wd@db:5432/x", "postgresql://smtpgate:[redacted]@db:5432/x"),
    ("postgresql://smtpgate@db/x?sslpassword=k&sslmode=require",
     "postgresql://smtpgate@db/x?sslpassword=[redacted]&sslmode=require"),
    ("https://work.corp.example/api?token=abc&team=a", "https://work.corp.example/api?token=[redacted]&team=a"),
    ("sqlite:var/smtpgate.db", "sqlite:var/smtpgate.db"),
    ("smtp://mail.corp.example:25", "smtp://mail.corp.example:25"),
])
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_secret_names():
    assert [k for k in ("password", "token", "client_secret", "auth_data", "Authorization", "sslpassword",
                        "password_file", "token_url", "tokens", "token_file", "authenticated_as", "user")
            if is_secret_key(k)] == ["password", "token", "client_secret", "auth_data", "Authorization",
                                     "sslpassword"]


def test_log_lines_hide_secrets(log_lines):
    get_logger().info("store.error", password="hunter2", url="postgresql://u:hunter2@db/x", user="jane")
    [event] = [e for e in log_lines() if e["event"] == "store.error"]
    assert event["password"] == "[redacted]" and event["url"] == "postgresql://u:[redacted]@db/x"
    assert event["user"] == "jane"
