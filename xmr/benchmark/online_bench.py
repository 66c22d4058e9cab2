"""Online serving under load: top-k searches through ``BatchedScorer.submit`` and its dynamic batcher.

Closed loop: C clients, each sending its next request when the previous one returns.
Open loop: requests arrive as a Poisson process at rate λ whatever the server does, so
queueing (and, past capacity, rejection) shows; ``offered_qps`` is the arrivals per second
this draw of the process made (λ give or take its noise). A request's latency runs from its
arrival (or, closed loop, its send) to its result, so it includes encoding the query in the
caller's thread, queueing, and the batched scoring.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from xmr.benchmark.hardware import UtilisationMonitor
from xmr.config import check_float, check_int
from xmr.errors import ConfigError
from xmr.runtime import BatchedScorer, BatcherConfig, QueueFullError
from xmr.runtime.batcher import BatcherStats
from xmr.runtime.gallery import Gallery


SENDERS = 16  # open loop: threads that send arrivals (and encode their queries)


@dataclass
class OnlineConfig:
    seconds: float = 4.0  # per setting
    gallery_images: int = 100  # image gallery (and 5x captions for image -> text)
    k: int = 10
    clients: tuple[int, ...] = (1, 4, 16)
    load_fractions: tuple[float, ...] = (0.5, 0.9, 1.2)  # open-loop rates, x the closed loop's best QPS
    delays_ms: tuple[float, ...] = (0.0, 2.0, 10.0)  # max_queue_delay_ms sweep, at the most clients
    max_batch: int = 64
    max_queue: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("gallery_images", "k", "max_batch", "max_queue"):
            check_int("serve-bench", name, getattr(self, name))
        check_float("serve-bench", "seconds", self.seconds, 0.0, above=True)
        if not self.clients or min(self.clients) < 1 or not self.load_fractions or min(self.load_fractions) <= 0 \
                or not self.delays_ms or min(self.delays_ms) < 0:
            raise ConfigError("online settings need clients >= 1, load fractions > 0 and queue delays >= 0")


@dataclass
class Workload:
    name: str  # text->image | image->text
    gallery: Gallery
    queries: list  # one request's query each


def percentiles(latencies: list[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None}
    ms = np.asarray(latencies) * 1e3
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99), "mean_ms": float(ms.mean())}


def poisson_arrivals(rate: float, seconds: float, seed: int) -> np.ndarray:
    """Arrival times (s, ascending, below ``seconds``) of a Poisson process at ``rate`` per second."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, int(rate * seconds * 2) + 10))
    return arrivals[arrivals < seconds]


def stats_delta(before: BatcherStats, after: BatcherStats) -> dict[str, Any]:
    histogram = {size: count - before.batch_sizes.get(size, 0) for size, count in after.batch_sizes.items()}
    requests, batches = after.requests - before.requests, after.batches - before.batches
    return {"requests": requests, "batches": batches, "failed": after.failed - before.failed,
            "rejected": after.rejected - before.rejected,
            "batch_size_histogram": {str(k): v for k, v in sorted(histogram.items()) if v},
            "mean_batch_size": requests / batches if batches else 0.0,
            "mean_queue_ms": 1e3 * (after.queue_seconds - before.queue_seconds) / requests if requests else None,
            "mean_compute_ms_per_batch": 1e3 * (after.compute_seconds - before.compute_seconds) / batches if batches else None}


def _measure(front: BatchedScorer, run: Callable[[], tuple[list[float], int, float]], setting: dict[str, Any]) -> dict[str, Any]:
    before = front.stats()["batcher"]
    with UtilisationMonitor(front.scorer.device) as util:
        latencies, rejected, seconds = run()
    return {**setting, "completed": len(latencies), "rejected_at_submit": rejected, "seconds": seconds,
            "qps": len(latencies) / seconds, **percentiles(latencies),
            **stats_delta(before, front.stats()["batcher"]), "cpu_utilisation": util.cpu, "gpu_utilisation": util.gpu}


