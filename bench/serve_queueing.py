"""What tail latency a served model can have under Poisson load: its batch cost S(n) measured
(n queries searched in one call, as the server's dynamic batcher hands them to the Scorer),
and a dynamic batcher fed Poisson arrivals at fractions of the best closed-loop rate,
simulated for cost curves from no batching gain to a batch that costs what one query does.

    python bench/serve_queueing.py --artifacts runs/shortlist-curve/prefilter-imram \\
        --images data/synth/test_ims.npy --data data/synth \\
        --remote docs/results/serve_bench_remote.json --json docs/results/serve_queueing.json

A batch's gain, n·S(1) / S(n), is what batching n queries buys per query: about 1 on a
compute-bound CPU, more where a batch leaves the hardware room (a GPU far from full). The
simulation is FIFO with Triton's batcher rules (a batch forms when an instance is free,
from what waited, up to ``max_batch``, after at most ``max_queue_delay`` for more) and sets
its load as the measurement does: a fraction of the best of closed loops over 1, 4 and 16
clients; S(n) = share + (1 - share)·n, whose gain at 16 is 16 / (share + 16·(1 - share)).
It shows which gains keep p99 within 2x p50 at 70% of the best QPS, and how many model
instances (``xmr serve --instances``) do at no gain, to read against the measured gains
and, with ``--remote``, the ratios a ``serve-bench --target`` run measured.
"""

from __future__ import annotations

import argparse
import heapq
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from rich.console import Console
from rich.table import Table

from results import write_results
from xmr.data import load_split
from xmr.runtime import Scorer

console = Console(width=140)
BATCHES = (1, 2, 4, 8, 16, 32, 64)
CLIENTS = (1, 4, 16)
LOADS = (0.5, 0.7, 0.9)
INSTANCES = (1, 2, 4, 8)
SHARES = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)


def batch_costs(search: Callable[[int, int], Any], batches: tuple[int, ...], repeats: int) -> list[float]:
    """Median seconds of ``search(n, offset)`` per batch size ``n`` (after one untimed call each)."""
    costs = []
    for n in batches:
        search(n, 0)
        times = []
        for r in range(repeats):
            started = time.perf_counter()
            search(n, (r + 1) * n)
            times.append(time.perf_counter() - started)
        costs.append(float(np.median(times)))
    return costs


def simulate(cost: Callable[[int], float], rate: float, max_batch: int, delay_s: float, instances: int = 1,
             requests: int = 50_000, seed: int = 0) -> np.ndarray:
    """Latencies (arrival to response) of ``requests`` Poisson arrivals at ``rate``/s through
    ``instances`` model instances, each of whose batches of n takes ``cost(n)`` seconds (the
    next batch goes to the instance free first)."""
    arrivals = np.cumsum(np.random.default_rng(seed).exponential(1 / rate, requests))
    latencies, free, i = np.empty(requests), [0.0] * instances, 0
    while i < requests:
        full = arrivals[min(i + max_batch, requests) - 1]  # when a full batch would have waited
        start = max(heapq.heappop(free), min(arrivals[i] + delay_s, full))
        j = min(int(np.searchsorted(arrivals, start, side="right")), i + max_batch)
        done = start + cost(j - i)
        heapq.heappush(free, done)
        latencies[i:j] = done - arrivals[i:j]
        i = j
    return latencies


