"""The dynamic batcher's guarantees, on a toy ``run_batch`` (no model).

Backlogs are built deterministically: ``hold`` parks the worker inside ``run_batch`` on an
Event, so everything submitted afterwards waits in the queue until the test releases it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
import time
from collections.abc import Hashable
from typing import Any

import numpy as np
import pytest

from xmr.runtime.batcher import BatcherClosedError, BatcherConfig, DynamicBatcher, QueueFullError


def value(payload: Any) -> int:
    """A payload is an int or a tuple whose last element is the int."""
    return payload[-1] if isinstance(payload, tuple) else payload


class Recorder:
    """``run_batch`` that doubles each payload's value, records each batch, and can be held or made to fail."""

    def __init__(self, fail_on: set[int] | None = None, seconds: float = 0.0) -> None:
        self.batches: list[list[Any]] = []
        self.fail_on = fail_on or set()
        self.seconds = seconds
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()

    def __call__(self, payloads: list[Any]) -> list[int]:
        self.started.set()
        assert self.release.wait(10), "the test never released run_batch"
        if self.seconds:
            time.sleep(self.seconds)
        self.batches.append(list(payloads))
        bad = self.fail_on.intersection(value(p) for p in payloads)
        if bad:
            raise ValueError(f"bad payload {sorted(bad)}")
        return [2 * value(p) for p in payloads]


def hold(batcher: DynamicBatcher, run: Recorder, payload: Any = 0) -> concurrent.futures.Future:
    """Park the worker inside ``run_batch`` on ``payload``; later submissions queue up until ``run.release``."""
    run.release.clear()
    run.started.clear()
    future = batcher.submit(payload)
    assert run.started.wait(10)
    return future


def reference_batches(payloads: list[Any], max_batch: int, key: Any, size: Any) -> list[list[Any]]:
    """The batches the rules prescribe for a queue that holds all of ``payloads`` at once."""
    queue, batches = list(payloads), []
    while queue:
        first, rest, blocked = queue[0], [], False
        batch, items = [first], size(first)
        for p in queue[1:]:
            if key(p) == key(first) and not blocked and items + size(p) <= max_batch:
                batch.append(p)
                items += size(p)
            else:
                blocked = blocked or key(p) == key(first)
                rest.append(p)
        batches.append(batch)
        queue = rest
    return batches


