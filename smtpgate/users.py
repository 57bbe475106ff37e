"""AUTH users: a file of `name:scrypt-hash[:senders]` lines that `smtpgate users add` writes.

Each line is `NAME:$scrypt$n=N,r=R,p=P$SALT$HASH` (salt and hash in base64),
optionally followed by `:` and a comma-separated list of the envelope senders
and `From:` addresses the user may use: an address (`jane@corp.example`), a
whole domain (`*@corp.example`), or a mailbox with any tag
(`uk-payroll+*@corp.example`: the mailbox itself and every tagged form). A
line without a list may send as anyone, as every line written before lists
existed. Blank lines and lines starting with `#` are ignored. Passwords are
never stored or logged in clear.
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
from dataclasses import dataclass
from pathlib import Path

from smtpgate.mail.addresses import Address, AddressError, normalize_domain, parse_path

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1

# The group the service runs as (systemd/README.md): a new users file is
# root:smtpgate 0640, so the service can read it and nobody else can.
SERVICE_GROUP = "smtpgate"
NEW_FILE_MODE = 0o640

_STORED = re.compile(r"\$scrypt\$n=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)")
_FORMAT = "NAME:$scrypt$n=N,r=R,p=P$SALT$HASH[:SENDER,...] (as `smtpgate users add` writes it)"


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


@dataclass(frozen=True)
class SenderPattern:
    """One entry of a user's sender list: an address, `*@domain`, or `mailbox+*@domain`."""

    text: str
    local: str | None  # None: any local part (`*@domain`)
    domain: str  # the lowercase A-label form
    separator: str | None = None  # `mailbox+*`: the tag separator; local is the mailbox

    @classmethod
    def parse(cls, text: str) -> SenderPattern:
        """The pattern written as text; ValueError saying what is wrong."""
        local, at, domain = text.strip().rpartition("@")
        if not at or not local or not domain:
            raise ValueError("expected ADDRESS, *@DOMAIN or MAILBOX+*@DOMAIN")
        try:
            domain = normalize_domain(domain)
        except AddressError as exc:
            raise ValueError(str(exc)) from None
        if local == "*":
            return cls(text.strip(), None, domain)
        separator = None
        if local.endswith("*"):
            # `uk-payroll+*`: the character before the star is the tag separator.
            if len(local) < 3 or local[-2].isalnum() or "*" in local[:-1]:
                raise ValueError("a star stands for a whole local part (*@domain) "
                                 "or for the tag after a separator (mailbox+*@domain)")
            local, separator = local[:-2], local[-2]
        try:
            address = parse_path(f"<{local}@{domain}>")
        except AddressError as exc:
            raise ValueError(str(exc)) from None
        if address is None or "*" in address.local:
            raise ValueError("not an address")
        return cls(text.strip(), address.local.lower(), domain, separator)

    def matches(self, address: Address) -> bool:
        try:
            domain = normalize_domain(address.domain)
        except AddressError:
            return False
        if domain != self.domain:
            return False
        if self.local is None:
            return True
        local = address.local.lower()
        if self.separator is not None and local.startswith(self.local + self.separator):
            return True
        return local == self.local


def parse_senders(text: str, *, show: bool = False) -> tuple[SenderPattern, ...]:
    """A comma-separated sender list; ValueError naming the entry that is wrong (by its
    text when `show`, else by its position: a users file line may hold a mistyped password)."""
    patterns = []
    for position, part in enumerate((p for p in text.split(",") if p.strip()), 1):
        try:
            patterns.append(SenderPattern.parse(part))
        except ValueError as exc:
            raise ValueError(f"sender {part.strip()!r}: {exc}" if show else f"sender list entry {position}: {exc}") from None
    if not patterns:
        raise ValueError("an empty sender list (leave out the colon to allow every sender)")
    return tuple(patterns)


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
        name, sep, rest = line.partition(":")
        stored, has_senders, senders = rest.partition(":")
        # The line itself is never shown: it may be a password typed by mistake.
        if not sep or not _valid_name(name) or _parse_stored(stored) is None:
            raise UsersError(f"{path}:{lineno}: expected {_FORMAT}")
        if has_senders:
            try:
                parse_senders(senders)
            except ValueError as exc:
                raise UsersError(f"{path}:{lineno}: user {name}: {exc}") from None
    return lines


