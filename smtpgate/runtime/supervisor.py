"""`workers: N`: one supervisor process, N worker processes on the same listening sockets.

`smtpgate serve` runs `serve_main`. With `workers: 1` that is today's single
process (runtime/gate.py `serve`). With more, a Supervisor:

- binds every listener once (one listening socket per address, shared by all
  workers: docs/workers.md has the measurements against SO_REUSEPORT), then
  forks N workers; each runs its own event loop and Gate on those sockets and
  the kernel hands each new connection to one of them;
- restarts a worker that dies, after a back-off that doubles with each quick
  death (`worker.exited` with its exit status or signal, `worker.started`);
- on SIGHUP reads the config file first and refuses a bad one
  (`config.rejected`) before any worker sees it; a good one is passed on as
  SIGHUP to every worker, which reloads it like a single process does;
- on SIGTERM or SIGINT passes SIGTERM to every worker, each drains for
  `shutdown_grace` seconds, and exits 0 when all drained cleanly;
- tells systemd READY=1 (Type=notify) once every worker listens: each
  worker's NOTIFY_SOCKET is the supervisor's own datagram socket, and the
  kernel's SCM_CREDENTIALS name the worker that wrote.

The store's background pruning and the admin listener run in worker 0 only
(and in its replacement), so the supervisor itself never opens the store.

The supervisor is a plain select loop without asyncio and without threads, so
forking copies no event loop, executor or database connection into a worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import selectors
import shutil
import signal
import socket
import stat
import struct
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from prometheus_client import multiprocess

from smtpgate.config import Config, ConfigError, Listener, load_config
from smtpgate.frontends.milter.server import SOCKET_MODE as MILTER_SOCKET_MODE
from smtpgate.log import get_logger, route_stray_output, setup_logging
from smtpgate.runtime import loop as event_loop
from smtpgate.runtime.gate import (Gate, StartupError, debug_peers, install_signals, load_or_report, serve,
                                   start_or_report)
from smtpgate.runtime.notify import sd_notify

log = get_logger()

# Signals the supervisor handles; blocked across fork so that a worker sees
# each of them only once its own handlers are in place.
_HANDLED = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
_WORKER_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT}
BACKLOG = 100  # asyncio's default for loop.create_server
BACKOFF_FIRST = 0.5  # seconds before the first restart of a worker that died
BACKOFF_MAX = 30.0
STABLE_AFTER = 10.0  # a worker that lived this long restarts after BACKOFF_FIRST again
STOP_MARGIN = 10.0  # seconds past shutdown_grace before a worker that still runs is killed
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid (unix(7) SCM_CREDENTIALS)
_PR_SET_PDEATHSIG = 1  # prctl(2)
# Every process of the node writes its metrics here; worker 0's /metrics sums them.
METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"
_OWNED_METRICS_DIR = "SMTPGATE_OWN_METRICS_DIR"  # the folder serve_main made, removed at exit

Bound = Sequence[tuple[Listener, Sequence[socket.socket]]]


def serve_main(config_path: Path) -> int:
    """`smtpgate serve`: one process for `workers: 1`, else a Supervisor; returns the exit status."""
    route_stray_output()  # while serving, stdout carries JSON lines only
    config = load_or_report(config_path)
    if config is None:
        return 2
    metrics_dir = os.environ.get(METRICS_DIR)
    if config.workers > 1 and not metrics_dir:
        _exec_with_metrics_dir()  # does not return
    owned = metrics_dir is not None and os.environ.pop(_OWNED_METRICS_DIR, None) == metrics_dir
    try:
        if metrics_dir:
            _empty_metrics_dir(Path(metrics_dir))
        if config.workers == 1:
            return event_loop.run(serve(config_path, config))
        setup_logging(config.logging.format, config.logging.level, debug_peers=debug_peers(config))
        return Supervisor(config_path, config).run()
    finally:
        if owned:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _exec_with_metrics_dir() -> None:
    """Start this command again with PROMETHEUS_MULTIPROC_DIR set to a new folder.

    prometheus-client picks its multiprocess mode when it is imported, which
    `smtpgate` did before it read `workers`; exec keeps the pid (systemd's
    MAINPID) and the open stdout.
    """
    folder = tempfile.mkdtemp(prefix="smtpgate-metrics-")
    os.environ[METRICS_DIR] = os.environ[_OWNED_METRICS_DIR] = folder
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "smtpgate", *sys.argv[1:]])


def _empty_metrics_dir(folder: Path) -> None:
    """Forget the samples of earlier runs (docs/operations.md, "Workers"); this process's files stay open."""
    for path in folder.glob("*.db"):
        if not path.stem.endswith(f"_{os.getpid()}"):
            path.unlink(missing_ok=True)


