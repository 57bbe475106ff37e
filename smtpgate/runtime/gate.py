"""The running relay: configuration, listeners, upstream pool, store; start, reload, drain.

`smtpgate serve` builds one Gate on its own asyncio loop (no threads): every
listener is an aiosmtpd protocol served by `loop.create_server`.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from smtpgate.config import Config, ConfigError, Listener, load_config
from smtpgate.frontends.milter.server import start_milter_listener
from smtpgate.frontends.milter.session import MilterSettings
from smtpgate.frontends.policy import MessagePolicy
from smtpgate.frontends.registry import SessionRegistry
from smtpgate.frontends.smtp.relay import RelayContext
from smtpgate.frontends.smtp.auth import upstream_authenticator
from smtpgate.frontends.smtp.stream import clean_spool_dir
from smtpgate.frontends.smtp.server import SmtpSettings, file_authenticator, make_factory, tls_context
from smtpgate.frontends.smtp.tls import TlsSetupError, server_context
from smtpgate.linking.plan import Directory
from smtpgate.linking.references import ReferenceMatcher
from smtpgate.linking.service import LinkService
from smtpgate.log import get_logger, setup_logging
from smtpgate.mail import replies
from smtpgate.runtime.notify import sd_notify
from smtpgate.store import Store, open_store, run_pruner
from smtpgate.store.allocation import HttpAllocator, LocalAllocator
from smtpgate.upstream.client import UpstreamPool
from smtpgate.users import Users, UsersError

log = get_logger()


class StartupError(Exception):
    """smtpgate cannot start; the message says why and what to do."""


class ReloadRefused(Exception):
    """A reload found a problem outside the config file (a certificate); nothing was swapped."""


def make_allocator(config: Config):
    alloc = config.allocator
    if alloc.kind == "http":
        matcher = ReferenceMatcher(config.references.pattern)
        return HttpAllocator(alloc.url, alloc.token(), alloc.timeout, matcher.fullmatch)
    return LocalAllocator(alloc.first_number, templates=[m.new_reference for m in config.mailboxes])


async def open_configured_store(config: Config, **kwargs) -> Store:
    return await open_store(
        config.store.url,
        base_dir=config.base_dir,
        allocator=make_allocator(config),
        auto_upgrade=config.store.auto_upgrade,
        timeout=config.store.timeout,
        password=config.store.password(),
        **kwargs,
    )


@dataclass(frozen=True)
class Snapshot:
    """Everything built from one configuration; a reload builds a new one and swaps it."""

    config: Config
    pool: UpstreamPool
    links: LinkService
    users: Users
    _smtp: dict[str, SmtpSettings] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, config: Config, store: Store, pool: UpstreamPool | None = None) -> Snapshot:
        directory = Directory(config.core)
        pool = pool or UpstreamPool(config.upstream, local_hostname=config.hostname)
        links = LinkService(store, directory, hostname=config.hostname, stamp=config.stamp.stamper)
        return cls(config, pool, links, Users.load(config.users_file))

    def listener(self, serving: Listener) -> Listener:
        """This snapshot's version of a listener that is serving: its mode may have changed."""
        for listener in self.config.listeners:
            if listener.name == serving.name:
                return serving.model_copy(update={"mode": listener.mode})
        return serving  # removed from the file: it serves as it was until a restart

    def smtp(self, listener: Listener) -> SmtpSettings:
        """The SMTP front end's settings for one listener, built once per snapshot."""
        settings = self._smtp.get(listener.name)
        if settings is None:
            policy = MessagePolicy.for_listener(self.links, self.config, self.listener(listener))
            relay = RelayContext(pool=self.pool, hostname=self.config.hostname, policy=policy)
            by_upstream = self.config.auth_backend == "upstream"  # the upstream's own send-as rules apply
            settings = SmtpSettings(relay=relay, max_connections=self.config.limits.max_connections,
                                    authenticator=(upstream_authenticator(self.pool) if by_upstream
                                                   else file_authenticator(self.users)),
                                    sender_rights=None if by_upstream else self.users.may_send_as,
                                    debug_for=debug_for(self.config))
            self._smtp[listener.name] = settings
        return settings


