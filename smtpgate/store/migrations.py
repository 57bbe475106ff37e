"""Versioned schema migrations, one list per SQL dialect.

A migration is (version, description, statements). Versions only grow; a
released migration is never edited, a change is a new migration. The
`smtpgate_schema` table holds one row per applied version.
"""

from __future__ import annotations

Migration = tuple[int, str, list[str]]

SQLITE: list[Migration] = [
    (
        1,
        "activities, links, relayed messages, local sequence",
        [
            """CREATE TABLE activities (
                reference TEXT PRIMARY KEY,
                mailbox TEXT,
                created_at TEXT NOT NULL
            )""",
            "CREATE INDEX activities_mailbox ON activities (mailbox)",
            # lo/hi hold the two references in a fixed order so that a link
            # is one row whichever side created it.
            """CREATE TABLE links (
                id INTEGER PRIMARY KEY,
                source_reference TEXT NOT NULL,
                target_reference TEXT NOT NULL,
                lo TEXT NOT NULL,
                hi TEXT NOT NULL,
                created_at TEXT NOT NULL,
                message_id TEXT,
                UNIQUE (lo, hi)
            )""",
            "CREATE INDEX links_hi ON links (hi)",
            "CREATE INDEX links_created_at ON links (created_at)",
            # source_key is source_reference or '': NULLs never conflict in
            # a UNIQUE constraint, and a retry must not add a second record.
            """CREATE TABLE messages (
                id INTEGER PRIMARY KEY,
                message_id TEXT NOT NULL,
                source_reference TEXT,
                source_key TEXT NOT NULL,
                date TEXT,
                from_addr TEXT,
                subject TEXT,
                recipients TEXT NOT NULL,
                mapping TEXT NOT NULL,
                relayed_at TEXT NOT NULL,
                UNIQUE (message_id, source_key)
            )""",
            "CREATE INDEX messages_relayed_at ON messages (relayed_at)",
            """CREATE TABLE message_activities (
                message INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
                reference TEXT NOT NULL,
                PRIMARY KEY (message, reference)
            )""",
            "CREATE INDEX message_activities_reference ON message_activities (reference)",
            """CREATE TABLE allocator_sequence (
                name TEXT PRIMARY KEY,
                next_number INTEGER NOT NULL
            )""",
        ],
    ),
    (
        2,
        "messages.shared: the recipients inbound sharing added",
        ["ALTER TABLE messages ADD COLUMN shared TEXT"],
    ),
]

POSTGRES: list[Migration] = [
    (
        1,
        "activities, links, relayed messages, local sequence",
        [
            """CREATE TABLE activities (
                reference TEXT PRIMARY KEY,
                mailbox TEXT,
                created_at TIMESTAMPTZ NOT NULL
            )""",
            "CREATE INDEX activities_mailbox ON activities (mailbox)",
            """CREATE TABLE links (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                source_reference TEXT NOT NULL,
                target_reference TEXT NOT NULL,
                lo TEXT NOT NULL,
                hi TEXT NOT NULL,
                created_at TIMESTAMPTZ NOT NULL,
                message_id TEXT,
                UNIQUE (lo, hi)
            )""",
            "CREATE INDEX links_hi ON links (hi)",
            "CREATE INDEX links_created_at ON links (created_at)",
            """CREATE TABLE messages (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                message_id TEXT NOT NULL,
                source_reference TEXT,
                source_key TEXT NOT NULL,
                date TEXT,
                from_addr TEXT,
                subject TEXT,
                recipients TEXT NOT NULL,
                mapping TEXT NOT NULL,
                relayed_at TIMESTAMPTZ NOT NULL,
                UNIQUE (message_id, source_key)
            )""",
            "CREATE INDEX messages_relayed_at ON messages (relayed_at)",
            """CREATE TABLE message_activities (
                message BIGINT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
                reference TEXT NOT NULL,
                PRIMARY KEY (message, reference)
            )""",
            "CREATE INDEX message_activities_reference ON message_activities (reference)",
            """CREATE TABLE allocator_sequence (
                name TEXT PRIMARY KEY,
                next_number BIGINT NOT NULL
            )""",
        ],
    ),
    (
        2,
        "messages.shared: the recipients inbound sharing added",
        ["ALTER TABLE messages ADD COLUMN shared TEXT"],
    ),
]


def latest(migrations: list[Migration]) -> int:
    """The version a database has after all of migrations ran."""
    return max((version for version, _, _ in migrations), default=0)
