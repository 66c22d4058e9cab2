"""A score-matrix job and its output directory: what to score, where results land, what is done.

    OUT/job.json             the job, its fingerprint, the matrix shape, whether it is complete
    OUT/scores.npy           float32 [n_images, n_captions] (memory-mapped; without top_k)
    OUT/i2t_indices.npy ...  with top_k: per image the K best captions (i2t_*), per caption
                             the K best images (t2i_*), int64 indices and float32 scores
    OUT/tiles/NNNNNN.done    a tile written into scores.npy (full matrix)
    OUT/tiles/NNNNNN.npz     a tile's top-K of its rows and columns (top_k)

A tile is recorded only after its results are on disk (flushed, then the marker renamed
into place), so a run killed at any moment resumes from what is recorded. Rerunning the same
job (same fingerprint: artifacts' weights, inputs' sha256, backend, precision, top-K, tiles)
skips recorded tiles; a different job into the same directory is refused unless overwritten.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xmr.errors import InputError, OutputError
from xmr.matrix.tiles import Tile, TopK, merge_top_k, top_k
from xmr.outputs import check_output_dir, write_file, write_text
from xmr.paths import file_sha256
from xmr.runtime import Scorer
from xmr.runtime.inputs import positive_int

FORMAT = "xmr-score-matrix"
JOB, SCORES, TILES = "job.json", "scores.npy", "tiles"
TOP_K_FILES = ("i2t_indices", "i2t_scores", "t2i_indices", "t2i_scores")


@dataclass(frozen=True)
class MatrixJob:
    """What ``xmr score-matrix`` scores, and how the matrix is cut."""

    artifacts: str
    images: str  # region features .npy [N, R, img_dim]
    captions: str  # one caption per line
    backend: str = "auto"
    precision: str = "fp32"
    device: str | None = None
    top_k: int | None = None  # None: the full matrix
    tile_images: int = 512
    tile_captions: int = 2048

    def validate(self) -> None:
        for name in ("tile_images", "tile_captions"):
            positive_int(getattr(self, name), name.replace("_", "-"))
        if self.top_k is not None:
            positive_int(self.top_k, "top-k")
        for name, suffix in (("images", ".npy"), ("captions", ".txt")):
            path = Path(getattr(self, name))
            if not (path.is_file() and path.suffix == suffix):
                raise InputError(f"--{name} {path}: not a {suffix} file")

    def load(self, threads: int | None = None) -> Scorer:
        """The job's scorer (``threads``: CPU threads, None: every core this process may use)."""
        return Scorer.load(self.artifacts, backend=self.backend, precision=self.precision, device=self.device,
                           threads=threads)

    def fingerprint(self, identity: str) -> str:
        """What makes two runs' tiles interchangeable: the weights, the inputs' bytes, and how they are scored."""
        digest = hashlib.sha256()
        for part in (identity, file_sha256(self.images), file_sha256(self.captions), self.backend, self.precision,
                     str(self.device), str(self.top_k), str(self.tile_images), str(self.tile_captions)):
            digest.update(part.encode() + b"\0")
        return digest.hexdigest()


