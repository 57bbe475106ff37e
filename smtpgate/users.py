"""AUTH users: a file of `name:scrypt-hash` lines that `smtpgate users add` writes.

Each line is `NAME:$scrypt$n=N,r=R,p=P$SALT$HASH` (salt and hash in base64).
Passwords are never stored or logged in clear.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import secrets
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1

# scrypt takes tens of milliseconds and 16 MiB per check (n=2**14, r=8). Checks run in
# a small pool of their own threads (hashlib releases the GIL while hashing), so a burst
# of logins neither stalls the event loop nor takes the default executor's threads that
# other blocking work (Maildir writes) needs; excess checks wait their turn.
VERIFY_THREADS = max(1, min(4, os.cpu_count() or 1))
_executor: ThreadPoolExecutor | None = None


def _verify_executor() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=VERIFY_THREADS, thread_name_prefix="smtpgate-scrypt")
    return _executor


def _forget_executor() -> None:
    # A forked worker has none of its parent's threads: it starts its own pool.
    global _executor
    _executor = None


os.register_at_fork(after_in_child=_forget_executor)


class UsersError(Exception):
    pass


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32)
    b64 = base64.b64encode
    return f"$scrypt$n={n},r={r},p={p}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    try:
        _, scheme, cost, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        params = dict(item.split("=") for item in cost.split(","))
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            password.encode("utf-8"), salt=base64.b64decode(salt),
            n=int(params["n"]), r=int(params["r"]), p=int(params["p"]), dklen=len(expected),
        )
    except (ValueError, KeyError):
        return False
    return hmac.compare_digest(actual, expected)


def _valid_name(name: str) -> bool:
    return bool(name) and ":" not in name and name.isprintable() and not name.strip() != name


class Users:
    """The users file, read once; `verify` never raises."""

    def __init__(self, entries: dict[str, str]):
        self.entries = entries

    @classmethod
    def load(cls, path: Path | None) -> Users:
        if path is None or not path.exists():
            return cls({})
        entries: dict[str, str] = {}
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            name, sep, stored = line.partition(":")
            if not sep or not stored.startswith("$scrypt$"):
                raise UsersError(f"{path}:{lineno}: expected NAME:$scrypt$..., got a malformed line")
            entries[name] = stored
        return cls(entries)

    def verify(self, name: str, password: str) -> bool:
        stored = self.entries.get(name)
        if stored is None:
            check_password(password, hash_password("x", n=2**10))  # keep timing alike for unknown users
            return False
        return check_password(password, stored)

    async def verify_off_loop(self, name: str, password: str) -> bool:
        """`verify` in the password-check threads: the event loop serves other sessions meanwhile."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_verify_executor(), self.verify, name, password)


def add_user(path: Path, name: str, password: str) -> bool:
    """Add or replace NAME in the users file (atomically, mode 0600); True when it was new."""
    if not _valid_name(name):
        raise UsersError(f"bad user name {name!r}: no colon, no surrounding space")
    if not password:
        raise UsersError("empty password")
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    new_line = f"{name}:{hash_password(password)}"
    replaced = False
    for i, line in enumerate(lines):
        if line.partition(":")[0] == name:
            lines[i] = new_line
            replaced = True
    if not replaced:
        lines.append(new_line)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".users.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return not replaced
