"""Fixtures that run the history suite on both databases: ``postgres`` (one real PostgreSQL server for the session,
``tests/postgres_server.py``) and ``stores`` (parametrized: where each of a test's histories lives, a new folder for
SQLite or a new database on that server)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postgres_server import PostgresCluster, missing

HISTORY_URL_ENV = "STREAMCHAT_HISTORY_URL"


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    reason = missing()
    if reason:
        pytest.skip(reason)
    cluster = PostgresCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


class Stores:
    """A test's histories on one backend: ``location()`` gives a new empty one (``History(location)`` opens it), and
    ``use()`` points the ``streamchat`` command (in this process and the ones it starts) at one."""

    def __init__(self, kind: str, root: Path, cluster: PostgresCluster | None) -> None:
        self.kind, self.root, self.cluster = kind, root, cluster
        self.made: list[str] = []

    def location(self, name: str = "data") -> Path | str:
        if self.cluster is None:
            return self.root / name
        self.made.append(self.cluster.create_database())
        return self.made[-1]

    def use(self, monkeypatch: pytest.MonkeyPatch, location: Path | str) -> None:
        if self.cluster is None:
            monkeypatch.setenv("STREAMCHAT_DATA_DIR", str(location))
            monkeypatch.delenv(HISTORY_URL_ENV, raising=False)
        else:
            monkeypatch.setenv(HISTORY_URL_ENV, str(location))

    def close(self) -> None:
        for url in self.made:
            self.cluster.drop_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    cluster = request.getfixturevalue("postgres") if request.param == "postgresql" else None
    made = Stores(request.param, tmp_path, cluster)
    try:
        yield made
    finally:
        made.close()
