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

import logging
import socket
import sys

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


class _StdoutLogger:
    """Writes each rendered event as one line to the current sys.stdout.

    Looked up at every write (not bound once), and never raising: a closed or
    broken stdout must not break an SMTP session.
    """

    def __init__(self, stream=None):
        self.stream = stream

    def msg(self, message: str) -> None:
        try:
            stream = self.stream or sys.stdout
            stream.write(message + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def _level_filter(threshold: int):
    """Drop events below the configured level, after the metrics have seen them."""

    def drop_below(_logger, method_name, event_dict):
        level = str(event_dict.get("level", method_name)).upper()
        if _NUMERIC.get(level, logging.INFO) < threshold:
            raise structlog.DropEvent
        return event_dict

    return drop_below


def setup_logging(fmt: str = "json", level: str = "info", stream=None) -> None:
    """Configure structlog for the process; safe to call again on reload."""
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
        wrapper_class=structlog.make_filtering_bound_logger(min(threshold, logging.INFO)),
        logger_factory=lambda *args: _StdoutLogger(stream),
        cache_logger_on_first_use=False,
    )


def get_logger(**bound):
    return structlog.get_logger().bind(**bound) if bound else structlog.get_logger()
