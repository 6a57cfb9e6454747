"""A registry in one SQLite file: survives restarts; for a single node (no Redis configured).

WAL journal, so readers never wait for a writer; every change is one transaction, so a
crash leaves each row either as it was or as it became. Several processes on one host may
share the file (SQLite's own locking; a writer waits up to busy_timeout_s). Replicas on
different hosts need the Redis registry.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from ragcache.registry.base import Registry, RegistryStats, RegistryUnavailableError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS registry (
    tbl TEXT NOT NULL, tenant TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY (tbl, tenant, key)
) WITHOUT ROWID
"""


class SqliteFile:
    """One SQLite connection shared by threads (statements take turns), WAL, and failures counted:
    run(work) calls work(connection) and turns an sqlite3.Error into `unavailable`."""

    def __init__(
        self, path: Path | str, schema: str, unavailable: type[Exception], busy_timeout_s: float = 5.0
    ) -> None:
        self.path = Path(path)
        self._unavailable = unavailable
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(schema)
        except (OSError, sqlite3.Error) as error:
            raise unavailable(f"cannot open {self.path}: {error}") from error
        self._lock = threading.Lock()
        self.errors = 0
        self.last_error: str | None = None

    def run(self, work):
        with self._lock:
            try:
                result = work(self._db)
            except sqlite3.Error as error:
                self.errors += 1
                self.last_error = f"{type(error).__name__}: {error}"
                raise self._unavailable(f"{self.path} failed: {error}") from error
            self.last_error = None
            return result

    def close(self) -> None:
        with self._lock:
            self._db.close()


class SqliteRegistry(Registry):
    def __init__(self, path: Path | str, busy_timeout_s: float = 5.0) -> None:
        self._file = SqliteFile(path, _SCHEMA, RegistryUnavailableError, busy_timeout_s)
        self._run = self._file.run

    def put(self, table: str, tenant: str, key: str, value: bytes) -> bytes | None:
        def work(db: sqlite3.Connection) -> bytes | None:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute(
                    "SELECT value FROM registry WHERE tbl=? AND tenant=? AND key=?", (table, tenant, key)
                ).fetchone()
                db.execute("INSERT OR REPLACE INTO registry VALUES (?, ?, ?, ?)", (table, tenant, key, value))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return row[0] if row else None

        return self._run(work)

    def get_many(self, table: str, tenant: str, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        wanted = list(dict.fromkeys(keys))

        def work(db: sqlite3.Connection) -> dict[str, bytes]:
            found: dict[str, bytes] = {}
            for first in range(0, len(wanted), 500):  # SQLite's bound on host parameters
                batch = wanted[first : first + 500]
                marks = ",".join("?" * len(batch))
                found.update(
                    db.execute(
                        f"SELECT key, value FROM registry WHERE tbl=? AND tenant=? AND key IN ({marks})",
                        (table, tenant, *batch),
                    ).fetchall()
                )
            return found

        found = self._run(work)
        return [found.get(key) for key in keys]

    def delete(self, table: str, tenant: str, key: str) -> bytes | None:
        def work(db: sqlite3.Connection) -> bytes | None:
            row = db.execute(
                "DELETE FROM registry WHERE tbl=? AND tenant=? AND key=? RETURNING value", (table, tenant, key)
            ).fetchone()
            return row[0] if row else None

        return self._run(work)

    def items(self, table: str, tenant: str) -> dict[str, bytes]:
        return self._run(
            lambda db: dict(
                db.execute("SELECT key, value FROM registry WHERE tbl=? AND tenant=?", (table, tenant)).fetchall()
            )
        )

    def count(self, table: str, tenant: str) -> int:
        return self._run(
            lambda db: db.execute("SELECT COUNT(*) FROM registry WHERE tbl=? AND tenant=?", (table, tenant)).fetchone()[
                0
            ]
        )

    def rows(self, table: str) -> Iterator[tuple[str, str, bytes]]:
        yield from self._run(
            lambda db: db.execute("SELECT tenant, key, value FROM registry WHERE tbl=?", (table,)).fetchall()
        )

    def stats(self) -> RegistryStats:
        return RegistryStats("sqlite", self._file.errors, self._file.last_error is None, self._file.last_error)

    def close(self) -> None:
        self._file.close()
