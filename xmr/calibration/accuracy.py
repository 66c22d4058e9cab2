"""What a lower precision costs: recall, score error and rank agreement against fp32."""

from __future__ import annotations

import numpy as np

from xmr.eval.metrics import rank_agreement, recall_report

RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def accuracy(scores: np.ndarray, reference: np.ndarray, per_image: int) -> dict[str, float]:
    """R@K both ways and rsum of ``scores``, their change against ``reference`` (fp32),
    mean and max absolute score error, and per-query Spearman agreement."""
    recall, base = recall_report(scores, per_image).to_dict(), recall_report(reference, per_image).to_dict()
    error = np.abs(scores.astype(np.float64) - reference)
    return {**{k: recall[k] for k in RECALL_KEYS}, **{f"delta_{k}": recall[k] - base[k] for k in RECALL_KEYS},
            "mean_abs_score_error": float(error.mean()), "max_abs_score_error": float(error.max()),
            **rank_agreement(reference, scores)}


def mean_rank_agreement(metrics: dict[str, float]) -> float:
    """The worse of the two directions' mean per-query Spearman correlation."""
    return min(metrics["i2t_spearman_mean"], metrics["t2i_spearman_mean"])


def meets_target(metrics: dict[str, float], target: float) -> bool:
    """rsum at least ``target`` x fp32's and mean per-query rank correlation at least ``target``."""
    fp32_rsum = metrics["rsum"] - metrics["delta_rsum"]
    return metrics["rsum"] >= target * fp32_rsum and mean_rank_agreement(metrics) >= target