class Gate:
    """The composition root: builds snapshots, starts listeners, reloads and drains."""

    def __init__(self, config: Config, store: Store | None = None):
        self.config = config
        self.store = store
        self.snapshot: Snapshot | None = None
        self.registry = SessionRegistry()
        self.servers: list[asyncio.AbstractServer] = []
        self.tls: dict[str, ssl.SSLContext] = {}  # per listener, refreshed in place on reload
        self.pruner: asyncio.Task | None = None
        self.admin = None  # smtpgate.admin.AdminServer when admin.listen is set
        self.started = config  # what the sockets and the store were opened with; only a restart changes it

    @property
    def bound(self) -> list[tuple[str, int]]:
        """(host, port) of every listening socket, in listener order (port 0 resolved)."""
        out = []
        for server in self.servers:
            for sock in server.sockets:
                name = sock.getsockname()
                out.append(name[:2] if isinstance(name, tuple) else (name, 0))  # a unix socket: its path
        return out

    async def start(self, sockets: Sequence[tuple[Listener, Sequence[socket.socket]]] | None = None,
                    *, prune: bool = True, admin: bool = True) -> None:
        """Open the store, probe the upstream and serve every listener.

        sockets: listening sockets a supervisor bound (runtime/supervisor.py),
        served instead of binding each configured listener's address. prune and
        admin: False when another process runs the store's background pruning
        or serves the admin listener.
        """
        log_warnings(self.config)
        if self.store is None:
            self.store = await open_configured_store(self.config)
        self.snapshot = Snapshot.build(self.config, self.store)
        await self.snapshot.pool.probe()
        if prune:
            # Spool files are anonymous; only a name left by a process killed within the moment
            # between creating and unlinking one (no O_TMPFILE) can remain.
            spool_dir = self.config.limits.spool_dir
            removed = clean_spool_dir(spool_dir)
            if removed:
                log.info("spool.cleaned", removed=removed, spool_dir=str(spool_dir or tempfile.gettempdir()))
            self.pruner = asyncio.get_running_loop().create_task(
                run_pruner(self.store, self.config.store.keep_messages_days))
        if sockets is None:
            sockets = [(listener, ()) for listener in self.config.listeners]
        else:  # bound by the supervisor for the listeners of its first config
            self.started = self.config.model_copy(update={"listeners": tuple(lst for lst, _ in sockets)})
        for listener, bound in sockets:
            await self._listen(listener, bound)
        if admin and self.config.admin.listen:
            await self._start_admin(self.config.admin.listen)

    async def _start_admin(self, listen: str) -> None:
        """The admin HTTP listener (docs/operations.md); it reads the current snapshot per request."""
        from smtpgate.admin import AdminServer, Sources
        from smtpgate.config import parse_hostport

        def sources() -> Sources:
            snapshot = self._current()
            return Sources(snapshot.config, self.store, snapshot.pool, self.registry.draining)

        host, port = parse_hostport(listen)  # type: ignore[misc]  # validated by the config loader
        context = None
        if self.config.admin.tls_cert is not None and self.config.admin.tls_key is not None:
            try:
                context = server_context(self.config.admin.tls_cert, self.config.admin.tls_key)
            except TlsSetupError as exc:
                raise StartupError(f"admin: {exc}") from None
        self.admin = AdminServer(sources)
        try:
            await self.admin.start(host, port, context)
        except OSError as exc:
            raise StartupError(f"admin.listen: cannot listen on {listen}: {exc.strerror or exc}") from None
        log.info("listener.started", listener="admin", address=", ".join(f"{h}:{p}" for h, p in self.admin.bound),
                 tls="https" if context else "none")

    async def _listen(self, listener: Listener, bound: Sequence[socket.socket] = ()) -> None:
        if listener.kind not in ("smtp", "milter"):
            raise StartupError(f"listener {listener.name}: kind {listener.kind} is not available yet")
        if listener.kind == "milter":
            return await self._listen_milter(listener, bound)
        try:
            context = tls_context(listener)
        except TlsSetupError as exc:
            raise StartupError(f"listener {listener.name}: {exc}") from None
        if context is not None:
            self.tls[listener.name] = context
        factory, tls = make_factory(listener, lambda: self._current().smtp(listener), self.registry, context)
        loop = asyncio.get_running_loop()
        try:
            if bound:
                servers = [await loop.create_server(factory, sock=sock, ssl=tls) for sock in bound]
            else:
                servers = [await loop.create_server(factory, listener.host, listener.port, ssl=tls,
                                                    reuse_address=True)]
        except OSError as exc:
            raise StartupError(f"listener {listener.name}: cannot listen on "
                               f"{listener.host}:{listener.port}: {exc.strerror or exc}") from None
        self.servers.extend(servers)
        log.info("listener.started", listener=listener.name, address=f"{listener.host}:{listener.port}",
                 tls=listener.tls, auth=listener.auth, mode=listener.mode or self.config.mode)

    async def _listen_milter(self, listener: Listener, bound: Sequence[socket.socket] = ()) -> None:
        """A Postfix smtpd_milters listener: each MTA connection takes the snapshot current then."""
        def settings() -> MilterSettings:
            snapshot = self._current()
            return MilterSettings.for_listener(snapshot.links, snapshot.config, snapshot.listener(listener))

        where = str(listener.path) if listener.path else f"{listener.host}:{listener.port}"
        limit = self.config.limits.max_connections
        try:
            servers = [await start_milter_listener(listener, settings, self.registry, max_connections=limit, sock=sock)
                       for sock in bound or [None]]
        except OSError as exc:
            raise StartupError(f"listener {listener.name}: cannot listen on {where}: {exc.strerror or exc}") from None
        self.servers.extend(servers)
        log.info("listener.started", listener=listener.name, kind="milter", address=where,
                 mode=listener.mode or self.config.mode)

    def _current(self) -> Snapshot:
        assert self.snapshot is not None
        return self.snapshot

    def reload(self, config: Config) -> None:
        """Build a snapshot of the new config for new connections; sessions keep theirs.

        Mode (top level and per listener) applies to new sessions; what the
        listening sockets were opened with, and the store, need a restart, which
        `needs_restart` names: compared with what is serving, not with the last
        file, so a change reverted before a restart needs none.
        """
        old, started = self.config, self.started
        kept = []
        if _sockets(config.listeners) != _sockets(started.listeners):
            kept.append("listeners")
        if config.store != started.store or config.allocator != started.allocator:
            kept.append("store")
        if config.workers != started.workers:
            kept.append("workers")
        if config.admin.listen != started.admin.listen:
            kept.append("admin.listen")
        if (config.admin.tls_cert, config.admin.tls_key) != (started.admin.tls_cert, started.admin.tls_key):
            kept.append("admin.tls_cert")
        previous = self._current()
        pool = previous.pool if config.upstream == old.upstream else None
        assert self.store is not None
        certificates = self._read_certificates(config)
        snapshot = Snapshot.build(config, self.store, pool)  # raises before anything is swapped
        for name, (cert, key) in certificates.items():
            # In place: the listening socket keeps its context, new handshakes get the new pair.
            self.tls[name].load_cert_chain(cert, key)
        if pool is None:
            # Learn the new upstream's extensions, so EHLO advertises what it supports.
            self.registry.spawn(snapshot.pool.probe())
            self.registry.spawn(previous.pool.close())
        self.config, self.snapshot = config, snapshot
        log.info("config.reloaded", path=str(config.path), needs_restart=kept or None)

    def _read_certificates(self, config: Config) -> dict[str, tuple[str, str]]:
        """Each TLS listener's certificate and key, checked by loading them (certbot renewals)."""
        pairs = {}
        for listener in config.listeners:
            if listener.name not in self.tls or listener.tls_cert is None or listener.tls_key is None:
                continue
            pair = (str(listener.tls_cert), str(listener.tls_key))
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(*pair)
            except (OSError, ssl.SSLError) as exc:
                raise ReloadRefused(f"listener {listener.name}: tls_cert/tls_key {pair[0]}: {exc}") from None
            pairs[listener.name] = pair
        return pairs

    async def drain(self, grace: float) -> None:
        """Stop accepting, let transactions in flight finish for up to grace seconds, then 421."""
        self.registry.draining = True
        for server in self.servers:
            server.close()
        deadline = time.monotonic() + grace
        while self.registry.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # Counted now: a closed session leaves the registry before the summary is logged.
        still_open = list(self.registry.sessions)
        for session in still_open:
            session.say_goodbye(replies.SHUTTING_DOWN.line())
        if self.pruner is not None:
            self.pruner.cancel()
        if self.registry.tasks:
            await asyncio.wait(list(self.registry.tasks), timeout=5)
        if self.admin is not None:
            await self.admin.close()
        if self.snapshot is not None:
            await self.snapshot.pool.close()
        if self.store is not None:
            await self.store.close()
        log.info("shutdown.complete", sessions_closed=len(still_open))


