"""One writer thread that commits queued operations in batches (group commit).

`await writer.submit(op)` returns only after the transaction holding `op` has committed, so a
caller that acknowledges after the await never acknowledges a record that a crash could lose.
Batching needs no timer: while one commit is being made durable, new operations queue up and all
of them go into the next transaction.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Any, Callable, Protocol

from sqlalchemy.engine import Connection

log = logging.getLogger("expo_serve.experiments")

_STOP = object()


class Connector(Protocol):
    """What the writer needs of its store: a SQLAlchemy connection, and which failures to retry."""

    def connect_writer(self) -> Connection: ...
    def is_retryable(self, exc: BaseException) -> bool: ...
    def is_disconnect(self, exc: BaseException) -> bool: ...


class OperationRefused(Exception):
    """Raised by an operation that validated its input and wrote nothing (e.g. unknown id).

    It fails that operation alone; the rest of its batch still commits.
    """

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


class BatchWriter:
    def __init__(self, connector: Connector, *, max_batch: int = 512, retries: int = 5, name: str = "expo-experiments-writer"):
        self._connector = connector
        self._max_batch = max_batch
        self._retries = retries
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._conn = None
        self._closed = False
        self.batches_committed = 0

    def start(self) -> None:
        self._thread.start()

    async def submit(self, op: Callable[[Any], Any]) -> Any:
        """Run `op(conn)` in the next batch; resolves with its result once the batch has committed."""
        if self._closed:
            raise RuntimeError("the experiments store is closed")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((op, future, loop))
        return await future

    def close(self, timeout: float = 30.0) -> None:
        """Commit everything already queued, then stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)
        # A submit that raced with close may have queued behind the stop: fail it, never leave it hanging.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                _op, future, loop = item
                try:
                    loop.call_soon_threadsafe(_resolve, future, False, RuntimeError("the experiments store is closed"))
                except RuntimeError:
                    pass
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection is best effort
                pass
            self._conn = None

    # --- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is _STOP:
                break
            batch = [item]
            while len(batch) < self._max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stopping = True
                    break
                batch.append(nxt)
            self._commit_batch(batch)

    def _connection(self):
        if self._conn is None:
            self._conn = self._connector.connect_writer()
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001
                pass
        self._conn = None

    def _attempt(self, batch) -> list[tuple[bool, Any]]:
        """One transaction over the whole batch; raises if it could not commit."""
        conn = self._connection()
        outcomes = []
        try:
            conn.begin()
            for op, _future, _loop in batch:
                try:
                    outcomes.append((True, op(conn)))
                except OperationRefused as refused:
                    outcomes.append((False, refused.error))
            conn.commit()
        except BaseException:
            try:
                conn.rollback()
            except Exception:  # noqa: BLE001 - the connection may be gone; reconnect below
                self._drop_connection()
            raise
        return outcomes

    def _commit_batch(self, batch) -> None:
        delay = 0.01
        for attempt in range(self._retries + 1):
            try:
                outcomes = self._attempt(batch)
                self.batches_committed += 1
                break
            except Exception as exc:  # noqa: BLE001 - sorted below
                retry = self._connector.is_retryable(exc) or self._connector.is_disconnect(exc)
                if self._connector.is_disconnect(exc):
                    self._drop_connection()
                if retry and attempt < self._retries:
                    log.warning("experiments store: retrying a batch of %d after %s", len(batch), exc)
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                if len(batch) > 1 and not retry:
                    # One bad operation must not sink the others: commit each on its own.
                    for item in batch:
                        self._commit_batch([item])
                    return
                log.error("experiments store: a write failed: %s", exc)
                outcomes = [(False, exc)] * len(batch)
                break
        for (ok, value), (_op, future, loop) in zip(outcomes, batch):
            try:
                loop.call_soon_threadsafe(_resolve, future, ok, value)
            except RuntimeError:  # the caller's event loop has closed: nobody is waiting
                pass


def _resolve(future: asyncio.Future, ok: bool, value: Any) -> None:
    if future.done():  # the caller was cancelled; the record is durable all the same
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
