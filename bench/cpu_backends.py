"""CPU backends at the released sizes, one run: how fast each backend and precision encodes and
scores on this CPU, how far its scores are from ONNX Runtime fp32's, and which block budget
suits it.

For IMRAM and CAMP with random seeded weights at the released sizes (D = 1024, R = 36 regions of
2048-d features, word_dim 300, Flickr30K's vocabulary size; built, or reused, by
``xmr.benchmark.workload.build_default_artifacts``: fp32 and fp16 graphs, int8 calibrated on
synthetic data), rows ONNX Runtime fp32 (the reference of every ratio) and int8, OpenVINO fp32
and bf16 (OpenVINO's bf16 inference precision on the fp32 graphs; its text encoder runs in ONNX
Runtime), PyTorch fp32 and bf16. A row whose ``Scorer.load`` raises an ``XmrError`` is skipped
with its reason. Per row:

1. image encoder: images/s of ``encode_images`` on ``--images`` images;
2. text encoder: captions/s of ``encode_texts`` on ``--captions`` captions;
3. pair scorer: pairs/s of ``score`` on galleries the row encoded (``--pair-images`` x
   ``--pair-captions``), through the runtime's planner at the backend's default block budget,
   and the largest absolute difference from ONNX Runtime fp32's scores of the same pairs.

Each row is warmed up once, untimed (encoding its pair galleries and scoring them: every graph's
first launch), then the rows are timed in rounds, every row once per round (``--rounds``), so a
noisy moment hits all rows alike: each figure is the median over rounds, min-max beside it. Then
a block-budget sweep: pairs/s of the ``--sweep-rows`` on the same galleries with
``Scorer.load(..., block_budget=B)`` for each of ``--budgets``, warmed up and interleaved the
same way. On a CPU without AMX-BF16 or AVX-512 BF16, bf16 is emulated (bf16 scores, 5-20x slower
than fp32): those rows are skipped unless ``--emulated`` is given.

Inputs from ``xmr.benchmark.workload.random_inputs`` (as ``xmr serve-bench``): caption lengths
normal, mean 12.3 and sd 5 words (about Flickr30K's), clipped to [4, 40], plus <start>/<end>.
The defaults (32 x 160 pairs per timed call, 3 rounds) take about 10-15 minutes on 2 cores;
each pair-scorer call is timed whole, so a larger gallery costs every row and budget in proportion.

    python bench/cpu_backends.py --json docs/results/cpu_backends.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from xmr.benchmark.offline_bench import repeat_summary, timed
from xmr.benchmark.workload import RELEASED, RELEASED_REGIONS, Inputs, build_default_artifacts, random_inputs
from xmr.cpu import available_cores, cpu_features
from xmr.errors import XmrError, first_line
from xmr.export.artifacts import tool_versions
from xmr.runtime import ImageGallery, Scorer, TextGallery
from xmr.runtime.artifacts import Artifacts

MODELS = ("imram", "camp")
ROWS = (("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("openvino", "fp32"), ("openvino", "bf16"),
        ("torch", "fp32"), ("torch", "bf16"))  # the first is the reference of every ratio and score difference
SWEEP_ROWS = ("onnxruntime:fp32", "openvino:fp32", "openvino:bf16", "torch:bf16")
BUDGETS = tuple(1 << e for e in range(21, 26))  # block-budget sweep, elements of a block's largest intermediate
TEST_IMAGES = 40  # synthetic test images written beside the artifacts (the int8 calibration's data), as serve-bench
QUICK = {"images": 8, "captions": 20, "pair_images": 4, "pair_captions": 12, "rounds": 2, "budgets": [1 << 22, 1 << 24]}
RATES = ("images", "captions", "pairs")  # per second of the image encoder, text encoder and pair scorer
console = Console(width=160)


@dataclass
class Row:
    """One backend and precision of a model: its scorer, the pair galleries it encoded, its rates by round."""

    backend: str
    precision: str
    scorer: Scorer
    images: ImageGallery
    texts: TextGallery
    scores: np.ndarray  # (pair images, pair captions), from the warm-up
    rates: dict[str, list[float]] = field(default_factory=lambda: {what: [] for what in RATES})


def row_spec(text: str) -> tuple[str, str]:
    """``backend:precision`` -> (backend, precision), one of ``ROWS``."""
    backend, _, precision = text.partition(":")
    if (backend, precision) not in ROWS:
        raise argparse.ArgumentTypeError(f"{text!r} is none of {', '.join(f'{b}:{p}' for b, p in ROWS)}")
    return backend, precision


def warm_row(scorer: Scorer, inputs: Inputs, n_images: int, n_captions: int) -> Row:
    """A row after its untimed warm-up: its pair galleries encoded and scored once (every graph's first launch)."""
    images = scorer.encode_images(inputs.features[:n_images])
    texts = scorer.encode_texts((inputs.ids[:n_captions], inputs.lengths[:n_captions]))
    return Row(scorer.backend, scorer.precision, scorer, images, texts, scorer.score(images, texts))


def time_pairs(row: Row) -> None:
    seconds, _ = timed(lambda: row.scorer.score(row.images, row.texts))
    row.rates["pairs"].append(len(row.images) * len(row.texts) / seconds)


def time_round(row: Row, inputs: Inputs, n_images: int, n_captions: int) -> None:
    """One round of a row: its image encoder, text encoder and pair scorer, each timed once."""
    seconds, _ = timed(lambda: row.scorer.encode_images(inputs.features[:n_images]))
    row.rates["images"].append(n_images / seconds)
    seconds, _ = timed(lambda: row.scorer.encode_texts((inputs.ids[:n_captions], inputs.lengths[:n_captions])))
    row.rates["captions"].append(n_captions / seconds)
    time_pairs(row)


def summary(rates: list[float], what: str) -> dict[str, Any]:
    """``repeat_summary``'s median, repeats, min, max and spread, named for ``what`` (images, captions, pairs)."""
    return {key.replace("pairs", what, 1): value for key, value in repeat_summary(rates).items()}


def row_result(model: str, row: Row, reference: Row) -> dict[str, Any]:
    result = {"model": model, "backend": row.backend, "precision": row.precision, "scorer": repr(row.scorer),
              "bf16_emulated": row.scorer.emulated, "block_budget": row.scorer.block_budget,
              "launches": row.scorer.plan(row.images, row.texts).launches,
              "max_abs_diff_vs_reference": float(np.abs(row.scores - reference.scores).max())}
    for what, rates in row.rates.items():
        result |= summary(rates, what)
        result[f"{what}_vs_reference"] = statistics.median(rates) / statistics.median(reference.rates[what])
    return result


def run_rows(model: str, artifacts: Path, inputs: Inputs, args: argparse.Namespace) -> tuple[list[dict], list[Row]]:
    """Every row of ``ROWS`` timed in rounds: its results (skipped rows with their reason) and the loaded rows."""
    loaded: dict[tuple[str, str], Row] = {}
    results: list[dict[str, Any]] = []
    for backend, precision in ROWS:
        try:
            scorer = Scorer.load(artifacts, backend=backend, precision=precision)
        except XmrError as e:  # not available here: the row says why
            results.append({"model": model, "backend": backend, "precision": precision, "skipped": first_line(e)})
            continue
        if scorer.emulated and not args.emulated:  # slower than fp32 by construction; minutes to measure
            scorer.close()
            results.append({"model": model, "backend": backend, "precision": precision,
                            "skipped": "bf16 is emulated on this CPU (no AMX-BF16 or AVX-512 BF16); --emulated measures it"})
            continue
        loaded[backend, precision] = warm_row(scorer, inputs, args.pair_images, args.pair_captions)
    if ROWS[0] not in loaded:
        sys.exit(f"{model}: the reference row {' '.join(ROWS[0])} cannot load ({results[0]['skipped']})")
    for _ in range(args.rounds):
        for row in loaded.values():
            time_round(row, inputs, args.images, args.captions)
    results += [row_result(model, row, loaded[ROWS[0]]) for row in loaded.values()]
    order = {spec: i for i, spec in enumerate(ROWS)}
    return sorted(results, key=lambda r: order[r["backend"], r["precision"]]), list(loaded.values())


def run_sweep(model: str, artifacts: Path, inputs: Inputs, rows: list[Row], args: argparse.Namespace) -> list[dict]:
    """Pairs/s of each sweep row (one that loaded) at each block budget, interleaved in rounds."""
    wanted = [row for row in rows if (row.backend, row.precision) in args.sweep_rows]
    sweep = {(row.backend, row.precision, budget): warm_row(
        Scorer.load(artifacts, backend=row.backend, precision=row.precision, block_budget=budget, verify=False),
        inputs, args.pair_images, args.pair_captions)  # verified when the row loaded
        for row in wanted for budget in args.budgets}
    for _ in range(args.rounds):
        for scored in sweep.values():
            time_pairs(scored)
    results = []
    for row in wanted:
        by_budget = {budget: sweep[row.backend, row.precision, budget] for budget in args.budgets}
        rates = {budget: summary(r.rates["pairs"], "pairs") | {"launches": r.scorer.plan(r.images, r.texts).launches}
                 for budget, r in by_budget.items()}
        best = max(rates, key=lambda budget: rates[budget]["pairs_per_second"])
        results.append({"model": model, "backend": row.backend, "precision": row.precision,
                        "default_budget": row.scorer.block_budget, "best_budget": best, "budgets": rates})
    for scored in sweep.values():
        scored.scorer.close()
    return results


def run_model(model: str, args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    artifacts, _ = build_default_artifacts(model, args.artifacts_root, TEST_IMAGES)
    vocab_size = len(Artifacts.open(artifacts).vocab)
    inputs = random_inputs(max(args.images, args.pair_images), max(args.captions, args.pair_captions),
                           RELEASED_REGIONS, RELEASED["img_dim"], vocab_size)
    results, rows = run_rows(model, artifacts, inputs, args)
    sweep = run_sweep(model, artifacts, inputs, rows, args)
    for row in rows:
        row.scorer.close()
    return results, sweep


def rate_cell(result: dict[str, Any], what: str) -> str:
    return (f"{result[f'{what}_per_second']:,.0f} ({result[f'{what}_per_second_min']:,.0f}-"
            f"{result[f'{what}_per_second_max']:,.0f})")


def rows_table(results: list[dict], args: argparse.Namespace) -> Table:
    table = Table(title=f"CPU backends ({available_cores()} cores): median over {args.rounds} rounds (min-max); "
                        f"x: vs onnxruntime fp32; pairs: {args.pair_images} x {args.pair_captions}, default budget")
    for column in ("model", "backend", "precision", "bf16", "images/s", "x", "captions/s", "x", "pairs/s", "x",
                   "max |diff|"):
        table.add_column(column, justify="left" if column in ("model", "backend", "precision", "bf16") else "right")
    for r in results:
        if "skipped" in r:
            table.add_row(r["model"], r["backend"], r["precision"], "", f"skipped: {r['skipped']}")
            continue
        bf16 = ("emulated" if r["bf16_emulated"] else "native") if r["precision"] == "bf16" else ""
        cells = [c for what in RATES for c in (rate_cell(r, what), f"{r[f'{what}_vs_reference']:.2f}x")]
        table.add_row(r["model"], r["backend"], r["precision"], bf16, *cells, f"{r['max_abs_diff_vs_reference']:.1e}")
    return table


def sweep_table(results: list[dict], args: argparse.Namespace) -> Table:
    table = Table(title=f"Block-budget sweep: pairs/s, median over {args.rounds} rounds "
                        f"({args.pair_images} x {args.pair_captions} pairs; launches in brackets)")
    for column in ("model", "backend", "precision", *(f"2^{b.bit_length() - 1}" for b in args.budgets), "best"):
        table.add_column(column, justify="left" if column in ("model", "backend", "precision") else "right")
    for r in results:
        cells = [f"{m['pairs_per_second']:,.0f} ({m['launches']})" for m in r["budgets"].values()]
        best = r["best_budget"]
        default = " (default)" if best == r["default_budget"] else ""
        table.add_row(r["model"], r["backend"], r["precision"], *cells, f"2^{best.bit_length() - 1}{default}")
    return table


def environment() -> dict[str, Any]:
    cpu = cpu_features()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "platform": platform.platform(),
            "cpu": {"name": cpu.name, "cores": available_cores(), "fp32_units": cpu.fp32_units,
                    "bf16_units": cpu.bf16_units, "int8_units": cpu.int8_units},
            "torch_threads": torch.get_num_threads(),
            "versions": tool_versions(("xmr", "torch", "onnxruntime", "openvino", "numpy"))}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--artifacts-root", type=Path, default=Path("runs/cpu-backends/artifacts"),
                        help="where the released-size random artifacts are built, or reused when present")
    parser.add_argument("--images", type=int, default=128, help="images per timed encode_images")
    parser.add_argument("--captions", type=int, default=500, help="captions per timed encode_texts")
    parser.add_argument("--pair-images", type=int, default=32, help="image gallery of the timed score")
    parser.add_argument("--pair-captions", type=int, default=160, help="caption gallery of the timed score")
    parser.add_argument("--emulated", action="store_true",
                        help="also measure bf16 rows on a CPU without bf16 units (emulated: 5-20x slower than fp32)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, every row once per round")
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS), help="block budgets of the sweep")
    parser.add_argument("--sweep-rows", type=row_spec, nargs="*", default=[row_spec(s) for s in SWEEP_ROWS],
                        metavar="BACKEND:PRECISION", help=f"rows of the sweep (default: {' '.join(SWEEP_ROWS)})")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run (a minute or two): {QUICK}")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:  # the quick sizes, unless given
        parser.set_defaults(**QUICK)
        args = parser.parse_args()
    return args


def main() -> None:
    args = parse_args()
    results, sweep = [], []
    for model in args.models:
        model_results, model_sweep = run_model(model, args)
        results += model_results
        sweep += model_sweep
    console.print(rows_table(results, args))
    if sweep:
        console.print(sweep_table(sweep, args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        config = {key: value for key, value in vars(args).items() if key not in ("json", "artifacts_root")}
        args.json.write_text(json.dumps({
            "command": " ".join(["python", *sys.argv]), "environment": environment(),
            "config": config | {"regions": RELEASED_REGIONS, "img_dim": RELEASED["img_dim"]},
            "rows": results, "sweep": sweep}, indent=2) + "\n")


if __name__ == "__main__":
    main()
