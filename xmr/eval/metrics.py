"""Retrieval metrics as the authors compute them (SCAN/CAMP/IMRAM ``i2t`` / ``t2i``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from xmr.errors import ShapeError

KS = (1, 5, 10)


@dataclass
class RecallReport:
    """R@K in percent for image->text (``i2t``) and text->image (``t2i``), ranks 1-based."""

    i2t_r1: float
    i2t_r5: float
    i2t_r10: float
    i2t_medr: float
    i2t_meanr: float
    t2i_r1: float
    t2i_r5: float
    t2i_r10: float
    t2i_medr: float
    t2i_meanr: float

    @property
    def rsum(self) -> float:
        return self.i2t_r1 + self.i2t_r5 + self.i2t_r10 + self.t2i_r1 + self.t2i_r5 + self.t2i_r10

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "rsum": self.rsum}


def _recalls(ranks: np.ndarray) -> list[float]:
    return [100.0 * float(np.mean(ranks < k)) for k in KS]


def image_to_text_ranks(scores: np.ndarray, per_image: int) -> np.ndarray:
    """0-based rank of each image's best-ranked ground-truth caption (among its ``per_image``)."""
    order = np.argsort(-scores, axis=1, kind="stable")  # (Ni, Nt) caption indices, best first
    owner = order // per_image  # image each ranked caption belongs to
    return np.argmax(owner == np.arange(scores.shape[0])[:, None], axis=1)


def text_to_image_ranks(scores: np.ndarray, per_image: int) -> np.ndarray:
    """0-based rank of each caption's image among all images."""
    order = np.argsort(-scores.T, axis=1, kind="stable")  # (Nt, Ni) image indices, best first
    truth = np.arange(scores.shape[1]) // per_image
    return np.argmax(order == truth[:, None], axis=1)


def recall_at(scores: np.ndarray, per_image: int, ks: tuple[int, ...]) -> dict[str, float]:
    """Recall@K of a score matrix ``[images, captions]`` in percent, both ways: ``i2t@K``
    (images with a caption of theirs among their K best) and ``t2i@K`` (captions whose image
    is among their K best)."""
    i2t, t2i = image_to_text_ranks(scores, per_image), text_to_image_ranks(scores, per_image)
    return {**{f"i2t@{k}": 100.0 * float(np.mean(i2t < k)) for k in ks},
            **{f"t2i@{k}": 100.0 * float(np.mean(t2i < k)) for k in ks}}


def check_finite_scores(scores: np.ndarray) -> None:
    """``ShapeError`` when a score matrix holds NaN or Inf: ranking them would give a silently
    wrong recall (NaN sorts last), so the first bad pair is named instead."""
    finite = np.isfinite(scores)
    if not finite.all():
        image, caption = (int(i) for i in np.argwhere(~finite)[0])
        raise ShapeError(f"scores contain NaN or Inf ({int(finite.size - finite.sum())} of {finite.size} pairs; first: "
                         f"image {image}, caption {caption} = {scores[image, caption]}); the model's weights or "
                         "inputs are not finite, or its computation overflowed (fp16?)")


def recall_report(scores: np.ndarray, per_image: int = 5, t2i_scores: np.ndarray | None = None) -> RecallReport:
    """Metrics of a score matrix ``[N_images, N_images * per_image]`` (rows images); with
    ``t2i_scores`` (same shape), image->text ranks come from ``scores`` and text->image ranks
    from ``t2i_scores`` (a shortlist's rankings differ by direction)."""
    matrices = [np.asarray(scores), np.asarray(scores if t2i_scores is None else t2i_scores)]
    for matrix in matrices:
        if matrix.ndim != 2 or matrix.shape[1] != matrix.shape[0] * per_image or matrix.shape != matrices[0].shape:
            raise ShapeError(f"score matrix must be [N, N*{per_image}] (rows images), got {list(matrix.shape)}")
        check_finite_scores(matrix)
    i2t = image_to_text_ranks(matrices[0], per_image)
    t2i = text_to_image_ranks(matrices[1], per_image)
    return RecallReport(
        *_recalls(i2t), float(np.floor(np.median(i2t)) + 1), float(i2t.mean() + 1),
        *_recalls(t2i), float(np.floor(np.median(t2i)) + 1), float(t2i.mean() + 1),
    )


def mean_report(reports: list[RecallReport]) -> RecallReport:
    return RecallReport(**{f.name: float(np.mean([getattr(r, f.name) for r in reports])) for f in fields(RecallReport)})


def _ranks(x: np.ndarray) -> np.ndarray:
    """Rank of every entry along the last axis (0-based; ties get distinct ranks)."""
    return np.argsort(np.argsort(x, axis=-1, kind="stable"), axis=-1, kind="stable").astype(np.float64)


def spearman_rows(reference: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each row of ``scores`` with the same row of ``reference``."""
    if reference.shape != scores.shape or reference.ndim != 2 or reference.shape[1] < 2:
        raise ShapeError(f"need two score matrices of one shape [queries, >=2 items], got "
                         f"{list(reference.shape)} and {list(scores.shape)}")
    a, b = _ranks(reference), _ranks(scores)
    a -= a.mean(-1, keepdims=True)
    b -= b.mean(-1, keepdims=True)
    return (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))


def rank_agreement(reference: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """How well ``scores`` ([images, captions]) preserve the per-query rankings of
    ``reference``: Spearman's rho per query, mean and worst, with images as queries
    (``i2t``, rows) and captions as queries (``t2i``, columns)."""
    i2t, t2i = spearman_rows(reference, scores), spearman_rows(reference.T, scores.T)
    return {"i2t_spearman_mean": float(i2t.mean()), "i2t_spearman_min": float(i2t.min()),
            "t2i_spearman_mean": float(t2i.mean()), "t2i_spearman_min": float(t2i.min())}
