"""The dynamic batcher's guarantees, on a toy ``run_batch`` (no model)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from xmr.runtime.batcher import BatcherClosedError, BatcherConfig, DynamicBatcher, QueueFullError


class Recorder:
    """``run_batch`` that doubles its payloads, records each batch, and can be held."""

    def __init__(self, fail_on: set | None = None, seconds: float = 0.0) -> None:
        self.batches: list[list] = []
        self.fail_on = fail_on or set()
        self.seconds = seconds
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()

    def __call__(self, payloads: list) -> list:
        self.started.set()
        self.release.wait(30)
        time.sleep(self.seconds)
        self.batches.append(list(payloads))
        bad = self.fail_on.intersection(p if isinstance(p, int) else p[1] for p in payloads)
        if bad:
            raise ValueError(f"bad payload {sorted(bad)}")
        return [2 * (p if isinstance(p, int) else p[1]) for p in payloads]


def test_many_concurrent_submitters_each_get_their_own_result_and_batches_form():
    run = Recorder(seconds=0.002)
    with DynamicBatcher(run, BatcherConfig(max_batch=32, max_queue_delay_ms=5, max_queue=10_000)) as batcher:
        futures, lock = {}, threading.Lock()

        def client(c):
            for i in range(200):
                f = batcher.submit(c * 1000 + i)
                with lock:
                    futures[c * 1000 + i] = f

        threads = [threading.Thread(target=client, args=(c,)) for c in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results = {p: f.result(timeout=60) for p, f in futures.items()}
    assert results == {p: 2 * p for p in futures}
    stats = batcher.stats()
    assert stats.requests == 3200 and stats.failed == 0 and stats.rejected == 0
    assert stats.batches == len(run.batches) and sum(len(b) for b in run.batches) == 3200
    assert max(len(b) for b in run.batches) <= 32 and stats.mean_batch_size > 1
    assert sum(stats.batch_sizes.values()) == stats.batches


def test_only_same_key_requests_share_a_batch_and_order_is_kept():
    run = Recorder()
    run.release.clear()
    batcher = DynamicBatcher(run, BatcherConfig(max_batch=100, max_queue_delay_ms=50), key=lambda p: p[0])
    first = batcher.submit(("a", 0))
    run.started.wait(10)  # the worker holds ("a", 0); the rest queue up behind it
    futures = [batcher.submit((key, i)) for i, key in enumerate("abab", start=1)]
    run.release.set()
    batcher.close()
    assert first.result() == 0 and [f.result() for f in futures] == [2, 4, 6, 8]
    assert run.batches[1:] == [[("a", 1), ("a", 3)], [("b", 2), ("b", 4)]]


def test_max_batch_counts_items_and_an_oversized_request_runs_alone():
    run = Recorder()
    run.release.clear()
    batcher = DynamicBatcher(run, BatcherConfig(max_batch=4, max_queue_delay_ms=20), size=lambda p: p)
    batcher.submit(1)
    run.started.wait(10)
    for p in (2, 2, 1, 9, 1):
        batcher.submit(p)
    run.release.set()
    batcher.close()
    assert run.batches == [[1], [2, 2], [1], [9], [1]]  # later same-key requests never overtake one that waits


def test_a_bad_request_fails_alone():
    run = Recorder(fail_on={13})
    run.release.clear()
    batcher = DynamicBatcher(run, BatcherConfig(max_batch=10, max_queue_delay_ms=20))
    held = batcher.submit(0)
    run.started.wait(10)
    futures = {p: batcher.submit(p) for p in (11, 12, 13, 14)}
    run.release.set()
    batcher.close()
    assert held.result() == 0
    with pytest.raises(ValueError, match=r"bad payload \[13\]"):
        futures[13].result()
    assert [futures[p].result() for p in (11, 12, 14)] == [22, 24, 28]
    assert batcher.stats().failed == 1 and batcher.stats().requests == 5


def test_wrong_number_of_results_fails_the_batch_clearly():
    batcher = DynamicBatcher(lambda payloads: [], BatcherConfig(max_queue_delay_ms=0))
    with pytest.raises(RuntimeError, match="returned 0 results for 1 request"):
        batcher.submit(1).result(timeout=10)
    batcher.close()


def test_a_full_queue_rejects_at_once_and_nothing_is_dropped():
    run = Recorder()
    run.release.clear()
    batcher = DynamicBatcher(run, BatcherConfig(max_batch=1, max_queue_delay_ms=0, max_queue=3))
    held = batcher.submit(0)
    run.started.wait(10)
    accepted = [batcher.submit(p) for p in (1, 2, 3)]
    start = time.monotonic()
    with pytest.raises(QueueFullError, match=r"queue is full \(3 waiting\)"):
        batcher.submit(4)
    assert time.monotonic() - start < 1  # rejected, not blocked
    run.release.set()
    batcher.close()
    assert [f.result() for f in [held, *accepted]] == [0, 2, 4, 6] and batcher.stats().rejected == 1


def test_close_drains_accepted_work_then_refuses():
    run = Recorder(seconds=0.01)
    batcher = DynamicBatcher(run, BatcherConfig(max_batch=2, max_queue_delay_ms=1))
    futures = [batcher.submit(p) for p in range(10)]
    batcher.close()
    assert all(f.done() for f in futures) and [f.result() for f in futures] == [2 * p for p in range(10)]
    with pytest.raises(BatcherClosedError):
        batcher.submit(1)
    batcher.close()  # idempotent
    assert batcher.closed


def test_a_lone_request_waits_only_its_delay_and_cancelled_ones_are_skipped():
    run = Recorder()
    with DynamicBatcher(run, BatcherConfig(max_batch=100, max_queue_delay_ms=50)) as batcher:
        assert batcher.submit(5).result(timeout=5) == 10
        run.release.clear()
        batcher.submit(1)
        run.started.wait(10)
        cancelled = batcher.submit(2)
        assert cancelled.cancel()
        run.release.set()
    assert [2] not in run.batches and all(2 not in b for b in run.batches)


def test_submit_async():
    with DynamicBatcher(Recorder(), BatcherConfig(max_queue_delay_ms=5)) as batcher:
        async def main():
            return await asyncio.gather(*(batcher.submit_async(p) for p in range(5)))

        assert asyncio.run(main()) == [0, 2, 4, 6, 8]


@pytest.mark.parametrize("field, value, message", [("max_batch", 0, "max_batch"), ("max_queue_delay_ms", -1, "delay"),
                                                   ("max_queue", 0, "max_queue")])
def test_config_is_validated(field, value, message):
    with pytest.raises(ValueError, match=message):
        BatcherConfig(**{field: value}).validate()
