"""Recall with a shortlist: the two-stage protocol of ALBEF and BLIP (their ``k_test``), exact.

For every query, in both directions, the prefilter head's vectors rank all items and its
``K`` best are rescored by the cross-attention model (``Scorer.shortlisted``); the other
items rank below every rescored one, in the prefilter's order. R@1/5/10 and rsum come
from those rankings; beside them, the prefilter alone, its own recall@K (queries with a
ground-truth item among their ``K``) and the pairs the cross-attention model scored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from xmr.data.precomp import PrecompSplit
from xmr.errors import InputError
from xmr.eval.metrics import RecallReport, recall_at, recall_report
from xmr.matrix.run import RayOptions, shortlists_on_ray
from xmr.runtime import Scorer
from xmr.runtime.gallery import ImageGallery, TextGallery


@dataclass
class ShortlistResult:
    """One shortlist size's figures on one split."""

    k: int
    report: RecallReport  # the shortlist reranked by cross-attention, the rest below
    prefilter: RecallReport  # the prefilter's vectors alone
    prefilter_recall: dict[str, float]  # share of queries with a ground-truth item in their K: i2t, t2i
    pairs_scored: int  # pairs the cross-attention model scored, both directions
    exhaustive_pairs: int  # images x captions
    seconds: float  # prefilter, rescoring and ranking (the galleries encoded before)

    def to_dict(self) -> dict[str, Any]:
        return {"k": self.k, "metrics": self.report.to_dict(), "prefilter": self.prefilter.to_dict(),
                "prefilter_recall_at_k": self.prefilter_recall, "pairs_scored": self.pairs_scored,
                "exhaustive_pairs": self.exhaustive_pairs, "seconds": self.seconds}


def split_galleries(scorer: Scorer, split: PrecompSplit, show_progress: bool = False) -> tuple[ImageGallery, TextGallery]:
    """``split``'s images and captions encoded once, with their prefilter vectors."""
    images = scorer.encode_images(np.asarray(split.features), show_progress=show_progress)
    texts = scorer.encode_texts(split.caption_batch(range(split.n_captions)), show_progress=show_progress)
    if images.vectors is None or texts.vectors is None:
        raise InputError(f"a shortlist needs a prefilter head, and this {scorer.artifacts.kind} model has none; "
                         f"add one with `xmr distill CHECKPOINT`")
    return images, texts


def shortlist_recall(scorer: Scorer, images: ImageGallery, texts: TextGallery, per_image: int, k: int) -> ShortlistResult:
    """The protocol at shortlist ``k`` on encoded galleries (captions ``per_image`` per image, in image order)."""
    started, before = time.perf_counter(), scorer.stats()["pairs_scored"]
    similarities = (images.vectors @ texts.vectors.T).float().cpu().numpy()  # type: ignore[union-attr]
    i2t, t2i = scorer.shortlisted(images, texts, k), scorer.shortlisted(texts, images, k)
    return shortlist_result(similarities, i2t, t2i, per_image, k, scorer.stats()["pairs_scored"] - before, started)


def shortlist_result(similarities: np.ndarray, i2t: tuple[np.ndarray, np.ndarray], t2i: tuple[np.ndarray, np.ndarray],
                     per_image: int, k: int, pairs_scored: int, started: float) -> ShortlistResult:
    """The figures from the prefilter ``similarities`` and each direction's (candidates, exact scores)."""
    report = recall_report(_rest_below(similarities, *i2t), per_image, _rest_below(similarities.T, *t2i).T)
    seconds = time.perf_counter() - started
    at_k = recall_at(similarities, per_image, (k,))
    recall = {"i2t": at_k[f"i2t@{k}"] / 100, "t2i": at_k[f"t2i@{k}"] / 100}
    return ShortlistResult(k, report, recall_report(similarities, per_image), recall, pairs_scored, similarities.size,
                           seconds)


def _rest_below(similarities: np.ndarray, candidates: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Rows ranked: the candidates by their exact scores, every other item below them all in
    the prefilter's order (similarities of unit vectors are within [-1, 1])."""
    ranked = similarities + (exact.min(axis=1) - 2.0)[:, None]
    np.put_along_axis(ranked, candidates, exact, axis=1)
    return ranked


def evaluate_shortlist(scorer: Scorer, split: PrecompSplit, k: int, show_progress: bool = False) -> ShortlistResult:
    """``shortlist_recall`` on ``split`` (encoded first)."""
    return shortlist_recall(scorer, *split_galleries(scorer, split, show_progress), split.per_image, k)


def evaluate_shortlist_on_ray(spec: Any, split: PrecompSplit, k: int, ray: RayOptions,
                              show_progress: bool = False) -> ShortlistResult:
    """The protocol on ``split`` with the rescoring on Ray actors (``spec.load``: each actor's scorer)."""
    started = time.perf_counter()
    found = shortlists_on_ray(spec, np.asarray(split.features), split.caption_batch(range(split.n_captions)), k, ray,
                              show_progress=show_progress)
    return shortlist_result(found.similarities, found.i2t, found.t2i, split.per_image, k, found.pairs_scored, started)
