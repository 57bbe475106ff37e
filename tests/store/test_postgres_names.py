"""Two nodes on PostgreSQL, as the README sets them up: the password from store.password_file,
and every pool and connection named in pg_stat_activity (of this test's database only)."""

from __future__ import annotations

import pytest

from smtpgate.config import load_config
from smtpgate.runtime.gate import open_configured_store
from tests.conftest import BASE_CONFIG, write_config
from tests.store_helpers import pg_database, pg_store_url  # noqa: F401  (fixtures)

pytestmark = pytest.mark.postgres


async def test_every_pool_is_named_and_the_password_comes_from_its_file(tmp_path, pg_store_url):  # noqa: F811
    import asyncpg

    (tmp_path / "store.secret").write_text("s3cret\n")
    config = load_config(write_config(tmp_path, BASE_CONFIG.format(upstream="maildir:outbox", store=pg_store_url)
                                      + "  password_file: store.secret\n"))
    assert config.store.password() == "s3cret"
    store = await open_configured_store(config)
    admin = await asyncpg.connect(pg_store_url)
    try:
        names = {r["application_name"] for r in await admin.fetch(
            "SELECT application_name FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name LIKE 'smtpgate %'")}
        assert {"smtpgate reads", "smtpgate writes", "smtpgate look-ups"} <= names
    finally:
        await admin.close()
        await store.close()