# -- coalescing and batch formation
def test_many_concurrent_submitters_each_get_their_own_result_in_order():
    run = Recorder(seconds=0.001)
    config = BatcherConfig(max_batch=32, max_queue_delay_ms=5, max_queue=10_000)
    with DynamicBatcher(run, config) as batcher:
        futures: dict[int, concurrent.futures.Future] = {}
        lock = threading.Lock()

        def client(c: int) -> None:
            for i in range(200):
                future = batcher.submit(c * 1000 + i)
                with lock:
                    futures[c * 1000 + i] = future

        threads = [threading.Thread(target=client, args=(c,)) for c in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results = {p: f.result(timeout=60) for p, f in futures.items()}
    assert len(results) == 3200 and results == {p: 2 * p for p in futures}
    stats = batcher.stats()
    assert stats.requests == stats.items == 3200 and stats.failed == stats.rejected == stats.cancelled == 0
    assert stats.batches == len(run.batches) == sum(stats.batch_sizes.values()) <= stats.requests
    assert sum(len(b) for b in run.batches) == 3200 and max(len(b) for b in run.batches) <= 32
    assert stats.requests / stats.batches > 1
    flat = [p for batch in run.batches for p in batch]
    for c in range(16):  # FIFO: each client's requests ran in the order it submitted them
        mine = [p for p in flat if p // 1000 == c]
        assert mine == sorted(mine)


def test_a_backlog_is_coalesced_into_one_batch():
    run = Recorder()
    batcher = DynamicBatcher(run, BatcherConfig(max_batch=64, max_queue_delay_ms=20))
    held = hold(batcher, run)
    futures = [batcher.submit(p) for p in range(1, 11)]
    run.release.set()
    batcher.close()
    assert held.result() == 0 and [f.result() for f in futures] == [2 * p for p in range(1, 11)]
    assert run.batches == [[0], list(range(1, 11))]
    stats = batcher.stats()
    assert stats.batch_sizes == {1: 1, 16: 1} and stats.requests / stats.batches == pytest.approx(5.5)


def test_a_slow_run_batch_with_quick_submissions_coalesces():
    run = Recorder(seconds=0.01)
    with DynamicBatcher(run, BatcherConfig(max_batch=64, max_queue_delay_ms=5)) as batcher:
        futures = [batcher.submit(p) for p in range(100)]
        assert [f.result(timeout=30) for f in futures] == [2 * p for p in range(100)]
    stats = batcher.stats()
    assert stats.requests / stats.batches > 1


def test_max_batch_one_runs_every_request_alone():
    run = Recorder()
    batcher = DynamicBatcher(run, BatcherConfig(max_batch=1, max_queue_delay_ms=20))
    held = hold(batcher, run)
    futures = [batcher.submit(p) for p in range(1, 20)]
    run.release.set()
    batcher.close()
    assert [f.result() for f in [held, *futures]] == [2 * p for p in range(20)]
    assert run.batches == [[p] for p in range(20)] and batcher.stats().batch_sizes == {1: 20}


def test_only_same_key_requests_share_a_batch_and_order_is_kept():
    run = Recorder()
    batcher = DynamicBatcher(run, BatcherConfig(max_batch=100, max_queue_delay_ms=20), key=lambda p: p[0])
    first = hold(batcher, run, ("a", 0))
    futures = [batcher.submit((key, i)) for i, key in enumerate("abacb", start=1)]
    run.release.set()
    batcher.close()
    assert first.result() == 0 and [f.result() for f in futures] == [2, 4, 6, 8, 10]
    assert run.batches[1:] == [[("a", 1), ("a", 3)], [("b", 2), ("b", 5)], [("c", 4)]]


def test_max_batch_counts_items_and_an_oversized_request_runs_alone():
    run = Recorder()
    batcher = DynamicBatcher(run, BatcherConfig(max_batch=4, max_queue_delay_ms=20), size=lambda p: p)
    hold(batcher, run, 1)
    futures = [batcher.submit(p) for p in (2, 2, 1, 9, 1)]
    run.release.set()
    batcher.close()
    assert run.batches == [[1], [2, 2], [1], [9], [1]]  # later same-key requests never overtake one that waits
    assert [f.result() for f in futures] == [4, 4, 2, 18, 2]
    stats = batcher.stats()
    assert stats.items == 16 and stats.batch_sizes == {1: 3, 4: 1, 16: 1}


def test_random_backlog_forms_exactly_the_prescribed_batches():
    rng = random.Random(0)
    payloads = [(rng.choice("abc"), rng.choice([1, 1, 2, 3, 5, 9]), i) for i in range(300)]
    run = Recorder()
    config = BatcherConfig(max_batch=8, max_queue_delay_ms=10, max_queue=1000)
    batcher = DynamicBatcher(run, config, key=lambda p: p[0], size=lambda p: p[1])
    hold(batcher, run, ("h", 1, -1))
    futures = [batcher.submit(p) for p in payloads]
    run.release.set()
    batcher.close()
    assert [f.result() for f in futures] == [2 * i for i in range(300)]
    assert run.batches[1:] == reference_batches(payloads, 8, key=lambda p: p[0], size=lambda p: p[1])


# -- timing: generous bounds only
def test_a_lone_request_waits_about_its_delay_not_forever():
    with DynamicBatcher(Recorder(), BatcherConfig(max_batch=100, max_queue_delay_ms=50)) as batcher:
        start = time.monotonic()
        assert batcher.submit(5).result(timeout=5) == 10
        assert time.monotonic() - start >= 0.045  # it did wait for company


def test_a_full_batch_does_not_wait_for_the_delay():
    run = Recorder()
    with DynamicBatcher(run, BatcherConfig(max_batch=3, max_queue_delay_ms=60_000), size=lambda p: p) as batcher:
        assert [f.result(timeout=5) for f in [batcher.submit(1), batcher.submit(2)]] == [2, 4]
        blocked = batcher.submit(2)  # a same-key 2 cannot join a 2 under max_batch=3: the batch is due at once
        late = batcher.submit(2)
        assert blocked.result(timeout=5) == 4
    assert late.result() == 4 and run.batches == [[1, 2], [2], [2]]  # close ran the last one without waiting


def test_close_does_not_wait_for_the_delay():
    batcher = DynamicBatcher(Recorder(), BatcherConfig(max_queue_delay_ms=60_000))
    future = batcher.submit(1)
    batcher.close(timeout=5)
    assert future.result(timeout=0) == 2


# -- results and failures
def test_a_bad_request_fails_alone():
    run = Recorder(fail_on={12, 14})
    batcher = DynamicBatcher(run, BatcherConfig(max_batch=10, max_queue_delay_ms=20))
    held = hold(batcher, run)
    futures = {p: batcher.submit(p) for p in (11, 12, 13, 14)}
    run.release.set()
    batcher.close()
    assert held.result() == 0 and futures[11].result() == 22 and futures[13].result() == 26
    for p in (12, 14):
        with pytest.raises(ValueError, match=rf"bad payload \[{p}\]"):
            futures[p].result()
    assert run.batches == [[0], [11, 12, 13, 14], [11], [12], [13], [14]]
    stats = batcher.stats()
    assert stats.failed == 2 and stats.requests == 5 and stats.batches == 2


def test_wrong_number_of_results_fails_every_request_of_the_batch():
    calls: list[list[int]] = []
    release = threading.Event()

    def run_batch(payloads: list[int]) -> list[int]:
        calls.append(payloads)
        release.wait(10)
        return [] if len(payloads) > 1 else [1]

    batcher = DynamicBatcher(run_batch, BatcherConfig(max_queue_delay_ms=20))
    held = batcher.submit(0)
    while not calls:
        time.sleep(0.001)
    futures = [batcher.submit(p) for p in (1, 2, 3)]
    release.set()
    batcher.close()
    assert held.result() == 1
    for future in futures:
        with pytest.raises(RuntimeError, match="returned 0 results for 3 requests"):
            future.result()
    assert calls == [[0], [1, 2, 3]]  # no retry: the batch's output does not line up, not one request
    assert batcher.stats().failed == 3


def test_a_result_that_is_not_a_list_fails_clearly():
    batcher = DynamicBatcher(lambda payloads: None, BatcherConfig(max_queue_delay_ms=0))
    with pytest.raises(RuntimeError, match="one result per payload .*NoneType"):
        batcher.submit(1).result(timeout=10)
    batcher.close()


def test_exceptions_from_run_batch_never_kill_the_worker():
    def run_batch(payloads: list[int]) -> list[int]:
        if payloads == [1]:
            raise ValueError("boom")
        if payloads == [2]:
            raise SystemExit(3)
        return [7]

    with DynamicBatcher(run_batch, BatcherConfig(max_batch=1, max_queue_delay_ms=0), name="t-survives") as batcher:
        with pytest.raises(ValueError, match="boom"):
            batcher.submit(1).result(timeout=10)
        with pytest.raises(SystemExit):
            batcher.submit(2).result(timeout=10)
        assert batcher.submit(3).result(timeout=10) == 7
        worker = [t for t in threading.enumerate() if t.name == "t-survives"]
        assert len(worker) == 1 and worker[0].daemon and worker[0].is_alive()
    assert batcher.stats().failed == 2 and not [t for t in threading.enumerate() if t.name == "t-survives"]


def test_bad_key_or_size_fail_in_submit_and_the_batcher_goes_on():
    with DynamicBatcher(Recorder(), BatcherConfig(max_queue_delay_ms=0), key=lambda p: [p] if p < 0 else p % 2,
                        size=lambda p: np.int64(-1) if p == 99 else np.int64(1)) as batcher:
        with pytest.raises(TypeError):
            batcher.submit(-1)  # unhashable key
        with pytest.raises(ValueError, match="size"):
            batcher.submit(99)
        assert batcher.submit(4).result(timeout=10) == 8  # numpy integers are fine sizes


# -- backpressure
def test_a_full_queue_rejects_at_once_and_nothing_is_dropped():
    run = Recorder()
    batcher = DynamicBatcher(run, BatcherConfig(max_batch=1, max_queue_delay_ms=0, max_queue=3))
    held = hold(batcher, run)
    accepted = [batcher.submit(p) for p in (1, 2, 3)]  # the running request does not count: 3 may wait
    start = time.monotonic()
    with pytest.raises(QueueFullError, match=r"queue is full \(3 waiting.*raise max_queue"):
        batcher.submit(4)
    assert time.monotonic() - start < 1  # rejected, not blocked
    run.release.set()
    assert [f.result(timeout=10) for f in [held, *accepted]] == [0, 2, 4, 6]
    assert batcher.submit(5).result(timeout=10) == 10  # room again once drained
    batcher.close()
    stats = batcher.stats()
    assert stats.rejected == 1 and stats.requests == 5


# -- shutdown and cancellation
def test_close_drains_accepted_work_then_refuses():
    run = Recorder()
    batcher = DynamicBatcher(run, BatcherConfig(max_batch=2, max_queue_delay_ms=1))
    held = hold(batcher, run)
    futures = [batcher.submit(p) for p in range(1, 10)]
    closer = threading.Thread(target=batcher.close)
    closer.start()
    deadline = time.monotonic() + 10
    while not batcher.closed and time.monotonic() < deadline:
        time.sleep(0.001)
    with pytest.raises(BatcherClosedError, match="closed"):
        batcher.submit(100)  # refused while still draining
    assert closer.is_alive() and not any(f.done() for f in futures)
    run.release.set()
    closer.join(10)
    assert not closer.is_alive()
    assert all(f.done() for f in futures) and [f.result() for f in [held, *futures]] == [2 * p for p in range(10)]
    batcher.close()  # idempotent
    assert batcher.closed


def test_close_with_a_timeout_says_when_work_is_unfinished():
    run = Recorder()
    batcher = DynamicBatcher(run, BatcherConfig(max_queue_delay_ms=0))
    held = hold(batcher, run)
    with pytest.raises(TimeoutError, match="still unfinished"):
        batcher.close(timeout=0.05)
    run.release.set()
    batcher.close(timeout=10)
    assert held.result() == 0


def test_close_from_inside_run_batch_does_not_deadlock():
    batcher: DynamicBatcher[int, int]

    def run_batch(payloads: list[int]) -> list[int]:
        batcher.close()
        return payloads

    batcher = DynamicBatcher(run_batch, BatcherConfig(max_queue_delay_ms=0))
    assert batcher.submit(1).result(timeout=10) == 1 and batcher.closed
    batcher.close(timeout=10)


def test_cancelled_requests_are_skipped():
    run = Recorder()
    batcher = DynamicBatcher(run, BatcherConfig(max_batch=100, max_queue_delay_ms=20), key=lambda p: p % 2)
    hold(batcher, run, 1)
    cancelled, kept, alone = batcher.submit(3), batcher.submit(5), batcher.submit(2)  # 2: a batch of its own
    assert cancelled.cancel() and alone.cancel()
    run.release.set()
    batcher.close()
    assert kept.result() == 10 and run.batches == [[1], [5]] and cancelled.cancelled()
    stats = batcher.stats()
    assert stats.cancelled == 2 and stats.requests == stats.batches == 2


# -- asyncio
def test_awaited_futures_gather_results_and_propagates_errors():
    with DynamicBatcher(Recorder(fail_on={3}), BatcherConfig(max_queue_delay_ms=5)) as batcher:
        async def main() -> list[Any]:
            return await asyncio.gather(*(asyncio.wrap_future(batcher.submit(p)) for p in range(5)), return_exceptions=True)

        results = asyncio.run(main())
    assert results[:3] == [0, 2, 4] and results[4] == 8 and isinstance(results[3], ValueError)


def test_cancelling_the_awaiting_task_cancels_the_queued_request():
    run = Recorder()
    batcher = DynamicBatcher(run, BatcherConfig(max_queue_delay_ms=20))
    hold(batcher, run)

    async def main() -> None:
        waiting = asyncio.wrap_future(batcher.submit(2))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(main())
    run.release.set()
    batcher.close()
    assert all(2 not in batch for batch in run.batches) and batcher.stats().cancelled == 1


# -- configuration and counters
@pytest.mark.parametrize("field, value_, message", [
    ("max_batch", 0, "max_batch must be at least 1"),
    ("max_queue_delay_ms", -1, "max_queue_delay_ms must be a finite number >= 0"),
    ("max_queue_delay_ms", float("nan"), "max_queue_delay_ms"),
    ("max_queue_delay_ms", float("inf"), "max_queue_delay_ms"),
    ("max_queue", 0, "max_queue must be at least 1"),
])
def test_config_is_validated(field: str, value_: float, message: str):
    config = BatcherConfig(**{field: value_})
    with pytest.raises(ValueError, match=message):
        config.validate()
    with pytest.raises(ValueError, match=message):
        DynamicBatcher(Recorder(), config)


def test_a_new_config_applies_to_the_next_batch():
    run = Recorder()
    batcher = DynamicBatcher(run, BatcherConfig(max_batch=64, max_queue_delay_ms=20))
    hold(batcher, run)
    futures = [batcher.submit(p) for p in range(1, 6)]
    with pytest.raises(ValueError, match="max_batch"):
        batcher.config = BatcherConfig(max_batch=0)
    batcher.config = BatcherConfig(max_batch=2, max_queue_delay_ms=20)
    run.release.set()
    batcher.close()
    assert [f.result() for f in futures] == [2, 4, 6, 8, 10]
    assert run.batches == [[0], [1, 2], [3, 4], [5]] and batcher.config.max_batch == 2


def test_stats_are_a_snapshot():
    run = Recorder(seconds=0.002)
    with DynamicBatcher(run, BatcherConfig(max_queue_delay_ms=1)) as batcher:
        batcher.submit(1).result(timeout=10)
        snapshot = batcher.stats()  # counted before the future resolved
        snapshot.batch_sizes[99] = 1
        snapshot.requests = 1000
        assert batcher.stats().requests == 1 and 99 not in batcher.stats().batch_sizes
    stats = batcher.stats()
    assert stats.batches == 1 and stats.queue_seconds >= 0 and stats.compute_seconds > 0


def test_keys_may_be_any_hashable():
    keys: list[Hashable] = [None, ("g", 1), frozenset({1}), 3]
    run = Recorder()
    batcher = DynamicBatcher(run, BatcherConfig(max_queue_delay_ms=20), key=lambda p: keys[p % 4])
    hold(batcher, run, 0)
    futures = [batcher.submit(p) for p in range(1, 9)]
    run.release.set()
    batcher.close()
    assert [f.result() for f in futures] == [2 * p for p in range(1, 9)]
    assert run.batches == [[0], [1, 5], [2, 6], [3, 7], [4, 8]]
