"""Two-stage search under ``xmr serve-bench``: online searches with and without a shortlist over
large galleries, and what an offline evaluation costs with one.

Online: for each gallery size, text -> image over that many images and image -> text over 5x
as many captions (at most ``max_captions``), one client sending its next query through ``BatchedScorer.submit`` when the
previous one returns (so a request's latency is its service time), exhaustive and with
``shortlist=K``: QPS and p50/p95/p99. Offline: a Flickr30K-1K-shaped evaluation (1,000 images,
5,000 captions) scores 5M pairs exhaustively and (images + captions) x K with a shortlist; its
time is the pairs over the rate each way measured here (exhaustive: the offline rows' best
rate; shortlist: the rate of a sample of shortlisted queries through ``Scorer.shortlisted``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from xmr.benchmark.online_bench import percentiles
from xmr.benchmark.workload import random_inputs
from xmr.config import check_float, check_int
from xmr.runtime import BatchedScorer, Scorer
from xmr.runtime.gallery import Gallery

F30K_IMAGES, PER_IMAGE = 1000, 5  # the Flickr30K 1K test: 1,000 images, 5,000 captions, 5M pairs


@dataclass
class ShortlistBenchConfig:
    galleries: tuple[int, ...] = (1000, 5000)  # images (image -> text searches 5x as many captions, up to ...)
    max_captions: int = 5000  # ... this many: a released-size IMRAM caption gallery holds 5 D floats a token,
    # 25,000 captions about 7 GB (twice that while it is built), more than a 24 GB machine keeps beside the rest
    shortlist: int = 128
    k: int = 10
    seconds: float = 4.0  # per setting, and at least ``min_requests`` requests
    min_requests: int = 3
    sample_queries: int = 32  # shortlisted queries timed for the offline estimate (each way)
    seed: int = 1

    def __post_init__(self) -> None:
        for name in ("shortlist", "k", "min_requests", "sample_queries"):
            check_int("serve-bench", name, getattr(self, name))
        check_float("serve-bench", "seconds", self.seconds, 0.0, above=True)
        for size in self.galleries:
            check_int("serve-bench", "gallery size", size)
        check_int("serve-bench", "max_captions", self.max_captions)


def closed_loop(front: BatchedScorer, queries: list, gallery: Gallery, k: int, shortlist: int | None,
                config: ShortlistBenchConfig) -> dict[str, Any]:
    """One client, one query after another, for ``seconds`` and at least ``min_requests``."""
    front.submit(queries[0], gallery, k, shortlist).result()  # untimed: the first launch allocates
    latencies, start, i = [], time.perf_counter(), 1
    while time.perf_counter() - start < config.seconds or len(latencies) < config.min_requests:
        sent = time.perf_counter()
        front.submit(queries[i % len(queries)], gallery, k, shortlist).result()
        latencies.append(time.perf_counter() - sent)
        i += 1
    seconds = time.perf_counter() - start
    return {"shortlist": shortlist, "requests": len(latencies), "seconds": seconds, "qps": len(latencies) / seconds,
            **percentiles(latencies)}


def online_rows(front: BatchedScorer, size: int, config: ShortlistBenchConfig,
                advance: Callable[[str], None]) -> list[dict[str, Any]]:
    """Both directions over a gallery of ``size`` images (and ``5 x size`` captions, unless
    that is over ``max_captions``: then a row says so), with and without the shortlist."""
    scorer, artifacts = front.scorer, front.scorer.artifacts
    n_captions = PER_IMAGE * size
    inputs = random_inputs(size, min(n_captions, config.max_captions), artifacts.regions, artifacts.config["img_dim"],
                           artifacts.config["vocab_size"], config.seed)
    rows = []
    images = scorer.encode_images(inputs.features)
    captions = [(inputs.ids[i : i + 1, : inputs.lengths[i]], inputs.lengths[i : i + 1]) for i in range(min(64, len(inputs.lengths)))]
    for shortlist in (None, config.shortlist):
        advance(f"text->image over {size:,} images, shortlist {shortlist}")
        rows.append({"workload": "text->image", "gallery_images": size, "gallery_items": size,
                     **closed_loop(front, captions, images, config.k, shortlist, config)})
    del images
    if n_captions > config.max_captions:
        advance("image->text skipped")
        advance("image->text skipped")
        return rows + [{"workload": "image->text", "gallery_images": size, "gallery_items": n_captions,
                        "skipped": f"{n_captions:,} captions: over max_captions {config.max_captions:,} (memory)"}]
    texts = scorer.encode_texts((inputs.ids, inputs.lengths))
    queries = [f.copy() for f in inputs.features[:64]]
    del inputs
    for shortlist in (None, config.shortlist):
        advance(f"image->text over {n_captions:,} captions, shortlist {shortlist}")
        rows.append({"workload": "image->text", "gallery_images": size, "gallery_items": n_captions,
                     **closed_loop(front, queries, texts, config.k, shortlist, config)})
    return rows


def offline_estimate(scorer: Scorer, exhaustive_rate: float, config: ShortlistBenchConfig) -> dict[str, Any]:
    """The F30K-1K evaluation's pairs and time, exhaustive and with the shortlist (see the module)."""
    artifacts = scorer.artifacts
    inputs = random_inputs(F30K_IMAGES, PER_IMAGE * F30K_IMAGES, artifacts.regions, artifacts.config["img_dim"],
                           artifacts.config["vocab_size"], config.seed)
    images, texts = scorer.encode_images(inputs.features), scorer.encode_texts((inputs.ids, inputs.lengths))
    n = config.sample_queries
    before, started = scorer.stats()["pairs_scored"], time.perf_counter()
    scorer.shortlisted(texts.select(np.arange(n)), images, config.shortlist)  # text -> image queries
    scorer.shortlisted(images.select(np.arange(n)), texts, config.shortlist)  # image -> text queries
    seconds, pairs = time.perf_counter() - started, scorer.stats()["pairs_scored"] - before
    exhaustive_pairs = F30K_IMAGES * PER_IMAGE * F30K_IMAGES
    queries = F30K_IMAGES + PER_IMAGE * F30K_IMAGES
    return {"images": F30K_IMAGES, "captions": PER_IMAGE * F30K_IMAGES, "shortlist": config.shortlist,
            "exhaustive_pairs": exhaustive_pairs, "shortlist_pairs": queries * config.shortlist,
            "sample_queries_each_way": n, "sample_pairs_scored": pairs, "sample_seconds": seconds,
            "exhaustive_seconds": exhaustive_pairs / exhaustive_rate,
            "shortlist_seconds": queries * seconds / (2 * n),  # the sample's mean per query, both ways alike
            "shortlist_pairs_per_second": pairs / seconds}


def run_shortlist_bench(front: BatchedScorer, exhaustive_rate: float, config: ShortlistBenchConfig,
                        advance: Callable[[str], None] = lambda label: None) -> dict[str, Any]:
    """The online rows for every gallery size and the offline estimate, or why they were skipped."""
    scorer = front.scorer
    if scorer.prefilter_dim is None:
        return {"skipped": "these artifacts have no prefilter head (train with xmr train, or add one with xmr distill, "
                           "then re-export)"}
    rows = [row for size in config.galleries for row in online_rows(front, size, config, advance)]
    advance("offline evaluation cost with a shortlist")
    return {"backend": scorer.backend, "precision": scorer.precision, "shortlist": config.shortlist, "k": config.k,
            "rows": rows, "offline": offline_estimate(scorer, exhaustive_rate, config)}
