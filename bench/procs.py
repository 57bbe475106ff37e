"""The processes a benchmark run talks to: Postfix's smtp-sink, a private
Postfix relay, smtpgate itself (`smtpgate serve`), and a fresh PostgreSQL
database. Each one is a context manager that cleans up after itself and ends
only the processes it started, by their pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.configs import TEAMS_A_B
from tests.support.postfix import PostfixInstance
from tests.support.wire import free_port

ROOT = Path(__file__).resolve().parent.parent
SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"
PG_ADMIN_DSN = os.environ.get("SMTPGATE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")


class BenchError(RuntimeError):
    """A benchmark could not run as set up; the message says what failed."""


def wait_until(condition, timeout: float, what: str, every: float = 0.01):
    """Poll condition() until it returns a true value (returned) or raise BenchError."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def wait_listening(port: int, timeout: float, what: str) -> None:
    def answers() -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
        return False

    wait_until(answers, timeout, f"{what} to listen on 127.0.0.1:{port}", every=0.02)


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM our own child, then SIGKILL it if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def process_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def children(pid: int) -> list[int]:
    """Direct children of pid (worker processes of a supervisor)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


# --------------------------------------------------------------------------- sink


class SmtpSink:
    """Postfix's smtp-sink on a loopback port; its running message counter in a file."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = 0
        self.counter_file = folder / "smtp-sink.counter"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> SmtpSink:
        self.port = free_port()
        self._out = open(self.counter_file, "wb")
        # -c: "sess=N quit=N mesg=N\r" after every message; -u: it refuses to run as root.
        self.proc = subprocess.Popen(
            [SMTP_SINK, "-u", "nobody", "-c", f"127.0.0.1:{self.port}", "1024"],
            stdout=self._out, stderr=subprocess.STDOUT)
        wait_listening(self.port, 10, "smtp-sink")
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self._out.close()

    def messages(self) -> int:
        """How many final dots the sink has answered so far."""
        with open(self.counter_file, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 200))
            tail = fh.read()
        found = re.findall(rb"mesg=(\d+)", tail)
        return int(found[-1]) if found else 0


# --------------------------------------------------------------------------- postfix


class PostfixRelay:
    """A private Postfix instance relaying everything to the sink (tests/support/postfix.py)."""

    def __init__(self, folder: Path, sink_port: int):
        self.instance = PostfixInstance(folder / "postfix", relayhost=("127.0.0.1", sink_port),
                                        main_cf={
                                            # Loopback only: no reverse lookups slowing smtpd.
                                            "smtpd_peername_lookup": "no",
                                            # smtp-source's default is 20 sessions; a queue that
                                            # goes to the sink as fast as it can.
                                            "default_destination_concurrency_limit": "20",
                                            "message_size_limit": "40000000",
                                        })

    @property
    def port(self) -> int:
        return self.instance.port

    def __enter__(self) -> PostfixRelay:
        self.instance.start()
        return self

    def __exit__(self, *exc) -> None:
        self.instance.stop()

    def queue_empty(self) -> bool:
        """True when Postfix holds no message (everything went to the sink)."""
        spool = self.instance.root / "spool"
        for sub in ("incoming", "active", "deferred", "maildrop", "hold"):
            folder = spool / sub
            if folder.is_dir() and any(p.is_file() for p in folder.rglob("*")):
                return False
        return True

    def version(self) -> str:
        done = subprocess.run(["/usr/sbin/postconf", "-d", "-h", "mail_version"],
                              capture_output=True, text=True)
        return done.stdout.strip()


# --------------------------------------------------------------------------- postgres


