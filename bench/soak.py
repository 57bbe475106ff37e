"""`make soak`: clients that vanish, faults that strike, and nothing leaks or is lost.

SOAK_MINUTES (default 10) of mixed traffic against `smtpgate serve` with 2 workers
on a PostgreSQL database created for the run (dropped after it):

- linking load from Postfix's smtp-source (a tagged sender, a team mailbox);
- connect-and-close probes every 100 ms (a FIN or a reset before the greeting);
- clients that go away at each stage (after EHLO, while MAIL or RCPT waits for a
  slow upstream, mid-DATA, after the dot before the reply), slow clients, and
  clients that send whole messages (bench/soak_clients.py);
- faults: the upstream (bench/soak_upstream.py) killed and restarted every minute,
  refusing a share of transactions at a stage chosen at random; every minute
  pg_terminate_backend on every connection to the run's database; every two
  minutes kill -9 of a worker.

Every 30 s the traffic pauses and the invariants are checked, and again at the
end; a breach is printed at once and fails the run. bench/SOAK.md gets the
figures. Needs root (smtp-source), Debian's postfix and PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import soak_clients  # noqa: E402
from bench.procs import (  # noqa: E402
    PG_ADMIN_DSN,
    SMTP_SOURCE,
    BenchError,
    GateSetup,
    Smtpgate,
    fresh_pg_database,
    process_memory,
    wait_listening,
)
from smtpgate.store.postgres import PostgresStore  # noqa: E402
from tests.support.wire import free_port  # noqa: E402

CHECK_EVERY = 30.0
UPSTREAM_EVERY = 60.0
PG_EVERY = 60.0
KILL_EVERY = 120.0
WARM_UP = 60.0  # a process's resources are measured against its first check after this long
CLIENTS = 8  # concurrent client loops
QUIET_WAIT = 30.0  # how long open sessions and upstream connections may take to reach 0
GROWTH = 0.10
_POOL = inspect.signature(PostgresStore.__init__).parameters["pool_size"].default
# A PostgresStore opens at most: the read pool, the write pool, the records connection and
# the look-ups' own connection (smtpgate/store/postgres.py).
PG_PER_PROCESS = 2 * _POOL + 2
UPSTREAM_MAX = 100  # upstream.max_connections' default, per process

EXTRA = """\
admin:
  listen: 127.0.0.1:{admin_port}
"""


@dataclass
class Faults:
    upstream_restarts: list[str] = field(default_factory=list)  # the refusing stage of each incarnation
    pg_terminations: list[int] = field(default_factory=list)  # backends terminated each time
    worker_kills: list[int] = field(default_factory=list)  # pids killed


@dataclass
class Check:
    at: float
    sessions_open: float | None
    upstream_in_use: float | None
    processes: dict[int, dict] = field(default_factory=dict)


class Upstream:
    """bench/soak_upstream.py as a child process, restarted on the same port."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.deliveries = folder / "deliveries.jsonl"
        self.proc: subprocess.Popen | None = None
        self.stage = "none"

    def start(self, stage: str = "none") -> None:
        self.stage = stage
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.soak_upstream", "--port", str(self.port),
             "--deliveries", str(self.deliveries), "--refuse-stage", stage],
            cwd=ROOT, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
        wait_listening(self.port, 20, "the soak upstream")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def records(self) -> list[dict]:
        out = []
        if self.deliveries.exists():
            for line in self.deliveries.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out


