"""SQLite backend: one file in WAL mode, fsync on every commit (synchronous=FULL).

WAL lets the readers of the results route run while the writer commits; FULL makes every
acknowledged batch survive not only a killed process but a power cut.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

from ..errors import ExpoError
from .store_sql import SqlStore


class SqliteStore(SqlStore):
    def __init__(self, path: Path):
        super().__init__(f"sqlite:///{path}")
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ExpoError(f"Cannot create the folder for the experiments database {self.path}: {exc.strerror}.") from None

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise ExpoError(f"Cannot open the experiments database {self.path}: {exc}.") from None
        conn.execute("PRAGMA busy_timeout = 30000")
        return conn

    def connect_writer(self) -> sqlite3.Connection:
        conn = self._connect()
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise ExpoError(f"The experiments database {self.path} cannot use WAL mode (got {mode}).")
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    def connect_reader(self) -> sqlite3.Connection:
        return self._connect()

    def begin(self, conn) -> None:
        conn.execute("BEGIN IMMEDIATE")

    def commit(self, conn) -> None:
        conn.execute("COMMIT")

    def rollback(self, conn) -> None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def end_read(self, conn) -> None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def is_retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc).lower()

    def bucket_sql(self, expr: str) -> str:
        return f"CAST({expr} AS INTEGER)"  # the times are never before the origin: truncation is floor
