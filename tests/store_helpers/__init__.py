"""Fixtures and helpers shared by the store tests.

PostgreSQL tests use a database created for this test run
(`smtpgate_test_<random>`, dropped at the end) and a fresh schema per test.
Without the server they skip, unless CI is true (tests/support/ci.py): then they fail.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.ci import needs

PG_ADMIN_DSN = os.environ.get("SMTPGATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"


async def _pg_admin(statements: list[str]) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def _dsn_for(database: str) -> str:
    base, _, _ = PG_ADMIN_DSN.rpartition("/")
    return f"{base}/{database}"


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """DSN of a database created for this test run, dropped afterwards."""
    name = f"smtpgate_test_{secrets.token_hex(6)}"
    try:
        asyncio.run(_pg_admin([f"CREATE DATABASE {name}"]))
    except Exception as exc:  # any failure to reach the server
        needs(f"PostgreSQL at {PG_ADMIN_DSN}", f"not answering: {exc!r}")
    try:
        yield _dsn_for(name)
    finally:
        asyncio.run(_pg_admin([f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"]))


def fresh_pg_url(pg_database: str) -> str:
    """A URL whose search_path is a new, empty schema of the test database."""
    schema = f"t_{secrets.token_hex(6)}"

    async def create() -> None:
        import asyncpg

        conn = await asyncpg.connect(pg_database, timeout=5)
        try:
            await conn.execute(f"CREATE SCHEMA {schema}")
        finally:
            await conn.close()

    asyncio.run(create())
    return f"{pg_database}?search_path={schema}"


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store URL for an empty database, once per backend."""
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'db' / 'smtpgate.db'}"
    return fresh_pg_url(request.getfixturevalue("pg_database"))


@pytest.fixture
def pg_store_url(pg_database: str) -> str:
    """A PostgreSQL store URL for an empty schema, for tests of PostgreSQL alone."""
    return fresh_pg_url(pg_database)


def helper_env() -> dict[str, str]:
    """Environment for helper subprocesses: the repo and tests/ importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


PYTHON = sys.executable