def is_matrix_output(path: Path) -> bool:
    try:
        return json.loads((path / JOB).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class MatrixOutput:
    """The output directory of one job: opened (new or resumed), written tile by tile, finished."""

    def __init__(self, out: Path, job: MatrixJob, fingerprint: str, shape: tuple[int, int], overwrite: bool) -> None:
        self.out, self.job, self.shape = Path(out), job, shape
        check_output_dir(self.out, is_matrix_output, overwrite, "score-matrix output")
        record = self._record()
        if record is not None and record.get("fingerprint") != fingerprint:
            if not overwrite:
                raise OutputError(f"{self.out} holds another score-matrix job (other inputs, weights or settings); "
                                  f"choose another --out or pass --overwrite to start over")
            record = None
        if record is None:
            self._reset()
        self.header = {"format": FORMAT, "job": asdict(job), "fingerprint": fingerprint, "shape": list(shape),
                       "complete": False}
        write_text(self.out / JOB, json.dumps(self.header, indent=2) + "\n")
        self.scores = None
        if job.top_k is None:
            path = self.out / SCORES
            mode = "r+" if path.is_file() else "w+"
            self.scores = np.lib.format.open_memmap(path, mode=mode, dtype=np.float32, shape=shape)
            if self.scores.shape != shape or self.scores.dtype != np.float32:
                raise OutputError(f"{path} is not a float32 {shape} matrix; pass --overwrite to start over")

    def _record(self) -> dict[str, Any] | None:
        try:
            record = json.loads((self.out / JOB).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _reset(self) -> None:
        """Remove what an earlier job of this directory left (xmr's own files only)."""
        for name in (SCORES, *(f"{n}.npy" for n in TOP_K_FILES)):
            (self.out / name).unlink(missing_ok=True)
        shutil.rmtree(self.out / TILES, ignore_errors=True)
        (self.out / TILES).mkdir(parents=True)

    def done(self, tiles: list[Tile]) -> set[int]:
        """Indices of ``tiles`` already recorded."""
        suffix = ".npz" if self.job.top_k is not None else ".done"
        return {t.index for t in tiles if (self.out / TILES / f"{t.name}{suffix}").is_file()}

    def write(self, tile: Tile, scores: np.ndarray) -> None:
        """Record ``tile``'s scores: into the matrix (flushed) or as its rows' and columns' top-K."""
        (i0, i1), (c0, c1) = tile.images, tile.captions
        if scores.shape != (i1 - i0, c1 - c0):
            raise OutputError(f"tile {tile.name}: got scores of shape {scores.shape}, expected {(i1 - i0, c1 - c0)}")
        if self.scores is not None:
            self.scores[i0:i1, c0:c1] = scores
            self.scores.flush()
            write_file(self.out / TILES / f"{tile.name}.done", lambda p: p.write_bytes(b""))
            return
        rows, columns = top_k(scores, self.job.top_k, c0), top_k(scores.T, self.job.top_k, i0)  # type: ignore[arg-type]

        def save(path: Path) -> None:
            with path.open("wb") as f:
                np.savez(f, i2t_indices=rows.indices, i2t_scores=rows.scores, t2i_indices=columns.indices,
                         t2i_scores=columns.scores)

        write_file(self.out / TILES / f"{tile.name}.npz", save)

    def finish(self, tiles: list[Tile]) -> dict[str, Any]:
        """Merge the tiles' top-K (with top_k) and mark the job complete; returns its header."""
        if self.scores is None:
            self._merge(tiles)
        self.scores = None  # the memory map (flushed tile by tile) is closed
        self.header.update(complete=True, finished=datetime.datetime.now(datetime.timezone.utc)
                           .isoformat(timespec="seconds"))
        write_text(self.out / JOB, json.dumps(self.header, indent=2) + "\n")
        return self.header

    def _merge(self, tiles: list[Tile]) -> None:
        k = self.job.top_k
        parts: dict[str, dict[int, list[TopK]]] = {"i2t": {}, "t2i": {}}
        for tile in tiles:  # row-major: per image band the caption ranges ascend, per caption band the image ranges
            with np.load(self.out / TILES / f"{tile.name}.npz", allow_pickle=False) as part:
                parts["i2t"].setdefault(tile.images[0], []).append(TopK(part["i2t_indices"], part["i2t_scores"]))
                parts["t2i"].setdefault(tile.captions[0], []).append(TopK(part["t2i_indices"], part["t2i_scores"]))
        for side, bands in parts.items():
            merged = [merge_top_k(bands[start], k) for start in sorted(bands)]  # type: ignore[arg-type]
            for name, array in ((f"{side}_indices", np.concatenate([m.indices for m in merged])),
                                (f"{side}_scores", np.concatenate([m.scores for m in merged]))):
                write_file(self.out / f"{name}.npy", lambda path, a=array: _save(path, a))


def _save(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as f:
        np.save(f, array)
