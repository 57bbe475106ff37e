"""The running relay: configuration, listeners, upstream pool, store; start, reload, drain.

`smtpgate serve` builds one Gate on its own asyncio loop (no threads): every
listener is an aiosmtpd protocol served by `loop.create_server`.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Coroutine
from pathlib import Path

from smtpgate.mail import replies
from smtpgate.store.allocation import HttpAllocator, LocalAllocator
from smtpgate.config import Config, ConfigError, load_config
from smtpgate.linking.service import Linker
from smtpgate.log import get_logger, setup_logging
from smtpgate.runtime.notify import sd_notify
from smtpgate.linking.plan import Directory
from smtpgate.linking.references import ReferenceMatcher
from smtpgate.frontends.smtp.server import file_authenticator, make_factory
from smtpgate.store import Store, open_store, run_pruner
from smtpgate.upstream.client import UpstreamPool
from smtpgate.users import Users

log = get_logger()


class StartupError(Exception):
    """smtpgate cannot start; the message says why and what to do."""


def make_allocator(config: Config):
    alloc = config.allocator
    if alloc.kind == "http":
        matcher = ReferenceMatcher(config.references.pattern)
        return HttpAllocator(alloc.url, alloc.token(), alloc.timeout, matcher.fullmatch)
    return LocalAllocator(alloc.first_number)


async def open_configured_store(config: Config, **kwargs) -> Store:
    return await open_store(
        config.store.url,
        base_dir=config.base_dir,
        allocator=make_allocator(config),
        auto_upgrade=config.store.auto_upgrade,
        timeout=config.store.timeout,
        **kwargs,
    )


class Gate:
    def __init__(self, config: Config, store: Store | None = None):
        self.config = config
        self.directory = Directory(config.core)
        self.pool = UpstreamPool(config.upstream, local_hostname=config.hostname)
        self.store = store
        self.users = Users.load(config.users_file)
        self.authenticator = file_authenticator(self)
        self.linker = Linker(self)
        self.sessions: set = set()
        self.draining = False
        self.servers: list[asyncio.AbstractServer] = []
        self.tasks: set[asyncio.Task] = set()
        self.pruner: asyncio.Task | None = None

    def spawn(self, coro: Coroutine) -> asyncio.Task:
        """Run coro in the background, keeping a reference until it ends (a drain waits for it)."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    @property
    def bound(self) -> list[tuple[str, int]]:
        """(host, port) of every listening socket, in listener order (port 0 resolved)."""
        out = []
        for server in self.servers:
            for sock in server.sockets:
                out.append(sock.getsockname()[:2])
        return out

    async def start(self) -> None:
        if self.store is None:
            self.store = await open_configured_store(self.config)
        if self.config.upstream.scheme == "mx":
            raise StartupError("upstream.url: mx: upstreams are not available yet; use smtp://, "
                               "smtp+starttls://, smtps:// or maildir:")
        await self.pool.probe()
        self.pruner = asyncio.get_running_loop().create_task(
            run_pruner(self.store, self.config.store.keep_messages_days))
        loop = asyncio.get_running_loop()
        for listener in self.config.listeners:
            if listener.kind != "smtp":
                raise StartupError(f"listener {listener.name}: kind {listener.kind} is not available yet")
            if listener.direction != "outbound":
                raise StartupError(f"listener {listener.name}: direction {listener.direction} is not available yet")
            factory, tls = make_factory(self, listener)
            try:
                server = await loop.create_server(factory, listener.host, listener.port, ssl=tls,
                                                  reuse_address=True)
            except OSError as exc:
                raise StartupError(f"listener {listener.name}: cannot listen on "
                                   f"{listener.host}:{listener.port}: {exc.strerror or exc}") from None
            self.servers.append(server)
            log.info("listener.started", listener=listener.name, address=f"{listener.host}:{listener.port}",
                     tls=listener.tls, auth=listener.auth)

    def reload(self, config: Config) -> None:
        """Take a new config for new connections and transactions."""
        old = self.config
        kept = []
        if config.listeners != old.listeners:
            kept.append("listeners")
        if config.store != old.store or config.allocator != old.allocator:
            kept.append("store")
        if config.workers != old.workers:
            kept.append("workers")
        users = Users.load(config.users_file)
        if config.upstream != old.upstream:
            old_pool, self.pool = self.pool, UpstreamPool(config.upstream, local_hostname=config.hostname)
            self.spawn(old_pool.close())
        self.config = config
        self.directory = Directory(config.core)
        self.users = users
        log.info("config.reloaded", path=str(config.path),
                 needs_restart=kept or None)

    async def drain(self, grace: float) -> None:
        """Stop accepting, let transactions in flight finish for up to grace seconds, then 421."""
        self.draining = True
        for server in self.servers:
            server.close()
        deadline = time.monotonic() + grace
        while any(s.busy for s in self.sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # Counted now: a closed session leaves self.sessions before the summary is logged.
        still_open = list(self.sessions)
        for session in still_open:
            session.say_goodbye(replies.SHUTTING_DOWN.line())
        if self.pruner is not None:
            self.pruner.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=5)
        await self.pool.close()
        if self.store is not None:
            await self.store.close()
        log.info("shutdown.complete", sessions_closed=len(still_open))


async def serve(config_path: Path) -> int:
    """`smtpgate serve`: run until SIGTERM/SIGINT; SIGHUP reloads the config."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        setup_logging()
        for problem in exc.problems:
            log.error("config.rejected", error=problem)
        return 2
    setup_logging(config.logging.format, config.logging.level)
    if config.workers != 1:
        log.warning("config.unsupported", key="workers", value=config.workers,
                    detail="one worker process is run; several are not available yet")
    gate = Gate(config)
    try:
        await gate.start()
    except Exception as exc:  # noqa: BLE001 - every start-up failure is reported, then exit 1
        log.error("startup.failed", reason=str(exc), error=type(exc).__name__)
        await gate.drain(0)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def reload() -> None:
        sd_notify("RELOADING=1")
        try:
            gate.reload(load_config(config_path))
        except ConfigError as exc:
            log.error("config.rejected", path=str(config_path), errors=exc.problems)
        sd_notify("READY=1")

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    sd_notify("READY=1")
    log.info("smtpgate.ready", config=str(config.path), listeners=[f"{h}:{p}" for h, p in gate.bound],
             upstream=config.upstream.label)
    await stop.wait()
    sd_notify("STOPPING=1")
    log.info("shutdown.started", grace=gate.config.shutdown_grace)
    await gate.drain(gate.config.shutdown_grace)
    return 0
