"""Load from outside: ``xmr serve-bench --target URL`` drives a running ``xmr serve`` with
``tritonclient`` (HTTP or gRPC), the way the in-process rows drive ``BatchedScorer.submit``.

Closed loop over 1/4/16 clients (each its own connection, sending its next request when the
previous one returns), then open-loop Poisson arrivals at fractions of the best closed-loop
QPS, sent from a pool of connections so a slow response never delays later arrivals; a
request's latency runs from its send (closed) or arrival (open) to its response. A request
the server turns away (its queue is full) counts as rejected, any other error fails the run.
With artifacts as well, the same queries against the same gallery run in-process through
``submit`` right after, with the server's batching limits, so the two sit side by side.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import numpy as np

from xmr.benchmark.online_bench import OnlineConfig, Workload, closed_loop, open_loop, percentiles, poisson_arrivals
from xmr.config import check_float, check_int
from xmr.errors import ConfigError, InputError, XmrError
from xmr.serve.repository import SEARCH_IMAGE, SEARCH_TEXT

PROTOCOLS = ("http", "grpc")


@dataclass
class RemoteConfig:
    target: str  # http://HOST:PORT or grpc://HOST:PORT
    seconds: float = 4.0  # per setting
    k: int = 10
    clients: tuple[int, ...] = (1, 4, 16)
    load_fractions: tuple[float, ...] = (0.5, 0.7, 0.9, 1.2)  # open-loop rates, x the best closed-loop QPS
    senders: int = 64  # open loop: connections that send arrivals
    timeout_s: float = 120.0  # one request, at most
    seed: int = 0

    def __post_init__(self) -> None:
        parse_target(self.target)
        for name in ("k", "senders"):
            check_int("serve-bench", name, getattr(self, name))
        check_float("serve-bench", "seconds", self.seconds, 0.0, above=True)
        if not self.clients or min(self.clients) < 1 or not self.load_fractions or min(self.load_fractions) <= 0:
            raise ConfigError("remote settings need clients >= 1 and load fractions > 0")


def parse_target(target: str) -> tuple[str, str]:
    """``(protocol, host:port)`` of ``http://HOST:PORT`` or ``grpc://HOST:PORT``."""
    parsed = urlparse(target)
    if parsed.scheme not in PROTOCOLS or not parsed.hostname or not parsed.port or parsed.path not in ("", "/"):
        raise InputError(f"--target must be http://HOST:PORT or grpc://HOST:PORT, got {target!r}"[:200])
    return parsed.scheme, f"{parsed.hostname}:{parsed.port}"


class Rejected(XmrError, RuntimeError):
    """The server turned the request away (its queue was full)."""


class Target:
    """A running ``xmr serve``: one client connection per thread (tritonclient's HTTP client
    must stay on the thread that made it), opened by ``open`` and closed by ``release``."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.protocol, self.address = parse_target(url)
        try:
            if self.protocol == "http":
                import tritonclient.http as module
            else:
                import tritonclient.grpc as module
        except ImportError as e:
            raise XmrError('serve-bench --target needs tritonclient: pip install -e ".[serve]"') from e
        self.module, self.timeout_s = module, timeout_s
        self._local = threading.local()

    def open(self) -> Any:
        """This thread's connection (made on first use)."""
        if getattr(self._local, "client", None) is None:
            if self.protocol == "http":
                self._local.client = self.module.InferenceServerClient(
                    self.address, connection_timeout=self.timeout_s, network_timeout=self.timeout_s)
            else:
                self._local.client = self.module.InferenceServerClient(self.address)
        return self._local.client

    def release(self) -> None:
        """Close this thread's connection."""
        client, self._local.client = getattr(self._local, "client", None), None
        if client is not None:
            client.close()

    def ready_models(self) -> list[str]:
        client = self.open()
        try:
            if not client.is_server_ready():
                raise XmrError(f"the server at {self.protocol}://{self.address} is not ready")
        except XmrError:
            raise
        except Exception as e:  # noqa: BLE001 - tritonclient raises its own and socket errors
            raise XmrError(f"no server answers at {self.protocol}://{self.address} ({str(e)[:160]})") from e
        return [name for name in (SEARCH_TEXT, SEARCH_IMAGE) if client.is_model_ready(name)]

    def batching(self, model: str) -> tuple[int, float, int]:
        """The server's ``max_batch_size``, queue delay (ms) and queue size of ``model``."""
        config = self.open().get_model_config(model)
        config = config.get("config", config) if isinstance(config, dict) else config.config
        if isinstance(config, dict):
            batcher = config.get("dynamic_batching", {})
            return (int(config["max_batch_size"]), int(batcher.get("max_queue_delay_microseconds", 0)) / 1e3,
                    int(batcher.get("default_queue_policy", {}).get("max_queue_size", 0)))
        batcher = config.dynamic_batching
        return (config.max_batch_size, batcher.max_queue_delay_microseconds / 1e3,
                batcher.default_queue_policy.max_queue_size)

    def search(self, model: str, query: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """One search request (a caption string, or an image's features ``[R, img_dim]``)."""
        m = self.module
        if model == SEARCH_TEXT:
            tensor = m.InferInput("text", [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[query.encode()]], dtype=object))
        else:
            features = np.ascontiguousarray(query[None], dtype=np.float32)
            tensor = m.InferInput("features", list(features.shape), "FP32")
            tensor.set_data_from_numpy(features)
        top = m.InferInput("k", [1, 1], "INT32")
        top.set_data_from_numpy(np.full((1, 1), k, dtype=np.int32))
        try:
            result = self.open().infer(model, [tensor, top], **(
                {} if self.protocol == "http" else {"client_timeout": self.timeout_s}))
        except Exception as e:  # noqa: BLE001 - sorted into rejections and failures below
            if "queue" in str(e).lower():
                raise Rejected(str(e)) from e
            raise XmrError(f"{model} failed: {str(e)[:200]}") from e
        return result.as_numpy("indices"), result.as_numpy("scores")