def bind_listener(listener: Listener, *, reuse_port: bool = False, port: int | None = None) -> list[socket.socket]:
    """Listening sockets for every address the listener's host names (as asyncio's create_server binds them).

    port overrides the listener's port (SO_REUSEPORT copies of a port-0 listener). Raises OSError.
    """
    if listener.path is not None:
        # A milter's unix socket, as smtpgate/frontends/milter/server.py binds it.
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(listener.path.lstat().st_mode):
                raise OSError(f"{listener.path} exists and is not a socket")
            listener.path.unlink()  # left by an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(listener.path))
            os.chmod(listener.path, MILTER_SOCKET_MODE)
            sock.listen(BACKLOG)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        return [sock]
    infos = socket.getaddrinfo(listener.host, listener.port if port is None else port,
                               type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, address in dict.fromkeys((i[0], i[1], i[2], i[4]) for i in infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                # One family per socket, as asyncio binds them: [::] must not take 0.0.0.0 too.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


@dataclass
class Slot:
    """One worker position: its index stays, its process is replaced when it dies."""

    index: int
    sockets: Bound
    pid: int | None = None
    started: float = 0.0
    ready: bool = False
    quick_deaths: int = 0
    restart_at: float | None = None
    statuses: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Timings:
    """The supervisor's waits, in seconds (the module constants unless a caller, a test, says otherwise)."""

    backoff_first: float = BACKOFF_FIRST
    backoff_max: float = BACKOFF_MAX
    stable_after: float = STABLE_AFTER
    stop_margin: float = STOP_MARGIN


class Supervisor:
    """Binds the listeners, forks and watches the workers; see the module docstring.

    sharing: "shared" (one socket per address for all workers, the default) or
    "reuseport" (one SO_REUSEPORT socket per address and worker: the kernel
    spreads connections by hash; kept for bench/spread.py).
    """

    def __init__(self, config_path: Path, config: Config, *, sharing: str = "shared",
                 timings: Timings = Timings()):
        self.config_path = config_path
        self.timings = timings
        self.config = config
        self.sharing = sharing
        self.slots: list[Slot] = []
        self.stopping = False
        self.stop_deadline: float | None = None
        self.announced = False
        self.startup_failed = False
        self.reloading: set[int] | None = None
        self.pid = os.getpid()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify_address = f"smtpgate-{self.pid}-{secrets.token_hex(8)}"

    # -- the loop ----------------------------------------------------------

    def run(self) -> int:
        """Bind, fork every worker, and supervise until stopped; returns the exit status."""
        try:
            self.slots = self._bind()
        except StartupError as exc:
            log.error("startup.failed", reason=str(exc), error=type(exc).__name__)
            return 1
        self._setup()
        try:
            for slot in self.slots:
                self._spawn(slot)
            while not (self.stopping and not self._live()):
                self._select()
                self._reap()
                self._due()
        finally:
            self._teardown()
        clean = all(status == 0 for slot in self.slots for status in slot.statuses[-1:])
        if self.startup_failed:
            return 1
        log.info("shutdown.complete", workers=len(self.slots), clean=clean)
        return 0 if clean else 1

    def _bind(self) -> list[Slot]:
        reuse_port = self.sharing == "reuseport"
        copies = self.config.workers if reuse_port else 1
        per_copy: list[list[tuple[Listener, Sequence[socket.socket]]]] = [[] for _ in range(copies)]
        opened: list[socket.socket] = []
        for lst in self.config.listeners:
            first: list[socket.socket] | None = None
            try:
                for bound in per_copy:
                    if first is None:
                        socks = first = bind_listener(lst, reuse_port=reuse_port)
                    elif lst.path is not None:
                        socks = first  # SO_REUSEPORT spreads TCP; a unix socket stays one
                    else:
                        # The copies take the port the first one got (a listener may ask for port 0).
                        socks = bind_listener(lst, reuse_port=True, port=first[0].getsockname()[1])
                    opened.extend(socks)
                    bound.append((lst, socks))
            except OSError as exc:
                for sock in opened:
                    sock.close()
                where = f"{lst.host}:{lst.port}" if lst.path is None else str(lst.path)
                raise StartupError(f"listener {lst.name}: cannot listen on {where}: "
                                   f"{exc.strerror or exc}") from None
        return [Slot(i, per_copy[i % copies]) for i in range(self.config.workers)]

    def _setup(self) -> None:
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._notify.bind("\0" + self.notify_address)  # abstract namespace: nothing to clean up
        self._notify.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._on_signals)
        self._selector.register(self._notify, selectors.EVENT_READ, self._on_notify)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in _HANDLED:
            # The C handler writes the number to the wakeup socket; the loop acts on it.
            signal.signal(sig, lambda *_: None)

    def _teardown(self) -> None:
        signal.set_wakeup_fd(-1)
        for sig in _HANDLED:
            signal.signal(sig, signal.SIG_DFL)
        self._close_listeners()
        self._selector.close()
        for sock in (self._wake_r, self._wake_w, self._notify):
            sock.close()

    def _select(self) -> None:
        deadlines = [s.restart_at for s in self.slots if s.restart_at is not None and s.pid is None]
        if self.stop_deadline is not None:
            deadlines.append(self.stop_deadline)
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        for key, _ in self._selector.select(timeout):
            key.data()

    def _live(self) -> list[Slot]:
        return [slot for slot in self.slots if slot.pid is not None]

    # -- signals -----------------------------------------------------------

    def _on_signals(self) -> None:
        try:
            data = self._wake_r.recv(256)
        except BlockingIOError:
            return
        for number in dict.fromkeys(data):  # each signal once per wake-up, in order
            if number == signal.SIGCHLD:
                continue  # _reap runs after every wake-up
            if number == signal.SIGHUP:
                self._reload()
            elif number in (signal.SIGTERM, signal.SIGINT):
                self._stop()

    def _reload(self) -> None:
        if self.stopping:
            return
        sd_notify("RELOADING=1")
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            log.error("config.rejected", path=str(self.config_path), errors=exc.problems)
            sd_notify("READY=1")
            return
        # Workers forked from now on start with it; running ones read the file again on SIGHUP.
        self.config = config
        self.reloading = set()
        for slot in self._live():
            self.reloading.add(slot.pid)
            self._kill(slot, signal.SIGHUP)
        self._reload_done()

    def _reload_done(self) -> None:
        if self.reloading is not None and not self.reloading:
            self.reloading = None
            sd_notify("READY=1")

    def _stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        sd_notify("STOPPING=1")
        grace = self.config.shutdown_grace
        log.info("shutdown.started", grace=grace, workers=[s.pid for s in self._live()])
        # The workers still hold the sockets; once they close theirs, the ports are free.
        self._close_listeners()
        self.stop_deadline = time.monotonic() + grace + self.timings.stop_margin
        for slot in self.slots:
            slot.restart_at = None
            if slot.pid is not None:
                self._kill(slot, signal.SIGTERM)

    def _kill(self, slot: Slot, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(slot.pid, sig)

    # -- workers -----------------------------------------------------------

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is not None:
                self._exited(slot, status)

    def _exited(self, slot: Slot, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        slot.statuses.append(code)
        pid, slot.pid, slot.ready = slot.pid, None, False
        if os.environ.get(METRICS_DIR):
            # Its counters stay in the sums; its gauges (sessions open) leave them.
            multiprocess.mark_process_dead(pid)
        how = {"signal": signal.Signals(-code).name} if code < 0 else {"exit_status": code}
        if self.reloading is not None:
            self.reloading.discard(pid)
            self._reload_done()
        if self.stopping:
            log.info("worker.exited", worker=slot.index, pid=pid, **how)
            return
        if not self.announced:
            # A worker that cannot start (store, upstream, listener) will not do better on a retry.
            log.error("worker.exited", worker=slot.index, pid=pid, **how)
            log.error("startup.failed", reason=f"worker {slot.index} exited before every worker was ready")
            self.startup_failed = True
            self._stop()
            return
        lived = time.monotonic() - slot.started
        timings = self.timings
        slot.quick_deaths = slot.quick_deaths + 1 if lived < timings.stable_after else 1
        delay = min(timings.backoff_max, timings.backoff_first * 2 ** (slot.quick_deaths - 1))
        slot.restart_at = time.monotonic() + delay
        log.warning("worker.exited", worker=slot.index, pid=pid, restart_in=delay, **how)

    def _due(self) -> None:
        now = time.monotonic()
        if self.stopping:
            if self.stop_deadline is not None and now >= self.stop_deadline:
                self.stop_deadline = None
                for slot in self._live():
                    log.error("worker.killed", worker=slot.index, pid=slot.pid,
                              reason="still running past shutdown_grace")
                    self._kill(slot, signal.SIGKILL)
            return
        for slot in self.slots:
            if slot.pid is None and slot.restart_at is not None and now >= slot.restart_at:
                self._spawn(slot)

    def _spawn(self, slot: Slot) -> None:
        slot.restart_at = None
        sys.stdout.flush()
        sys.stderr.flush()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            log.error("worker.fork_failed", worker=slot.index, error=str(exc))
            slot.restart_at = time.monotonic() + self.timings.backoff_max
            return
        if pid == 0:
            self._worker(slot)  # never returns
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        slot.pid, slot.started, slot.ready = pid, time.monotonic(), False
        log.info("worker.started", worker=slot.index, pid=pid)

    def _on_notify(self) -> None:
        while True:
            try:
                data, ancdata, _, _ = self._notify.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
            except BlockingIOError:
                return
            pid = next((_UCRED.unpack(cdata[:_UCRED.size])[0] for level, kind, cdata in ancdata
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), None)
            slot = next((s for s in self.slots if s.pid is not None and s.pid == pid), None)
            if slot is None:
                continue  # only our own workers speak here
            for line in data.decode("utf-8", "replace").splitlines():
                if line == "READY=1":
                    slot.ready = True
                    if self.reloading is not None:
                        self.reloading.discard(slot.pid)
                        self._reload_done()
                elif line == "STOPPING=1":
                    slot.ready = False
            if not self.announced and not self.stopping and all(s.ready for s in self.slots):
                self.announced = True
                sd_notify("READY=1")
                listeners = sorted({f"{lst.host}:{sock.getsockname()[1]}" if lst.path is None else str(lst.path)
                                    for lst, socks in self.slots[0].sockets for sock in socks})
                config = self.config
                log.info("smtpgate.ready", config=str(config.path), listeners=listeners,
                         upstream=config.upstream.label, mode=config.mode,
                         observing=[lst.name for lst in config.listeners if lst.mode == "observe"] or None,
                         workers=[s.pid for s in self.slots])

    def _close_listeners(self) -> None:
        for slot in self.slots:
            for _, socks in slot.sockets:
                for sock in socks:
                    sock.close()

    # -- inside a worker ---------------------------------------------------

    def _worker(self, slot: Slot) -> None:
        """The forked child: serve slot's sockets until SIGTERM, then _exit with serve's status."""
        status = 70  # EX_SOFTWARE, should anything below escape
        try:
            signal.set_wakeup_fd(-1)
            for sig in _HANDLED:
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            self._selector.close()
            for sock in (self._wake_r, self._wake_w, self._notify):
                sock.close()
            mine = {id(sock) for _, socks in slot.sockets for sock in socks}
            for other in self.slots:
                for _, socks in other.sockets:
                    for sock in socks:
                        if id(sock) not in mine:
                            sock.close()  # another worker's SO_REUSEPORT copy
            _die_with_parent(self.pid)
            os.environ["NOTIFY_SOCKET"] = "@" + self.notify_address
            structlog.contextvars.bind_contextvars(worker=slot.index, pid=os.getpid())
            status = event_loop.run(run_worker(self.config, self.config_path, slot.sockets, first=slot.index == 0))
        except BaseException as exc:  # noqa: BLE001 - a worker never returns into the supervisor's loop
            with contextlib.suppress(Exception):
                log.error("worker.crashed", error=type(exc).__name__, reason=str(exc))
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(status)


def _die_with_parent(parent: int) -> None:
    """Ask Linux for SIGTERM when the supervisor dies, so no worker is left serving alone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux: a worker outlives a killed supervisor
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)  # the parent died before prctl took effect


async def run_worker(config: Config, config_path: Path, sockets: Bound, *, first: bool) -> int:
    """One worker: a Gate on the supervisor's sockets; SIGHUP reloads, SIGTERM drains (as `serve`).

    first: this is worker 0, which also prunes the store and serves the admin listener.
    """
    gate = Gate(config)
    if not await start_or_report(gate, sockets, prune=first, admin=first):
        return 1
    stop = install_signals(gate, config_path)
    # Signals that came while starting were held back (blocked across fork); they act now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _WORKER_SIGNALS)
    sd_notify("READY=1")
    await stop.wait()
    sd_notify("STOPPING=1")
    log.info("shutdown.started", grace=gate.config.shutdown_grace)
    await gate.drain(gate.config.shutdown_grace)
    return 0
