"""Evaluation: retrieval metrics and block-wise scoring of whole splits."""

from xmr.eval.evaluate import EvalResult, evaluate
from xmr.eval.metrics import RecallReport, recall_report
from xmr.eval.scoring import EncodedSplit, encode_split, score_matrix

__all__ = ["EncodedSplit", "EvalResult", "RecallReport", "encode_split", "evaluate", "recall_report", "score_matrix"]
