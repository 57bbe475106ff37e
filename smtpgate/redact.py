"""Keeping secrets out of output: the one place that says what a secret looks like.

Used by the log processor (smtpgate.log), by `check-config` (its summary and
`--show`) and by the store's error messages, so a password in
`store.url: postgresql://smtpgate:PASSWORD@db/smtpgate` or a field named
`token` is hidden the same way everywhere.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from functools import lru_cache
from typing import Any

__all__ = ["REDACTED", "is_secret_key", "redact_fields", "redact_url"]

REDACTED = "[redacted]"

# A field or query parameter whose name ends in one of these holds a credential
# (`password`, `client_secret`, `sslpassword`); `password_file`, `token_url`
# and `tokens` (a list of files) do not.
_SECRET_NAME = re.compile(r"(password|passwd|secret|token|authorization|api_?key|auth_data)$", re.IGNORECASE)

# scheme://user:password@host -> the password; the user name stays (it says who).
_USERINFO_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@?#\s]*):[^/?#\s]*@")
# ?password=...&sslpassword=... in a DSN or URL query.
_QUERY_SECRET = re.compile(r"(?P<head>[?&;](?P<name>[^=&;#\s]+)=)[^&;#\s]*")


@lru_cache(maxsize=1024)  # field names are few and recur in every event
def is_secret_key(name: str) -> bool:
    """True for a field name that holds a credential (`password`, `client_secret`,
    `token`, ...); the name of a file that holds one (`password_file`) is not."""
    return _SECRET_NAME.search(name) is not None


@lru_cache(maxsize=256)  # the same upstream and store URLs recur in every event
def redact_url(url: str) -> str:
    """url with the password of its user info and secret query parameters replaced:
    `postgresql://smtpgate:pw@db/x?sslpassword=k` gives
    `postgresql://smtpgate:[redacted]@db/x?sslpassword=[redacted]`."""
    url = _USERINFO_PASSWORD.sub(lambda m: f"{m.group('head')}:{REDACTED}@", url)

    def query(match: re.Match[str]) -> str:
        if is_secret_key(match.group("name")):
            return match.group("head") + REDACTED
        return match.group(0)

    return _QUERY_SECRET.sub(query, url)


def redact_fields(fields: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """fields with every secret-named value replaced and credentials in URL-like
    strings hidden; changed in place and returned (a structlog processor's shape)."""
    for key, value in list(fields.items()):
        if is_secret_key(key):
            fields[key] = REDACTED
        elif isinstance(value, str) and "://" in value:
            fields[key] = redact_url(value)
    return fields
