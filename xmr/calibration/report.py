"""The INT8 accuracy report: every precision of an artifact directory on one split, against fp32.

Written as ``int8_report.json`` and ``int8_report.md`` beside the graphs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xmr.calibration.accuracy import accuracy
from xmr.data.precomp import PrecompSplit
from xmr.calibration.fallback import graph_scorer
from xmr.eval.evaluate import split_scores
from xmr.runtime.artifacts import Artifacts

REPORT = "int8_report"


def precision_rows(artifacts: Artifacts, variants: dict[str, dict[str, Path]], split: PrecompSplit,
                   show_progress: bool = True) -> dict[str, dict]:
    """Metrics of each variant (``name -> graph paths`` made from ``artifacts``; the first is the
    fp32 reference; a name's first word is its precision)."""
    reference, rows = None, {}
    for name, paths in variants.items():
        scorer = graph_scorer(artifacts, paths, name.split()[0])
        scores = split_scores(scorer, split, show_progress=show_progress, description=f"score {name}")
        reference = scores if reference is None else reference
        rows[name] = accuracy(scores, reference, split.per_image)
    return rows


def markdown(report: dict[str, Any]) -> str:
    head = ("| precision | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum | Δ rsum | mean abs err | max abs err "
            "| ρ i2t mean / worst | ρ t2i mean / worst |")
    lines = [f"# INT8 accuracy: {report['model']} on {report['split']} ({report['pairs']:,} pairs, ONNX Runtime CPU)", "",
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