def remote_closed_loop(target: Target, model: str, name: str, queries: list, clients: int,
                       config: RemoteConfig) -> dict[str, Any]:
    tally, clock = _Tally(target, model, config.k), {}
    started = threading.Barrier(clients, action=lambda: clock.update(start=time.perf_counter()))

    def client(offset: int) -> None:
        target.open()  # connected before the clock starts
        started.wait()
        i, deadline = offset, clock["start"] + config.seconds
        while time.perf_counter() < deadline:
            tally.request(queries[i % len(queries)], time.perf_counter())
            i += clients
        target.release()

    _run_all(client, range(clients), clients)
    seconds = time.perf_counter() - clock["start"]
    return _row(name, {"mode": "closed", "clients": clients}, tally.latencies, tally.rejected, seconds)


def remote_open_loop(target: Target, model: str, name: str, queries: list, rate: float,
                     config: RemoteConfig) -> dict[str, Any]:
    arrivals = poisson_arrivals(rate, config.seconds, config.seed)
    tally = _Tally(target, model, config.k)

    def send(item: tuple[int, float]) -> None:
        i, arrived = item
        tally.request(queries[i % len(queries)], arrived)

    with concurrent.futures.ThreadPoolExecutor(config.senders, thread_name_prefix="xmr-sender") as pool:
        _on_every_thread(pool, config.senders, target.open)  # connected before the clock starts
        start = time.perf_counter()
        futures = []
        for i, at in enumerate(arrivals):
            delay = start + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(send, (i, start + at)))
        for future in futures:
            future.result()
        seconds = max(time.perf_counter() - start, config.seconds)
        _on_every_thread(pool, config.senders, target.release)
    return _row(name, {"mode": "open", "rate": rate, "offered_qps": len(arrivals) / config.seconds},
                tally.latencies, tally.rejected, seconds)


class _Tally:
    """Latencies of answered requests and the count of rejected ones, from any thread."""

    def __init__(self, target: Target, model: str, k: int) -> None:
        self.target, self.model, self.k = target, model, k
        self.latencies: list[float] = []
        self.rejected = 0
        self._lock = threading.Lock()

    def request(self, query: Any, since: float) -> None:
        """Send ``query``; its latency counts from ``since`` (its send, or its arrival)."""
        try:
            self.target.search(self.model, query, self.k)
        except Rejected:
            with self._lock:
                self.rejected += 1
            return
        with self._lock:
            self.latencies.append(time.perf_counter() - since)


def _on_every_thread(pool: concurrent.futures.ThreadPoolExecutor, threads: int, work: Callable[[], Any]) -> None:
    """``work`` once on each of the pool's ``threads`` threads (each waits for all to arrive)."""
    together = threading.Barrier(threads)
    _wait_all([pool.submit(lambda: (work(), together.wait())) for _ in range(threads)])


def _wait_all(futures: list[concurrent.futures.Future]) -> None:
    for future in futures:
        future.result()


def _run_all(work: Callable[[int], None], items: Any, threads: int) -> None:
    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="xmr-client") as pool:
        _wait_all([pool.submit(work, item) for item in items])


def _row(workload: str, setting: dict[str, Any], latencies: list[float], rejected: int, seconds: float) -> dict[str, Any]:
    return {"workload": workload, **setting, "completed": len(latencies), "rejected": rejected, "seconds": seconds,
            "qps": len(latencies) / seconds, **percentiles(latencies)}


