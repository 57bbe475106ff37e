"""Logging: one JSON object per line on stdout (every event and its fields: docs/reference.md).

Every event has `timestamp` (ISO 8601 UTC), `level` and `event`; session-scoped
events carry `session`. Message bodies and secrets are never passed to a
logger, and the redaction processor below drops any field named like a secret
as a second line of defence.

Every event also passes through smtpgate.metrics.observe, which turns it into
Prometheus metrics: the log and the metrics come from one emission and cannot
disagree (docs/operations.md).
"""

from __future__ import annotations

import errno
import io
import logging
import os
import socket
import ssl
import sys
import threading
import time

import structlog

from smtpgate.metrics import observe
from smtpgate import __version__
from smtpgate.redact import redact_fields

_HOST = socket.gethostname()
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_NUMERIC = logging.getLevelNamesMapping()


def _redact(_logger, _name, event_dict):
    return redact_fields(event_dict)


def _node(_logger, _name, event_dict):
    # Which node and which smtpgate wrote it: several nodes may share one log pipeline.
    event_dict.setdefault("host", _HOST)
    event_dict.setdefault("version", __version__)
    return event_dict


# The process's stdout when route_stray_output replaced sys.stdout; events are written there.
_REAL_STDOUT = None


class _StdoutLogger:
    """Writes each rendered event as one line to the current sys.stdout.

    Looked up at every write (not bound once), and never raising: a closed or
    broken stdout must not break an SMTP session.
    """

    def __init__(self, stream=None):
        self.stream = stream

    def msg(self, message: str) -> None:
        try:
            stream = self.stream or _REAL_STDOUT or sys.stdout
            stream.write(message + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def _level_filter(threshold: int):
    """Drop events below the configured level, after the metrics have seen them."""

    def drop_below(_logger, method_name, event_dict):
        level = str(event_dict.get("level", method_name)).upper()
        if _NUMERIC.get(level, logging.INFO) < threshold and not event_dict.get("debug_peer"):
            raise structlog.DropEvent
        return event_dict

    return drop_below


def setup_logging(fmt: str = "json", level: str = "info", stream=None, *, debug_peers: bool = False) -> None:
    """Configure structlog for the process; safe to call again on reload.

    debug_peers: some sessions log at debug level whatever `level` says (their events
    carry `debug_peer`), so debug calls must reach the processors."""
    renderer = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    threshold = _LEVELS.get(level, logging.INFO)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            observe,
            _level_filter(threshold),
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _node,
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        # Info and above always reach the processors so the metrics count them
        # whatever logging.level says; _level_filter drops them from the log.
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.DEBUG if debug_peers else min(threshold, logging.INFO)),
        logger_factory=lambda *args: _StdoutLogger(stream),
        cache_logger_on_first_use=False,
    )


def get_logger(**bound):
    return structlog.get_logger().bind(**bound) if bound else structlog.get_logger()


class _LibraryHandler(logging.Handler):
    """The standard library's logging (aiosmtpd, asyncio, warnings) as smtpgate JSON events.

    Only warning and above pass the root logger's level: aiosmtpd's own debug lines
    show each command line, AUTH's credentials included.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {"logger": record.name, "message": record.getMessage()}
            if record.exc_info:
                fields["exc_info"] = record.exc_info
            if record.levelno >= logging.ERROR:
                get_logger().error("library.log", **fields)
            else:  # the root logger passes nothing below warning
                get_logger().warning("library.log", **fields)
        except Exception:  # noqa: BLE001 - a log line must never break a session
            pass


class _StrayOutput(io.TextIOBase):
    """sys.stdout/sys.stderr while serving: each line something printed becomes a
    `library.output` event, so stdout carries JSON lines only."""

    def __init__(self, name: str) -> None:
        self.name_ = name
        self._pending = ""
        self._busy = threading.local()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if getattr(self._busy, "on", False):
            return len(text)  # the logger itself failed and printed: drop it rather than loop
        self._pending += text
        while "\n" in self._pending:
            line, self._pending = self._pending.split("\n", 1)
            if line.strip():
                self._busy.on = True
                try:
                    get_logger().warning("library.output", stream=self.name_, text=line[:2000])
                finally:
                    self._busy.on = False
        return len(text)

    def flush(self) -> None:
        if _REAL_STDOUT is not None:
            _REAL_STDOUT.flush()


def route_library_logging() -> None:
    """Send the standard library's logging and Python's warnings through structlog."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _LibraryHandler):
            root.removeHandler(handler)
    root.addHandler(_LibraryHandler())
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)


def route_stray_output() -> None:
    """`serve`: whatever a library prints to stdout or stderr becomes a JSON event, and
    every event goes to the process's real stdout (systemd's journal merges both)."""
    global _REAL_STDOUT
    route_library_logging()
    if _REAL_STDOUT is None:
        _REAL_STDOUT = sys.stdout
        sys.stdout = _StrayOutput("stdout")
        sys.stderr = _StrayOutput("stderr")


def plain_words(exc: BaseException) -> str:
    """A network or system fault as an operator says it: `connection refused`,
    `no answer in time`, `host name not found`; else the exception's own words."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, TimeoutError):
            return "no answer in time"
        if isinstance(current, socket.gaierror):
            return "host name not found"
        if isinstance(current, ssl.SSLError):
            break  # its errno is OpenSSL's, not the system's: its own words say more
        if isinstance(current, OSError) and current.errno in errno.errorcode:
            return os.strerror(current.errno).lower()
        current = getattr(current, "os_error", None) or current.__cause__ or current.__context__
    return f"{type(exc).__name__}: {exc}"


class Outage:
    """One component's outages as operators see them (docs/operations.md, "Outages").

    The first failure is a warning (`component.failed`), again once a minute while
    the failures go on; the first success after them is `component.recovered` at info.
    """

    REPEAT_SECONDS = 60.0

    def __init__(self, component: str) -> None:
        self.component = component
        self.since: float | None = None  # monotonic time of the first failure of this outage
        self.failures = 0
        self._told = 0.0

    def failed(self, problem: str) -> None:
        """problem names the component and the fault in plain words: `allocator: http://...: connection refused`."""
        now = time.monotonic()
        if self.since is None:
            self.since, self.failures = now, 0
        self.failures += 1
        if self.failures == 1 or now - self._told >= self.REPEAT_SECONDS:
            self._told = now
            get_logger().warning("component.failed", component=self.component, problem=problem,
                                 failures=self.failures, for_s=round(now - self.since, 1))

    def ok(self) -> None:
        if self.since is None:
            return
        down, failures, self.since = time.monotonic() - self.since, self.failures, None
        get_logger().info("component.recovered", component=self.component, failures=failures,
                          down_s=round(down, 1))


_OUTAGES: dict[str, Outage] = {}


def outage(component: str) -> Outage:
    """This process's outage record of one component (upstream, store, allocator)."""
    found = _OUTAGES.get(component)
    if found is None:
        found = _OUTAGES[component] = Outage(component)
    return found
