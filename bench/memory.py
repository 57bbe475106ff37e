"""Memory: peak RSS of smtpgate relaying large messages, and a small message
answered while ten large ones are in flight."""

from __future__ import annotations

import smtplib
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.load import MAILBOX, SENDER, _finish, write_message
from bench.procs import SMTP_SOURCE, BenchError, process_memory, wait_until

LARGE = 25 * 1024 * 1024


@dataclass
class MemoryResult:
    idle: int  # RSS of a fresh process, bytes
    peak_one: int  # VmHWM after one large message
    idle_ten: int
    peak_ten: int
    small_seconds: float  # the small message's MAIL .. 250 while the ten were in flight
    large_in_flight: int  # how many of the ten had not been answered when it was


def large_message(folder: Path) -> Path:
    path = folder / "large.txt"
    if not path.exists():
        write_message(path, LARGE)
    return path


def _large(port: int, message: Path, count: int) -> subprocess.Popen:
    return subprocess.Popen(
        [SMTP_SOURCE, "-c", "-s", str(count), "-m", str(count), "-r", "2", "-F", str(message),
         "-f", SENDER, "-t", MAILBOX, f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def one_large(gate, folder: Path) -> tuple[int, int]:
    """(idle RSS, peak RSS) of a fresh smtpgate relaying one large message."""
    idle = _settled_rss(gate.pid)
    proc = _large(gate.port, large_message(folder), 1)
    _finish(proc, "one large message", 300)
    return idle, process_memory(gate.pid)["VmHWM"]


def ten_large(gate, folder: Path, sink) -> tuple[int, int, float, int]:
    """(idle RSS, peak RSS, small message seconds, large ones still in flight then)."""
    idle = _settled_rss(gate.pid)
    before = sink.messages()
    proc = _large(gate.port, large_message(folder), 10)
    # In flight: smtpgate holds at least one large message's worth more than idle.
    wait_until(lambda: process_memory(gate.pid)["VmRSS"] > idle + LARGE or proc.poll() is not None,
               120, "the large messages to arrive")
    started = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", gate.port, timeout=30) as client:
        client.sendmail(SENDER, ["client@supplier.example", MAILBOX],
                        b"From: <" + SENDER.encode() + b">\r\nSubject: small\r\n\r\nsmall\r\n")
    small = time.perf_counter() - started
    in_flight = 10 - (sink.messages() - before) + 1  # the small one reached the sink too
    _finish(proc, "ten large messages", 600)
    if in_flight <= 0:
        raise BenchError("the ten large messages were done before the small one was sent")
    return idle, process_memory(gate.pid)["VmHWM"], small, min(10, in_flight)


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
