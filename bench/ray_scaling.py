"""Scaling of ``xmr score-matrix`` on Ray: the same matrix in one process, on 1 and on 2 Ray
workers (wall time, pairs/s, efficiency; every output checked equal to the one-process one),
and a cost model for N GPUs (a model, not a measurement).

    python bench/ray_scaling.py --artifacts runs/shortlist-curve/prefilter-imram \\
        --images data/synth/test_ims.npy --captions data/synth/test_caps.txt \\
        --json docs/results/ray_scaling.json

Wall time includes starting the local cluster, loading a Scorer per actor and encoding the
galleries, as a user's command does. Two workers on a 2-core machine split the same cores
(1 thread each against 1 worker's 2 threads): the efficiency measured here is what the
actor machinery costs, not what a second machine adds.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from results import write_results
from xmr.matrix import MatrixJob, score_matrix
from xmr.matrix.run import RayOptions
from xmr.matrix.tiles import plan_tiles

console = Console(width=140)


def measure(job: MatrixJob, root: Path, workers: int | None) -> dict[str, Any]:
    out = root / ("one-process" if workers is None else f"ray-{workers}")
    started = time.perf_counter()
    result = score_matrix(job, out, ray=None if workers is None else RayOptions(workers=workers), show_progress=False)
    seconds = time.perf_counter() - started
    pairs = result["shape"][0] * result["shape"][1]
    return {"run": out.name, "workers": workers, "tiles": result["tiles"], "seconds": seconds,
            "pairs_per_s": pairs / seconds, "scores": np.load(out / "scores.npy")}


@dataclass(frozen=True)
class Fleet:
    """What the cost model assumes of N GPUs (arguments; none measured here)."""

    pairs_per_gpu: float  # pair scores per second per GPU (``xmr serve-bench`` on that GPU)
    link_gb_s: float = 12.5  # bytes per second into and out of a node (100 Gb/s), GB/s
    tile_overhead_s: float = 0.005  # Ray scheduling and result hand-off per tile
    startup_s: float = 20.0  # cluster connect, actor start, engine load


def gallery_bytes(n_images: int, n_captions: int, regions: int = 36, dim: int = 1024, words: float = 14.0) -> float:
    """fp32 bytes of IMRAM's prepared galleries at the released sizes: three [R, D] tensors per
    image, three [L, D] per caption (the fast form, docs/scoring.md)."""
    return 4 * 3 * dim * (n_images * regions + n_captions * words)


def model_time(fleet: Fleet, gpus: int, pairs: float, tiles: int, result_bytes: float, broadcast_bytes: float) -> float:
    """Seconds for ``pairs`` in ``tiles`` equal tiles on ``gpus`` GPUs: startup, every node
    pulling the galleries once, waves of tiles (a tile's pairs on one GPU), results to the driver."""
    waves = math.ceil(tiles / gpus)
    tile_s = pairs / tiles / fleet.pairs_per_gpu + fleet.tile_overhead_s
    return fleet.startup_s + broadcast_bytes / (fleet.link_gb_s * 1e9) + waves * tile_s + \
        result_bytes / (fleet.link_gb_s * 1e9)


def coco_model(fleet: Fleet, shortlist: int = 128) -> list[dict[str, Any]]:
    n_images, n_captions = 5000, 25000
    tiles = len(plan_tiles(n_images, n_captions, 512, 2048))
    rows = []
    for gpus in (1, 8, 64):
        exhaustive = model_time(fleet, gpus, n_images * n_captions, tiles, 4 * n_images * n_captions,  # the full matrix
                                gallery_bytes(n_images, n_captions))
        pairs = (n_images + n_captions) * shortlist  # each query's shortlist, both ways, in 4 waves per GPU
        short = model_time(fleet, gpus, pairs, 4 * gpus, (n_images + n_captions) * 10 * 12,  # top-10 back
                           gallery_bytes(n_images, n_captions))
        rows.append({"gpus": gpus, "exhaustive_s": exhaustive, "shortlist_s": short, "tiles": tiles,
                     "shortlist_pairs": pairs})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--captions", type=Path, required=True)
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--tile-images", type=int, default=128)
    parser.add_argument("--tile-captions", type=int, default=1024)
    parser.add_argument("--gpu-pairs-per-s", type=float, default=1.0e6,
                        help="the cost model's pairs/s per GPU (an assumption unless measured with serve-bench)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    job = MatrixJob(str(args.artifacts), str(args.images), str(args.captions), backend=args.backend,
                    tile_images=args.tile_images, tile_captions=args.tile_captions)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [measure(job, Path(tmp), workers) for workers in (None, 1, 2)]
    table = Table(title=f"xmr score-matrix, {runs[0]['scores'].shape[0]} x {runs[0]['scores'].shape[1]} pairs, "
                        f"{runs[0]['tiles']} tiles")
    for name in ("run", "seconds", "pairs/s", "equal to one process"):
        table.add_column(name, justify="right")
    for run in runs:
        run["equal"] = bool(np.array_equal(run["scores"], runs[0]["scores"]))
        table.add_row(run["run"], f"{run['seconds']:.1f}", f"{run['pairs_per_s']:,.0f}", str(run["equal"]))
    console.print(table)
    efficiency = runs[2]["pairs_per_s"] / (2 * runs[1]["pairs_per_s"])
    console.print(f"2 workers / (2 x 1 worker): {efficiency:.2f}")
    fleet = Fleet(args.gpu_pairs_per_s)
    model = coco_model(fleet)
    cost = Table(title=f"cost model, COCO 5K (5,000 x 25,000), {fleet.pairs_per_gpu:,.0f} pairs/s per GPU (assumed)")
    for name in ("GPUs", "exhaustive (125 M pairs)", "shortlist 128 (3.84 M pairs)"):
        cost.add_column(name, justify="right")
    for row in model:
        cost.add_row(str(row["gpus"]), f"{row['exhaustive_s']:.0f} s", f"{row['shortlist_s']:.0f} s")
    console.print(cost)
    if args.json:
        rows = [{k: v for k, v in run.items() if k != "scores"} for run in runs]
        write_results(args.json, rows + [{"efficiency_2_workers": efficiency},
                                         {"cost_model": {"fleet": fleet.__dict__, "coco_5k": model}}], ("ray",))


if __name__ == "__main__":
    main()
