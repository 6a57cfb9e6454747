"""Answers in one SQLite file: the embedded store (no Redis configured) that survives restarts.

One row per entry (the packed record, its expiry and hit count); WAL journal, one
transaction per change. Expired rows are skipped by reads and deleted as records() meets them.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from ragcache.registry.sqlite import SqliteFile
from ragcache.semantic.answers.base import (
    AnswerRecord,
    AnswerStore,
    AnswerStoreStats,
    AnswerStoreUnavailable,
    pack_record,
    unpack_record,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    tenant TEXT NOT NULL, entry_id TEXT NOT NULL, record BLOB NOT NULL, answer TEXT NOT NULL,
    expires_s REAL NOT NULL, hits INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, entry_id)
) WITHOUT ROWID
"""


class SqliteAnswerStore(AnswerStore):
    def __init__(self, path: Path | str, clock=time.time, busy_timeout_s: float = 5.0) -> None:
        self._file = SqliteFile(path, _SCHEMA, AnswerStoreUnavailable, busy_timeout_s)
        self._run = self._file.run
        self._clock = clock

    def put(self, record: AnswerRecord) -> bool:
        try:
            self._run(
                lambda db: db.execute(
                    "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?)",
                    (record.tenant, record.entry_id, pack_record(record), record.answer, record.expires_s, record.hits),
                )
            )
        except AnswerStoreUnavailable:
            return False
        return True

    def answer(self, tenant: str, entry_id: str) -> str | None:
        def work(db: sqlite3.Connection) -> str | None:
            row = db.execute(
                "UPDATE answers SET hits = hits + 1 WHERE tenant=? AND entry_id=? AND expires_s > ? RETURNING answer",
                (tenant, entry_id, self._clock()),
            ).fetchone()
            return row[0] if row else None

        return self._run(work)

    def delete(self, tenant: str, entry_ids: Sequence[str]) -> int:
        if not entry_ids:
            return 0
        try:
            return self._run(
                lambda db: sum(
                    db.execute("DELETE FROM answers WHERE tenant=? AND entry_id=?", (tenant, entry_id)).rowcount
                    for entry_id in entry_ids
                )
            )
        except AnswerStoreUnavailable:
            return 0

    def records(self, now_s: float) -> Iterator[AnswerRecord]:
        try:
            rows = self._run(
                lambda db: db.execute("SELECT record, hits FROM answers WHERE expires_s > ?", (now_s,)).fetchall()
            )
            self._run(lambda db: db.execute("DELETE FROM answers WHERE expires_s <= ?", (now_s,)))
        except AnswerStoreUnavailable:
            return
        for raw, hits in rows:
            try:
                record = unpack_record(raw)
            except ValueError:
                continue
            yield AnswerRecord(**{**record.__dict__, "hits": hits})

    def stats(self) -> AnswerStoreStats:
        return AnswerStoreStats("sqlite", self._file.errors, self._file.last_error is None, self._file.last_error)

    def close(self) -> None:
        self._file.close()
