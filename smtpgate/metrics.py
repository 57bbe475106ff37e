"""Prometheus metrics derived from the log events (docs/operations.md).

`observe` is a structlog processor installed by smtpgate.log: every event
smtpgate logs passes through it before it is rendered, so each counter moves
exactly when its log line is written and the two cannot disagree. Code that
wants a number in the metrics logs an event with the field; nothing else
increments these counters, except the upstream pool's connections-in-use
gauge, which has no log event (a connection taken from the pool is not news).

Gauges carry a `multiprocess_mode` so the same definitions work when worker
processes write to PROMETHEUS_MULTIPROC_DIR and one process serves /metrics
(docs/operations.md, "Workers").
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest, multiprocess)

__all__ = ["CONTENT_TYPE_LATEST", "UPSTREAM_IN_USE", "exposition", "observe"]

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BYTES = (1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)

EVENTS = Counter("smtpgate_log_events", "Log events written, by event name and level.", ["event", "level"])
RELAYED = Counter("smtpgate_messages_relayed", "Messages the upstream accepted (message.relayed).")
REJECTED = Counter("smtpgate_messages_rejected",
                   "Messages refused, by reply class (4xx, 5xx) and code (message.rejected).",
                   ["reply_class", "code"])
LINKS_CREATED = Counter("smtpgate_links_created", "Links created between two activities (link.created).")
LINKS_REUSED = Counter("smtpgate_links_reused",
                       "Existing links a relayed message was tagged with (links_reused of message.relayed).")
MESSAGE_SECONDS = Histogram("smtpgate_message_duration_seconds",
                            "MAIL to the upstream's reply to the final dot, per relayed message.",
                            buckets=_SECONDS)
MESSAGE_BYTES = Histogram("smtpgate_message_size_bytes", "Size of each relayed message as sent upstream.",
                          buckets=_BYTES)
UPSTREAM_SECONDS = Histogram("smtpgate_upstream_data_seconds",
                             "From sending the data upstream to the upstream's reply to the final dot.",
                             buckets=_SECONDS)
STORE_SECONDS = Histogram("smtpgate_store_seconds",
                          "Time the link service spent in the store for one message "
                          "(look-ups, link creation, the message record).",
                          buckets=_SECONDS)
SESSIONS_OPEN = Gauge("smtpgate_smtp_sessions_open", "SMTP client sessions open now.",
                      multiprocess_mode="livesum")
SESSIONS = Counter("smtpgate_smtp_sessions", "SMTP client sessions opened.")
SESSIONS_REFUSED = Counter("smtpgate_smtp_sessions_refused", "Sessions refused over limits.max_connections.")
UPSTREAM_IN_USE = Gauge("smtpgate_upstream_connections_in_use",
                        "Upstream SMTP connections carrying a transaction now (idle pooled ones excluded).",
                        multiprocess_mode="livesum")
UPSTREAM_ERRORS = Counter("smtpgate_upstream_errors", "Upstream failures (upstream.error), by stage.", ["stage"])
TAG_REFUSED = Counter("smtpgate_upstream_tag_refused",
                      "Tagged recipients the upstream refused and that were relayed untagged.")
COMMANDS_REFUSED = Counter("smtpgate_commands_refused", "MAIL/RCPT commands smtpgate refused itself, by code.",
                           ["code"])
AUTH = Counter("smtpgate_auth_attempts", "SMTP AUTH attempts, by result.", ["result"])
UNTAGGABLE = Counter("smtpgate_addresses_untaggable",
                     "Mailbox recipients left untagged because the tagged local part would exceed 64 octets.")
STORE_ERRORS = Counter("smtpgate_store_errors", "Store failures after delivery (store.error), by stage.", ["stage"])
SHARED = Counter("smtpgate_messages_shared",
                 "Inbound replies that inbound sharing delivered to more of their thread's team mailboxes "
                 "(message.shared with recipients added).")
RECIPIENTS_SHARED = Counter("smtpgate_recipients_shared",
                            "Recipients inbound sharing added to the envelope (added of message.shared).")
CONFIG_RELOADS = Counter("smtpgate_config_reloads", "Configuration reloads, by result (reloaded, rejected).",
                         ["result"])


def _count(value: object) -> int:
    """links_reused and friends: a list of references, or already a number."""
    if isinstance(value, bool) or value is None:
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return len(value)
    return 0


def _seconds(event_dict: dict, key: str) -> float | None:
    value = event_dict.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return value / 1000.0
    return None


def _code(value: object) -> str:
    try:
        code = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "unknown"
    return str(code) if 100 <= code <= 599 else "unknown"


def _message_relayed(e: dict) -> None:
    RELAYED.inc()
    LINKS_REUSED.inc(_count(e.get("links_reused")))
    for key, histogram in (("duration_ms", MESSAGE_SECONDS), ("upstream_ms", UPSTREAM_SECONDS),
                           ("store_ms", STORE_SECONDS)):
        seconds = _seconds(e, key)
        if seconds is not None:
            histogram.observe(seconds)
    size = e.get("size")
    if isinstance(size, int) and not isinstance(size, bool):
        MESSAGE_BYTES.observe(size)


def _message_rejected(e: dict) -> None:
    code = _code(e.get("code"))
    REJECTED.labels(reply_class=f"{code[0]}xx" if code != "unknown" else "unknown", code=code).inc()
    # A refusal of the final dot still measured the upstream and the store.
    for key, histogram in (("upstream_ms", UPSTREAM_SECONDS), ("store_ms", STORE_SECONDS)):
        seconds = _seconds(e, key)
        if seconds is not None:
            histogram.observe(seconds)


def _message_shared(e: dict) -> None:
    added = _count(e.get("added"))
    if added:
        SHARED.inc()
        RECIPIENTS_SHARED.inc(added)


def _session_opened(_e: dict) -> None:
    SESSIONS.inc()
    SESSIONS_OPEN.inc()


def _reload_counted(e: dict, result: str) -> None:
    # With workers every worker logs the reload it applied: one reload counts once, by worker 0
    # (the supervisor's own config.rejected has no worker).
    if e.get("worker") in (None, 0):
        CONFIG_RELOADS.labels(result=result).inc()


_HANDLERS = {
    "message.relayed": _message_relayed,
    "message.rejected": _message_rejected,
    "link.created": lambda e: LINKS_CREATED.inc(),
    "message.shared": _message_shared,
    "session.opened": _session_opened,
    "session.closed": lambda e: SESSIONS_OPEN.dec(),
    "session.refused": lambda e: SESSIONS_REFUSED.inc(),
    "upstream.error": lambda e: UPSTREAM_ERRORS.labels(stage=str(e.get("stage") or "unknown")).inc(),
    "upstream.tag_refused": lambda e: TAG_REFUSED.inc(),
    "command.refused": lambda e: COMMANDS_REFUSED.labels(code=_code(e.get("code"))).inc(),
    "auth.result": lambda e: AUTH.labels(result="success" if e.get("success") else "failure").inc(),
    "address.untaggable": lambda e: UNTAGGABLE.inc(),
    "store.error": lambda e: STORE_ERRORS.labels(stage=str(e.get("stage") or "unknown")).inc(),
    "config.reloaded": lambda e: _reload_counted(e, "reloaded"),
    "config.rejected": lambda e: _reload_counted(e, "rejected"),
}


# smtpgate_events_total's child per (event, level): labels() takes a lock and builds a key each time.
_EVENT_COUNTERS: dict[tuple[str, str], Any] = {}


def _event_counter(event: str, level: str):
    child = _EVENT_COUNTERS.get((event, level))
    if child is None:
        child = _EVENT_COUNTERS[event, level] = EVENTS.labels(event=event, level=level)
    return child


def observe(_logger, method_name: str, event_dict: dict) -> dict:
    """structlog processor: update the metrics for this event and pass it on unchanged."""
    event = event_dict.get("event")
    if isinstance(event, str):
        try:
            _event_counter(event, str(event_dict.get("level", method_name))).inc()
            handler = _HANDLERS.get(event)
            if handler is not None:
                handler(event_dict)
        except Exception:  # noqa: BLE001 - a metrics fault must never lose the log line
            pass
    return event_dict


def exposition() -> bytes:
    """The Prometheus text exposition of every metric, the process collectors' included.

    With PROMETHEUS_MULTIPROC_DIR set (workers > 1, runtime/supervisor.py) it sums
    what every process of the node wrote there instead, without process collectors.
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)
