"""Exact against indexed prefilter search for large galleries: time per query and the share
of the exact shortlist the index finds (``Gallery.with_index``, FAISS IVF-Flat).

The vectors are synthetic (no dataset here has millions of items): unit vectors of
``--dim`` around ``--clusters`` random centres (``--noise`` apart), the queries perturbed gallery items (a
caption near its image). Recall here is the overlap with the exact top-K, which is what
the index can cost two-stage search; what that costs in rsum depends on the model.

    python bench/prefilter_index.py --json docs/results/prefilter_index.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from results import write_results
from xmr.runtime.shortlist import PrefilterIndex, top_candidates

console = Console(width=140)


def unit(x: np.ndarray) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.from_numpy(x.astype(np.float32)), dim=1)


def vectors(n: int, dim: int, clusters: int, noise: float, queries: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    gallery = unit(centres[rng.integers(clusters, size=n)] + noise * rng.normal(size=(n, dim)))
    picked = gallery[torch.from_numpy(rng.integers(n, size=queries))].numpy()
    return gallery, unit(picked + 0.05 * rng.normal(size=picked.shape))


def per_query_ms(search, queries: torch.Tensor, batch: int) -> float:
    search(queries[:batch])  # warm
    started = time.perf_counter()
    for start in range(0, len(queries), batch):
        search(queries[start : start + batch])
    return 1000 * (time.perf_counter() - started) / len(queries)


def row(n: int, args: argparse.Namespace) -> dict[str, Any]:
    gallery, queries = vectors(n, args.dim, args.clusters, args.noise, args.queries)
    k = args.k
    exact = top_candidates(queries, gallery, k)
    out: dict[str, Any] = {"items": n, "dim": args.dim, "k": k, "queries": args.queries, "exact": {
        f"ms_per_query_batch_{b}": per_query_ms(lambda q: top_candidates(q, gallery, k), queries, b) for b in args.batches}}
    started = time.perf_counter()
    index = PrefilterIndex.train(gallery)
    out["index"] = {"lists": index.lists, "train_seconds": time.perf_counter() - started, "probes": []}
    started = time.perf_counter()
    index.search(queries[:1], gallery, k)
    out["index"]["build_seconds"] = time.perf_counter() - started  # filling the lists, as after loading
    for probes in (index.probes // 2, index.probes, 2 * index.probes):
        probed = PrefilterIndex(index.centroids, index.assignment, probes)
        found = probed.search(queries, gallery, k)
        overlap = float(np.mean([len(np.intersect1d(a, b)) for a, b in zip(found, exact)]) / k)
        out["index"]["probes"].append({"probes": probes, "recall_of_exact_top_k": overlap, **{
            f"ms_per_query_batch_{b}": per_query_ms(lambda q: probed.search(q, gallery, k), queries, b)
            for b in args.batches}})
    return out


def show(rows: list[dict[str, Any]], batches: list[int]) -> None:
    table = Table(title="prefilter top-K: exact (blocked inner products) vs IVF-Flat index")
    for name in ("items", "search", "recall of exact top-K", *[f"ms/query, {b} at a time" for b in batches]):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(f"{r['items']:,}", "exact", "1.000", *[f"{r['exact'][f'ms_per_query_batch_{b}']:.2f}" for b in batches])
        for p in r["index"]["probes"]:
            table.add_row("", f"index {p['probes']}/{r['index']['lists']} lists", f"{p['recall_of_exact_top_k']:.3f}",
                          *[f"{p[f'ms_per_query_batch_{b}']:.2f}" for b in batches])
        table.add_row("", f"(train {r['index']['train_seconds']:.1f} s, lists {r['index']['build_seconds']:.1f} s)", "",
                      *[""] * len(batches))
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.5, help="spread of a cluster (its centre's norm: 1 per dim)")
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = [row(n, args) for n in args.items]
    show(rows, args.batches)
    if args.json:
        write_results(args.json, rows, ("torch", "numpy", "faiss"))


if __name__ == "__main__":
    main()
