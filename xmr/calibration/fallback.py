"""Which matmuls run in INT8: per-node sensitivity and the fallback that meets an accuracy target.

Every candidate is measured end to end, as retrieval sees it: the three graphs (some nodes
quantized) score an evaluation split (dev by default) in ONNX Runtime, compared with fp32.
A node's sensitivity is what quantizing it *alone* costs in mean per-query rank correlation;
the fallback keeps the most sensitive nodes in float32, one more at a time, until the target
holds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xmr.calibration.accuracy import accuracy, mean_rank_agreement, meets_target
from xmr.calibration.config import CalibrationConfig
from xmr.calibration.dataset import CalibrationSet
from xmr.calibration.quantize import quantizable_nodes, quantize_graph
from xmr.data.precomp import PrecompSplit
from xmr.errors import CalibrationError
from xmr.eval.evaluate import split_scores
from xmr.runtime import OnnxRuntimeBackend, Scorer
from xmr.runtime.artifacts import Artifacts
from xmr.export.graphs import GRAPHS
from xmr.export.precision import graph_path

Node = tuple[str, str]  # (graph, node name)


def graph_scorer(artifacts: Artifacts, paths: dict[str, Path], precision: str) -> Scorer:
    """A CPU scorer over graph files made from ``artifacts``' fp32 graphs (same IO)."""
    return Scorer(OnnxRuntimeBackend(artifacts, precision, "cpu", paths=paths))


@dataclass
class Evaluation:
    """Scores an evaluation split with any set of graphs, against fp32."""

    artifacts: Artifacts
    split: PrecompSplit
    n_images: int
    reference: np.ndarray = field(repr=False)

    def __call__(self, paths: dict[str, Path]) -> dict[str, float]:
        scores = split_scores(graph_scorer(self.artifacts, paths, "int8"), self.split, self.n_images)
        return accuracy(scores, self.reference, self.split.per_image)


@dataclass
class Quantizer:
    """Quantizes the fp32 graphs with the calibration set's ranges, any nodes excluded."""

    fp32: dict[str, Path]
    calibration: CalibrationSet
    config: CalibrationConfig
    ranges_dir: Path

    def ranges(self, graph: str) -> Path:
        return self.ranges_dir / f"{graph}.{self.config.method}.json"

    @functools.cached_property
    def nodes(self) -> list[Node]:
        """Every quantizable node (read from the fp32 graphs once, not per build)."""
        return [(graph, node) for graph in GRAPHS for node in quantizable_nodes(self.fp32[graph])]

    def build(self, out_dir: Path, exclude: set[Node] = frozenset(), only: set[Node] | None = None) -> dict[str, Path]:
        """INT8 graphs in ``out_dir``; ``only``: quantize just these nodes (graphs without one stay fp32)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {}
        for graph in GRAPHS:
            nodes = {n for g, n in self.nodes if g == graph}
            in_float32 = exclude if only is None else set(self.nodes) - only
            skipped = {n for g, n in in_float32 if g == graph}
            if skipped == nodes:
                paths[graph] = self.fp32[graph]
                continue
            paths[graph] = graph_path(out_dir, graph, "int8")
            quantize_graph(self.fp32[graph], paths[graph], self.calibration.feeds[graph], self.ranges(graph),
                           self.config.method, self.config.percentile, tuple(sorted(skipped)))
        return paths


def sensitivities(quantizer: Quantizer, evaluate: Evaluation, work: Path) -> list[dict]:
    """Each quantizable node's cost when it alone is quantized, most harmful first."""
    rows = []
    for graph, node in quantizer.nodes:
        metrics = evaluate(quantizer.build(work / "single", only={(graph, node)}))
        rows.append({"graph": graph, "node": node, "rank_correlation_drop": 1.0 - mean_rank_agreement(metrics),
                     "delta_rsum": metrics["delta_rsum"], "mean_abs_score_error": metrics["mean_abs_score_error"]})
    return sorted(rows, key=lambda r: (-r["rank_correlation_drop"], r["delta_rsum"]))


@dataclass
class FallbackResult:
    exclude: set[Node]
    full: dict[str, float]  # every node quantized
    chosen: dict[str, float]
    steps: list[dict]  # each fallback tried: nodes kept in float32 and the metrics
    sensitivity: list[dict]


def choose_fallback(quantizer: Quantizer, evaluate: Evaluation, target: float, work: Path,
                    measure_sensitivity: bool = False) -> FallbackResult:
    """Quantize every node; if ``target`` is missed, keep the most sensitive nodes in float32,
    one more at a time, until it holds. Raises ``CalibrationError`` if only an all-float32
    graph would meet it."""
    full = evaluate(quantizer.build(work / "full"))
    ranking = sensitivities(quantizer, evaluate, work) if measure_sensitivity or not meets_target(full, target) else []
    if meets_target(full, target):
        return FallbackResult(set(), full, full, [], ranking)
    exclude: set[Node] = set()
    steps = []
    for row in ranking[:-1]:  # keeping every node in float32 is not INT8
        exclude.add((row["graph"], row["node"]))
        metrics = evaluate(quantizer.build(work / "fallback", exclude))
        steps.append({"float32_nodes": len(exclude), "added": f"{row['graph']}/{row['node']}", **metrics})
        if meets_target(metrics, target):
            return FallbackResult(exclude, full, metrics, steps, ranking)
    best = max(steps or [full], key=mean_rank_agreement)
    raise CalibrationError(
        f"accuracy target {target} not met with any INT8 node (best: rsum {best['rsum']:.1f} "
        f"vs fp32 {best['rsum'] - best['delta_rsum']:.1f}, mean rank correlation {mean_rank_agreement(best):.4f}); "
        f"lower --accuracy-target, calibrate with more data (--calibration-images) or another --method")