def _split_entry(line: str) -> tuple[str, str, tuple[SenderPattern, ...] | None]:
    """(name, stored hash, sender list or None) of a line _read_lines checked."""
    name, _, rest = line.partition(":")
    stored, has_senders, senders = rest.partition(":")
    return name, stored, parse_senders(senders) if has_senders else None


class Users:
    """The users file, read once; `verify` never raises."""

    def __init__(self, entries: dict[str, str], senders: dict[str, tuple[SenderPattern, ...]] | None = None):
        self.entries = entries
        self.senders = senders or {}  # users with a sender list; the others may send as anyone

    @classmethod
    def load(cls, path: Path | None) -> Users:
        """The users in path (none when path is None or does not exist); UsersError
        naming the file and line when a line is not a user entry."""
        if path is None or not path.exists():
            return cls({})
        entries: dict[str, str] = {}
        senders: dict[str, tuple[SenderPattern, ...]] = {}
        for line in _read_lines(path):
            if line.strip() and not line.lstrip().startswith("#"):
                name, stored, patterns = _split_entry(line)
                entries[name] = stored
                senders.pop(name, None)
                if patterns is not None:
                    senders[name] = patterns
        return cls(entries, senders)

    def may_send_as(self, name: str, address: Address | None) -> bool:
        """True when user `name` may use `address` as envelope sender or From: address.

        A user without a sender list may use any; the null sender names nobody.
        """
        patterns = self.senders.get(name)
        if patterns is None or address is None:
            return True
        return any(p.matches(address) for p in patterns)

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


def add_user(path: Path, name: str, password: str, *, group: str = SERVICE_GROUP,
             senders: list[str] | None = None) -> bool:
    """Add or replace NAME in the users file; True when the name was new.

    `senders` (patterns, see SenderPattern) replaces the user's sender list, an empty
    list removes it (any sender); None keeps the list a replaced user had, so a new
    password never widens what it may send as.
    The file is replaced atomically (a reader sees the old or the new file,
    never half of one) and keeps its owner, group and mode; a new file is
    created 0640, owned by the caller and the group `group` (when it exists).
    """
    if not _valid_name(name):
        raise UsersError(f"bad user name {name!r}: no colon, no leading #, no surrounding space")
    if not password:
        raise UsersError("empty password")
    patterns = None
    if senders:
        try:
            patterns = parse_senders(",".join(senders), show=True)
        except ValueError as exc:
            raise UsersError(str(exc)) from None
    lines = _read_lines(path) if path.exists() else []
    replaced = False
    for i, line in enumerate(lines):
        if not line.lstrip().startswith("#") and line.partition(":")[0] == name:
            kept = _split_entry(line)[2] if senders is None else patterns
            lines[i] = _entry(name, hash_password(password), kept)
            replaced = True
    if not replaced:
        lines.append(_entry(name, hash_password(password), patterns))
    if path.exists():
        st = path.stat()
        uid, gid, mode = st.st_uid, st.st_gid, st.st_mode & 0o7777
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        uid, gid, mode = _new_file_owner(group)
    _replace(path, "\n".join(lines) + "\n", uid, gid, mode)
    return not replaced


def delete_user(path: Path, name: str) -> bool:
    """Remove NAME from the users file (atomically, keeping its owner, group and mode);
    False when the file has no such user."""
    if not path.exists():
        return False
    lines = _read_lines(path)
    kept = [line for line in lines if line.lstrip().startswith("#") or line.partition(":")[0] != name]
    if len(kept) == len(lines):
        return False
    st = path.stat()
    _replace(path, "".join(line + "\n" for line in kept), st.st_uid, st.st_gid, st.st_mode & 0o7777)
    return True


def _entry(name: str, stored: str, senders: tuple[SenderPattern, ...] | None) -> str:
    """One users file line; without a sender list it is the format every version reads."""
    if senders is None:
        return f"{name}:{stored}"
    return f"{name}:{stored}:{','.join(p.text for p in senders)}"


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
