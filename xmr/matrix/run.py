"""Scoring a job's tiles: in this process, or on Ray actors (``ray_pool``).

Both encode each gallery once (here; on Ray by one actor, then shared through the object
store) and score every tile with one ``Scorer.score`` call on the tile's slices of the
galleries, so both give the same numbers for the same backend and precision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xmr.data.precomp import load_features, read_captions
from xmr.errors import InputError
from xmr.matrix.job import MatrixJob, MatrixOutput
from xmr.matrix.tiles import QueryRows, Tile, plan_query_rows, plan_tiles
from xmr.models.checkpoint import load_checkpoint
from xmr.progress import progress
from xmr.runtime import Scorer, TorchBackend
from xmr.runtime.artifacts import Artifacts
from xmr.runtime.gallery import ImageGallery, TextGallery
from xmr.runtime.inputs import positive_int


@dataclass(frozen=True)
class CheckpointSpec:
    """A scorer over a checkpoint's PyTorch model (what ``xmr eval`` scores with), for Ray actors."""

    checkpoint: str
    regions: int
    max_length: int
    device: str = "cpu"

    def load(self, threads: int | None = None) -> Scorer:
        if threads is not None:
            torch.set_num_threads(threads)
        net = load_checkpoint(self.checkpoint, map_location=self.device)
        return Scorer(TorchBackend.from_model(net, self.regions), max_length=self.max_length)


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a Ray run is: ``address`` a running cluster (None: a local one)."""

    address: str | None = None
    workers: int | None = None

    def __post_init__(self) -> None:
        if self.workers is not None:
            positive_int(self.workers, "workers")


Rectangle = tuple[tuple[int, int], tuple[int, int]]  # [start, stop) of images, of captions


def matrix_scores(spec: Any, features: np.ndarray, captions: Any, rectangles: list[Rectangle], ray: RayOptions,
                  tile_images: int = 512, tile_captions: int = 2048, show_progress: bool = True) -> np.ndarray:
    """float32 scores ``[len(features), len(captions)]`` over ``rectangles`` ((image range,
    caption range) pairs; NaN elsewhere), in tiles on Ray with ``spec.load(threads)`` scorers."""
    from xmr.matrix.ray_pool import score_on_ray

    scores = np.full((len(features), _count(captions)), np.nan, dtype=np.float32)
    tiles: list[Tile] = []
    for (i0, i1), (c0, c1) in rectangles:
        tiles += plan_tiles(i1 - i0, c1 - c0, tile_images, tile_captions, origin=(i0, c0), first=len(tiles))
    with progress(show_progress) as bar:
        task = bar.add_task("score tiles on Ray", total=len(tiles), info="")

        def record(tile: Tile, block: np.ndarray) -> None:
            scores[slice(*tile.images), slice(*tile.captions)] = block
            bar.advance(task)

        score_on_ray(spec, np.asarray(features), captions, tiles, record, ray.address, ray.workers)
    return scores


@dataclass
class Shortlists:
    """Both directions' shortlists from Ray: the prefilter similarities ``[Ni, Nt]``, per
    direction the candidates and their exact scores ``[queries, K]``, and the pairs scored."""

    similarities: np.ndarray
    i2t: tuple[np.ndarray, np.ndarray]
    t2i: tuple[np.ndarray, np.ndarray]
    pairs_scored: int


def shortlists_on_ray(spec: Any, features: np.ndarray, captions: Any, k: int, ray: RayOptions, per_task: int = 1024,
                      show_progress: bool = True) -> Shortlists:
    """The two-stage protocol's rescoring (``Scorer.shortlisted`` both ways) in tasks of
    ``per_task`` queries on Ray actors; galleries encoded once, as for tiles."""
    from xmr.matrix.ray_pool import score_on_ray

    tasks = plan_query_rows(len(features), _count(captions), k, per_task)
    found: dict[str, dict[int, Any]] = {"i2t": {}, "t2i": {}}
    with progress(show_progress) as bar:
        task = bar.add_task("rescore shortlists on Ray", total=len(tasks), info="")

        def record(rows: QueryRows, result: Any) -> None:
            found[rows.direction][rows.rows[0]] = result
            bar.advance(task)

        vectors = score_on_ray(spec, np.asarray(features), captions, tasks, record, ray.address, ray.workers,
                               vectors=True)
    if vectors is None or vectors[0] is None or vectors[1] is None:
        raise InputError("a shortlist needs a prefilter head, and this model has none; add one with "
                         "`xmr distill CHECKPOINT`")
    joined = {d: [found[d][start] for start in sorted(found[d])] for d in found}
    return Shortlists((vectors[0] @ vectors[1].T).float().cpu().numpy(),
                      *(tuple(np.concatenate([r[i] for r in joined[d]]) for i in (0, 1)) for d in ("i2t", "t2i")),
                      sum(r[2] for d in joined for r in joined[d]))


def _count(captions: Any) -> int:
    """Captions in raw strings or ``(ids, lengths)``."""
    return len(captions[1]) if isinstance(captions, tuple) else len(captions)


def score_tile(scorer: Scorer, images: ImageGallery, texts: TextGallery, tile: Tile) -> np.ndarray:
    """float32 scores of ``tile``: its images against its captions."""
    return scorer.score(images.select(np.arange(*tile.images)), texts.select(np.arange(*tile.captions)))


def score_matrix(job: MatrixJob, out: Path, *, ray: RayOptions | None = None, overwrite: bool = False,
                 show_progress: bool = True, after_tile: Callable[[Tile], None] = lambda tile: None) -> dict[str, Any]:
    """Score ``job`` into ``out`` (``job.MatrixOutput``), skipping tiles an earlier run of the
    same job recorded; on Ray when ``ray`` is given. Returns the job header with ``tiles``,
    ``skipped`` and ``scored``."""
    job.validate()
    artifacts = Artifacts.open(job.artifacts)
    features, captions = load_features(Path(job.images)), read_captions(Path(job.captions))
    tiles = plan_tiles(len(features), len(captions), job.tile_images, job.tile_captions)
    output = MatrixOutput(out, job, job.fingerprint(artifacts.identity), (len(features), len(captions)), overwrite)
    done = output.done(tiles)
    todo = [t for t in tiles if t.index not in done]
    with progress(show_progress) as bar:
        task = bar.add_task("score tiles", total=len(tiles), completed=len(done), info=f"{len(done)} resumed")

        def record(tile: Tile, scores: np.ndarray) -> None:
            output.write(tile, scores)
            bar.advance(task)
            after_tile(tile)

        if todo and ray is not None:
            from xmr.matrix.ray_pool import score_on_ray

            score_on_ray(job, np.asarray(features), captions, todo, record, ray.address, ray.workers)
        elif todo:
            scorer = job.load()
            images, texts = scorer.encode_images(features), scorer.encode_texts(captions)
            for tile in todo:
                record(tile, score_tile(scorer, images, texts, tile))
    header = output.finish(tiles)
    return {**header, "tiles": len(tiles), "skipped": len(done), "scored": len(todo)}
