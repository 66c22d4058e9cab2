"""The INT8 accuracy report: every precision of an artifact directory on one split, against fp32.

The graphs' precisions run in ONNX Runtime on the CPU; bf16, the CPU's other low precision, in
OpenVINO (bf16 inference over the fp32 graphs, as the runtime serves it).

Written as ``int8_report.json`` and ``int8_report.md`` beside the graphs.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xmr.calibration.accuracy import accuracy
from xmr.data.precomp import PrecompSplit
from xmr.calibration.fallback import graph_scorer
from xmr.eval.evaluate import split_scores
from xmr.runtime import Scorer
from xmr.runtime.artifacts import Artifacts
from xmr.runtime.backends import OpenVINOBackend

REPORT = "int8_report"


def precision_rows(variants: dict[str, Callable[[], Scorer]], split: PrecompSplit,
                   show_progress: bool = True) -> dict[str, dict]:
    """Metrics of each variant (``name -> a function making its scorer``; the first is the
    fp32 reference)."""
    reference, rows = None, {}
    for name, make_scorer in variants.items():
        with make_scorer() as scorer:
            scores = split_scores(scorer, split, show_progress=show_progress, description=f"score {name}")
        reference = scores if reference is None else reference
        rows[name] = accuracy(scores, reference, split.per_image)
    return rows


def graph_variant(artifacts: Artifacts, paths: dict[str, Path], precision: str) -> Callable[[], Scorer]:
    """A variant of graph files made from ``artifacts``, run by ONNX Runtime on the CPU."""
    return lambda: graph_scorer(artifacts, paths, precision)


def bf16_variant(artifacts: Artifacts) -> Callable[[], Scorer] | None:
    """bf16 on the CPU: OpenVINO's bf16 inference over the fp32 graphs (None without openvino)."""
    if importlib.util.find_spec("openvino") is None:
        return None
    return lambda: Scorer(OpenVINOBackend(artifacts, "bf16", "cpu"))


def markdown(report: dict[str, Any]) -> str:
    head = ("| precision | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum | Δ rsum | mean abs err | max abs err "
            "| ρ i2t mean / worst | ρ t2i mean / worst |")
    lines = [f"# INT8 accuracy: {report['model']} on {report['split']} ({report['pairs']:,} pairs, ONNX Runtime CPU; "
             f"bf16: OpenVINO)", "",
             f"Calibration: {report['calibration']}", "", head, "|" + " --- |" * 13]
    for name, r in report["rows"].items():
        lines.append(f"| {name} | {r['i2t_r1']:.1f} | {r['i2t_r5']:.1f} | {r['i2t_r10']:.1f} | {r['t2i_r1']:.1f} | "
                     f"{r['t2i_r5']:.1f} | {r['t2i_r10']:.1f} | {r['rsum']:.1f} | {r['delta_rsum']:+.1f} | "
                     f"{r['mean_abs_score_error']:.2g} | {r['max_abs_score_error']:.2g} | "
                     f"{r['i2t_spearman_mean']:.4f} / {r['i2t_spearman_min']:.4f} | "
                     f"{r['t2i_spearman_mean']:.4f} / {r['t2i_spearman_min']:.4f} |")
    lines += ["", report["verdict"], ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    json_path, md_path = out_dir / f"{REPORT}.json", out_dir / f"{REPORT}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path
