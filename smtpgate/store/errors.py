"""The store's failures: each one is temporary for the SMTP client (451 4.3.0)."""

from __future__ import annotations


class StoreError(Exception):
    """The store could not answer: the relay turns this into `451 4.3.0`.

    The message is for the log; it never holds a password or a token.
    """


class StoreMissing(StoreError):
    """A read-only open found no store: no database file, no database, or no
    smtpgate schema in it. The message names the store (without a password)."""


class LinkConflict(StoreError):
    """A link asked for by hand contradicts the store (the target belongs to another mailbox)."""


class SchemaOutdated(StoreError):
    """The database schema is older than this smtpgate and may not be upgraded here."""


class AllocationError(StoreError):
    """No reference could be allocated for a new linked activity; nothing was written."""
