"""``xmr serve-bench``'s report: terminal tables and a PNG plot, from the JSON report alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from xmr.outputs import write_file


def _num(value: float | None, spec: str = ",.0f", suffix: str = "", scale: float = 1) -> str:
    return "–" if value is None else f"{value * scale:{spec}}{suffix}"


def _gib(value: int | None) -> str:
    return "–" if not value else f"{value / 2**30:.1f}"


def _rate_with_spread(timing: dict[str, Any]) -> str:
    """A median rate with its repeats' range, e.g. "121 (115-130)"."""
    low = _num(timing["pairs_per_second_min"])
    high = _num(timing["pairs_per_second_max"])
    return f"{_num(timing['pairs_per_second'])} ({low}-{high})"


def _peak_lines(rows: list[dict[str, Any]], hardware: dict[str, Any]) -> list[str]:
    """One caption line per peak the rows were measured against: its figure and where it comes from."""
    lines = []
    for precision in dict.fromkeys(r["peak_precision"] for r in rows):
        peak = hardware["peak_flops"].get(precision)
        unit = "TOP/s" if precision == "int8" else "TFLOP/s"
        lines.append(f"{precision} peak {_num(peak, ',.2f', f' {unit}', 1e-12)}: {hardware['peak_sources'][precision]}")
    return lines


def offline_table(report: dict[str, Any]) -> Table:
    matrix, hw = report["matrix"], report["hardware"]
    table = Table(title=f"Offline: {matrix['images']:,} x {matrix['captions']:,} = {matrix['pairs']:,} pairs, "
                        f"{report['model']}, {hw['name']} ({hw['kind']})")
    for column in ("backend", "precision", "pairs/s", "total s", "encode s", "vs authors", "vs torch fp32",
                   "% of peak", "units", "rsum", "Δ rsum", "rank ρ", "peak GiB"):
        table.add_column(column, justify="left" if column == "units" else "right",
                         no_wrap=column in ("pairs/s", "units"))  # "121 (115-130)", "AVX-512 VNNI": one line each
    authors = report["offline"]["authors"]
    table.add_row(authors["backend"], "fp32", _rate_with_spread(authors), _num(authors["score_seconds"]) + "*",
                  "–", "1.00x", "–", _num(authors["fraction_of_peak"], ".1f", scale=100), authors["peak_unit"] or "–",
                  "–", "–", "–", _gib(authors["peak_process_bytes"]))
    skipped = []
    measured = [authors]
    for row in report["offline"]["rows"]:
        if "skipped" in row:
            skipped.append(f"{row['backend']} {row['precision']}: {row['skipped']}")
            table.add_row(row["backend"], row["precision"], f"skipped ({len(skipped)})", *[""] * 10)
            continue
        measured.append(row)
        acc = row["accuracy"]
        table.add_row(row["backend"], row["precision"], _num(row["pairs_per_second"]),
                      _num(row["total_seconds"]) + ("*" if row["extrapolated"] else ""), _num(row["encode_seconds"], ".1f"),
                      _num(row["speedup_vs_authors"], ".1f", "x"), _num(row["speedup_vs_torch_fp32"], ".2f", "x"),
                      _num(row["fraction_of_peak"], ".1f", scale=100), row["peak_unit"] or "–", _num(acc["rsum"], ".1f"),
                      _num(acc["delta_rsum"], "+.1f"), _num(acc["rank_agreement"], ".4f"),
                      _gib(row["peak_gpu_bytes"] or row["peak_process_bytes"]))
    table.caption = "\n".join([
        "* extrapolated from the pairs timed. rsum on the test split "
        f"({report['offline']['accuracy_split']['images']} images), Δ and rank ρ against PyTorch fp32.",
        f"authors' loop: median of {authors['repeats']} repeats (their range), spread "
        f"{_num(authors['pairs_per_second_spread'], '.0f', '%', 100)}; vs authors: over the median.",
        "% of peak: of the peak of the units each row runs on:",
        *_peak_lines(measured, hw),
        *(f"({i}) {reason}" for i, reason in enumerate(skipped, 1))])
    return table


