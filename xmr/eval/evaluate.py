"""``xmr eval``: recall of a model on a precomp split, scored through the runtime.

Every score xmr reports (this recall, training's dev recall, INT8's accuracy gate and report,
serve-bench's recall per row) comes from ``split_scores``: a ``Scorer`` over some backend —
the PyTorch model in memory here (``TorchBackend.from_model``), graph files for calibration,
exported artifacts for serving — so they share one planner, one executor and one masking."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xmr.data.precomp import PrecompSplit
from xmr.errors import ConfigError, ShapeError
from xmr.eval.metrics import RecallReport, mean_report, recall_report
from xmr.models.base import RetrievalModel
from xmr.matrix.run import CheckpointSpec, RayOptions, Rectangle, matrix_scores
from xmr.runtime import Scorer, TorchBackend


EVAL_FORMAT = "xmr-eval"  # "format" of the JSON `xmr eval --json` writes


def is_eval_json(path: Path) -> bool:
    """True when ``path`` is metrics JSON ``xmr eval --json`` wrote (with ``format``, or an
    older file with its keys), so it may be replaced."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and (data.get("format") == EVAL_FORMAT
                                       or {"checkpoint", "split", "fold5", "metrics"} <= set(data))


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


def split_scores(scorer: Scorer, split: PrecompSplit, n_images: int | None = None, show_progress: bool = False,
                 description: str = "score") -> np.ndarray:
    """float32 scores ``[Ni, Nt]`` of the first ``n_images`` images of ``split`` (all by
    default) and their captions (tokenised by the data loader), each item encoded once."""
    n_images = min(n_images or split.n_images, split.n_images)
    images = scorer.encode_images(np.asarray(split.features[:n_images]), show_progress=show_progress)
    texts = scorer.encode_texts(split.caption_batch(range(n_images * split.per_image)), show_progress=show_progress)
    return scorer.score(images, texts, show_progress=show_progress, description=description)


def longest_caption(split: PrecompSplit) -> int:
    """Tokens of ``split``'s longest caption (at least 3: ``<start>``, a word, ``<end>``)."""
    return max(3, max(len(split.caption_ids(i)) for i in range(split.n_captions)))  # tokenised once, cached


def checkpoint_spec(checkpoint: Path, split: PrecompSplit, device: str) -> CheckpointSpec:
    """What a Ray actor loads to score ``split`` as ``model_scorer`` does: ``checkpoint``'s model."""
    return CheckpointSpec(str(checkpoint), split.regions, longest_caption(split), device)


def model_scorer(model: RetrievalModel, split: PrecompSplit) -> Scorer:
    """A scorer over the in-memory ``model`` for ``split``'s images, taking its longest caption."""
    return Scorer(TorchBackend.from_model(model, split.regions), max_length=longest_caption(split))


def evaluate(model: RetrievalModel, split: PrecompSplit, fold5: bool = False, show_progress: bool = True,
             ray: RayOptions | None = None, checkpoint: Path | None = None) -> EvalResult:
    """Score every (image, caption) pair of ``split`` and compute R@1/5/10, medr, meanr, rsum.

    ``fold5`` is COCO's 1K protocol: the mean over 5 folds of 1000 images, each scored
    against its own 5000 captions only. A split whose features or vocabulary do not fit the
    model is refused first (``DataError``/``VocabError``); so are NaN scores (``ShapeError``).
    ``ray``: the score matrix in tiles on Ray actors, each loading ``checkpoint`` (``model``'s)."""
    split.check_fits(model.config)
    if fold5 and split.n_images % 5:
        raise ShapeError(f"--fold5 needs a number of images divisible by 5, got {split.n_images}")
    if ray is not None:
        return _evaluate_on_ray(model, split, fold5, ray, checkpoint, show_progress)
    scorer = model_scorer(model, split)
    if not fold5:
        scores = split_scores(scorer, split, show_progress=show_progress)
        return EvalResult(recall_report(scores, split.per_image), [], scores)
    images = scorer.encode_images(np.asarray(split.features), show_progress=show_progress)
    texts = scorer.encode_texts(split.caption_batch(range(split.n_captions)), show_progress=show_progress)
    folds = [recall_report(scorer.score(images.select(np.arange(*fold_images)), texts.select(np.arange(*fold_texts)),
                                        show_progress=show_progress), split.per_image)
             for fold_images, fold_texts in score_blocks(split, fold5)]
    return EvalResult(mean_report(folds), folds)


def score_blocks(split: PrecompSplit, fold5: bool) -> list[Rectangle]:
    """The (image range, caption range) blocks ``evaluate`` scores: the whole split, or with
    ``fold5`` COCO's 5 folds, each its images and their own captions."""
    n, per = split.n_images, split.per_image
    size = n // 5 if fold5 else n
    return [((f * size, (f + 1) * size), (f * size * per, (f + 1) * size * per)) for f in range(n // size)]


def _evaluate_on_ray(model: RetrievalModel, split: PrecompSplit, fold5: bool, ray: RayOptions,
                     checkpoint: Path | None, show_progress: bool) -> EvalResult:
    """``evaluate`` with the score matrix (the folds' blocks with ``fold5``) from Ray actors."""
    if checkpoint is None:
        raise ConfigError("evaluating on Ray needs the checkpoint's path: each actor loads it")
    spec = checkpoint_spec(checkpoint, split, str(next(model.parameters()).device))
    blocks = score_blocks(split, fold5)
    scores = matrix_scores(spec, np.asarray(split.features), split.caption_batch(range(split.n_captions)), blocks, ray,
                           show_progress=show_progress)
    reports = [recall_report(scores[slice(*images), slice(*captions)], split.per_image) for images, captions in blocks]
    if not fold5:
        return EvalResult(reports[0], [], scores)
    return EvalResult(mean_report(reports), reports)
