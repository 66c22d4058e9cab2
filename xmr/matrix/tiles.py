"""How a score matrix is cut into tiles, and the top-K of rows and columns merged across tiles.

A tile is a rectangle of images x captions that one worker scores in one ``Scorer.score``
call; tiles are numbered row-major. Every run of a job — one process or many Ray actors —
scores the same tiles of the same encoded galleries, which is what makes their results
equal. Top-K: ties go to the lower index (a stable sort), in a tile and across tiles, so
the merged top-K equals the top-K of the whole row or column.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tile:
    index: int
    images: tuple[int, int]  # [start, stop)
    captions: tuple[int, int]

    @property
    def name(self) -> str:
        return f"{self.index:06d}"


def plan_tiles(n_images: int, n_captions: int, tile_images: int, tile_captions: int,
               origin: tuple[int, int] = (0, 0), first: int = 0) -> list[Tile]:
    """The tiles of an ``n_images x n_captions`` matrix (or of that rectangle starting at
    ``origin`` in a larger one), row-major, numbered from ``first``."""
    (i0, c0), tiles = origin, []
    for i in range(0, n_images, tile_images):
        for c in range(0, n_captions, tile_captions):
            tiles.append(Tile(first + len(tiles), (i0 + i, i0 + min(i + tile_images, n_images)),
                              (c0 + c, c0 + min(c + tile_captions, n_captions))))
    return tiles


@dataclass
class TopK:
    """Per row, the K best columns: ``indices`` int64 ``[n, K]`` and ``scores`` float32 ``[n, K]``, best first."""

    indices: np.ndarray
    scores: np.ndarray


def top_k(scores: np.ndarray, k: int, offset: int = 0) -> TopK:
    """The ``k`` best of each row of ``scores`` (ties: lower column first); column indices + ``offset``."""
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return TopK((order + offset).astype(np.int64), np.take_along_axis(scores, order, axis=1).astype(np.float32))


def merge_top_k(parts: list[TopK], k: int) -> TopK:
    """The top-``k`` of rows whose candidates come in ``parts`` of ascending column ranges."""
    indices = np.concatenate([p.indices for p in parts], axis=1)
    scores = np.concatenate([p.scores for p in parts], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # equal scores keep their order: lower index first
    return TopK(np.take_along_axis(indices, order, axis=1), np.take_along_axis(scores, order, axis=1))


@dataclass(frozen=True)
class QueryRows:
    """Queries ``rows`` [start, stop) of one direction (``i2t``: images ask for captions,
    ``t2i``: captions ask for images), each rescoring its ``k`` best by the prefilter."""

    index: int
    direction: str
    rows: tuple[int, int]
    k: int

    @property
    def name(self) -> str:
        return f"{self.index:06d}"


def plan_query_rows(n_images: int, n_captions: int, k: int, per_task: int) -> list[QueryRows]:
    """Both directions' queries in tasks of ``per_task`` queries."""
    tasks: list[QueryRows] = []
    for direction, n in (("i2t", n_images), ("t2i", n_captions)):
        for start in range(0, n, per_task):
            tasks.append(QueryRows(len(tasks), direction, (start, min(start + per_task, n)), k))
    return tasks