def run_remote(target: Target, queries: dict[str, list], config: RemoteConfig,
               in_process: Callable[[str], Any] | None = None,
               advance: Callable[[str], None] = lambda label: None) -> dict[str, Any]:
    """Per workload the server serves (``queries``: ``text->image`` captions, ``image->text``
    features): the closed-loop sweep, then open-loop rates at fractions of its best QPS; and,
    with ``in_process`` (workload -> (BatchedScorer, Workload)), the same settings through
    ``submit`` with the server's batching limits."""
    models = {"text->image": SEARCH_TEXT, "image->text": SEARCH_IMAGE}
    ready = target.ready_models()
    remote, local, batching = [], [], {}
    for name, model in models.items():
        if model not in ready or not queries.get(name):
            continue
        batching[name] = target.batching(model)
        target.search(model, queries[name][0], config.k)  # untimed: the first launch allocates
        closed = []
        for clients in config.clients:
            advance(f"remote {name}: {clients} clients")
            closed.append(remote_closed_loop(target, model, name, queries[name], clients, config))
        best = max(r["qps"] for r in closed)
        remote += closed
        for fraction in config.load_fractions:
            advance(f"remote {name}: {fraction:g} x {best:.1f} req/s")
            remote.append({**remote_open_loop(target, model, name, queries[name], max(best * fraction, 0.1), config),
                           "load_fraction": fraction})
        if in_process is not None:
            local += _in_process_rows(in_process(name), name, best, config, advance)
    return {"target": config.target, "batching": {n: dict(zip(("max_batch", "max_queue_delay_ms", "max_queue"), b))
                                                  for n, b in batching.items()},
            "remote": remote, "in_process": local}


def _in_process_rows(setup: tuple[Any, Workload], name: str, remote_best: float, config: RemoteConfig,
                     advance: Callable[[str], None]) -> list[dict[str, Any]]:
    """The remote settings through ``submit``: the same clients, the open loop at the same
    absolute rates (fractions of the remote best), so each pair of rows saw the same load."""
    front, workload = setup
    online = OnlineConfig(seconds=config.seconds, k=config.k, clients=config.clients,
                          load_fractions=config.load_fractions, seed=config.seed)
    front.submit(workload.queries[0], workload.gallery, config.k).result()
    rows = []
    for clients in config.clients:
        advance(f"in-process {name}: {clients} clients")
        rows.append(closed_loop(front, workload, clients, online))
    for fraction in config.load_fractions:
        advance(f"in-process {name}: {fraction:g} x {remote_best:.1f} req/s")
        rows.append({**open_loop(front, workload, max(remote_best * fraction, 0.1), online), "load_fraction": fraction})
    return rows


def remote_serve_bench(config: RemoteConfig, data: Path, artifacts: Path | None = None, backend: str = "auto",
                       precision: str = "fp32", show_progress: bool = True) -> dict[str, Any]:
    """The remote rows for ``data``'s test split as queries; with ``artifacts``, the in-process
    rows beside them (the server must serve that split's images and captions: checked on
    the first query, whose results must be the same)."""
    from xmr.data import Vocabulary, find_vocab, load_split
    from xmr.runtime import BatchedScorer, BatcherConfig, Scorer

    target = Target(config.target, config.timeout_s)
    scorer = None if artifacts is None else Scorer.load(artifacts, backend=backend, precision=precision)
    vocab = scorer.vocab if scorer is not None and scorer.vocab is not None else Vocabulary.load(find_vocab(data))
    split = load_split(data, "test", vocab)
    queries = {"text->image": list(split.captions), "image->text": list(np.asarray(split.features))}
    fronts: list[Any] = []

    def in_process(name: str) -> tuple[Any, Workload]:
        model = SEARCH_TEXT if name == "text->image" else SEARCH_IMAGE
        max_batch, delay_ms, max_queue = target.batching(model)
        front = BatchedScorer(scorer, BatcherConfig(max_batch, delay_ms, max(max_queue, 1)))  # type: ignore[arg-type]
        fronts.append(front)
        if name == "text->image":
            workload = Workload(name, scorer.encode_images(split.features), [[c] for c in split.captions])  # type: ignore[union-attr]
        else:
            workload = Workload(name, scorer.encode_texts(split.captions), [f[None] for f in np.asarray(split.features)])  # type: ignore[union-attr]
        remote = target.search(model, queries[name][0], config.k)[0]
        local = front.submit(workload.queries[0], workload.gallery, config.k).result().indices
        if not np.array_equal(remote, local):
            raise XmrError(f"the server's {name} gallery is not {data}'s test split (the first query's results differ); "
                           f"start xmr serve with --images and --captions of that split, and the same backend")
        return front, workload

    from xmr.progress import progress

    settings = 2 * (len(config.clients) + len(config.load_fractions)) * (1 if scorer is None else 2)
    try:
        with progress(show_progress) as bar:
            task = bar.add_task("serve-bench --target", total=settings, info="")
            report = run_remote(target, queries, config, None if scorer is None else in_process,
                                lambda label: bar.update(task, advance=1, info=label))
    finally:
        for front in fronts:
            front.close()
        if scorer is not None:
            scorer.close()
        target.release()
    in_process_of = None if scorer is None else {"artifacts": str(artifacts), "backend": repr(scorer)}
    return {**report, "data": str(data), "in_process_scorer": in_process_of, "config": dataclasses.asdict(config)}
