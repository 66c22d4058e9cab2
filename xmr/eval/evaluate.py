"""``xmr eval``: recall of a model on a precomp split."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xmr.data.precomp import PrecompSplit
from xmr.errors import ShapeError
from xmr.eval.metrics import RecallReport, mean_report, recall_report
from xmr.eval.scoring import EncodedSplit, encode_split, score_matrix
from xmr.models.base import RetrievalModel


EVAL_FORMAT = "xmr-eval"  # "format" of the JSON `xmr eval --json` writes


def is_eval_json(path: Path) -> bool:
    """True when ``path`` is metrics JSON ``xmr eval --json`` wrote (with ``format``, or an
    older file with its keys), so it may be replaced."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    if not isinstance(data, dict):
        return False
    return data.get("format") == EVAL_FORMAT or {"checkpoint", "split", "fold5", "metrics"} <= set(data)


@dataclass
class EvalResult:
    report: RecallReport  # on the whole split, or the mean over folds
    folds: list[RecallReport] = field(default_factory=list)
    scores: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"metrics": self.report.to_dict()}
        if self.folds:
            out["folds"] = [f.to_dict() for f in self.folds]
        return out


def evaluate(model: RetrievalModel, split: PrecompSplit, fold5: bool = False, show_progress: bool = True) -> EvalResult:
    """Score every (image, caption) pair of ``split`` and compute R@1/5/10, medr, meanr, rsum.

    ``fold5`` is COCO's 1K protocol: the mean over 5 folds of 1000 images, each scored
    against its own 5000 captions only. A split whose features or vocabulary do not fit the
    model is refused first (``DataError``/``VocabError``); so are NaN scores (``ShapeError``)."""
    split.check_fits(model.config)
    if fold5 and split.n_images % 5:
        raise ShapeError(f"--fold5 needs a number of images divisible by 5, got {split.n_images}")
    encoded = encode_split(model, split, show_progress=show_progress)
    if not fold5:
        scores = score_matrix(model, encoded, show_progress=show_progress)
        return EvalResult(recall_report(scores, split.per_image), [], scores)
    size, per = split.n_images // 5, split.per_image
    folds = []
    for f in range(5):
        fold = EncodedSplit(
            encoded.img_emb[f * size : (f + 1) * size],
            encoded.cap_emb[f * size * per : (f + 1) * size * per],
            encoded.lengths[f * size * per : (f + 1) * size * per],
        )
        folds.append(recall_report(score_matrix(model, fold, show_progress=show_progress), per))
    return EvalResult(mean_report(folds), folds)
