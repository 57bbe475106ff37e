"""`workers: 2` as real processes: one port, a worker killed mid-transaction, reload, drain, readiness."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import re
import signal
import socket
import stat
import struct
import sys
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

from smtpgate.store import MessageRecord, open_store
from tests.conftest import write_config
from tests.store_helpers import pg_database, store_url  # noqa: F401  (fixtures)
from tests.support.configs import SUBMISSION, TEAMS_A_B
from tests.support.wire import Wire, code, free_port

CONFIG = SUBMISSION + """\
upstream:
  url: {upstream}
""" + TEAMS_A_B + """\
store:
  url: {store}
  auto_upgrade: true
workers: 2
shutdown_grace: 20
{extra}"""


class Supervised:
    """`smtpgate serve` with workers: its stdout read all along (so no worker blocks on a full pipe)."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.events: list[dict] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while line := await self.proc.stdout.readline():
            self.events.append(json.loads(line))
            self._changed.set()
        self._changed.set()

    async def until(self, predicate: Callable[[], object], what: str, timeout: float = 30):
        """The first true value of predicate(), re-checked after every log line; fails after timeout s."""
        try:
            async with asyncio.timeout(timeout):
                while not (found := predicate()):
                    if self._reader.done():
                        raise AssertionError(f"serve exited before {what}")
                    self._changed.clear()
                    await self._changed.wait()
                return found
        except TimeoutError:
            raise AssertionError(f"no {what} after {timeout}s; events: {self.events[-20:]}") from None

    def named(self, name: str, **fields) -> list[dict]:
        return [e for e in self.events if e["event"] == name and all(e.get(k) == v for k, v in fields.items())]

    async def event(self, name: str, **fields) -> dict:
        return (await self.until(lambda: self.named(name, **fields), name))[0]

    async def served_by(self, local_port: int) -> int:
        """The pid of the worker whose session.opened names this client port."""
        opened = await self.until(lambda: self.named("session.opened", port=local_port), f"session of {local_port}")
        return opened[0]["pid"]

    async def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        status = await asyncio.wait_for(self.proc.wait(), 60)
        assert await self.ended(30)
        return status

    async def ended(self, timeout: float) -> bool:
        """True once stdout is closed: the supervisor and every worker have exited."""
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        except TimeoutError:
            return False
        return True

    async def kill(self) -> None:
        """End the supervisor and every worker it started, whatever state they are in."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        if not await self.ended(30):
            for pid in {e["pid"] for e in self.named("worker.started")}:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await self.ended(10)
        # (Python 3.11's Process.wait also waits for stdout to close, so only now.)
        await asyncio.wait_for(self.proc.wait(), 10)


async def start(config: Path, notify_path: str | None = None) -> Supervised:
    env = dict(os.environ, TMPDIR=str(config.parent))  # the metrics folder of a killed supervisor stays there
    env.pop("NOTIFY_SOCKET", None)
    if notify_path:
        env["NOTIFY_SOCKET"] = notify_path
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "smtpgate", "serve", "-c", str(config),
        stdout=asyncio.subprocess.PIPE, env=env, cwd=str(config.parent))
    return Supervised(proc)


async def greet(port: int) -> tuple[Wire, int]:
    """A session whose greeting arrived, and its local port."""
    wire, greeting = await Wire.open(port)
    assert code(greeting) == 220
    return wire, wire.writer.get_extra_info("sockname")[1]


async def one_session_per_worker(served: Supervised, port: int, workers: set[int]) -> dict[int, Wire]:
    """Open sessions until each worker pid in workers holds one; the others are closed."""
    held: dict[int, Wire] = {}
    for _ in range(200):  # the kernel picks the worker; 200 misses in a row would be a finding
        wire, local = await greet(port)
        pid = await served.served_by(local)
        assert pid in workers, f"session served by {pid}, not a worker of {workers}"
        if pid in held:
            await wire.cmd("QUIT")
            await wire.close()
        else:
            held[pid] = wire
        if set(held) == workers:
            return held
    raise AssertionError(f"200 sessions never reached every worker of {workers}: {set(held)}")


def message(i: int, source: str) -> tuple[str, bytes]:
    msgid = f"<kill-{i}@corp.example>"
    data = (f"From: Team A <uk-payroll+{source}@corp.example>\r\n"
            f"To: Team B <pl-payroll@corp.example>\r\nCc: client@supplier.example\r\n"
            f"Subject: concurrent {i}\r\nMessage-ID: {msgid}\r\n\r\nbody {i}\r\n.\r\n").encode()
    return msgid, data


async def transaction(wire: Wire, i: int, source: str) -> int:
    """One whole transaction on a greeted session; the reply code to the dot, 0 when the connection broke."""
    _, data = message(i, source)
    steps = [("EHLO client.test", 250), (f"MAIL FROM:<uk-payroll+{source}@corp.example>", 250),
             ("RCPT TO:<pl-payroll@corp.example>", 250), ("RCPT TO:<client@supplier.example>", 250),
             ("DATA", 354)]
    try:
        for line, wanted in steps:
            reply = code(await wire.cmd(line))
            if reply == 0:
                return 0
            assert reply == wanted, f"{line!r}: {reply}"
        await wire.send(data)
        reply = code(await wire.reply(timeout=60))
    except ConnectionError:
        return 0  # a session on the killed worker breaks wherever it was
    await wire.close()
    return reply


def sink_message_ids(sink) -> list[str]:
    ids = []
    for received in sink.messages:
        found = re.search(rb"(?im)^Message-ID:\s*(<[^>]+>)", received.data)
        ids.append(found.group(1).decode() if found else "")
    return ids


async def test_two_workers_one_port_kill9_mid_transactions_restart_and_drain(tmp_path, sink, store_url):  # noqa: F811
    port = free_port()
    config = write_config(tmp_path, CONFIG.format(port=port, upstream=f"smtp://127.0.0.1:{sink.port}",
                                                  store=store_url, extra=""))
    served = await start(config)
    try:
        ready = await served.event("smtpgate.ready")
        workers = set(ready["workers"])
        assert len(workers) == 2 and served.proc.pid not in workers

        # Two worker processes serve the one port: a session reaches each of them.
        held = await one_session_per_worker(served, port, workers)
        for wire in held.values():
            await wire.cmd("QUIT")
            await wire.close()

        # 20 sessions, opened one after the other so that the kernel spreads them over both
        # workers (a burst of connects is mostly taken by one: docs/workers.md), then 20
        # concurrent transactions from 5 source activities to one mailbox, so that the workers
        # race for each (source, mailbox) link. The upstream holds its answers to the dot.
        sources = [f"{7100 + i % 5}-T" for i in range(20)]
        sessions, served_by = [], []
        for i in range(20):
            for _ in range(200):  # bounded: the kernel may hand a busy run of connects to one worker
                session = await greet(port)
                who = await served.served_by(session[1])
                if i < 19 or len(set(served_by) | {who}) == 2:
                    break
                await session[0].cmd("QUIT")  # the last one must reach the other worker
                await session[0].close()
            sessions.append(session)
            served_by.append(who)
        assert set(served_by) == workers
        hold = asyncio.Event()
        sink.hold_data = hold
        clients = [asyncio.create_task(transaction(wire, i, sources[i])) for i, (wire, _) in enumerate(sessions)]
        await sink.wait_for_received(10, timeout=60)
        # The worker with more of the sessions dies, every one of them in flight.
        victim = collections.Counter(served_by).most_common(1)[0][0]
        os.kill(victim, signal.SIGKILL)
        exited = await served.event("worker.exited", pid=victim)
        hold.set()
        first = await asyncio.gather(*clients)

        assert exited["signal"] == "SIGKILL" and exited["restart_in"] > 0
        restarted = await served.until(
            lambda: [e for e in served.named("worker.started", worker=exited["worker"]) if e["pid"] not in workers],
            "the replacement worker")
        new_pid = restarted[0]["pid"]
        await served.event("listener.started", pid=new_pid)
        survivor = (workers - {victim}).pop()
        # The survivor's transactions completed; every one on the killed worker was cut.
        assert first == [250 if pid == survivor else 0 for pid in served_by]

        # A client that got no 250 retries, as an MTA does, and now both workers are up again.
        retried = list(first)
        for i, reply in enumerate(first):
            if reply != 250:
                retried[i] = await transaction((await greet(port))[0], i, sources[i])
        assert retried == [250] * 20

        delivered = sink_message_ids(sink)
        sent = {message(i, sources[i])[0] for i in range(20)}
        got_250_first = {message(i, sources[i])[0] for i, reply in enumerate(first) if reply == 250}
        # Every message a client got 250 for is at the sink (a retry may add a copy; nothing is lost).
        assert got_250_first <= set(delivered) and sent == set(delivered)
        # Nothing reached the sink that no client sent.
        assert set(delivered) <= sent
        # One linked activity per (source, mailbox): every copy of a source's messages has the same tag.
        tags = collections.defaultdict(set)
        for received, msgid in zip(sink.messages, delivered):
            source = sources[int(msgid.split("-")[1].split("@")[0])]
            tags[source].update(r for r in received.rcpt_tos if r.startswith("pl-payroll+"))
        assert all(len(t) == 1 for t in tags.values()) and len(tags) == 5

        # The replacement serves too; then SIGTERM drains a transaction in flight on each worker.
        workers = {survivor, new_pid}
        held = await one_session_per_worker(served, port, workers)
        for wire in held.values():
            assert code(await wire.cmd("EHLO client.test")) == 250
            assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250
            assert code(await wire.cmd("RCPT TO:<client@supplier.example>")) == 250
        served.proc.send_signal(signal.SIGTERM)
        for pid in workers:
            await served.event("shutdown.started", pid=pid)
        for wire in held.values():
            assert code(await wire.cmd("DATA")) == 354
            await wire.send(b"Subject: in flight\r\n\r\nbody\r\n.\r\n")
            assert code(await wire.reply()) == 250
            await wire.cmd("QUIT")
        assert await asyncio.wait_for(served.proc.wait(), 60) == 0
        assert await served.ended(30)
        for pid in workers:
            assert served.named("shutdown.complete", pid=pid)
            assert served.named("worker.exited", pid=pid)[0]["exit_status"] == 0
    finally:
        await served.kill()

    store = await open_store(store_url, base_dir=tmp_path)
    try:
        links = await store.list_links()
    finally:
        await store.close()
    pairs = collections.Counter((link.source_reference, link.target_mailbox) for link in links)
    assert pairs and all(count == 1 for count in pairs.values()), pairs
    assert {source for source, _ in pairs} == set(sources)
    linked = {link.source_reference: f"pl-payroll+{link.target_reference}@corp.example" for link in links}
    assert {source: {tag} for source, tag in linked.items()} == dict(tags)


class NotifySocket:
    """The socket systemd would give smtpgate in NOTIFY_SOCKET; it records who sent each datagram."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.path)
        self.sock.setblocking(False)

    async def receive(self, timeout: float = 30) -> tuple[str, int]:
        """(state, sender pid) of the next datagram."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(self.sock, ready.set)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        data, ancdata, _, _ = self.sock.recvmsg(256, socket.CMSG_SPACE(12))
                        break
                    except BlockingIOError:
                        ready.clear()
                        await ready.wait()
        finally:
            loop.remove_reader(self.sock)
        pid = next(struct.unpack("3i", c[:12])[0] for level, kind, c in ancdata
                   if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
        return data.decode(), pid


async def test_ready_reload_refused_by_supervisor_and_reload_in_every_worker(tmp_path):
    port = free_port()

    def text(extra: str = "") -> str:
        return CONFIG.format(port=port, upstream="maildir:outbox", store="sqlite:smtpgate.db", extra=extra)

    config = write_config(tmp_path, text())
    notify = NotifySocket(tmp_path / "notify.sock")
    served = await start(config, notify.path)
    try:
        # READY=1 comes from the supervisor, only once both workers listen.
        assert await notify.receive() == ("READY=1", served.proc.pid)
        ready = await served.event("smtpgate.ready")
        assert ready["config"] == str(config)
        workers = set(ready["workers"])
        before_ready = served.events[:served.events.index(ready)]
        assert {e["pid"] for e in before_ready if e["event"] == "listener.started"} == workers

        async def sizes() -> dict[int, str]:
            held = await one_session_per_worker(served, port, workers)
            out = {}
            for pid, wire in held.items():
                ehlo = await wire.cmd("EHLO client.test")
                out[pid] = next(line[4:] for line in ehlo.split("\n") if line[4:].startswith("SIZE"))
                await wire.cmd("QUIT")
                await wire.close()
            return out

        # A broken file: the supervisor refuses it and no worker hears of it.
        config.write_text(text("upstream_typo: 1\n"))
        served.proc.send_signal(signal.SIGHUP)
        rejected = await served.event("config.rejected")
        assert "pid" not in rejected
        assert rejected["path"] == str(config)
        assert any("upstream_typo: unknown key" in e for e in rejected["errors"])
        assert await notify.receive() == ("RELOADING=1", served.proc.pid)
        assert await notify.receive() == ("READY=1", served.proc.pid)
        assert await sizes() == {pid: "SIZE 36700160" for pid in workers}

        # A good file: every worker reloads it, once.
        config.write_text(text("limits:\n  max_message_size: 1000\n"))
        served.proc.send_signal(signal.SIGHUP)
        assert await notify.receive() == ("RELOADING=1", served.proc.pid)
        assert await notify.receive() == ("READY=1", served.proc.pid)
        reloaded = await served.until(lambda: len(served.named("config.reloaded")) >= 2 and
                                      served.named("config.reloaded"), "config.reloaded by both workers")
        assert sorted(e["pid"] for e in reloaded) == sorted(workers)
        assert await sizes() == {pid: "SIZE 1000" for pid in workers}
        assert len(served.named("config.rejected")) == 1

        assert await served.stop() == 0
        assert await notify.receive() == ("STOPPING=1", served.proc.pid)
    finally:
        await served.kill()
        notify.sock.close()


async def test_debug_level_reaches_the_log_from_every_worker(tmp_path):
    port = free_port()
    config = write_config(tmp_path, CONFIG.format(port=port, upstream="maildir:outbox", store="sqlite:smtpgate.db",
                                                  extra="logging:\n  level: debug\n"))
    served = await start(config)
    try:
        workers = set((await served.event("smtpgate.ready"))["workers"])
        held = await one_session_per_worker(served, port, workers)
        for wire in held.values():
            assert code(await wire.cmd("NOOP")) == 250
            await wire.cmd("QUIT")
            await wire.close()
            opened = served.named("session.opened", port=wire.writer.get_extra_info("sockname")[1])[0]
            await served.event("session.closed", session=opened["session"])
        commands = served.named("smtp.command", verb="NOOP")
        assert sorted(e["pid"] for e in commands) == sorted(workers) and {e["level"] for e in commands} == {"debug"}
        assert await served.stop() == 0
    finally:
        await served.kill()


async def test_a_worker_dying_again_soon_waits_longer(tmp_path):
    config = write_config(tmp_path, CONFIG.format(port=free_port(), upstream="maildir:outbox",
                                                  store="sqlite:smtpgate.db", extra=""))
    served = await start(config)
    try:
        ready = await served.event("smtpgate.ready")
        seen = set(ready["workers"])
        pid = ready["workers"][1]
        delays = []
        for _ in range(2):
            os.kill(pid, signal.SIGKILL)
            exited = await served.event("worker.exited", pid=pid)
            assert exited["worker"] == 1 and exited["signal"] == "SIGKILL"
            delays.append(exited["restart_in"])
            started = await served.until(
                lambda: [e for e in served.named("worker.started", worker=1) if e["pid"] not in seen],
                "a new worker 1")
            pid = started[0]["pid"]
            seen.add(pid)
            await served.event("listener.started", pid=pid)
        assert delays[1] == 2 * delays[0]
        assert await served.stop() == 0
    finally:
        await served.kill()


async def test_only_worker_0_prunes_the_store(tmp_path):
    url = f"sqlite:{tmp_path / 'smtpgate.db'}"

    async def old_record(n: int) -> None:
        store = await open_store(url, base_dir=tmp_path)
        try:
            await store.record_message(MessageRecord(
                message_id=f"<old-{n}@corp.example>", date=None, from_=None, subject=None,
                source_reference=None, recipients=["client@supplier.example"], mapping={},
                relayed_at=datetime.now(timezone.utc) - timedelta(days=500)))
        finally:
            await store.close()

    async def replace(worker: int, pid: int, seen: set[int]) -> int:
        os.kill(pid, signal.SIGKILL)
        started = await served.until(
            lambda: [e for e in served.named("worker.started", worker=worker) if e["pid"] not in seen],
            f"a new worker {worker}")
        await served.event("listener.started", pid=started[0]["pid"])
        return started[0]["pid"]

    await old_record(1)
    config = write_config(tmp_path, CONFIG.format(port=free_port(), upstream="maildir:outbox", store=url, extra=""))
    served = await start(config)
    try:
        ready = await served.event("smtpgate.ready")
        seen = set(ready["workers"])
        assert (await served.event("store.pruned"))["pid"] == ready["workers"][0]
        # A second old record survives a new worker 1 and goes with the next worker 0.
        await old_record(2)
        seen.add(await replace(1, ready["workers"][1], seen))
        new_0 = await replace(0, ready["workers"][0], seen)
        await served.event("store.pruned", pid=new_0)
        assert [e["worker"] for e in served.named("store.pruned")] == [0, 0]
        assert await served.stop() == 0
    finally:
        await served.kill()


def sample(exposition: str, name: str) -> float:
    """The value of one unlabelled sample in a Prometheus text exposition."""
    [value] = [line.split()[-1] for line in exposition.splitlines() if line.split(" ")[0] == name]
    return float(value)


async def test_worker_0_serves_the_admin_listener_with_every_workers_metrics(tmp_path):
    import aiohttp

    admin_port = free_port()
    port = free_port()
    config = write_config(tmp_path, CONFIG.format(port=port, upstream="maildir:outbox",
                                                  store="sqlite:smtpgate.db",
                                                  extra=f"admin:\n  listen: 127.0.0.1:{admin_port}\n"))
    served = await start(config)
    try:
        ready = await served.event("smtpgate.ready")
        [admin] = served.named("listener.started", listener="admin")
        assert admin["pid"] == ready["workers"][0]
        async with aiohttp.ClientSession() as http:
            async def get(path: str) -> str:
                async with http.get(f"http://127.0.0.1:{admin_port}{path}") as response:
                    assert response.status == 200
                    return await response.text()

            await get("/readyz")
            # One SIGHUP is one reload, however many workers apply it.
            served.proc.send_signal(signal.SIGHUP)
            await served.until(lambda: len(served.named("config.reloaded")) == 2, "config.reloaded by both")
            assert sample(await get("/metrics"), 'smtpgate_config_reloads_total{result="reloaded"}') == 1
            # /metrics sums every worker: sessions opened on both, one held open on each.
            held = await one_session_per_worker(served, port, set(ready["workers"]))
            metrics = await get("/metrics")
            assert sample(metrics, "smtpgate_smtp_sessions_open") == 2
            assert sample(metrics, "smtpgate_smtp_sessions_total") == len(served.named("session.opened"))

            # Worker 0 dies with its session: its counts stay, its open session leaves the gauge,
            # and its replacement serves the admin listener.
            os.kill(admin["pid"], signal.SIGKILL)
            started = await served.until(
                lambda: [e for e in served.named("worker.started", worker=0) if e["pid"] != admin["pid"]],
                "a new worker 0")
            await served.event("listener.started", listener="admin", pid=started[0]["pid"])
            metrics = await get("/metrics")
            assert sample(metrics, "smtpgate_smtp_sessions_open") == 1
            assert sample(metrics, "smtpgate_smtp_sessions_total") == len(served.named("session.opened"))
            for wire in held.values():
                await wire.close()
        assert await served.stop() == 0
    finally:
        await served.kill()


async def test_two_workers_serve_one_milter_unix_socket(tmp_path):
    from tests.support.milter import MilterClient

    path = tmp_path / "milter.sock"
    extra = f"""\
  - name: milter
    kind: milter
    address: {path}