def closed_loop(front: BatchedScorer, workload: Workload, clients: int, config: OnlineConfig) -> dict[str, Any]:
    def run() -> tuple[list[float], int, float]:
        latencies: list[float] = []
        lock, start = threading.Lock(), time.perf_counter()
        deadline = start + config.seconds

        def client(offset: int) -> None:
            i = offset
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                front.submit(workload.queries[i % len(workload.queries)], workload.gallery, config.k).result()
                with lock:
                    latencies.append(time.perf_counter() - sent)
                i += clients

        with concurrent.futures.ThreadPoolExecutor(clients, thread_name_prefix="xmr-client") as pool:
            for offset in range(clients):
                pool.submit(client, offset)
        return latencies, 0, time.perf_counter() - start

    return _measure(front, run, {"workload": workload.name, "mode": "closed", "clients": clients,
                                  "max_queue_delay_ms": front.config.max_queue_delay_ms})


def open_loop(front: BatchedScorer, workload: Workload, rate: float, config: OnlineConfig) -> dict[str, Any]:
    """Poisson arrivals at ``rate`` per second for ``config.seconds``. Each arrival is sent from
    a pool of sender threads (as a server's request handlers would), so a slow submit (the
    query is encoded there) never delays later arrivals; every accepted request is waited for,
    so the measured time covers draining what queued up."""
    arrivals = poisson_arrivals(rate, config.seconds, config.seed)

    def run() -> tuple[list[float], int, float]:
        latencies: list[float] = []
        futures: list[concurrent.futures.Future] = []
        lock, rejected = threading.Lock(), [0]
        start = time.perf_counter()

        def send(i: int, arrived: float) -> None:
            try:
                future = front.submit(workload.queries[i % len(workload.queries)], workload.gallery, config.k)
            except QueueFullError:
                with lock:
                    rejected[0] += 1
                return
            future.add_done_callback(lambda _: _record(latencies, lock, time.perf_counter() - arrived))
            with lock:
                futures.append(future)

        with concurrent.futures.ThreadPoolExecutor(SENDERS, thread_name_prefix="xmr-sender") as senders:
            for i, at in enumerate(arrivals):
                delay = start + at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                senders.submit(send, i, start + at)
        for future in futures:
            future.result()
        while len(latencies) < len(futures):  # callbacks run just after result() wakes us
            time.sleep(1e-3)
        return latencies, rejected[0], max(time.perf_counter() - start, config.seconds)

    return _measure(front, run, {"workload": workload.name, "mode": "open", "rate": rate,
                                  "offered_qps": len(arrivals) / config.seconds,
                                  "max_queue_delay_ms": front.config.max_queue_delay_ms})


def _record(latencies: list[float], lock: threading.Lock, latency: float) -> None:
    with lock:
        latencies.append(latency)


def run_online(front: BatchedScorer, workloads: list[Workload], config: OnlineConfig,
               advance: Callable[[str], None] = lambda label: None) -> list[dict[str, Any]]:
    """Closed-loop sweep over clients, open-loop sweep over rates (fractions of the closed
    loop's best QPS), and a max_queue_delay_ms sweep at the most clients, per workload, each
    after one untimed request (the first launch against a gallery allocates)."""
    base = BatcherConfig(config.max_batch, config.delays_ms[0], config.max_queue)  # delays_ms: never empty
    results = []
    for workload in workloads:
        front.config = base
        front.submit(workload.queries[0], workload.gallery, config.k).result()
        closed = []
        for clients in config.clients:
            advance(f"{workload.name}: {clients} clients")
            closed.append(closed_loop(front, workload, clients, config))
        results += closed
        best = max(r["qps"] for r in closed)
        for fraction in config.load_fractions:
            advance(f"{workload.name}: {fraction:g} x {best:.1f} req/s")
            results.append({**open_loop(front, workload, max(best * fraction, 0.1), config), "load_fraction": fraction})
        for delay in config.delays_ms[1:]:
            front.config = BatcherConfig(config.max_batch, delay, config.max_queue)
            advance(f"{workload.name}: max_queue_delay_ms {delay:g}")
            results.append(closed_loop(front, workload, max(config.clients), config))
    front.config = base
    return results
