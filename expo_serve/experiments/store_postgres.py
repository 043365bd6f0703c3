"""PostgreSQL backend, for several replicas sharing one experiment state (psycopg 3)."""
from __future__ import annotations

from ..errors import ExpoError
from .store_sql import SqlStore, Tx

_SCHEMA_LOCK = 0x6578706F  # "expo": serialises CREATE TABLE IF NOT EXISTS across replicas starting together


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise ExpoError("A postgresql:// --db needs psycopg 3: pip install 'psycopg[binary]'.") from None
    return psycopg


class PostgresStore(SqlStore):
    placeholder_convert = staticmethod(lambda sql: sql.replace("?", "%s"))

    def __init__(self, url: str):
        super().__init__(url)
        self._psycopg = _psycopg()

    def _connect(self):
        try:
            return self._psycopg.connect(self.url, autocommit=False, connect_timeout=10)
        except self._psycopg.OperationalError as exc:
            raise ExpoError(f"Cannot connect to the experiments database: {str(exc).strip().splitlines()[0]}.") from None

    def connect_writer(self):
        return self._connect()

    def connect_reader(self):
        return self._connect()

    def begin(self, conn) -> None:
        pass  # psycopg opens a transaction with the first statement

    def create_schema(self, tx: Tx) -> None:
        tx.run("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))
        super().create_schema(tx)

    def is_retryable(self, exc: BaseException) -> bool:
        errors = self._psycopg.errors
        return isinstance(exc, (errors.DeadlockDetected, errors.SerializationFailure, errors.LockNotAvailable))

    def is_disconnect(self, exc: BaseException) -> bool:
        return isinstance(exc, (self._psycopg.OperationalError, self._psycopg.InterfaceError)) and not self.is_retryable(exc)

    def bucket_sql(self, expr: str) -> str:
        return f"CAST(FLOOR({expr}) AS BIGINT)"