"""
    text = CONFIG.format(port=free_port(), upstream="maildir:outbox", store="sqlite:smtpgate.db", extra="")
    config = write_config(tmp_path, text.replace("upstream:", extra + "upstream:", 1))
    served = await start(config)
    try:
        workers = set((await served.event("smtpgate.ready"))["workers"])
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        for n in range(1, 201):  # the kernel picks the worker; 200 misses in a row would be a finding
            client = await MilterClient.open(path=str(path))
            await client.negotiate()
            opened = await served.until(lambda: len(served.named("milter.session.opened")) >= n and
                                        served.named("milter.session.opened"), "milter.session.opened")
            await client.quit()
            if {e["pid"] for e in opened} == workers:
                break
        assert {e["pid"] for e in opened} == workers
        assert await served.stop() == 0
    finally:
        await served.kill()


async def test_start_up_failures_stop_everything(tmp_path):
    # The port is taken: the supervisor cannot bind it and no worker starts.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = write_config(tmp_path, CONFIG.format(port=busy.getsockname()[1], upstream="maildir:outbox",
                                                      store="sqlite:smtpgate.db", extra=""))
        served = await start(config)
        failed = await served.event("startup.failed")
        assert "cannot listen on" in failed["reason"]
        assert await asyncio.wait_for(served.proc.wait(), 30) == 1
        assert not served.named("worker.started")

    # The store cannot be opened: each worker says why, the supervisor stops and exits 1.
    (tmp_path / "not-a-folder").write_text("")
    config = write_config(tmp_path, CONFIG.format(port=free_port(), upstream="maildir:outbox",
                                                  store="sqlite:not-a-folder/smtpgate.db", extra=""))
    served = await start(config)
    try:
        assert await asyncio.wait_for(served.proc.wait(), 60) == 1
        assert await served.ended(30)
        failed = served.named("startup.failed")
        assert any("smtpgate.db" in e["reason"] for e in failed if "pid" in e)
        assert any("worker" in e["reason"] for e in failed if "pid" not in e)
        assert not served.named("smtpgate.ready")
    finally:
        await served.kill()


async def test_workers_drain_when_the_supervisor_is_killed(tmp_path):
    config = write_config(tmp_path, CONFIG.format(port=free_port(), upstream="maildir:outbox",
                                                  store="sqlite:smtpgate.db", extra=""))
    served = await start(config)
    try:
        workers = (await served.event("smtpgate.ready"))["workers"]
        served.proc.kill()
        # stdout ends only when every worker has exited too.
        assert await served.ended(60), "workers outlived the supervisor"
        assert sorted(e["pid"] for e in served.named("shutdown.complete")) == sorted(workers)
    finally:
        await served.kill()
