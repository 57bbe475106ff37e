"""A sampling profile of smtpgate under load (py-spy), summarised as text.

py-spy records the threads that are running (it leaves out those sleeping in
the kernel) as collapsed stacks (`--format raw`); a thread's samples divided
by the snapshots taken (seconds x rate) is how busy it was. The summary
says that per thread, and where the event loop thread's samples went.
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import BenchError, wait_until

# Where busy samples of the event loop thread go (see _part); asyncio last.
PARTS = [
    ("aiosmtpd SMTP.__init__ (per connection)", re.compile(r"^SMTP\.__init__\b.*\(aiosmtpd/smtp\.py")),
    ("logging (structlog, json)", re.compile(r"\((structlog/|json/|smtpgate/log\.py)")),
    ("store (smtpgate/store, aiosqlite, asyncpg)", re.compile(r"\((smtpgate/store/|aiosqlite/|asyncpg/)")),
    ("linking (plan, references, service)", re.compile(r"\(smtpgate/linking/")),
    ("mail parsing (headers, addresses, rewrite, dataguard)", re.compile(r"\(smtpgate/mail/")),
    ("upstream client (aiosmtplib)", re.compile(r"\((aiosmtplib/|smtpgate/upstream/)")),
    ("relay transaction (smtpgate/frontends)", re.compile(r"\(smtpgate/frontends/")),
    ("aiosmtpd protocol", re.compile(r"\(aiosmtpd/")),
    ("asyncio transports and loop", re.compile(r"\(asyncio/|uvloop")),
]


def _part(frames: list[str]) -> str:
    """The part of smtpgate a sample belongs to: the innermost frame of a known
    component, asyncio's own frames counting only when nothing else matches."""
    for frame in reversed(frames):
        for name, pattern in PARTS[:-1]:
            if pattern.search(frame):
                return name
    name, pattern = PARTS[-1]
    return name if any(pattern.search(f) for f in frames) else "other"


@dataclass
class ThreadShare:
    name: str
    samples: int
    busy: int


@dataclass
class Profile:
    samples: int
    snapshots: int
    threads: list[ThreadShare]
    parts: list[tuple[str, float]]  # share of the event loop thread's busy samples
    top: list[tuple[str, float]]  # innermost functions, share of the loop's busy samples
    inclusive: list[tuple[str, float]] = field(default_factory=list)
    raw_path: Path | None = None


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise BenchError("py-spy is not installed: pip install py-spy")
    return found


class Recorder:
    """py-spy record on running processes until stopped."""

    def __init__(self, pid: int, out: Path, subprocesses: bool = False, rate: int = 250):
        cmd = [py_spy(), "record", "--pid", str(pid), "--format", "raw", "--output", str(out),
               "--threads", "--nolineno", "--rate", str(rate), "--nonblocking"]
        if subprocesses:
            cmd.append("--subprocesses")
        self.out = out
        self.rate = rate
        self.started = time.monotonic()
        self.seconds = 0.0
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> None:
        # SIGINT makes py-spy write what it sampled.
        self.seconds = time.monotonic() - self.started
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        wait_until(lambda: self.out.exists() and self.out.stat().st_size > 0, 10, "py-spy's output")


def summarise(raw: Path, snapshots: int, top: int = 12) -> Profile:
    threads: collections.Counter[str] = collections.Counter()
    loop_busy = 0
    parts: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        # With --threads the outermost entries name the process and the thread.
        head = [f for f in frames[:2] if f.startswith(("process ", "thread "))]
        frames = frames[len(head):]
        thread = head[-1] if head else "?"
        total += count
        threads[thread] += count
        leaf = frames[-1] if frames else ""
        if "MainThread" not in thread:
            continue  # a helper thread (aiosqlite's worker)
        loop_busy += count
        leaves[leaf] += count
        parts[_part(frames)] += count
        for f in set(frames):
            inclusive[f] += count
    shares = [ThreadShare(re.sub(r"^thread \(\d+\): ", "", name), n, min(n, snapshots))
              for name, n in threads.most_common()]
    loop = max(loop_busy, 1)
    return Profile(
        samples=total,
        snapshots=snapshots,
        threads=shares,
        parts=[(name, n / loop) for name, n in parts.most_common()],
        top=[(name, n / loop) for name, n in leaves.most_common(top)],
        inclusive=[(name, n / loop) for name, n in inclusive.most_common(60)
                   if not re.search(r"\(asyncio/|<module>|<frozen runpy>|run_forever|_run_once|serve \(smtpgate/|main \(", name)][:top],
        raw_path=raw,
    )
