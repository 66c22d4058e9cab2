"""The prefilter of two-stage search: each query's ``K`` best gallery items by the inner
product of the prefilter head's unit vectors, and groups of queries whose candidates are
scored together.

The gallery is searched exactly, in blocks (at most ``SIMILARITY_BUDGET`` similarities in
memory at a time, whatever the gallery's size), on the device the vectors live on. The
shortlisted items are then scored by the cross-attention model itself (``Scorer.search``):
the prefilter decides only which items are scored, never a returned score.
"""

from __future__ import annotations

import numpy as np
import torch

SIMILARITY_BUDGET = 1 << 24  # query x gallery similarities computed at a time
UNION_FACTOR = 1.25  # a group's shared candidates: at most this many times one query's shortlist


def top_candidates(queries: torch.Tensor, gallery: torch.Tensor, k: int) -> np.ndarray:
    """int64 ``[Q, min(k, N)]``: the gallery rows with the largest inner products with each
    query row (``queries [Q, G]``, ``gallery [N, G]``), each row's indices ascending."""
    k = min(k, gallery.size(0))
    if queries.device.type == "cpu" and queries.size(0) * gallery.size(0) <= SIMILARITY_BUDGET:
        return _top_on_cpu(queries.numpy(), gallery.numpy(), k)
    block = max(k, SIMILARITY_BUDGET // max(1, queries.size(0)))
    best_scores = torch.empty(queries.size(0), 0, device=queries.device)
    best_index = torch.empty(queries.size(0), 0, dtype=torch.int64, device=queries.device)
    for start in range(0, gallery.size(0), block):
        scores = queries @ gallery[start : start + block].T
        index = torch.arange(start, start + scores.size(1), device=queries.device).expand_as(scores)
        best_scores, chosen = torch.cat([best_scores, scores], 1).topk(k, dim=1)
        best_index = torch.cat([best_index, index], 1).gather(1, chosen)
    return np.sort(best_index.cpu().numpy(), axis=1)


def _top_on_cpu(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    """``top_candidates`` in one block with numpy (an online query: a fraction of a millisecond
    where torch's matrix product and top-k cost milliseconds of thread start-up)."""
    scores = queries @ gallery.T
    if k == scores.shape[1]:
        return np.broadcast_to(np.arange(k), scores.shape).copy()
    return np.sort(np.argpartition(-scores, k - 1, axis=1)[:, :k], axis=1)


def candidate_groups(candidates: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Queries whose candidates are scored in one call: ``(query indices, the union of their
    candidates, ascending)`` per group, every query in exactly one. Queries are taken in the
    order of their sorted candidate lists, so queries that share candidates sit together; a
    group grows while its union stays within ``UNION_FACTOR`` shortlists, so a call scores at
    most that many times the pairs asked for (a query alone: exactly its own)."""
    order = np.lexsort(candidates.T[::-1])  # rows sorted by their candidate lists
    limit = int(UNION_FACTOR * candidates.shape[1])
    groups, members, union = [], [], np.empty(0, dtype=np.int64)
    for query in order.tolist():
        grown = np.union1d(union, candidates[query])
        if members and len(grown) > limit:
            groups.append((np.asarray(members), union))
            members, grown = [], candidates[query]
        members.append(query)
        union = grown
    groups.append((np.asarray(members), union))
    return groups