def online_table(report: dict[str, Any]) -> Table:
    online = report["online"]
    table = Table(title=f"Online: top-k through BatchedScorer.submit ({online['backend']} {online['precision']})")
    for column in ("workload", "load", "delay ms", "QPS", "p50 ms", "p95 ms", "p99 ms", "queue ms", "compute ms",
                   "batch", "rejected", "util"):
        table.add_column(column, justify="right")
    for r in online["results"]:
        load = f"{r['clients']} clients" if r["mode"] == "closed" else _arrivals(r)
        util = r["gpu_utilisation"] if r["gpu_utilisation"] is not None else r["cpu_utilisation"]
        table.add_row(r["workload"], load, f"{r['max_queue_delay_ms']:g}", _num(r["qps"], ".1f"), _num(r["p50_ms"], ".1f"),
                      _num(r["p95_ms"], ".1f"), _num(r["p99_ms"], ".1f"), _num(r["mean_queue_ms"], ".1f"),
                      _num(r["mean_compute_ms_per_batch"], ".1f"),
                      _num(r["mean_batch_size"], ".1f"), str(r["rejected"] + r["rejected_at_submit"]),
                      _num(util, ".0f", "%", 100))
    return table


def _arrivals(row: dict[str, Any], fraction: str = "") -> str:
    """An open-loop row's rate λ, and what its draw of arrivals offered when that is known."""
    offered = f", {row['offered_qps']:.1f} offered" if "offered_qps" in row else ""
    return f"λ {row['rate']:.1f}/s{fraction}{offered}"


def remote_table(report: dict[str, Any]) -> Table:
    """``serve-bench --target``: the server's rows, and the in-process rows of the same settings beside them."""
    local = {_setting(r): r for r in report["in_process"]}
    table = Table(title=f"Through the server at {report['target']}" + (
        f", beside in-process submit ({report['in_process_scorer']['backend']})" if report["in_process"] else ""))
    for column in ("workload", "load", "QPS", "p50 ms", "p95 ms", "p99 ms", "rejected", "in-process QPS",
                   "p50 ms", "p99 ms", "rejected", "server / in-process"):
        table.add_column(column, justify="right")
    for r in report["remote"]:
        load = f"{r['clients']} clients" if r["mode"] == "closed" else _arrivals(r, f" ({r['load_fraction']:g}x)")
        mine = local.get(_setting(r))
        there = [] if mine is None else [_num(mine["qps"], ".1f"), _num(mine["p50_ms"], ".1f"), _num(mine["p99_ms"], ".1f"),
                                          str(mine["rejected"] + mine["rejected_at_submit"]),
                                          _num(r["qps"] / mine["qps"] if mine["qps"] else None, ".2f")]
        table.add_row(r["workload"], load, _num(r["qps"], ".1f"), _num(r["p50_ms"], ".1f"), _num(r["p95_ms"], ".1f"),
                      _num(r["p99_ms"], ".1f"), str(r["rejected"]), *(there or [""] * 5))
    return table


def _setting(row: dict[str, Any]) -> tuple:
    return (row["workload"], row["mode"], row.get("clients"), row.get("load_fraction"))