def best_closed_loop(cost: Callable[[int], float], max_batch: int = 64, instances: int = 1) -> float:
    """Requests/s of the best closed loop over ``CLIENTS`` (C clients keep min(C, instances)
    instances busy with batches of C / busy, at most ``max_batch``)."""
    rates = []
    for clients in CLIENTS:
        busy = min(clients, instances)
        batch = min(max_batch, max(1, clients // busy))
        rates.append(busy * batch / cost(batch))
    return max(rates)


def tail_ratios(cost: Callable[[int], float], max_batch: int, delay_s: float,
                instances: int = 1) -> dict[str, float]:
    """p99/p50 of the simulated latencies at each of ``LOADS`` x the best closed loop."""
    best = best_closed_loop(cost, max_batch, instances)
    ratios = {}
    for load in LOADS:
        p50, p99 = np.percentile(simulate(cost, load * best, max_batch, delay_s, instances), [50, 99])
        ratios[f"{load:g}"] = float(p99 / p50)
    return ratios


def measured_ratios(remote: Path | None) -> dict[str, dict[str, float]]:
    """p99/p50 at 0.7x best per (side, workload) of a ``serve-bench --target`` report."""
    if remote is None:
        return {}
    report = json.loads(remote.read_text())
    out: dict[str, dict[str, float]] = {}
    for side in ("remote", "in_process"):
        for row in report.get(side, []):
            if row.get("mode") == "open" and row.get("load_fraction") == 0.7 and row.get("p50_ms"):
                out.setdefault(row["workload"], {})[side] = row["p99_ms"] / row["p50_ms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True, help="the served image gallery (features .npy)")
    parser.add_argument("--data", type=Path, required=True, help="its dataset: the test split's captions are queries")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--remote", type=Path, help="a serve-bench --target report to set the measured ratios beside")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    scorer = Scorer.load(args.artifacts, backend=args.backend, spin=False)  # as xmr serve loads it
    split = load_split(args.data, "test", scorer.vocab)
    captions, features = list(split.captions), np.asarray(split.features)
    images, texts = scorer.encode_images(np.load(args.images)), scorer.encode_texts(captions)
    searches = {
        "text->image": lambda n, at: scorer.search([captions[(at + i) % len(captions)] for i in range(n)], images),
        "image->text": lambda n, at: scorer.search(features[np.arange(at, at + n) % len(features)], texts),
    }
    batches = tuple(n for n in BATCHES if n <= args.max_batch)
    delay = args.max_queue_delay_ms / 1e3
    measured = measured_ratios(args.remote)
    rows = []
    for name, search in searches.items():
        costs = batch_costs(search, batches, args.repeats)
        rows.append({"workload": name, "batch_costs_ms": {str(n): 1e3 * s for n, s in zip(batches, costs)},
                     "batch_gain": {str(n): n * costs[0] / s for n, s in zip(batches, costs)},
                     "measured_p99_over_p50_at_0.7": measured.get(name, {})})
    scorer.close()
    shares = [{"fixed_share": share, "batch_gain_16": 16 / (share + (1 - share) * 16),
               "predicted_p99_over_p50": tail_ratios(lambda n, s=share: s + (1 - s) * n, args.max_batch, delay)}
              for share in SHARES]  # S(1) = 1 s: the ratios do not depend on the unit
    spread = [{"instances": c, "one_at_a_time": tail_ratios(lambda n: float(n), 1, 0.0, c),
               "batched_linear": tail_ratios(lambda n: float(n), args.max_batch, delay, c)}
              for c in INSTANCES]  # no batcher (M/D/c), and the batcher on c instances at no batching gain
    serial = spread[0]["one_at_a_time"]  # one instance, one query at a time: M/D/1

    table = Table(title=f"measured batch cost S(n), {scorer!r}")
    for column in ("workload", *(f"S({n}) ms (gain)" for n in batches), "p99/p50 measured @0.7 server / in-process"):
        table.add_column(column, justify="right")
    for row in rows:
        seen = row["measured_p99_over_p50_at_0.7"]
        table.add_row(row["workload"], *(f"{c:.1f} ({g:.2f})" for c, g in zip(row["batch_costs_ms"].values(),
                                                                           row["batch_gain"].values())),
                      " / ".join(f"{seen[s]:.1f}" for s in ("remote", "in_process") if s in seen) or "-")
    console.print(table)
    model = Table(title="simulated p99/p50 for S(n) = share + (1 - share)·n")
    for column in ("fixed share", "gain at 16", *(f"p99/p50 @{load:g}" for load in LOADS)):
        model.add_column(column, justify="right")
    for row in shares:
        model.add_row(f"{row['fixed_share']:.2f}", f"{row['batch_gain_16']:.2f}",
                      *(f"{v:.2f}" for v in row["predicted_p99_over_p50"].values()))
    model.add_row("one at a time", "1.00", *(f"{v:.2f}" for v in serial.values()))
    console.print(model)
    side = Table(title="simulated p99/p50 on c instances, linear cost S(n) = n (each instance a core's share)")
    for column in ("instances", *(f"{how} @{load:g}" for how in ("one at a time", "batched") for load in LOADS)):
        side.add_column(column, justify="right")
    for row in spread:
        side.add_row(str(row["instances"]), *(f"{v:.2f}" for how in ("one_at_a_time", "batched_linear")
                                              for v in row[how].values()))
    console.print(side)
    if args.json:
        write_results(args.json, rows + [{"by_fixed_share": shares, "one_at_a_time": serial,
                                          "by_instances": spread, "max_batch": args.max_batch,
                                          "max_queue_delay_ms": args.max_queue_delay_ms, "clients": list(CLIENTS)}])


if __name__ == "__main__":
    main()
