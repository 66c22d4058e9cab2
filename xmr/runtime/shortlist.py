"""The prefilter of two-stage search: each query's ``K`` best gallery items by the inner
product of the prefilter head's unit vectors, and groups of queries whose candidates are
scored together.

The gallery is searched exactly, in blocks (at most ``SIMILARITY_BUDGET`` similarities in
memory at a time, whatever the gallery's size), on the device the vectors live on. The
shortlisted items are then scored by the cross-attention model itself (``Scorer.search``):
the prefilter decides only which items are scored, never a returned score.

For galleries where exact search is too slow (millions of items), ``PrefilterIndex`` is an
inverted-file index (FAISS ``IndexIVFFlat``, inner product; the ``faiss`` extra): each query
searches only the items of its ``probes`` nearest of ``lists`` k-means centroids. A gallery
saves the centroids and each item's list as checked ``.npy`` files, never a FAISS binary
(which C++ would parse from a file that may come from someone else); the inverted lists
are filled from the gallery's vectors when first searched.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

from xmr.errors import InputError

SIMILARITY_BUDGET = 1 << 24  # query x gallery similarities computed at a time
UNION_FACTOR = 1.25  # a group's shared candidates: at most this many times one query's shortlist


POINTS_PER_LIST = 39  # FAISS's minimum of training points per centroid
TRAINING_POINTS_PER_LIST = 64  # k-means trains on at most this many vectors per centroid (a sample)
KMEANS_ITERATIONS = 20
KMEANS_SEED = 1234


class PrefilterIndex:
    """An approximate index over one gallery's prefilter vectors: ``centroids`` (float32
    ``[lists, G]``, unit rows), ``assignment`` (int64 ``[N]``: each item's list, its nearest
    centroid) and ``probes``, the lists each query searches. Built with
    ``PrefilterIndex.train``; the FAISS index is made from these and the vectors on first
    search (copying each vector into its list: no distances computed, about 1 s per million)."""

    def __init__(self, centroids: torch.Tensor, assignment: torch.Tensor, probes: int) -> None:
        self.centroids = centroids
        self.assignment = assignment
        self.probes = probes
        self._built: tuple[torch.Tensor, object, object] | None = None  # (vectors, faiss index, its quantizer)
        self._lock = threading.Lock()

    @property
    def lists(self) -> int:
        return self.centroids.size(0)

    @classmethod
    def train(cls, vectors: torch.Tensor, lists: int | None = None, probes: int | None = None) -> PrefilterIndex:
        """k-means (spherical, seeded, on a sample of at most 64 vectors per centroid) of
        ``vectors [N, G]`` into ``lists`` centroids (default ``4 sqrt(N)``, at most
        ``N / 39``), each vector assigned to its nearest; ``probes`` defaults to ``lists / 8``."""
        faiss = _faiss()
        n = vectors.size(0)
        lists = lists if lists is not None else max(1, min(round(4 * math.sqrt(n)), n // POINTS_PER_LIST))
        if not isinstance(lists, int) or isinstance(lists, bool) or not 1 <= lists <= n:
            raise InputError(f"an index over {n} vectors needs 1 to {n} lists, got {lists!r}")
        probes = probes if probes is not None else max(1, lists // 8)
        points = np.ascontiguousarray(vectors.detach().cpu().numpy(), dtype=np.float32)
        kmeans = faiss.Kmeans(vectors.size(1), lists, niter=KMEANS_ITERATIONS, seed=KMEANS_SEED, spherical=True,
                              max_points_per_centroid=TRAINING_POINTS_PER_LIST)
        kmeans.train(points)
        assignment = kmeans.index.search(points, 1)[1][:, 0]
        index = cls(torch.from_numpy(np.ascontiguousarray(kmeans.centroids, dtype=np.float32)),
                    torch.from_numpy(assignment.astype(np.int64)), probes)
        index.check(vectors, "the trained index")
        return index

    def check(self, vectors: torch.Tensor, where: str) -> None:
        """``InputError`` unless this index fits ``vectors [N, G]``: centroids float32
        ``[lists, G]`` with ``1 <= lists <= N``, finite; assignment int64 ``[N]`` of lists
        ``0 .. lists - 1`` (FAISS trusts them as offsets); ``1 <= probes <= lists``."""
        centroids, assignment = self.centroids, self.assignment
        if (not isinstance(centroids, torch.Tensor) or centroids.dtype != torch.float32 or centroids.dim() != 2
                or centroids.size(1) != vectors.size(1) or not 1 <= centroids.size(0) <= vectors.size(0)):
            raise InputError(f"{where}: its index centroids must be float32 [lists, {vectors.size(1)}] with 1 to "
                             f"{vectors.size(0)} lists, got {getattr(centroids, 'dtype', type(centroids).__name__)} "
                             f"{list(getattr(centroids, 'shape', []))}")
        if not torch.isfinite(centroids).all():
            raise InputError(f"{where}: its index centroids hold NaN or Inf values")
        if (not isinstance(assignment, torch.Tensor) or assignment.dtype != torch.int64
                or list(assignment.shape) != [vectors.size(0)]):
            raise InputError(f"{where}: its index assignment must be int64 [{vectors.size(0)}] (a list per item), "
                             f"got {getattr(assignment, 'dtype', type(assignment).__name__)} "
                             f"{list(getattr(assignment, 'shape', []))}")
        if int(assignment.min()) < 0 or int(assignment.max()) >= self.lists:
            raise InputError(f"{where}: its index assigns items to lists {int(assignment.min())} to "
                             f"{int(assignment.max())}, and it has lists 0 to {self.lists - 1}")
        if not isinstance(self.probes, int) or isinstance(self.probes, bool) or not 1 <= self.probes <= self.lists:
            raise InputError(f"{where}: its index probes must be an integer from 1 to {self.lists} (lists), "
                             f"got {self.probes!r}"[:300])

    def copy(self) -> PrefilterIndex:
        """The same index for another copy of the vectors (its FAISS lists made anew for them)."""
        return PrefilterIndex(self.centroids, self.assignment, self.probes)

    def search(self, queries: torch.Tensor, vectors: torch.Tensor, k: int) -> np.ndarray:
        """``top_candidates`` approximately: each query's ``k`` best among the items of its
        ``probes`` nearest lists; a query whose lists hold fewer than ``k`` items is searched
        exactly instead."""
        index = self._index(vectors)
        index.nprobe = self.probes  # type: ignore[attr-defined]
        found = index.search(np.ascontiguousarray(queries.detach().cpu().numpy()), k)[1]  # type: ignore[attr-defined]
        short = (found < 0).any(axis=1)
        if short.any():
            found[short] = top_candidates(queries[torch.from_numpy(short)], vectors, k)
        return np.sort(found, axis=1)

    def _index(self, vectors: torch.Tensor) -> object:
        """The FAISS index of ``vectors`` in their assigned lists (made once per vectors)."""
        with self._lock:
            if self._built is None or self._built[0] is not vectors:
                faiss = _faiss()
                centroids = np.ascontiguousarray(self.centroids.numpy())
                quantizer = faiss.IndexFlatIP(centroids.shape[1])
                quantizer.add(centroids)
                index = faiss.IndexIVFFlat(quantizer, centroids.shape[1], len(centroids), faiss.METRIC_INNER_PRODUCT)
                index.is_trained = True
                points = np.ascontiguousarray(vectors.detach().cpu().numpy(), dtype=np.float32)
                assignment = np.ascontiguousarray(self.assignment.numpy())  # checked: every list exists
                index.add_core(len(points), faiss.swig_ptr(points), None, faiss.swig_ptr(assignment))
                self._built = (vectors, index, quantizer)  # the quantizer lives as long as the index
            return self._built[1]


def _faiss():  # type: ignore[no-untyped-def]
    try:
        import faiss
    except ImportError as e:
        raise InputError("a prefilter index needs faiss: pip install -e \".[faiss]\" (faiss-cpu), or search "
                         "the gallery exactly (gallery.index = None)") from e
    return faiss


def top_candidates(queries: torch.Tensor, gallery: torch.Tensor, k: int,
                   index: PrefilterIndex | None = None) -> np.ndarray:
    """int64 ``[Q, min(k, N)]``: the gallery rows with the largest inner products with each
    query row (``queries [Q, G]``, ``gallery [N, G]``), each row's indices ascending; with an
    ``index``, approximately (``PrefilterIndex.search``)."""
    k = min(k, gallery.size(0))
    if index is not None:
        return index.search(queries, gallery, k)
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