def shortlist_table(report: dict[str, Any]) -> Table | str:
    bench = report.get("shortlist") or {"skipped": "not measured"}
    if "skipped" in bench:
        return f"Two-stage search: skipped ({bench['skipped']})"
    table = Table(title=f"Two-stage search, one client through BatchedScorer.submit ({bench['backend']} "
                        f"{bench['precision']}, top {bench['k']})")
    for column in ("workload", "gallery", "shortlist", "QPS", "p50 ms", "p95 ms", "p99 ms", "requests", "QPS gain"):
        table.add_column(column, justify="right")
    measured = [r for r in bench["rows"] if "skipped" not in r]
    exhaustive = {(r["workload"], r["gallery_items"]): r["qps"] for r in measured if r["shortlist"] is None}
    for r in bench["rows"]:
        if "skipped" in r:
            table.add_row(r["workload"], f"{r['gallery_items']:,}", "", f"skipped: {r['skipped']}", *[""] * 5)
            continue
        gain = r["qps"] / exhaustive[(r["workload"], r["gallery_items"])] if r["shortlist"] else None
        table.add_row(r["workload"], f"{r['gallery_items']:,}", str(r["shortlist"] or "none"), _num(r["qps"], ".2f"),
                      _num(r["p50_ms"], ".1f"), _num(r["p95_ms"], ".1f"), _num(r["p99_ms"], ".1f"), str(r["requests"]),
                      _num(gain, ".1f", "x"))
    off = bench["offline"]
    table.caption = (f"Offline, Flickr30K-1K shape ({off['images']:,} images x {off['captions']:,} captions): exhaustive "
                     f"{off['exhaustive_pairs']:,} pairs, about {_num(off['exhaustive_seconds'], ',.0f')} s at the best "
                     f"offline row's rate; shortlist {off['shortlist']}: (images + captions) x {off['shortlist']} = "
                     f"{off['shortlist_pairs']:,} pairs, about {_num(off['shortlist_seconds'], ',.0f')} s (from "
                     f"{off['sample_queries_each_way']} timed queries each way).")
    return table


def print_report(report: dict[str, Any], console: Console) -> None:
    console.print(offline_table(report))
    console.print(online_table(report))
    console.print(shortlist_table(report))


def plot_report(report: dict[str, Any], path: Path) -> Path | None:
    """Throughput per backend/precision and latency against load; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in report["offline"]["rows"] if "skipped" not in r]
    authors = report["offline"]["authors"]
    labels = ["authors' loop\nfp32"] + [f"{r['backend']}\n{r['precision']}" for r in rows]
    rates = [authors["pairs_per_second"]] + [r["pairs_per_second"] for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    bars = left.bar(range(len(rates)), rates, color=["gray"] + ["tab:blue"] * len(rows))
    left.bar_label(bars, [f"{rate / rates[0]:.1f}x" for rate in rates], fontsize=8)
    left.set_xticks(range(len(rates)), labels, fontsize=8)
    left.set(yscale="log", ylabel="pairs / s (log)",
             title=f"{report['model']}: score matrix throughput (x: over the authors' loop)")
    base_delay = report["online"]["results"][0]["max_queue_delay_ms"] if report["online"]["results"] else 0
    colors = iter(["tab:blue", "tab:orange", "tab:green", "tab:red"])
    for workload, marker in (("text->image", "o"), ("image->text", "s")):
        for mode in ("closed", "open"):
            points = sorted((r["qps"], r["p50_ms"], r["p99_ms"]) for r in report["online"]["results"]
                            if r["workload"] == workload and r["mode"] == mode and r["p50_ms"] is not None
                            and r["max_queue_delay_ms"] == base_delay)
            color = next(colors)
            if points:
                qps, p50, p99 = zip(*points)
                right.plot(qps, p99, "-", marker=marker, color=color, label=f"{workload}, {mode} loop: p99")
                right.plot(qps, p50, ":", marker=marker, color=color, alpha=0.6, label=f"{workload}, {mode} loop: p50")
    right.set(xlabel="achieved requests / s", ylabel="latency ms",
              title=f"latency vs load ({report['online']['backend']} {report['online']['precision']})")
    right.legend(fontsize=7)
    figure.suptitle(f"{report['hardware']['name']} — {report['environment']['date'][:10]}", fontsize=9)
    figure.tight_layout()
    write_file(path, lambda partial: figure.savefig(partial, dpi=110, format="png"))
    plt.close(figure)
    return path
