"""A dynamic batcher: many small requests in, few large launches out.

Callers ``submit`` payloads and get futures. One worker thread takes the oldest waiting
request and every later one with the same ``key`` (same gallery, same kind of work) until
the batch holds ``max_batch`` items or the oldest has waited ``max_queue_delay_ms``; runs
them with one ``run_batch`` call; and hands each future its own result. The queue is bounded
(a full queue rejects at once), a failing batch is retried request by request so only the
bad request fails, and ``close`` finishes accepted work before it returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

P = TypeVar("P")
R = TypeVar("R")


class QueueFullError(RuntimeError):
    """The batcher's queue is full: the request was not accepted (backpressure)."""


class BatcherClosedError(RuntimeError):
    """The batcher is closed (or closing) and accepts no new requests."""


@dataclass(frozen=True)
class BatcherConfig:
    max_batch: int = 64  # most items (queries, pairs) in one batch
    max_queue_delay_ms: float = 2.0  # the oldest request waits at most this long for others
    max_queue: int = 1024  # most requests waiting; beyond it submit raises QueueFullError

    def validate(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")
        if self.max_queue_delay_ms < 0:
            raise ValueError(f"max_queue_delay_ms must be >= 0, got {self.max_queue_delay_ms}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {self.max_queue}")


@dataclass
class BatcherStats:
    requests: int = 0  # completed, successfully or not
    failed: int = 0
    rejected: int = 0  # refused with QueueFullError
    batches: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)  # power-of-two upper bound of items -> batches
    queue_seconds: float = 0.0  # submit -> batch start, summed over requests
    compute_seconds: float = 0.0  # inside run_batch, summed over batches

    @property
    def mean_batch_size(self) -> float:
        return self.requests / self.batches if self.batches else 0.0

    @property
    def mean_queue_ms(self) -> float:
        return 1e3 * self.queue_seconds / self.requests if self.requests else 0.0

    @property
    def mean_compute_ms(self) -> float:
        return 1e3 * self.compute_seconds / self.batches if self.batches else 0.0


@dataclass
class _Request(Generic[P, R]):
    payload: P
    key: Hashable
    size: int
    future: concurrent.futures.Future
    submitted: float


def _bucket(items: int) -> int:
    return 1 << max(0, items - 1).bit_length()


class DynamicBatcher(Generic[P, R]):
    def __init__(self, run_batch: Callable[[list[P]], list[R]], config: BatcherConfig = BatcherConfig(),
                 key: Callable[[P], Hashable] = lambda p: None, size: Callable[[P], int] = lambda p: 1,
                 name: str = "xmr-batcher") -> None:
        config.validate()
        self.config = config
        self._run_batch, self._key, self._size = run_batch, key, size
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._stats = BatcherStats()
        self._worker = threading.Thread(target=self._loop, name=name, daemon=True)
        self._worker.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, payload: P) -> concurrent.futures.Future:
        """Queue ``payload``; its future gets ``run_batch``'s result for it (or its exception)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        request = _Request(payload, self._key(payload), self._size(payload), future, time.monotonic())
        with self._cond:
            if self._closed:
                raise BatcherClosedError("the scorer is closed; no new requests are accepted")
            if len(self._queue) >= self.config.max_queue:
                self._stats.rejected += 1
                raise QueueFullError(f"request queue is full ({self.config.max_queue} waiting); retry later, "
                                     f"slow the callers down, or raise max_queue")
            self._queue.append(request)
            self._cond.notify()
        return future

    async def submit_async(self, payload: P) -> R:
        return await asyncio.wrap_future(self.submit(payload))

    def stats(self) -> BatcherStats:
        with self._cond:
            return BatcherStats(**{**self._stats.__dict__, "batch_sizes": dict(self._stats.batch_sizes)})

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish every accepted one, stop the worker. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout)

    def __enter__(self) -> DynamicBatcher[P, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- worker
    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._execute(batch)

    def _next_batch(self) -> list[_Request] | None:
        """The oldest request and later ones with its key, once full or once the oldest's delay is up."""
        delay = self.config.max_queue_delay_ms / 1e3
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            first = self._queue[0]
            while not self._closed:
                if self._matching_items(first.key) >= self.config.max_batch:
                    break
                remaining = first.submitted + delay - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._take(first.key)

    def _matching_items(self, key: Hashable) -> int:
        return sum(r.size for r in self._queue if r.key == key)

    def _take(self, key: Hashable) -> list[_Request]:
        """Remove and return the batch: same-key requests in order while they fit ``max_batch``
        (the first always goes, even when alone it is larger); others keep their places."""
        batch: list[_Request] = []
        kept: deque[_Request] = deque()
        items, taking = 0, True
        for request in self._queue:
            if taking and request.key == key and (not batch or items + request.size <= self.config.max_batch):
                batch.append(request)
                items += request.size
            else:
                taking = taking and request.key != key  # a same-key request that does not fit waits, and so do later ones
                kept.append(request)
        self._queue = kept
        return batch

    def _execute(self, batch: list[_Request]) -> None:
        live = [r for r in batch if r.future.set_running_or_notify_cancel()]
        if not live:
            return
        start = time.monotonic()
        try:
            results = self._run_batch([r.payload for r in live])
            if len(results) != len(live):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(live)} requests")
            outcomes: list[tuple[object, BaseException | None]] = [(r, None) for r in results]
        except Exception as error:  # noqa: BLE001  (isolate: retry one by one)
            outcomes = [self._alone(r) for r in live] if len(live) > 1 else [(None, error)]
        compute = time.monotonic() - start
        for request, (result, error) in zip(live, outcomes):
            if error is None:
                request.future.set_result(result)
            else:
                request.future.set_exception(error)
        with self._cond:
            stats = self._stats
            stats.batches += 1
            stats.requests += len(live)
            stats.failed += sum(error is not None for _, error in outcomes)
            bucket = _bucket(sum(r.size for r in live))
            stats.batch_sizes[bucket] = stats.batch_sizes.get(bucket, 0) + 1
            stats.queue_seconds += sum(start - r.submitted for r in live)
            stats.compute_seconds += compute

    def _alone(self, request: _Request) -> tuple[object, BaseException | None]:
        try:
            results = self._run_batch([request.payload])
            if len(results) != 1:
                raise RuntimeError(f"run_batch returned {len(results)} results for 1 request")
            return results[0], None
        except Exception as error:  # noqa: BLE001
            return None, error
