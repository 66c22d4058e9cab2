"""Tiles on Ray: one ``Scorer`` per actor, tiles handed to actors as they free up.

One actor encodes the galleries; the encoded galleries go to the object store once and every
actor holds them. Each actor keeps two tiles in flight, so it scores while the driver writes.
An actor that dies (killed, its node lost) has its tiles requeued for the others and is
replaced by a new one (at most ``2 x workers`` replacements in a run). Actors take
``threads`` CPUs each (one GPU each on a cluster with GPUs), so they never oversubscribe.
Ray is imported only here (the ``ray`` extra).
"""

from __future__ import annotations

import collections
import itertools
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from xmr.cpu import available_cores
from xmr.errors import XmrError, first_line
from xmr.matrix.tiles import QueryRows, Tile

IN_FLIGHT = 2  # tiles per actor
TILE_TIMEOUT_S = 3600.0  # no tile finishing for this long: the run stops
WORKER = "xmr-tile-worker-{}"


class RayRunError(XmrError, RuntimeError):
    """The Ray run could not finish."""


class TileWorker:
    """A Ray actor's state: a Scorer (``spec.load(threads)``: a ``MatrixJob``, a
    ``run.CheckpointSpec``) and the galleries it scores tiles of."""

    def __init__(self, spec: Any, threads: int | None) -> None:
        self.scorer = spec.load(threads)
        self.galleries: tuple[Any, Any] | None = None

    def encode(self, features: np.ndarray, captions: Any) -> tuple[Any, Any]:
        return self.scorer.encode_images(features), self.scorer.encode_texts(captions)

    def hold(self, images: Any, texts: Any) -> int:
        self.galleries = (images, texts)
        return os.getpid()

    def score(self, item: Tile | QueryRows) -> Any:
        """A tile's scores; or for query rows, their shortlists: (candidates, exact scores, pairs scored)."""
        from xmr.matrix.run import score_tile

        images, texts = self.galleries  # type: ignore[misc]
        if isinstance(item, Tile):
            return score_tile(self.scorer, images, texts, item)
        queries, gallery = (images, texts) if item.direction == "i2t" else (texts, images)
        before = self.scorer.stats()["pairs_scored"]
        candidates, exact = self.scorer.shortlisted(queries.select(np.arange(*item.rows)), gallery, item.k)
        return candidates, exact, self.scorer.stats()["pairs_scored"] - before

    def vectors(self) -> tuple[Any, Any]:
        """The galleries' prefilter vectors (None without a head)."""
        images, texts = self.galleries  # type: ignore[misc]
        return images.vectors, texts.vectors


def connect(address: str | None) -> None:
    """``ray.init``: the cluster at ``address``, or a local one on this process's cores."""
    import ray

    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if address is None:
        options["num_cpus"] = available_cores()
    try:
        ray.init(address=address, **options)
    except Exception as e:  # ConnectionError, RuntimeError, ValueError: Ray's own for a cluster it cannot reach
        raise RayRunError(f"cannot start or reach a Ray cluster at {address or 'this machine'}: {first_line(e)}"[:300]) \
            from e


def actor_resources(workers: int | None) -> tuple[int, dict[str, float], int | None]:
    """(actors, resources per actor, threads per actor) on the connected cluster: one per GPU
    where there are GPUs, else ``workers`` actors (default: one per 4 CPUs) sharing the CPUs."""
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    if gpus and workers is None:
        workers = gpus
    workers = workers or max(1, cpus // 4)
    if gpus:
        return workers, {"num_gpus": 1, "num_cpus": 1}, None
    threads = max(1, cpus // workers)
    return workers, {"num_cpus": threads}, threads


def score_on_ray(spec: Any, features: np.ndarray, captions: Any, tiles: list[Any], record: Callable[[Any, Any], None],
                 address: str | None, workers: int | None, vectors: bool = False) -> tuple[Any, Any] | None:
    """Score ``tiles`` (``Tile`` or ``QueryRows``) on Ray, calling ``record(tile, result)`` in
    this process as each arrives; with ``vectors``, returns the galleries' prefilter vectors.
    ``captions``: raw strings or ``(ids, lengths)``, whatever ``Scorer.encode_texts`` takes."""
    import ray

    main = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
    previous = signal.signal(signal.SIGTERM, _interrupt) if main else None  # a SIGTERM'd driver still shuts Ray down
    try:
        connect(address)
        return _run(ray, spec, features, captions, tiles, record, workers, vectors)
    finally:
        ray.shutdown()
        if main:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _run(ray: Any, spec: Any, features: np.ndarray, captions: Any, tiles: list[Any], record: Callable[[Any, Any], None],
         workers: int | None, vectors: bool) -> tuple[Any, Any] | None:
    from ray.exceptions import RayActorError, RayTaskError

    count, resources, threads = actor_resources(workers)
    remote = ray.remote(max_restarts=0, max_task_retries=0, **resources)(TileWorker)
    names = (WORKER.format(i) for i in itertools.count())
    actors = [remote.options(name=next(names)).remote(spec, threads) for _ in range(count)]
    try:
        images, texts = ray.get(actors[0].encode.options(num_returns=2).remote(ray.put(features), captions))
        galleries = (ray.put(images), ray.put(texts))
        del images, texts
        ray.get([a.hold.remote(*galleries) for a in actors])
        held = ray.get(actors[0].vectors.remote()) if vectors else None
    except RayTaskError as e:
        raise RayRunError(f"a Ray actor could not load the scorer or encode the galleries: {_cause(e)}") from e
    queue, pending = collections.deque(tiles), {}
    replacements = 2 * count

    def submit(actor: Any) -> None:
        if queue:
            tile = queue.popleft()
            pending[actor.score.remote(tile)] = (actor, tile)

    for actor in actors:
        for _ in range(IN_FLIGHT):
            submit(actor)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=TILE_TIMEOUT_S)
        if not ready:
            raise RayRunError(f"no tile finished within {TILE_TIMEOUT_S:.0f} s")
        actor, tile = pending.pop(ready[0])
        try:
            scores = ray.get(ready[0])
        except RayActorError:  # the actor died: its tile goes back, the actor is replaced once
            queue.appendleft(tile)
            if actor in actors:
                actors.remove(actor)
                if replacements == 0:
                    raise RayRunError("Ray actors keep dying; the run stops (rerun the command to resume)") from None
                replacements -= 1
                actor = remote.options(name=next(names)).remote(spec, threads)
                ray.get(actor.hold.remote(*galleries))
                actors.append(actor)
                for _ in range(IN_FLIGHT):
                    submit(actor)
            elif not pending:
                submit(actors[0])
            continue
        except RayTaskError as e:
            raise RayRunError(f"tile {tile.name} failed: {_cause(e)}") from e
        record(tile, scores)
        submit(actor)
    return held


def _cause(error: Exception) -> str:
    cause = getattr(error, "cause", None) or error
    return first_line(cause)[:300]
