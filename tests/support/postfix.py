"""Private Postfix instances for integration tests (Debian's postfix package, as root).

One instance is a config folder, a queue, a log file and a Maildir tree in a
folder of its own, listening on 127.0.0.1 at a free port. It plays
corp.example's mail store (virtual Maildir mailboxes with plus addressing),
a relay to a sink the test controls, or the host of smtpgate's milter.
The system Postfix need not run and /etc/postfix/main.cf need not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

__all__ = ["PostfixError", "PostfixInstance", "postfix_available"]

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
MASTER_CF_DIST = "/usr/share/postfix/master.cf.dist"
DEFAULT_CONFIG = Path("/etc/postfix")
DOMAIN = "corp.example"
# uid/gid the virtual delivery agent writes Maildirs as (Debian's nobody:nogroup).
MAIL_OWNER = 65534
# Serialises edits of the default main.cf between instances and processes.
_LOCK_PATH = Path(tempfile.gettempdir()) / "smtpgate-postfix-main-cf.lock"
# First line of a default main.cf that only exists for test instances.
_MARKER = "# private Postfix instances of smtpgate's tests; removed when the last one stops"


class PostfixError(RuntimeError):
    """A private instance failed; the message carries the instance's maillog."""


def postfix_available() -> str | None:
    """Return None when private instances can run here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "private Postfix instances need root (mail owner, setgid postdrop, port binding as postfix)"
    for path in (POSTFIX, POSTCONF, MASTER_CF_DIST):
        if not os.path.exists(path):
            return f"Debian package postfix is not installed ({path} missing)"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "the postfix user does not exist (package postfix not configured)"
    return None


class PostfixInstance:
    """A private Postfix on 127.0.0.1:`port`, built under `tmpdir` (a context manager).

    - mailboxes: local parts of corp.example Maildir mailboxes. None means
      uk-payroll and pl-payroll, or none at all when relayhost is given, so
      that every domain, corp.example too, goes to the relay host.
    - relayhost: (host, port) that mail for other domains is relayed to.
    - recipient_delimiter: "+" turns plus addressing on; "" turns it off.
    - milter: (host, port) of an smtpd milter; a dead milter defers mail.
    - main_cf: more main.cf settings, applied last.
    - master_cf: more master.cf services (lines as master.cf takes them), e.g. the
      reinjection smtpd of an after-queue content filter.

    Entering starts Postfix and returns once the port accepts connections;
    leaving stops it and takes its folder out of the default main.cf. An
    instance starts once. start/stop block: from async code call them with
    asyncio.to_thread and wait with wait_for_delivery_async.
    """

    def __init__(
        self,
        tmpdir: str | os.PathLike[str],
        *,
        mailboxes: Sequence[str] | None = None,
        relayhost: tuple[str, int] | None = None,
        recipient_delimiter: str = "+",
        milter: tuple[str, int] | None = None,
        main_cf: Mapping[str, str] | None = None,
        master_cf: str = "",
        start_timeout: float = 30,
    ) -> None:
        if mailboxes is None:
            mailboxes = () if relayhost else ("uk-payroll", "pl-payroll")
        self.mailboxes = tuple(mailboxes)
        self.relayhost = relayhost
        self.recipient_delimiter = recipient_delimiter
        self.milter = milter
        self.extra = dict(main_cf or {})
        self.extra_services = master_cf
        self.start_timeout = start_timeout
        self.host = "127.0.0.1"
        self.port = 0
        self.root, self._own_root = _traversable_folder(Path(tmpdir))
        self.config_dir = self.root / "etc"
        self._registered = False
        self._running = False

    # -- public API -----------------------------------------------------
    def __enter__(self) -> PostfixInstance:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def maildir(self, mailbox: str) -> Path:
        """The Maildir folder of a mailbox (local part, or full address in corp.example)."""
        local = mailbox.split("@", 1)[0]
        return self.root / "mail" / local

    def wait_for_delivery(self, mailbox: str, count: int = 1, timeout: float = 30) -> list[bytes]:
        """Wait until `mailbox` holds at least count new messages; return them all, oldest first.

        Raises PostfixError with the maillog when they do not arrive in time.
        """
        new = self.maildir(mailbox) / "new"
        deadline = time.monotonic() + timeout
        while True:
            files = sorted(new.glob("*"), key=_delivery_order) if new.is_dir() else []
            if len(files) >= count:
                return [path.read_bytes() for path in files]
            if time.monotonic() >= deadline:
                raise PostfixError(
                    f"{len(files)} of {count} messages in {new} after {timeout}s; "
                    f"maillog:\n{self.maillog()}"
                )
            # Local delivery takes a few milliseconds once queued.
            time.sleep(0.05)

    async def wait_for_delivery_async(
        self, mailbox: str, count: int = 1, timeout: float = 30
    ) -> list[bytes]:
        """wait_for_delivery for async tests: polls without blocking the event loop."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.wait_for_delivery(mailbox, count, timeout=0)
            except PostfixError:
                if time.monotonic() >= deadline:
                    return self.wait_for_delivery(mailbox, count, timeout=0)
            await asyncio.sleep(0.05)

    def maillog(self) -> str:
        """The instance's log so far ('' before the first line is written)."""
        try:
            return (self.root / "maillog").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        """Write the configuration, start Postfix and wait until its port answers."""
        reason = postfix_available()
        if reason:
            raise PostfixError(reason)
        self._layout()
        _register(self.config_dir)
        self._registered = True
        try:
            # A port picked free can be taken before master binds it: retry with another.
            for attempt in range(3):
                self.port = _free_port(self.host)
                self._write_config()
                self._postfix("check")
                self._postfix("start")
                self._running = True
                try:
                    self._wait_listening()
                    return
                except PostfixError:
                    in_use = "Address already in use" in self.maillog()
                    self._stop_master()
                    if not in_use or attempt == 2:
                        raise
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop Postfix (killing its master if it lingers) and unregister the folder."""
        try:
            if self._running:
                self._stop_master()
        finally:
            if self._registered:
                _unregister(self.config_dir)
                self._registered = False
            if self._own_root:
                # Outside tmpdir, so nothing else would clean it up.
                shutil.rmtree(self.root, ignore_errors=True)
                self._own_root = False

    # -- internals ------------------------------------------------------
    def _layout(self) -> None:
        # spool must exist (root-owned) for postfix to chdir there; it fills it itself.
        for name in ("etc", "spool", "data", "mail"):
            (self.root / name).mkdir(parents=True, exist_ok=True)
        postfix = pwd.getpwnam("postfix")
        # master writes its lock file into data_directory as the postfix user.
        os.chown(self.root / "data", postfix.pw_uid, postfix.pw_gid)
        os.chown(self.root / "mail", MAIL_OWNER, MAIL_OWNER)
        for mailbox in self.mailboxes:
            for sub in ("", "new", "cur", "tmp"):
                path = self.maildir(mailbox) / sub
                path.mkdir(exist_ok=True)
                os.chown(path, MAIL_OWNER, MAIL_OWNER)
                path.chmod(0o700)

    def _write_config(self) -> None:
        root = self.root
        settings: dict[str, str] = {
            "compatibility_level": "3.6",
            "queue_directory": f"{root}/spool",
            "data_directory": f"{root}/data",
            "inet_interfaces": self.host,
            "inet_protocols": "ipv4",
            "myhostname": f"mx.{DOMAIN}",
            "mydomain": DOMAIN,
            "myorigin": DOMAIN,
            "mydestination": "",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "recipient_delimiter": self.recipient_delimiter,
            "maillog_file": f"{root}/maillog",
            "maillog_file_prefixes": str(root),
            # No local(8) delivery here: keep Postfix away from /etc/aliases.
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "smtputf8_enable": "yes",
            # Tests want a refusal now, not a deferred retry minutes later.
            "unknown_virtual_mailbox_reject_code": "550",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
        }
        if self.mailboxes:
            _write(
                self.config_dir / "vmailbox",
                "".join(f"{m}@{DOMAIN} {m}/\n" for m in self.mailboxes),
            )
            settings |= {
                "virtual_mailbox_domains": DOMAIN,
                "virtual_mailbox_base": f"{root}/mail",
                "virtual_mailbox_maps": f"texthash:{self.config_dir}/vmailbox",
                "virtual_uid_maps": f"static:{MAIL_OWNER}",
                "virtual_gid_maps": f"static:{MAIL_OWNER}",
            }
        if self.relayhost:
            host, port = self.relayhost
            settings["relayhost"] = f"[{host}]:{port}"
            # The sink is on loopback and offers no certificate worth checking.
            settings["smtp_tls_security_level"] = "none"
        if self.milter:
            host, port = self.milter
            settings |= {
                "smtpd_milters": f"inet:{host}:{port}",
                "milter_default_action": "tempfail",
                "milter_protocol": "6",
            }
        settings |= self.extra
        _write(
            self.config_dir / "main.cf",
            "".join(f"{key} = {value}\n" for key, value in settings.items()),
        )
        _write(self.config_dir / "master.cf", _master_cf(self.host, self.port) + self.extra_services)

    def _postfix(self, command: str) -> None:
        done = subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), command],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise PostfixError(
                f"postfix {command} exited {done.returncode}: {done.stderr.strip()}\n"
                f"maillog:\n{self.maillog()}"
            )

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=1):
                return
            if time.monotonic() >= deadline or (
                self._master_pid() is None and "fatal" in self.maillog()
            ):
                raise PostfixError(
                    f"Postfix in {self.root} is not listening on {self.host}:{self.port} "
                    f"after start; maillog:\n{self.maillog()}"
                )
            time.sleep(0.05)

    def _master_pid(self) -> int | None:
        try:
            pid = int((self.root / "spool" / "pid" / "master.pid").read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def _stop_master(self) -> None:
        pid = self._master_pid()
        subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), "stop"], capture_output=True, timeout=60
        )
        self._running = False
        if pid is None:
            return
        deadline = time.monotonic() + 15
        while _alive(pid):
            if time.monotonic() >= deadline:
                # Our own master that ignored SIGTERM: end it by its pid.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
                return
            time.sleep(0.05)


def _write(path: Path, text: str) -> None:
    """Write a config file dated two seconds ago.

    Postfix re-reads a table or main.cf modified within the current second,
    300 ms at a time, until it is older: a fresh file costs every postconf
    and postfix command (postfix-script runs a dozen) up to two seconds.
    """
    path.write_text(text)
    past = time.time() - 2
    os.utime(path, (past, past))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of this process is dead too (postfix start daemonises, so rarely ours).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _delivery_order(path: Path) -> tuple[int, str]:
    # Maildir names start with the delivery time in seconds.
    head = path.name.split(".", 1)[0]
    return (int(head) if head.isdigit() else 0, path.name)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _master_cf(host: str, port: int) -> str:
    """master.cf.dist with smtpd on host:port and no service chrooted."""
    lines = []
    for line in Path(MASTER_CF_DIST).read_text().splitlines():
        fields = line.split()
        if line and not line[0].isspace() and not line.startswith("#") and len(fields) >= 8:
            if fields[0] == "smtp" and fields[1] == "inet":
                fields[0] = f"{host}:{port}"
            # A private spool has none of the files (resolv.conf, services,
            # localtime) that Debian's init script copies into a chroot jail.
            fields[4] = "n"
            line = " ".join(fields[:7]) + " " + " ".join(fields[7:])
        lines.append(line)
    return "\n".join(lines) + "\n"


def _traversable_folder(tmpdir: Path) -> tuple[Path, bool]:
    """A folder for the instance that the postfix and nobody users can reach.

    pytest's tmp_path sits under /tmp/pytest-of-root (mode 0700); Postfix's
    daemons and the Maildir writer run as other users and cannot pass it.
    Then the instance lives in a fresh /tmp folder (removed at stop) and
    tmpdir/postfix links to it. Returns (folder, whether it is such a folder).
    """
    tmpdir = tmpdir.resolve()
    tmpdir.mkdir(parents=True, exist_ok=True)
    if all(os.stat(p).st_mode & 0o001 for p in [tmpdir, *tmpdir.parents]):
        root = tmpdir / "postfix"
        root.mkdir(exist_ok=True)
        root.chmod(0o755)
        return root, False
    root = Path(tempfile.mkdtemp(prefix="smtpgate-postfix-"))
    root.chmod(0o755)
    link = tmpdir / "postfix"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(root)
    return root, True


# -- the default main.cf's alternate_config_directories -------------------------


@contextlib.contextmanager
def _main_cf_lock() -> Iterator[None]:
    with open(_LOCK_PATH, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


_ALTERNATES = re.compile(r"alternate_config_directories\s*=")


def _alternates(text: str) -> list[str]:
    """The folders listed in main.cf text (the last setting wins, as in Postfix)."""
    folders: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if _ALTERNATES.match(line):
            value = [line.split("=", 1)[1]]
            # A line that starts with white space continues the one before.
            for more in lines[i + 1 :]:
                if not more[:1].isspace():
                    break
                value.append(more)
            folders = [f for f in re.split(r"[\s,]+", " ".join(value)) if f]
    return folders


def _with_alternates(text: str, folders: list[str]) -> str:
    """main.cf text with alternate_config_directories set to folders (removed when empty)."""
    kept: list[str] = []
    skipping = False
    for line in text.splitlines():
        if _ALTERNATES.match(line):
            skipping = True
            continue
        if skipping and line[:1].isspace():
            continue
        skipping = False
        kept.append(line)
    if folders:
        kept.append(f"alternate_config_directories = {' '.join(folders)}")
    return "".join(line + "\n" for line in kept)


# The default main.cf is edited as text, under a lock, so that concurrent
# instances (other processes too) never lose each other's entries.
def _register(config_dir: Path) -> None:
    """List config_dir in the default main.cf (created if missing), keeping what is there."""
    main_cf = DEFAULT_CONFIG / "main.cf"
    with _main_cf_lock():
        if main_cf.exists():
            text = main_cf.read_text()
        else:
            # Debian's "No configuration" leaves no main.cf; postfix -c still reads it.
            DEFAULT_CONFIG.mkdir(parents=True, exist_ok=True)
            text = _MARKER + "\n"
        folders = _alternates(text)
        if str(config_dir) not in folders:
            _replace(main_cf, _with_alternates(text, [*folders, str(config_dir)]))


def _unregister(config_dir: Path) -> None:
    """Take config_dir out of the default main.cf; remove a main.cf only tests made."""
    main_cf = DEFAULT_CONFIG / "main.cf"
    with _main_cf_lock():
        if not main_cf.exists():
            return
        text = main_cf.read_text()
        folders = _alternates(text)
        if str(config_dir) not in folders:
            return
        text = _with_alternates(text, [f for f in folders if f != str(config_dir)])
        if text.startswith(_MARKER) and not _alternates(text):
            main_cf.unlink()
        else:
            _replace(main_cf, text)


def _replace(path: Path, text: str) -> None:
    # Write beside and rename, so a crash never leaves a half-written main.cf.
    temporary = path.with_name(path.name + ".smtpgate-tmp")
    _write(temporary, text)
    if path.exists():
        shutil.copymode(path, temporary)
    else:
        temporary.chmod(0o644)
    temporary.replace(path)
