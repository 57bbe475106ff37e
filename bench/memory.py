"""Memory: peak RSS of smtpgate relaying 25 MB messages (one, and ten at once; plain
mail and mail that creates links), RSS per idle session, and small messages answered
while ten large ones are in flight."""

from __future__ import annotations

import smtplib
import os
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.load import MAILBOX, SENDER, _finish, write_message
from bench.procs import SMTP_SOURCE, BenchError, process_memory, wait_until

LARGE = 25 * 1024 * 1024
SMALL_MESSAGES = 20  # sent one after another while the ten large ones are in flight
IDLE_SESSIONS = 1000
# Plain mail: no source activity (an untagged sender to an outside address), nothing to link.
PLAIN_SENDER = "accounts@corp.example"
PLAIN_RECIPIENT = "client@supplier.example"


@dataclass
class MemoryCase:
    kind: str  # plain | linking
    idle_one: int  # RSS of a fresh process, bytes
    peak_one: int  # VmHWM after one large message
    idle_ten: int
    peak_ten: int
    small_seconds: list[float] = field(default_factory=list)  # each small message's connect .. 250
    small_in_flight: int = 0  # how many of them were answered while the ten were all still sending
    small_during: list[float] = field(default_factory=list)  # those ones' seconds

    @property
    def small_p50(self) -> float:
        return statistics.median(self.small_seconds) if self.small_seconds else float("nan")

    @property
    def small_during_p50(self) -> float:
        return statistics.median(self.small_during) if self.small_during else float("nan")


@dataclass
class IdleSessions:
    sessions: int
    idle: int  # RSS before the sessions opened
    open_rss: int  # RSS with them open after EHLO, settled

    @property
    def per_session(self) -> float:
        return (self.open_rss - self.idle) / self.sessions


@dataclass
class MemoryResult:
    cases: list[MemoryCase]
    idle_sessions: IdleSessions | None = None


def large_message(folder: Path, kind: str) -> Path:
    path = folder / f"large-{kind}.txt"
    if not path.exists():
        write_message(path, LARGE, source=SENDER if kind == "linking" else PLAIN_SENDER)
    return path


def _large(port: int, message: Path, count: int, kind: str) -> subprocess.Popen:
    sender, recipient = (SENDER, MAILBOX) if kind == "linking" else (PLAIN_SENDER, PLAIN_RECIPIENT)
    return subprocess.Popen(
        [SMTP_SOURCE, "-c", "-s", str(count), "-m", str(count), "-r", "2", "-F", str(message),
         "-f", sender, "-t", recipient, f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def one_large(gate, folder: Path, kind: str) -> tuple[int, int]:
    """(idle RSS, peak RSS) of a fresh smtpgate relaying one large message."""
    idle = _settled_rss(gate.pid)
    proc = _large(gate.port, large_message(folder, kind), 1, kind)
    _finish(proc, f"one large {kind} message", 300)
    return idle, process_memory(gate.pid)["VmHWM"]


def ten_large(gate, folder: Path, kind: str) -> tuple[int, int, list[float], list[float]]:
    """(idle RSS, peak RSS, each small message's seconds, those of the ones answered while the
    ten were all in flight)."""
    idle = _settled_rss(gate.pid)
    sockets_before = _sockets(gate.pid)
    proc = _large(gate.port, large_message(folder, kind), 10, kind)
    # In flight: smtpgate holds the ten sessions (their data follows at once). The small messages
    # start then: a quick machine relays the ten in a second or two.
    wait_until(lambda: _sockets(gate.pid) - sockets_before >= 10 or proc.poll() is not None,
               120, "the large messages' sessions", every=0.002)
    small, during = [], []
    for n in range(SMALL_MESSAGES):
        running = proc.poll() is None
        started = time.perf_counter()
        with smtplib.SMTP("127.0.0.1", gate.port, timeout=30) as client:
            client.sendmail(SENDER, ["client@supplier.example", MAILBOX],
                            b"From: <" + SENDER.encode() + b">\r\nSubject: small " + str(n).encode()
                            + b"\r\n\r\nsmall\r\n")
        small.append(time.perf_counter() - started)
        if running and proc.poll() is None:
            during.append(small[-1])
    _finish(proc, f"ten large {kind} messages", 600)
    if not during:
        raise BenchError("the ten large messages were done before the small ones were sent")
    return idle, process_memory(gate.pid)["VmHWM"], small, during


def idle_sessions(gate, count: int = IDLE_SESSIONS) -> IdleSessions:
    """RSS with `count` sessions open after EHLO, against the fresh process's."""
    idle = _settled_rss(gate.pid)
    sockets = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", gate.port), timeout=30)
            sockets.append(sock)
            _reply(sock)
            sock.sendall(b"EHLO idle.bench.example\r\n")
            if not _reply(sock).startswith(b"250"):
                raise BenchError("an idle session's EHLO was refused")
        return IdleSessions(count, idle, _settled_rss(gate.pid))
    finally:
        for sock in sockets:
            sock.close()


def _reply(sock: socket.socket) -> bytes:
    """One whole SMTP reply (its last line has a space after the code)."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            raise BenchError("smtpgate closed an idle session")
        data += chunk
        lines = data.split(b"\r\n")
        if len(lines) > 1 and any(len(line) >= 4 and line[3:4] == b" " for line in lines[:-1]):
            return data


def _sockets(pid: int) -> int:
    """The sockets the process holds open (/proc/PID/fd). Not /proc/PID/io's rchar: asyncio's
    loop reads sockets with recv(), which rchar does not count."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except OSError:
            pass  # closed meanwhile
    return count


def _settled_rss(pid: int) -> int:
    """RSS once it stopped changing (start-up work is over)."""
    last = -1
    for _ in range(50):
        now = process_memory(pid)["VmRSS"]
        if now == last:
            return now
        last = now
        time.sleep(0.1)
    return last