class Soak:
    def __init__(self, gate: Smtpgate, upstream: Upstream, dsn: str, admin_port: int, minutes: float) -> None:
        self.gate, self.upstream, self.dsn = gate, upstream, dsn
        self.database = dsn.rpartition("/")[2]
        self.admin_port = admin_port
        self.seconds = minutes * 60
        self.run_id = os.urandom(3).hex()
        self.outcomes = soak_clients.Outcomes()
        self.faults = Faults()
        self.checks: list[Check] = []
        self.breaches: list[str] = []
        self.baselines: dict[int, dict] = {}
        self.births: dict[int, float] = {}
        self.source_runs = 0
        self.source_messages = 0
        self.active: set = set()  # client tasks and smtp-source processes under way
        self.delivery_figures: dict = {}
        self.tag_figures: dict = {}
        self.traffic = asyncio.Event()  # set while traffic runs
        self.stopping = False
        self.started = 0.0

    # ------------------------------------------------------------------ run

    async def run(self) -> None:
        self.started = time.monotonic()
        self.traffic.set()
        tasks = [asyncio.create_task(t) for t in (
            self._probes(), self._smtp_source(), self._faults(),
            *(self._client_loop() for _ in range(CLIENTS)))]
        try:
            while not self.stopping:
                await asyncio.sleep(CHECK_EVERY)
                last = time.monotonic() - self.started >= self.seconds
                await self._checkpoint(final=last)
                self.stopping = last
        finally:
            self.stopping = True
            self.traffic.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def breach(self, text: str) -> None:
        at = round(time.monotonic() - self.started)
        self.breaches.append(f"{at}s: {text}")
        print(f"SOAK BREACH at {at}s: {text}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ traffic

    async def _client_loop(self) -> None:
        names, weights = zip(*soak_clients.SCENARIOS.items())
        active = self.active
        while not self.stopping:
            await self.traffic.wait()
            if self.stopping:
                return
            scenario = random.choices(names, weights)[0]
            active.add(asyncio.current_task())
            try:
                await soak_clients.run_scenario(self.gate.port, scenario, self.outcomes, self.run_id)
            finally:
                active.discard(asyncio.current_task())

    async def _probes(self) -> None:
        n = 0
        while not self.stopping:
            await self.traffic.wait()
            how = "fin" if n % 2 == 0 else "reset"
            n += 1
            try:
                await soak_clients.probe(self.gate.port, how)
                self.outcomes.probes[how] += 1
            except OSError:
                self.outcomes.probes["refused"] += 1
            await asyncio.sleep(0.1)

    async def _smtp_source(self) -> None:
        while not self.stopping:
            await self.traffic.wait()
            source = f"{800000 + self.source_runs % 200}-T"
            self.source_runs += 1
            proc = await asyncio.create_subprocess_exec(
                SMTP_SOURCE, "-A", "-s", "4", "-m", "40", "-l", "3000",
                "-f", f"uk-payroll+{source}@corp.example", "-t", "pl-payroll@corp.example",
                f"127.0.0.1:{self.gate.port}", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.active.add(proc)
            try:
                await proc.wait()
            finally:
                self.active.discard(proc)
            self.source_messages += 40

    async def _faults(self) -> None:
        next_upstream, next_pg, next_kill = UPSTREAM_EVERY, PG_EVERY - 15, KILL_EVERY - 45
        while not self.stopping:
            await asyncio.sleep(1)
            await self.traffic.wait()
            now = time.monotonic() - self.started
            if now >= next_upstream:
                next_upstream += UPSTREAM_EVERY
                stage = random.choice(("MAIL", "RCPT", "DATA", "dot"))
                self.upstream.kill()
                await asyncio.to_thread(self.upstream.start, stage)
                self.faults.upstream_restarts.append(stage)
            if now >= next_pg:
                next_pg += PG_EVERY
                self.faults.pg_terminations.append(await self._terminate_backends())
            if now >= next_kill:
                next_kill += KILL_EVERY
                workers = self.gate.pids()
                victim = workers[len(self.faults.worker_kills) % len(workers)]
                os.kill(victim, 9)
                self.faults.worker_kills.append(victim)

    async def _terminate_backends(self) -> int:
        import asyncpg

        conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=10)
        try:
            rows = await conn.fetch(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()", self.database)
            return sum(1 for r in rows if r[0])
        finally:
            await conn.close()

    # ------------------------------------------------------------------ checks

    async def _checkpoint(self, final: bool) -> None:
        self.traffic.clear()
        deadline = time.monotonic() + 180
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        if self.active:
            self.breach(f"{len(self.active)} clients still waiting for smtpgate 180 s after traffic paused")
            for waiting in list(self.active):
                (waiting.cancel if isinstance(waiting, asyncio.Task) else waiting.kill)()
        at = time.monotonic() - self.started
        sessions, in_use = await self._quiet()
        check = Check(at=round(at), sessions_open=sessions, upstream_in_use=in_use)
        if sessions != 0:
            self.breach(f"smtpgate_smtp_sessions_open is {sessions} {QUIET_WAIT:.0f}s after traffic stopped")
        if in_use != 0:
            self.breach(f"smtpgate_upstream_connections_in_use is {in_use} {QUIET_WAIT:.0f}s after traffic stopped")
        await self._check_processes(check)
        self.checks.append(check)
        await asyncio.to_thread(self._check_deliveries)
        if final:
            await self._check_tags()
        self._print(check)
        if not final:
            self.traffic.set()

    async def _quiet(self) -> tuple[float | None, float | None]:
        deadline = time.monotonic() + QUIET_WAIT
        sessions = in_use = None
        while time.monotonic() < deadline:
            metrics = await asyncio.to_thread(self._metrics)
            sessions = metrics.get("smtpgate_smtp_sessions_open")
            in_use = metrics.get("smtpgate_upstream_connections_in_use")
            if sessions == 0 and in_use == 0:
                break
            await asyncio.sleep(0.5)
        return sessions, in_use

    def _metrics(self) -> dict[str, float]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=5) as answer:
                text = answer.read().decode()
        except OSError:
            return {}  # worker 0 restarting: asked again
        out = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in ("smtpgate_smtp_sessions_open", "smtpgate_upstream_connections_in_use"):
                out[name] = float(value)
        return out

    async def _check_processes(self, check: Check) -> None:
        pg_ports = await self._pg_client_ports()
        now = time.monotonic()
        for pid in [self.gate.pid, *self.gate.pids()]:
            self.births.setdefault(pid, now)
            try:
                figures = process_figures(pid, self.upstream.port, pg_ports)
            except OSError:
                continue  # gone meanwhile (killed)
            check.processes[pid] = figures
            if figures["pg"] > PG_PER_PROCESS:
                self.breach(f"pid {pid} holds {figures['pg']} PostgreSQL connections (pools allow {PG_PER_PROCESS})")
            if figures["upstream"] > UPSTREAM_MAX:
                self.breach(f"pid {pid} holds {figures['upstream']} upstream connections (cap {UPSTREAM_MAX})")
            base = self.baselines.get(pid)
            if base is None:
                if now - self.births[pid] >= WARM_UP or pid == self.gate.pid:
                    self.baselines[pid] = figures
                continue
            if figures["other_fds"] > max(base["other_fds"] * (1 + GROWTH), base["other_fds"] + 2):
                self.breach(f"pid {pid}: {figures['other_fds']} descriptors (besides upstream and PostgreSQL "
                            f"sockets) against {base['other_fds']} after warm-up")
            if figures["rss"] > base["rss"] * (1 + GROWTH):
                self.breach(f"pid {pid}: RSS {figures['rss'] >> 20} MiB against {base['rss'] >> 20} MiB after warm-up")

    async def _pg_client_ports(self) -> set[int]:
        import asyncpg

        conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=10)
        try:
            rows = await conn.fetch("SELECT client_port FROM pg_stat_activity WHERE datname = $1", self.database)
        finally:
            await conn.close()
        return {r[0] for r in rows if r[0]}

    def _check_deliveries(self) -> None:
        """Every 250 has exactly one delivery; every delivery of a soak client's message was told 250
        (or is one of the after-the-dot cases); smtp-source's messages are delivered at most once."""
        prefix = f"<soak.{self.run_id}."
        delivered: Counter = Counter()
        source_ids: Counter = Counter()
        for record in self.upstream.records():
            mid = record.get("message_id") or ""
            if mid.startswith(prefix):
                delivered[mid] += 1
            else:
                source_ids[mid] += 1
        self.delivery_figures = {"deliveries": sum(delivered.values()) + sum(source_ids.values()),
                                 "after_the_dot": Counter(), "source_delivered": sum(source_ids.values())}
        told = dict(self.outcomes.by_message)
        for mid, outcome in told.items():
            times = delivered.get(mid, 0)
            if outcome == "250" and times != 1:
                self.breach(f"{mid}: client told 250, delivered {times} times")
            elif outcome != "250" and times:
                if outcome in soak_clients.AFTER_THE_DOT and times == 1:
                    self.delivery_figures["after_the_dot"][outcome] += 1
                else:
                    self.breach(f"{mid}: client told {outcome!r}, delivered {times} times")
        for mid, times in delivered.items():
            if mid not in told:
                self.breach(f"{mid}: delivered {times} times, its client never sent the final dot")
        for mid, times in source_ids.items():
            if times > 1 and mid:
                self.breach(f"smtp-source message {mid} delivered {times} times")

    async def _check_tags(self) -> None:
        """Every tag in a delivered message names a link the store holds."""
        import asyncpg

        pairs = set()
        for record in self.upstream.records():
            source = _tag(record.get("mail_from") or "")
            for rcpt in record.get("rcpt_tos", []):
                tag = _tag(rcpt)
                if source and tag and rcpt.startswith("pl-payroll+"):
                    pairs.add(tuple(sorted((source, tag))))
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            rows = await conn.fetch("SELECT lo, hi FROM links")
        finally:
            await conn.close()
        stored = {(r[0], r[1]) for r in rows}
        missing = pairs - stored
        self.tag_figures = {"tagged_pairs": len(pairs), "missing": len(missing)}
        for lo, hi in sorted(missing)[:20]:
            self.breach(f"a delivered message carries the link {lo} <-> {hi}, which the store does not hold")

    def _print(self, check: Check) -> None:
        procs = ", ".join(f"{pid}: rss {f['rss'] >> 20} MiB fds {f['other_fds']}+{f['upstream']}u+{f['pg']}pg"
                          for pid, f in check.processes.items())
        print(f"[{check.at:>4}s] sessions {check.sessions_open} upstream in use {check.upstream_in_use} "
              f"| {procs} | breaches {len(self.breaches)}", flush=True)


