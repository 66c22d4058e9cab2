"""``BatchedScorer``: the online front of a ``Scorer`` — dynamic batching of concurrent requests.

    scorer = Scorer.load("artifacts/imram")
    with BatchedScorer(scorer, BatcherConfig(max_batch=64, max_queue_delay_ms=2)) as front:
        future = front.submit(["two people ride bikes"], images, k=5)   # from any thread
        hits = future.result()

Each request is checked and encoded when it is submitted (a bad one raises at once); requests
against the same gallery are merged into one ``Scorer`` launch sequence and the result is split
per request (the policy of forming batches is ``batcher.DynamicBatcher``'s). The ``Scorer``
knows nothing of requests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

import numpy as np

from xmr.runtime.batcher import BatcherConfig, DynamicBatcher
from xmr.runtime.gallery import Gallery, concat
from xmr.runtime.scorer import Captions, Images, PairsRequest, Scorer, SearchRequest, SearchResult

Request = SearchRequest | PairsRequest


class BatchedScorer:
    """``search`` and ``score_pairs`` through a dynamic batcher (one worker thread); thread-safe."""

    def __init__(self, scorer: Scorer, config: BatcherConfig | None = None) -> None:
        self.scorer = scorer
        self._batcher: DynamicBatcher[Request, Any] = DynamicBatcher(
            lambda requests: run_batch(scorer, requests), config or BatcherConfig(), key=batch_key, size=_batch_size,
            name="xmr-scorer")

    def submit(self, query: Images | Captions, gallery: Gallery, k: int = 10,
               shortlist: int | None = None) -> concurrent.futures.Future[SearchResult]:
        """``Scorer.search`` through the batcher (requests with the same gallery and shortlist
        share batches); a full queue raises ``QueueFullError``."""
        return self._batcher.submit(self.scorer.search_request(query, gallery, k, shortlist))

    def submit_pairs(self, images: Images, texts: Captions, pairs: object) -> concurrent.futures.Future[np.ndarray]:
        """``Scorer.score_pairs`` through the batcher."""
        return self._batcher.submit(self.scorer.pairs_request(images, texts, pairs))

    async def search_async(self, query: Images | Captions, gallery: Gallery, k: int = 10,
                           shortlist: int | None = None) -> SearchResult:
        """``submit`` for asyncio code: awaits the batched result without blocking the loop."""
        return await asyncio.wrap_future(self.submit(query, gallery, k, shortlist))

    @property
    def config(self) -> BatcherConfig:
        return self._batcher.config

    @config.setter
    def config(self, config: BatcherConfig) -> None:
        """New batching limits (checked), applied from the next batch on (requests already queued stay)."""
        self._batcher.config = config

    def stats(self) -> dict[str, Any]:
        """The scorer's counters and the batcher's (``batcher.BatcherStats``)."""
        return {**self.scorer.stats(), "batcher": self._batcher.stats()}

    def close(self, timeout: float | None = None) -> None:
        """Finish every submitted request, then refuse new ones."""
        self._batcher.close(timeout)

    def __enter__(self) -> BatchedScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()



def run_batch(scorer: Scorer, requests: list[Request]) -> list[Any]:
    """Checked requests of one ``batch_key`` as one launch sequence, each request's result
    split off (searches: the merged top-max(k), cut to each request's k)."""
    cuts = np.cumsum([_batch_size(r) for r in requests])[:-1]  # where each request's rows start
    first = requests[0]
    if isinstance(first, PairsRequest):
        pairs = np.concatenate([r.pairs for r in requests])
        return np.split(scorer.run_pairs(PairsRequest(first.images, first.texts, pairs)), cuts)
    query = concat([r.query for r in requests])  # type: ignore[union-attr]
    merged = scorer.run_search(SearchRequest(query, first.gallery, max(r.k for r in requests),
                                             first.shortlist))  # type: ignore[union-attr]
    return [SearchResult(indices[:, : r.k], scores[:, : r.k]) for r, indices, scores  # type: ignore[union-attr]
            in zip(requests, np.split(merged.indices, cuts), np.split(merged.scores, cuts))]


def batch_key(request: Request) -> tuple:
    """Requests with equal keys may share a ``run_batch`` call."""
    if isinstance(request, PairsRequest):
        return ("pairs", id(request.images), id(request.texts))
    return ("search", id(request.gallery), request.shortlist)


def _batch_size(request: Request) -> int:
    return len(request.pairs) if isinstance(request, PairsRequest) else len(request.query)
