"""AUTH users: a file of `name:scrypt-hash` lines that `smtpgate users add` writes.

Each line is `NAME:$scrypt$n=N,r=R,p=P$SALT$HASH` (salt and hash in base64);
blank lines and lines starting with `#` are ignored. Passwords are never
stored or logged in clear.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import grp
import hashlib
import hmac
import os
import re
import secrets
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1

# The group the service runs as (systemd/README.md): a new users file is
# root:smtpgate 0640, so the service can read it and nobody else can.
SERVICE_GROUP = "smtpgate"
NEW_FILE_MODE = 0o640

_STORED = re.compile(r"\$scrypt\$n=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)")
_FORMAT = "NAME:$scrypt$n=N,r=R,p=P$SALT$HASH (as `smtpgate users add` writes it)"


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


def _parse_stored(stored: str) -> tuple[int, int, int, bytes, bytes] | None:
    """(n, r, p, salt, digest) of a stored hash, or None when it is not one."""
    match = _STORED.fullmatch(stored)
    if match is None:
        return None
    n, r, p = (int(match.group(i)) for i in (1, 2, 3))
    try:
        salt = base64.b64decode(match.group(4), validate=True)
        digest = base64.b64decode(match.group(5), validate=True)
    except binascii.Error:
        return None
    # n a power of two above 1, as scrypt requires; an empty digest checks nothing.
    if n < 2 or n & (n - 1) or r < 1 or p < 1 or not salt or not digest:
        return None
    return n, r, p, salt, digest


def check_password(password: str, stored: str) -> bool:
    parsed = _parse_stored(stored)
    if parsed is None:
        return False
    n, r, p, salt, expected = parsed
    try:
        actual = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=len(expected))
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(actual, expected)


def _valid_name(name: str) -> bool:
    return bool(name) and ":" not in name and name.isprintable() and name.strip() == name and not name.startswith("#")


def _read_lines(path: Path) -> list[str]:
    """The file's lines, every entry checked; UsersError names file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsersError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise UsersError(f"{path}: cannot read: {exc.strerror or exc}") from None
    lines = text.splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, stored = line.partition(":")
        # The line itself is never shown: it may be a password typed by mistake.
        if not sep or not _valid_name(name) or _parse_stored(stored) is None:
            raise UsersError(f"{path}:{lineno}: expected {_FORMAT}")
    return lines


class Users:
    """The users file, read once; `verify` never raises."""

    def __init__(self, entries: dict[str, str]):
        self.entries = entries

    @classmethod
    def load(cls, path: Path | None) -> Users:
        """The users in path (none when path is None or does not exist); UsersError
        naming the file and line when a line is not a user entry."""
        if path is None or not path.exists():
            return cls({})
        entries: dict[str, str] = {}
        for line in _read_lines(path):
            if line.strip() and not line.lstrip().startswith("#"):
                name, _, stored = line.partition(":")
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


def _new_file_owner(group: str) -> tuple[int, int, int]:
    """(uid, gid, mode) for a users file that does not exist yet."""
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        gid = os.getegid()  # no such group here: the service cannot share it anyway
    return os.geteuid(), gid, NEW_FILE_MODE


def add_user(path: Path, name: str, password: str, *, group: str = SERVICE_GROUP) -> bool:
    """Add or replace NAME in the users file; True when the name was new.

    The file is replaced atomically (a reader sees the old or the new file,
    never half of one) and keeps its owner, group and mode; a new file is
    created 0640, owned by the caller and the group `group` (when it exists).
    """
    if not _valid_name(name):
        raise UsersError(f"bad user name {name!r}: no colon, no leading #, no surrounding space")
    if not password:
        raise UsersError("empty password")
    lines = _read_lines(path) if path.exists() else []
    new_line = f"{name}:{hash_password(password)}"
    replaced = False
    for i, line in enumerate(lines):
        if not line.lstrip().startswith("#") and line.partition(":")[0] == name:
            lines[i] = new_line
            replaced = True
    if not replaced:
        lines.append(new_line)
    if path.exists():
        st = path.stat()
        uid, gid, mode = st.st_uid, st.st_gid, st.st_mode & 0o7777
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        uid, gid, mode = _new_file_owner(group)
    _replace(path, "\n".join(lines) + "\n", uid, gid, mode)
    return not replaced


def _replace(path: Path, text: str, uid: int, gid: int, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".users.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            # Owner and mode before the content: the hashes are never readable by others.
            if (uid, gid) != (os.geteuid(), os.getegid()):
                try:
                    os.fchown(fh.fileno(), uid, gid)
                except PermissionError:
                    raise UsersError(
                        f"{path}: cannot keep its owner and group ({uid}:{gid}): run as root or as its owner"
                    ) from None
            os.fchmod(fh.fileno(), mode)
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)
