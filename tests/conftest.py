"""Shared test setup: no network, quiet W&B, small thread counts (CI has 2 cores); a throwaway
PostgreSQL server on loopback for the distributed-search tests.

``postgres_server``: one server for the whole session (about a second to start).
``postgres_url``: a fresh empty database on it for each test, dropped afterwards.
Without a server here (see ``scripts/ci_postgres.sh``) those tests are skipped with the reason; with
``DARWIN_HYDRA_REQUIRE_POSTGRES=1`` (CI) they fail instead, so a lost install step shows.
"""

import os
from typing import Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


from darwin_hydra.testing.postgres import PostgresServer, PostgresUnavailable  # noqa: E402
from darwin_hydra.testing.postgres import postgres_server as _start_server  # noqa: E402

REQUIRE_ENV = "DARWIN_HYDRA_REQUIRE_POSTGRES"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        with _start_server() as server:
            yield server
    except PostgresUnavailable as e:
        if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
            pytest.fail(f"PostgreSQL required ({REQUIRE_ENV} is set) but unavailable: {e}", pytrace=False)
        pytest.skip(f"PostgreSQL unavailable: {e}")


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    database = postgres_server.create_database()
    yield postgres_server.url(database)
    postgres_server.drop_database(database)
