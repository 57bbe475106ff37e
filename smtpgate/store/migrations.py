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
    (
        3,
        "activity lists and search, admin sign-in sessions",
        [
            # Lists: newest first, overall (admin) and per owning mailbox (a team).
            "CREATE INDEX activities_created ON activities (created_at, reference)",
            "CREATE INDEX activities_mailbox_created ON activities (mailbox, created_at, reference)",
            "DROP INDEX activities_mailbox",
            # Search: a trigram index of subjects and Message-IDs, kept by triggers.
            """CREATE VIRTUAL TABLE messages_search USING fts5 (
                subject, message_id, content='messages', content_rowid='id', tokenize='trigram'
            )""",
            """CREATE TRIGGER messages_search_insert AFTER INSERT ON messages BEGIN
                INSERT INTO messages_search (rowid, subject, message_id)
                VALUES (new.id, new.subject, new.message_id);
            END""",
            """CREATE TRIGGER messages_search_delete AFTER DELETE ON messages BEGIN
                INSERT INTO messages_search (messages_search, rowid, subject, message_id)
                VALUES ('delete', old.id, old.subject, old.message_id);
            END""",
            "INSERT INTO messages_search (messages_search) VALUES ('rebuild')",
            # id is the SHA-256 of the cookie's value, never the value itself.
            """CREATE TABLE admin_sessions (
                id TEXT PRIMARY KEY,
                team TEXT NOT NULL,
                token TEXT NOT NULL,
                created_at TEXT NOT NULL,
                expires_at TEXT NOT NULL
            )""",
            "CREATE INDEX admin_sessions_expires_at ON admin_sessions (expires_at)",
        ],
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
    (
        3,
        "activity lists and search, admin sign-in sessions",
        [
            "CREATE INDEX activities_created ON activities (created_at, reference)",
            "CREATE INDEX activities_mailbox_created ON activities (mailbox, created_at, reference)",
            "DROP INDEX activities_mailbox",
            # Search: trigram indexes (pg_trgm, a trusted extension: the database's owner may
            # create it) for ILIKE '%text%' on subjects and Message-IDs.
            # The operator class is named with the extension's own schema, wherever an
            # earlier CREATE EXTENSION put it.
            """DO $$
            DECLARE home text;
            BEGIN
                CREATE EXTENSION IF NOT EXISTS pg_trgm;
                SELECT n.nspname INTO home FROM pg_extension e
                    JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'pg_trgm';
                EXECUTE format('CREATE INDEX messages_subject_trgm ON messages'
                               ' USING gin (subject %I.gin_trgm_ops)', home);
                EXECUTE format('CREATE INDEX messages_message_id_trgm ON messages'
                               ' USING gin (message_id %I.gin_trgm_ops)', home);
            END
            $$""",
            """CREATE TABLE admin_sessions (
                id TEXT PRIMARY KEY,
                team TEXT NOT NULL,
                token TEXT NOT NULL,
                created_at TIMESTAMPTZ NOT NULL,
                expires_at TIMESTAMPTZ NOT NULL
            )""",
            "CREATE INDEX admin_sessions_expires_at ON admin_sessions (expires_at)",
        ],
    ),
]


def latest(migrations: list[Migration]) -> int:
    """The version a database has after all of migrations ran."""
    return max((version for version, _, _ in migrations), default=0)