def _tag(address: str) -> str | None:
    local = address.partition("@")[0]
    return local.partition("+")[2] or None


def process_figures(pid: int, upstream_port: int, pg_ports: set[int]) -> dict:
    """RSS and descriptors of a process: sockets to the upstream, to PostgreSQL, and the rest."""
    inodes = {}
    for name in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{name}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            parts = line.split()
            local_port = int(parts[1].rsplit(":", 1)[1], 16)
            remote_port = int(parts[2].rsplit(":", 1)[1], 16)
            inodes[parts[9]] = (local_port, remote_port)
    upstream = pg = other = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            inode = target[8:-1] if target.startswith("socket:[") else None
            ports = inodes.get(inode) if inode else None
            if ports and ports[1] == upstream_port:
                upstream += 1
            elif ports and (ports[1] == 5432 or ports[0] in pg_ports):
                pg += 1
            else:
                other += 1
    return {"rss": process_memory(pid)["VmRSS"], "other_fds": other, "upstream": upstream, "pg": pg}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", "10")))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "SOAK.md")
    parser.add_argument("--root", type=Path, default=ROOT, help="the smtpgate source tree to run (another "
                        "checkout, to see the soak catch what it guards against)")
    args = parser.parse_args(argv)
    from bench import soak_report

    with tempfile.TemporaryDirectory(prefix="smtpgate-soak-") as tmp, fresh_pg_database() as dsn:
        folder = Path(tmp)
        upstream = Upstream(folder)
        upstream.start()
        admin_port = free_port()
        setup = GateSetup(store_kind="postgresql", store_url=dsn, workers=2, root=args.root,
                          extra=EXTRA.format(admin_port=admin_port))
        try:
            with Smtpgate(folder, setup, upstream.port, "soak") as gate:
                soak = Soak(gate, upstream, dsn, admin_port, args.minutes)
                started = time.time()
                asyncio.run(soak.run())
                counts = {e: gate.count(e) for e in ("message.relayed", "message.rejected", "session.opened",
                                                     "session.closed", "worker.exited", "link.created")}
        finally:
            upstream.kill()
        soak_report.write(args.out, soak, started, args.minutes, counts)
    print(f"bench/SOAK.md written; {len(soak.breaches)} breaches", flush=True)
    return 1 if soak.breaches else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        sys.exit(2)
