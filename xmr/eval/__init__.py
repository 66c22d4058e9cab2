"""Evaluation: retrieval metrics and block-wise scoring of whole splits."""

from xmr.eval.evaluate import EVAL_FORMAT, EvalResult, evaluate, is_eval_json
from xmr.eval.metrics import RecallReport, recall_report
from xmr.eval.scoring import EncodedSplit, encode_split, score_matrix

__all__ = ["EVAL_FORMAT", "EncodedSplit", "EvalResult", "RecallReport", "encode_split", "evaluate", "is_eval_json", "recall_report",
           "score_matrix"]