@contextlib.contextmanager
def fresh_pg_database() -> Iterator[str]:
    """DSN of a PostgreSQL database created for this run, dropped afterwards."""
    import asyncpg

    name = f"smtpgate_bench_{secrets.token_hex(4)}"
    try:
        _pg_admin(f"CREATE DATABASE {name}")
    except (OSError, asyncpg.PostgresError) as exc:
        raise BenchError(f"PostgreSQL at {PG_ADMIN_DSN}: {exc}") from exc
    base = PG_ADMIN_DSN.rpartition("/")[0]
    try:
        yield f"{base}/{name}"
    finally:
        _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _pg_admin(sql: str) -> None:
    """One statement on the administrative connection."""
    import asyncio

    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def pg_checkpoint() -> None:
    """A CHECKPOINT, so a phase does not pay for the WAL an earlier one wrote."""
    import asyncpg

    try:
        _pg_admin("CHECKPOINT")
    except (OSError, asyncpg.PostgresError) as exc:
        raise BenchError(f"PostgreSQL at {PG_ADMIN_DSN}: CHECKPOINT: {exc}") from exc


def pg_version() -> str:
    import asyncio

    import asyncpg

    async def ask() -> str:
        conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
        try:
            return await conn.fetchval("SHOW server_version")
        finally:
            await conn.close()

    try:
        return asyncio.run(ask())
    except (OSError, asyncpg.PostgresError) as exc:
        return f"unreachable ({exc})"


# --------------------------------------------------------------------------- smtpgate


CONFIG = """\
hostname: relay.bench.example
listeners:
  - name: bench
    address: 127.0.0.1:{port}
    relay_networks: [127.0.0.0/8]
workers: {workers}
upstream:
  url: smtp://127.0.0.1:{sink_port}
  timeout: 60
  pool_size: 64
""" + TEAMS_A_B + """\
store:
  url: {store}
  auto_upgrade: true
limits:
  max_connections: 2000              # the memory section holds 1,000 idle sessions open
  max_connections_per_client: 2000
logging:
  format: json
  level: info
"""


@dataclass
class GateSetup:
    """What one smtpgate configuration of the table runs with."""

    store_kind: str  # sqlite | postgresql
    store_url: str
    workers: int
    env: dict[str, str] | None = None  # extra environment (e.g. the event loop choice)
    root: Path = ROOT  # the smtpgate source tree that runs
    extra: str = ""  # YAML appended to the generated config (keys CONFIG does not set)


@dataclass
class Target:
    """One row of the throughput table."""

    name: str
    kind: str  # sink | postfix | smtpgate
    setup: GateSetup | None = None
    runs: list = field(default_factory=list)  # load.Throughput, one per round
    unavailable: str | None = None
    checks: list[str] = field(default_factory=list)


class Smtpgate:
    """`smtpgate serve` as a subprocess with a generated config; logs in a file."""

    def __init__(self, folder: Path, setup: GateSetup, sink_port: int, name: str):
        self.folder = folder
        self.setup = setup
        self.sink_port = sink_port
        self.name = name
        self.port = 0
        self.config_path = folder / f"{name}.yaml"
        self.log_path = folder / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Smtpgate:
        self.port = free_port()
        self.config_path.write_text(CONFIG.format(
            port=self.port, workers=self.setup.workers, sink_port=self.sink_port,
            store=self.setup.store_url) + self.setup.extra)
        self._log = open(self.log_path, "wb")  # a fresh log: its events are this run's only
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.setup.root)
        env.update(self.setup.env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smtpgate", "serve", "-c", str(self.config_path)],
            cwd=self.folder, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_until(self._ready, 60, f"smtpgate ({self.name}) to be ready", every=0.05)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"smtpgate ({self.name}) exited {self.proc.returncode}:\n"
                             + self.log_path.read_text(errors="replace")[-3000:])
        return any(e.get("event") == "smtpgate.ready" for e in self.events())

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        self._log.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pids(self) -> list[int]:
        """The serving processes: the workers when there are any, else the one process."""
        return children(self.pid) or [self.pid]

    def events(self) -> list[dict]:
        out = []
        with open(self.log_path, "rb") as fh:
            for line in fh:
                if line.startswith(b"{"):
                    with contextlib.suppress(ValueError):
                        out.append(json.loads(line))
        return out

    def workers_running(self) -> bool:
        """False when serve said it runs one process whatever `workers` says."""
        for e in self.events():
            if e.get("event") == "config.unsupported" and e.get("key") == "workers":
                return False
        return True

    def count(self, event: str) -> int:
        return sum(1 for e in self.events() if e.get("event") == event)
