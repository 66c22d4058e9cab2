"""``xmr score-matrix``: every (image, caption) score of two galleries, in tiles, in one process
or on a Ray cluster, resumable, with the same numbers either way (docs/distributed.md)."""

from xmr.matrix.job import MatrixJob
from xmr.matrix.run import score_matrix

__all__ = ["MatrixJob", "score_matrix"]
