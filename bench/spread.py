"""`python -m bench.spread`: how the kernel spreads connections over smtpgate's workers.

Runs `workers: N` once with one listening socket shared by every worker (what
smtpgate does) and once with one SO_REUSEPORT socket per worker, and prints,
per load, how many sessions each worker served:

- sequential: one connection at a time (greeting, QUIT);
- bursts: groups of connections opened at once;
- transactions: whole messages from concurrent clients;
- after kill -9: a worker is killed and connections are opened at once; the
  time to their greeting shows what a dead worker costs each way.

Numbers are printed, not asserted. docs/workers.md records a run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smtpgate.runtime.supervisor import BACKOFF_FIRST  # noqa: E402
from tests.support.wire import Wire, free_port  # noqa: E402

RUN_SUPERVISOR = """\
import sys
from pathlib import Path
from smtpgate.config import load_config
from smtpgate.log import setup_logging
from smtpgate.runtime.supervisor import Supervisor
path = Path(sys.argv[1])
config = load_config(path)
setup_logging(config.logging.format, config.logging.level)
sys.exit(Supervisor(path, config, sharing=sys.argv[2]).run())
"""

CONFIG = """\
listeners:
  - name: bench
    address: 127.0.0.1:{port}
    relay_networks: [127.0.0.0/8]
upstream:
  url: maildir:outbox
internal_domains: [corp.example]
store:
  url: sqlite:smtpgate.db
  auto_upgrade: true
workers: {workers}
shutdown_grace: 5
"""


class Run:
    """One supervisor as a subprocess; its JSON log lines are collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.events: list[dict] = []
        self.changed = asyncio.Event()
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while line := await self.proc.stdout.readline():
            self.events.append(json.loads(line))
            self.changed.set()

    async def until(self, predicate, timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    def opened(self) -> list[dict]:
        return [e for e in self.events if e["event"] == "session.opened"]

    def workers(self) -> dict[int, int]:
        """worker index -> pid of its newest process."""
        return {e["worker"]: e["pid"] for e in self.events if e["event"] == "worker.started"}


async def greet_and_quit(port: int) -> float:
    """Seconds from connect to the greeting."""
    began = time.perf_counter()
    wire, _ = await Wire.open(port, timeout=30)
    waited = time.perf_counter() - began
    await wire.cmd("QUIT")
    await wire.close()
    return waited


async def transaction(port: int, i: int) -> None:
    wire, _ = await Wire.open(port)
    await wire.cmd("EHLO bench.test")
    await wire.cmd("MAIL FROM:<a@corp.example>")
    await wire.cmd("RCPT TO:<b@supplier.example>")
    await wire.cmd("DATA")
    await wire.send(b"Subject: spread %d\r\n\r\n" % i + b"a line of body text\r\n" * 100 + b".\r\n")
    await wire.reply()
    await wire.cmd("QUIT")
    await wire.close()


def spread(events: list[dict], workers: int) -> str:
    counts = collections.Counter(e["worker"] for e in events)
    shares = [counts.get(w, 0) for w in range(workers)]
    return f"{shares} (largest share {max(shares) / max(1, sum(shares)):.0%})"


async def measure(sharing: str, workers: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        port = free_port()
        config = Path(folder) / "smtpgate.yaml"
        config.write_text(CONFIG.format(port=port, workers=workers))
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", RUN_SUPERVISOR, str(config), sharing,
            stdout=asyncio.subprocess.PIPE, env=env, cwd=folder)
        run = Run(proc)
        try:
            await run.until(lambda: any(e["event"] == "smtpgate.ready" for e in run.events))
            print(f"{sharing}, {workers} workers:")

            async def phase(name: str, load) -> None:
                before = len(run.opened())
                expected = await load()
                await run.until(lambda: len(run.opened()) >= before + expected)
                print(f"  {name:<34} {spread(run.opened()[before:], workers)}")

            async def sequential() -> int:
                for _ in range(rounds * 20):
                    await greet_and_quit(port)
                return rounds * 20

            async def bursts() -> int:
                for _ in range(rounds):
                    await asyncio.gather(*(greet_and_quit(port) for _ in range(20)))
                return rounds * 20

            async def transactions() -> int:
                queue = list(range(rounds * 20))

                async def client() -> None:
                    while queue:
                        await transaction(port, queue.pop())
                await asyncio.gather(*(client() for _ in range(20)))
                return rounds * 20

            await phase(f"sequential ({rounds * 20} connections)", sequential)
            await phase(f"bursts ({rounds} x 20 at once)", bursts)
            await phase(f"transactions ({rounds * 20}, 20 clients)", transactions)

            victim = run.workers()[workers - 1]
            os.kill(victim, signal.SIGKILL)
            waits = await asyncio.gather(*(greet_and_quit(port) for _ in range(20)))
            stalled = sum(w >= BACKOFF_FIRST for w in waits)
            print(f"  after kill -9 of worker {workers - 1}: 20 at once, greeting p50 "
                  f"{statistics.median(waits) * 1000:.0f} ms, max {max(waits) * 1000:.0f} ms, "
                  f"{stalled} waited for the restart (>= {BACKOFF_FIRST} s)")
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 60)
            await run.reader


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.spread")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10, help="20 connections per round and load")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    for sharing in ("shared", "reuseport"):
        asyncio.run(measure(sharing, args.workers, args.rounds))


if __name__ == "__main__":
    main()