def debug_for(config: Config):
    """Which client addresses get their SMTP commands and replies logged at debug level
    (logging.level debug: every one; logging.debug_peers), or None for none."""
    if config.logging.level == "debug" or config.logging.debug_peers:
        return config.logging.debug_for
    return None


def debug_peers(config: Config) -> bool:
    """True when some sessions log at debug level while logging.level is above it."""
    return bool(config.logging.debug_peers)


def log_warnings(config: Config) -> None:
    """The file's warnings (what check-config prints as `warning:`) as config.warning, at start and
    at each reload."""
    for warning in config.warnings:
        log.warning("config.warning", problem=warning)


def _sockets(listeners: Sequence[Listener]) -> tuple[Listener, ...]:
    """The listeners without what a reload applies to new sessions (their mode)."""
    return tuple(listener.model_copy(update={"mode": None}) for listener in listeners)


async def start_or_report(gate: Gate, *args, **kwargs) -> bool:
    """Start the gate; a failure is logged as startup.failed and what started is drained."""
    try:
        await gate.start(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every start-up failure is reported, then exit 1
        log.error("startup.failed", reason=str(exc), error=type(exc).__name__)
        await gate.drain(0)
        return False
    return True


def install_signals(gate: Gate, config_path: Path) -> asyncio.Event:
    """SIGHUP reloads (a bad file refused, the old config kept; systemd told RELOADING/READY);
    SIGTERM and SIGINT set the returned event."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def reload() -> None:
        sd_notify("RELOADING=1")
        try:
            config = load_config(config_path)
            gate.reload(config)
            setup_logging(config.logging.format, config.logging.level, debug_peers=debug_peers(config))
            log_warnings(config)
        except ConfigError as exc:
            log.error("config.rejected", path=str(config_path), errors=exc.problems)
        except (UsersError, ReloadRefused) as exc:
            log.error("config.rejected", path=str(config_path), errors=[str(exc)])
        sd_notify("READY=1")

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    return stop


def load_or_report(config_path: Path) -> Config | None:
    """The config at config_path, or None once each of its problems is logged (config.rejected)."""
    try:
        return load_config(config_path)
    except ConfigError as exc:
        setup_logging()
        for problem in exc.problems:
            log.error("config.rejected", error=problem)
        return None


async def serve(config_path: Path, config: Config) -> int:
    """`smtpgate serve` with one process (config read from config_path): run until
    SIGTERM/SIGINT; SIGHUP reloads the config from config_path."""
    setup_logging(config.logging.format, config.logging.level, debug_peers=debug_peers(config))
    gate = Gate(config)
    if not await start_or_report(gate):
        return 1
    stop = install_signals(gate, config_path)
    sd_notify("READY=1")
    log.info("smtpgate.ready", config=str(config.path), listeners=[f"{h}:{p}" for h, p in gate.bound],
             upstream=config.upstream.label, mode=config.mode,
             observing=[lst.name for lst in config.listeners if lst.mode == "observe"] or None)
    await stop.wait()
    sd_notify("STOPPING=1")
    log.info("shutdown.started", grace=gate.config.shutdown_grace)
    await gate.drain(gate.config.shutdown_grace)
    return 0
