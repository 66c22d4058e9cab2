"""Evaluation: retrieval metrics, and recall of a model or scorer on a split (scored by the runtime)."""

from xmr.eval.evaluate import EVAL_FORMAT, EvalResult, evaluate, is_eval_json, model_scorer, split_scores
from xmr.eval.metrics import RecallReport, rank_agreement, recall_report

__all__ = ["EVAL_FORMAT", "EvalResult", "RecallReport", "evaluate", "is_eval_json", "model_scorer", "rank_agreement",
           "recall_report", "split_scores"]
