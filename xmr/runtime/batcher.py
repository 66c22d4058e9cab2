"""A dynamic batcher: many small requests in, few large launches out.

Callers ``submit`` payloads and get futures. One worker thread takes the oldest waiting
request and the later ones with the same ``key`` (same gallery, same kind of work), in order,
until the batch would exceed ``max_batch`` items or the oldest has waited ``max_queue_delay_ms``;
runs them with one ``run_batch`` call; and hands each future its own result. The queue is
bounded (a full queue rejects at once), a failing batch is retried request by request so only
the bad request fails, and ``close`` finishes accepted work before it returns.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import operator
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

from xmr.errors import InputError, XmrError

P = TypeVar("P")
R = TypeVar("R")

log = logging.getLogger(__name__)

_Outcome = tuple[bool, Any]  # (True, result) or (False, exception)


class QueueFullError(XmrError, RuntimeError):
    """The batcher's queue is full: the request was not accepted (backpressure)."""


class BatcherClosedError(XmrError, RuntimeError):
    """The batcher is closed (or closing) and accepts no new requests."""


@dataclass(frozen=True)
class BatcherConfig:
    max_batch: int = 64  # most items (``size`` summed: queries, pairs) in one batch
    max_queue_delay_ms: float = 2.0  # the oldest request of a batch waits at most this long for others
    max_queue: int = 1024  # most requests waiting (not yet taken); beyond it submit raises QueueFullError

    def validate(self) -> None:
        """Raise ``InputError`` (a ValueError) naming the first setting that cannot work."""
        for name in ("max_batch", "max_queue"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be at least 1 (an integer), got {value!r}"[:200])
        delay = self.max_queue_delay_ms
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not (math.isfinite(delay) and delay >= 0):
            raise InputError(f"max_queue_delay_ms must be a finite number >= 0, got {delay!r}"[:200])


@dataclass
class BatcherStats:
    """Counters since the batcher started; ``DynamicBatcher.stats`` returns a copy."""

    requests: int = 0  # completed, successfully or not
    failed: int = 0
    rejected: int = 0  # refused with QueueFullError
    batches: int = 0  # batches formed (a failed batch retried request by request still counts once)
    batch_sizes: dict[int, int] = field(default_factory=dict)  # items, rounded up to a power of two -> batches
    queue_seconds: float = 0.0  # submit -> batch start, summed over requests
    compute_seconds: float = 0.0  # inside run_batch (retries included), summed over batches
    cancelled: int = 0  # cancelled by the caller before they ran: skipped, not counted in ``requests``
    items: int = 0  # ``size`` summed over completed requests


@dataclass(eq=False)
class _Request:
    payload: Any
    key: Hashable
    size: int
    future: concurrent.futures.Future[Any]
    submitted: float  # time.monotonic()
    taken: bool = False


def _checked_size(size: object) -> int:
    """``size(payload)`` as an int >= 0 (numpy integers welcome), or a ValueError saying what came back."""
    try:
        items = operator.index(size)  # type: ignore[arg-type]
    except TypeError:
        items = -1
    if items < 0:
        raise ValueError(f"size(payload) must return an integer >= 0, got {size!r}")
    return items


class _Queue:
    """Waiting requests, FIFO overall and per key. Not thread-safe: the batcher's lock guards it.

    A batch is always a prefix of one key's requests, so keeping them per key makes taking a
    batch and knowing whether it is full O(batch) and O(1), however many other keys wait."""

    def __init__(self) -> None:
        self._order: deque[_Request] = deque()  # submit order; taken requests are dropped lazily from the left
        self._by_key: dict[Hashable, deque[_Request]] = {}
        self._items: dict[Hashable, int] = {}  # ``size`` summed over each key's waiting requests
        self._waiting = 0

    def __len__(self) -> int:
        return self._waiting

    def append(self, request: _Request) -> None:
        self._order.append(request)
        self._by_key.setdefault(request.key, deque()).append(request)
        self._items[request.key] = self._items.get(request.key, 0) + request.size
        self._waiting += 1

    def oldest(self) -> _Request | None:
        while self._order and self._order[0].taken:
            self._order.popleft()
        return self._order[0] if self._order else None

    def items(self, key: Hashable) -> int:
        return self._items.get(key, 0)

    def take(self, max_batch: int) -> list[_Request]:
        """Remove the oldest request and the same-key ones after it while they fit ``max_batch``.

        The oldest always goes, even when it alone is larger; the first same-key request that
        does not fit stops the batch, so later ones never overtake it."""
        first = self.oldest()
        assert first is not None, "take() on an empty queue"
        waiting = self._by_key[first.key]
        batch, items = [waiting.popleft()], first.size
        while waiting and items + waiting[0].size <= max_batch:
            batch.append(waiting.popleft())
            items += batch[-1].size
        for request in batch:
            request.taken = True
        self._waiting -= len(batch)
        if waiting:
            self._items[first.key] -= items
        else:
            del self._by_key[first.key], self._items[first.key]
        return batch


class DynamicBatcher(Generic[P, R]):
    """Coalesces ``submit``-ted payloads into ``run_batch`` calls on one worker thread; thread-safe.

    ``key(payload)``: only requests with equal keys share a batch. ``size(payload)``: how many
    items a request adds towards ``max_batch`` (default 1 per request)."""

    def __init__(self, run_batch: Callable[[list[P]], list[R]], config: BatcherConfig = BatcherConfig(),
                 key: Callable[[P], Hashable] = lambda payload: None, size: Callable[[P], int] = lambda payload: 1,
                 name: str = "xmr-batcher") -> None:
        self.name = name
        self._cond = threading.Condition()
        self.config = config  # checked
        self._run_batch, self._key, self._size = run_batch, key, size
        self._queue = _Queue()
        self._closed = False
        self._stats = BatcherStats()
        self._worker = threading.Thread(target=self._loop, name=name, daemon=True)
        self._worker.start()

    @property
    def config(self) -> BatcherConfig:
        return self._config

    @config.setter
    def config(self, config: BatcherConfig) -> None:
        """New limits, applied from the batch being formed now on (queued requests stay)."""
        if not isinstance(config, BatcherConfig):
            raise InputError(f"a batcher config is a BatcherConfig, got {type(config).__name__}")
        config.validate()
        with self._cond:
            self._config = config
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, payload: P) -> concurrent.futures.Future[R]:
        """Queue ``payload``; its future gets ``run_batch``'s result for it (or its exception).

        Never blocks: raises QueueFullError when ``max_queue`` requests wait, BatcherClosedError
        once ``close`` began; exceptions from ``key``/``size`` surface here, in the caller."""
        key, size = self._key(payload), _checked_size(self._size(payload))
        hash(key)  # an unhashable key fails here, not inside the queue
        future: concurrent.futures.Future[R] = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise BatcherClosedError(f"{self.name} is closed: no new requests are accepted")
            if len(self._queue) >= self._config.max_queue:
                self._stats.rejected += 1
                raise QueueFullError(f"{self.name}: request queue is full ({self._config.max_queue} waiting, the "
                                     f"max_queue limit); retry later, slow the callers down, or raise max_queue")
            self._queue.append(_Request(payload, key, size, future, time.monotonic()))
            self._cond.notify_all()
        return future

    def stats(self) -> BatcherStats:
        """A consistent snapshot of the counters (a copy: later work does not change it)."""
        with self._cond:
            return replace(self._stats, batch_sizes=dict(self._stats.batch_sizes))

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish every accepted one, stop the worker. Idempotent.

        With ``timeout`` (seconds), raises TimeoutError if work is still unfinished by then (the
        worker keeps draining it). Called from inside ``run_batch`` it cannot wait for itself, so
        it only refuses new requests."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is self._worker:
            return
        self._worker.join(timeout)
        if self._worker.is_alive():
            raise TimeoutError(f"{self.name}: accepted requests still unfinished after {timeout} s; "
                               f"the worker keeps draining them")

    def __enter__(self) -> DynamicBatcher[P, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- worker
    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._execute(batch)
            except BaseException as error:  # a bug here must not strand this batch or every later request
                log.exception("%s: batch of %d requests failed outside run_batch", self.name, len(batch))
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(error)

    def _next_batch(self) -> list[_Request] | None:
        """Block until a batch is due: full, or its oldest request's delay is up, or closing (drain
        at once). None once closed and empty."""
        with self._cond:
            while True:
                first = self._queue.oldest()
                if first is None:
                    if self._closed:
                        return None
                    self._cond.wait()
                    continue
                config = self._config
                remaining = first.submitted + config.max_queue_delay_ms / 1e3 - time.monotonic()
                # items >= max_batch means the batch cannot grow: it is full or its next request does not fit
                if self._closed or remaining <= 0 or self._queue.items(first.key) >= config.max_batch:
                    return self._queue.take(config.max_batch)
                self._cond.wait(remaining)

    def _execute(self, batch: list[_Request]) -> None:
        live = [r for r in batch if r.future.set_running_or_notify_cancel()]
        start = time.monotonic()
        outcomes = self._run([r.payload for r in live]) if live else []
        compute = time.monotonic() - start
        # counted before the futures are resolved, so a caller who has its result also sees it in stats()
        self._record(len(batch) - len(live), live, outcomes, start, compute)
        for request, (ok, value) in zip(live, outcomes):
            if ok:
                request.future.set_result(value)
            else:
                request.future.set_exception(value)

    def _run(self, payloads: list[P]) -> list[_Outcome]:
        """One outcome per payload. If ``run_batch`` raises on several, each is re-run alone so
        only the bad ones fail; a wrong number of results fails them all (no retry)."""
        try:
            results = self._run_batch(payloads)
        except BaseException as error:  # noqa: BLE001  (the worker must survive anything run_batch does)
            if len(payloads) == 1:
                return [(False, error)]
            return [self._run([payload])[0] for payload in payloads]
        return _match(results, len(payloads))

    def _record(self, cancelled: int, live: list[_Request], outcomes: list[_Outcome], start: float,
                compute: float) -> None:
        with self._cond:
            stats = self._stats
            stats.cancelled += cancelled
            if not live:
                return
            items = sum(r.size for r in live)
            stats.batches += 1
            stats.requests += len(live)
            stats.items += items
            stats.failed += sum(not ok for ok, _ in outcomes)
            bucket = 1 << max(0, items - 1).bit_length()  # the smallest power of two >= items (1 for 0 or 1)
            stats.batch_sizes[bucket] = stats.batch_sizes.get(bucket, 0) + 1
            stats.queue_seconds += sum(start - r.submitted for r in live)
            stats.compute_seconds += compute


def _match(results: object, expected: int) -> list[_Outcome]:
    """``run_batch``'s results as outcomes, or a RuntimeError for each request if they do not line up."""
    try:
        results = list(results)  # type: ignore[call-overload]
    except TypeError:
        problem = f"run_batch must return a list with one result per payload ({expected}), got {type(results).__name__}"
    else:
        if len(results) == expected:
            return [(True, result) for result in results]
        problem = f"run_batch returned {len(results)} results for {expected} request{'s' * (expected != 1)}"
    return [(False, RuntimeError(problem)) for _ in range(expected)]
