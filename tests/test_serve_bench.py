"""``xmr serve-bench`` at toy sizes: every reported figure is a measurement or derived from one."""

from __future__ import annotations

import io
import json
import os
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

import xmr.benchmark.hardware as hardware
import xmr.benchmark.offline_bench as offline_bench
from xmr.benchmark.hardware import UtilisationMonitor, cpu_hardware, datasheet_hardware, row_peak
from xmr.benchmark.offline_bench import (
    AUTHORS_MIN_CAPTIONS, OfflineConfig, add_peak, authors_baseline, measure_backend, score_for_seconds,
)
from xmr.benchmark.online_bench import OnlineConfig, percentiles, stats_delta
from xmr.benchmark.serve_bench import PLOT, ServeBenchConfig, run_serve_bench, write_report
from xmr.benchmark.shortlist_bench import ShortlistBenchConfig
from xmr.benchmark.serve_report import plot_report, print_report
from xmr.benchmark.workload import MAX_WORDS, MIN_WORDS, caption_lengths, random_inputs
from xmr.calibration.accuracy import accuracy
from xmr.calibration.calibrate import calibrate_artifacts
from xmr.calibration.config import CalibrationConfig
from xmr.cpu import CpuFeatures, cpu_features
from xmr.data import SynthConfig, Vocabulary, load_split, write_synthetic
from xmr.errors import BackendUnavailableError
from xmr.export.artifacts import export_artifacts
from xmr.models import build_model, make_config
from xmr.models.checkpoint import save_checkpoint
from xmr.runtime import Scorer
from xmr.runtime.batcher import BatcherStats

from conftest import invoke


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_bench")
    data = root / "data"
    write_synthetic(data, SynthConfig(n_train=30, n_dev=12, n_test=8, regions=6, img_dim=8, seed=4))
    vocab = Vocabulary.load(data / "vocab.json")
    torch.manual_seed(0)
    model = build_model(make_config("imram", vocab_size=len(vocab), img_dim=8, embed_size=8, word_dim=8, global_dim=4),
                        vocab)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    artifacts = root / "artifacts"
    export_artifacts(save_checkpoint(model, root / "model.pt", {"regions": 6}), artifacts, ("fp32", "fp16"), engine=False)
    calibrate_artifacts(artifacts, data, CalibrationConfig(images=12, image_batch=6, caption_batch=20, pair_images=4),
                        accuracy_target=0.5, eval_images=12, report_split=None, show_progress=False, engine=False)
    return root, artifacts, data


@pytest.fixture(scope="module")
def report(setup):
    root, artifacts, data = setup
    config = ServeBenchConfig(model="imram", artifacts=artifacts, data=data, out=root / "out", device="cpu", test_images=8,
                              offline=OfflineConfig(images=6, seconds=0.05, encode_captions=12, authors_seconds=0.05),
                              online=OnlineConfig(seconds=0.3, gallery_images=4, clients=(1, 3), load_fractions=(0.5,),
                                                  delays_ms=(0.0, 3.0)),
                              shortlist=ShortlistBenchConfig(galleries=(12,), shortlist=4, seconds=0.1, min_requests=2,
                                                             sample_queries=3))
    return run_serve_bench(config, show_progress=False)


def test_two_stage_rows_search_with_and_without_the_shortlist_and_cost_the_offline_evaluation(report):
    bench = report["shortlist"]
    assert (bench["backend"], bench["precision"]) == (report["online"]["backend"], report["online"]["precision"])
    assert [(r["workload"], r["gallery_items"], r["shortlist"]) for r in bench["rows"]] == [
        ("text->image", 12, None), ("text->image", 12, 4), ("image->text", 60, None), ("image->text", 60, 4)]
    for row in bench["rows"]:
        assert row["requests"] >= 2 and row["qps"] == pytest.approx(row["requests"] / row["seconds"])
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    offline = bench["offline"]
    assert offline["exhaustive_pairs"] == 1000 * 5000 and offline["shortlist_pairs"] == (1000 + 5000) * 4
    assert 2 * 3 * 4 <= offline["sample_pairs_scored"] <= 1.25 * 2 * 3 * 4
    best = max(r["pairs_per_second"] for r in report["offline"]["rows"] if "skipped" not in r)
    assert offline["exhaustive_seconds"] == pytest.approx(5e6 / best)
    assert offline["shortlist_seconds"] == pytest.approx(6000 * offline["sample_seconds"] / 6)


def test_every_available_backend_and_precision_has_a_row_and_the_rest_say_why(report):
    rows = {(r["backend"], r["precision"]): r for r in report["offline"]["rows"]}
    for measured in (("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16"), ("onnxruntime", "int8")):
        assert "skipped" not in rows[measured], rows[measured]
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in rows[("torch", "fp16")]["skipped"]
        assert "tensorrt" in rows[("tensorrt", "int8")]["skipped"]
    assert set(rows) == set(offline_bench.CANDIDATES)
    if cpu_features().bf16_units is None and not torch.cuda.is_available():  # bf16 would be emulated: not measured
        for backend in ("openvino", "torch"):
            assert "bf16 is emulated on this CPU" in rows[(backend, "bf16")]["skipped"]
    else:
        assert "skipped" not in rows[("openvino", "bf16")], rows[("openvino", "bf16")]
    for row in rows.values():
        assert "skipped" not in row or row["skipped"].strip(), row  # a row that could not run says why
    assert report["matrix"] == {"images": 6, "captions": 30, "pairs": 180}


def test_the_authors_rate_is_the_median_of_its_repeats_with_their_spread(report):
    authors = report["offline"]["authors"]
    assert authors["repeats"] == 5 == len(authors["captions_per_repeat"]) == len(authors["seconds_per_repeat"])
    assert min(authors["captions_per_repeat"]) >= AUTHORS_MIN_CAPTIONS == 3
    assert authors["captions_timed"] == sum(authors["captions_per_repeat"])
    assert authors["pairs_timed"] == 6 * authors["captions_timed"]
    assert authors["score_seconds_timed"] == pytest.approx(sum(authors["seconds_per_repeat"]))
    rates = [6 * c / s for c, s in zip(authors["captions_per_repeat"], authors["seconds_per_repeat"])]
    assert authors["pairs_per_second_repeats"] == pytest.approx(rates)
    median = statistics.median(rates)
    assert authors["pairs_per_second"] == pytest.approx(median)
    assert (authors["pairs_per_second_min"], authors["pairs_per_second_max"]) == pytest.approx((min(rates), max(rates)))
    assert authors["pairs_per_second_spread"] == pytest.approx((max(rates) - min(rates)) / median)
    assert authors["score_seconds"] == pytest.approx(180 / median)
    for row in (r for r in report["offline"]["rows"] if "skipped" not in r):
        assert row["speedup_vs_authors"] == pytest.approx(row["pairs_per_second"] / median)


def test_throughput_figures_are_the_timed_work_over_the_timed_seconds(report):
    authors = report["offline"]["authors"]
    torch_fp32 = next(r for r in report["offline"]["rows"] if (r["backend"], r["precision"]) == ("torch", "fp32"))
    hw = report["hardware"]
    peaks = hw["peak_flops"]
    for row in (r for r in report["offline"]["rows"] if "skipped" not in r):
        assert row["pairs_timed"] % 6 == 0 and row["pairs_timed"] >= 6  # whole captions against all 6 images
        assert row["pairs_per_second"] == pytest.approx(row["pairs_timed"] / row["score_seconds_timed"])
        assert row["score_seconds"] == pytest.approx(180 / row["pairs_per_second"])
        assert row["total_seconds"] == pytest.approx(row["score_seconds"] + row["encode_seconds"])
        assert row["speedup_vs_authors"] == pytest.approx(row["pairs_per_second"] / authors["pairs_per_second"])
        assert row["speedup_vs_torch_fp32"] == pytest.approx(row["pairs_per_second"] / torch_fp32["pairs_per_second"])
        flops = report["offline"]["cost_model"]["graphs"]["pair_scorer_flops_per_pair"] * row["pairs_per_second"]
        assert row["flops_per_second"] == pytest.approx(flops)
        expected = "fp32" if row["precision"] == "fp16" and hw["kind"] == "cpu" else row["precision"]
        assert row["peak_precision"] == expected and row["peak_unit"] == hw["peak_units"][expected]
        assert row["peak_flops"] == peaks[expected]
        if peaks[expected]:
            assert row["fraction_of_peak"] == pytest.approx(flops / peaks[expected])
        assert 0 < row["padding_efficiency"] <= 1
        # sampled RSS while the row ran: above what torch alone takes, never above the process's peak so far
        # (give or take 4 MiB: Linux keeps both counts per CPU, and they lag by a few pages each)
        peak_so_far = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        assert 100 * 2**20 < row["peak_process_bytes"] <= peak_so_far + 4 * 2**20
        assert 0 < row["cpu_utilisation"] <= 1.05, row  # of the cores this process may use
    assert report["hardware"]["cores"] == len(os.sched_getaffinity(0))


def test_accuracy_columns_are_the_rows_own_scores_against_pytorch_fp32(report, setup):
    _, artifacts, data = setup
    rows = {(r["backend"], r["precision"]): r for r in report["offline"]["rows"]}
    fp32 = rows[("onnxruntime", "fp32")]["accuracy"]
    assert fp32["delta_rsum"] == 0 and fp32["max_abs_score_error"] < 1e-4 and fp32["rank_agreement"] > 0.999
    split = load_split(data, "test", Vocabulary.load(data / "vocab.json"))
    with Scorer.load(artifacts, precision="int8") as scorer:
        int8 = scorer.score(split.features, split.captions)
    with Scorer.load(artifacts, backend="torch") as scorer:
        reference = scorer.score(split.features, split.captions)
    expected = accuracy(int8, reference, split.per_image)
    assert rows[("onnxruntime", "int8")]["accuracy"]["mean_abs_score_error"] == pytest.approx(
        expected["mean_abs_score_error"], rel=1e-3, abs=1e-6)
    assert rows[("onnxruntime", "int8")]["accuracy"]["rsum"] == pytest.approx(expected["rsum"])


def test_online_results_cover_the_sweeps_with_consistent_counters(report):
    online = report["online"]
    assert (online["backend"], online["precision"]) in {(r["backend"], r["precision"]) for r in report["offline"]["rows"]}
    results = online["results"]
    for workload in ("text->image", "image->text"):
        mine = [r for r in results if r["workload"] == workload]
        assert [(r["mode"], r.get("clients"), r["max_queue_delay_ms"]) for r in mine] == [
            ("closed", 1, 0.0), ("closed", 3, 0.0), ("open", None, 0.0), ("closed", 3, 3.0)]
    for r in results:
        assert r["completed"] >= 1 and r["qps"] == pytest.approx(r["completed"] / r["seconds"])
        assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert r["requests"] == r["completed"] and sum(r["batch_size_histogram"].values()) == r["batches"]
        assert r["failed"] == 0 and r["rejected"] == r["rejected_at_submit"] == 0
        if r["mode"] == "open":  # every arrival of its 0.3 s (the fixture's) was sent and answered
            assert r["offered_qps"] * 0.3 == pytest.approx(r["completed"])
        assert r["mean_batch_size"] == pytest.approx(r["requests"] / r["batches"])
        # a request's latency covers its wait in the queue; the single worker computes no longer than the setting ran
        assert 0 <= r["mean_queue_ms"] <= r["mean_ms"]
        assert r["mean_compute_ms_per_batch"] * r["batches"] <= 1e3 * r["seconds"]
        assert 0 < r["cpu_utilisation"] <= 1.05, r  # the scorer was busy all along, on the cores it may use


def test_report_is_written_as_json_printed_and_plotted(report, tmp_path):
    path = write_report(report, tmp_path)
    loaded = json.loads(path.read_text())
    assert loaded["format"] == "xmr-serve-bench" and loaded["environment"]["versions"]["torch"]
    console = Console(file=io.StringIO(), width=250)
    print_report(loaded, console)
    printed = console.file.getvalue()
    authors = loaded["offline"]["authors"]
    rates = (authors["pairs_per_second"], authors["pairs_per_second_min"], authors["pairs_per_second_max"])
    assert "{:,.0f} ({:,.0f}-{:,.0f})".format(*rates) in printed  # the authors' median and its repeats' range
    assert f"median of {authors['repeats']} repeats" in printed
    assert "fp32 peak" in printed and loaded["hardware"]["peak_units"]["fp32"] in printed
    pytest.importorskip("matplotlib")
    png = plot_report(loaded, tmp_path / PLOT)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_percentiles_and_workload_shapes():
    assert percentiles([0.001, 0.002, 0.003, 0.004])["p50_ms"] == pytest.approx(2.5)
    assert percentiles([])["p99_ms"] is None
    lengths = caption_lengths(10_000, np.random.default_rng(0))
    assert lengths.min() == MIN_WORDS + 2 and lengths.max() <= MAX_WORDS + 2 and 13 < lengths.mean() < 15
    inputs = random_inputs(3, 7, regions=4, img_dim=5, vocab_size=30)
    assert inputs.features.shape == (3, 4, 5) and (inputs.ids[:, 0] == 1).all()
    assert (inputs.ids[np.arange(7), inputs.lengths - 1] == 2).all()


def test_online_counters_are_the_batchers_change_over_the_setting():
    before = BatcherStats(requests=3, batches=2, batch_sizes={1: 1, 2: 1}, queue_seconds=0.5, compute_seconds=0.2,
                          failed=1, rejected=4)
    after = BatcherStats(requests=9, batches=5, batch_sizes={1: 2, 2: 3, 4: 1}, queue_seconds=0.8,
                         compute_seconds=0.5, failed=1, rejected=6)
    delta = stats_delta(before, after)
    assert delta["requests"] == 6 and delta["batches"] == 3 and delta["failed"] == 0 and delta["rejected"] == 2
    assert delta["batch_size_histogram"] == {"1": 1, "2": 2, "4": 1} and delta["mean_batch_size"] == 2.0
    assert delta["mean_queue_ms"] == pytest.approx(1e3 * 0.3 / 6)  # the waits recorded in the setting, per request
    assert delta["mean_compute_ms_per_batch"] == pytest.approx(1e3 * 0.3 / 3)
    assert stats_delta(after, after)["mean_queue_ms"] is None


AMX_CPU = CpuFeatures("Sapphire Rapids", frozenset(
    "fma avx2 avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8".split()), 2600.0)
AVX512_BF16_CPU = CpuFeatures("Cooper Lake", frozenset("fma avx2 avx512f avx512_vnni avx512_bf16".split()), 2600.0)
AVX2_CPU = CpuFeatures("Haswell", frozenset("fma avx2".split()), 2600.0)


def _cpu(monkeypatch, features: CpuFeatures) -> hardware.Hardware:
    """``cpu_hardware()`` as it would be on a CPU with ``features``."""
    monkeypatch.setattr(hardware, "cpu_features", lambda: features)
    return cpu_hardware()


def test_cpu_peaks_are_cores_times_clock_times_each_precisions_units(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    assert cpu_hardware().cores == cores
    per_core = cores * 2.6e9
    amx = _cpu(monkeypatch, AMX_CPU)
    assert (amx.name, amx.cores) == ("Sapphire Rapids", cores)
    assert amx.peak_flops == {"fp32": per_core * 64, "fp16": per_core * 64, "bf16": per_core * 1024,
                              "int8": per_core * 2048}
    assert amx.peak_units == {"fp32": "AVX-512", "fp16": "AVX-512", "bf16": "AMX-BF16", "int8": "AMX-INT8"}
    assert amx.peak_sources["bf16"] == f"{cores} cores x 2.60 GHz x 1024 bf16 FLOPs/cycle (AMX-BF16)"
    assert amx.peak_sources["int8"] == f"{cores} cores x 2.60 GHz x 2048 int8 OPs/cycle (AMX-INT8)"
    assert "AMX-INT8" in amx.peak_source and "2.60 GHz" in amx.peak_source

    no_amx = _cpu(monkeypatch, AVX512_BF16_CPU)
    assert no_amx.peak_flops == {"fp32": per_core * 64, "fp16": per_core * 64, "bf16": per_core * 128,
                                 "int8": per_core * 256}
    assert (no_amx.peak_units["bf16"], no_amx.peak_units["int8"]) == ("AVX-512 BF16", "AVX-512 VNNI")

    avx2 = _cpu(monkeypatch, AVX2_CPU)
    assert avx2.peak_flops == dict.fromkeys(("fp32", "fp16", "bf16", "int8"), per_core * 32)  # nothing faster than fp32
    assert set(avx2.peak_units.values()) == {"AVX2"}
    assert "emulated" in avx2.peak_sources["bf16"] and "no int8 dot products" in avx2.peak_sources["int8"]
    vnni = _cpu(monkeypatch, CpuFeatures("Alder Lake", frozenset("fma avx2 avx_vnni".split()), 2600.0))
    assert (vnni.peak_flops["int8"], vnni.peak_units["int8"]) == (per_core * 128, "AVX-VNNI")

    no_clock = _cpu(monkeypatch, CpuFeatures("Unknown", AMX_CPU.flags, None))
    assert no_clock.peak_flops == dict.fromkeys(("fp32", "fp16", "bf16", "int8"))
    assert no_clock.peak_units["int8"] == "AMX-INT8" and "unknown clock" in no_clock.peak_sources["int8"]


def test_gpu_peaks_are_the_datasheets_with_bf16_where_the_gpu_has_it():
    h200 = datasheet_hardware("NVIDIA H200", 132)
    assert h200.peak_flops["bf16"] == h200.peak_flops["fp16"] == 989e12
    assert h200.peak_units == {"fp32": "CUDA cores", "fp16": "tensor cores", "bf16": "tensor cores",
                               "int8": "tensor cores"}
    t4 = datasheet_hardware("Tesla T4", 40)
    assert t4.peak_flops["bf16"] is None and t4.peak_units["bf16"] is None and "no bf16" in t4.peak_sources["bf16"]
    assert t4.peak_flops["fp16"] == 65e12
    unknown = datasheet_hardware("Some GPU", 8)
    assert set(unknown.peak_flops.values()) == {None} and "no datasheet figure" in unknown.peak_source
    assert row_peak(h200, "tensorrt", "int8") == ("int8", "tensor cores")
    assert row_peak(h200, "onnxruntime", "fp16") == ("fp16", "tensor cores")  # on a GPU fp16 is tensor-core fp16
    assert row_peak(t4, "tensorrt", "bf16") == ("bf16", None)


def test_each_row_runs_on_the_units_of_its_backend_and_precision(monkeypatch):
    amx = _cpu(monkeypatch, AMX_CPU)
    assert row_peak(amx, "onnxruntime", "int8") == ("int8", "AMX-INT8")  # MLAS: u8s8 GEMMs on AMX tiles
    assert row_peak(amx, "openvino", "bf16") == ("bf16", "AMX-BF16")
    assert row_peak(amx, "torch", "bf16") == ("bf16", "AMX-BF16")
    assert row_peak(amx, "openvino", "fp32") == row_peak(amx, "torch", "fp32") == ("fp32", "AVX-512")
    assert row_peak(amx, "onnxruntime", "fp16") == ("fp32", "AVX-512")  # computes at fp32 speed
    assert row_peak(_cpu(monkeypatch, AVX512_BF16_CPU), "torch", "bf16") == ("bf16", "AVX-512 BF16")
    assert row_peak(_cpu(monkeypatch, AVX2_CPU), "onnxruntime", "int8") == ("int8", "AVX2")


def test_fraction_of_peak_is_against_the_rows_own_units(monkeypatch):
    amx = _cpu(monkeypatch, AMX_CPU)
    flops = 1e12
    rows = {(backend, precision): {"flops_per_second": flops} for backend, precision in
            (("onnxruntime", "int8"), ("onnxruntime", "fp16"), ("openvino", "bf16"), ("torch", "fp32"))}
    for (backend, precision), row in rows.items():
        add_peak(row, amx, backend, precision)
    assert rows[("onnxruntime", "int8")]["peak_unit"] == "AMX-INT8"
    assert rows[("onnxruntime", "int8")]["fraction_of_peak"] == pytest.approx(flops / amx.peak_flops["int8"])
    assert rows[("openvino", "bf16")]["fraction_of_peak"] == pytest.approx(flops / amx.peak_flops["bf16"])
    assert rows[("onnxruntime", "fp16")]["fraction_of_peak"] == pytest.approx(flops / amx.peak_flops["fp32"])
    assert rows[("onnxruntime", "fp16")]["peak_unit"] == rows[("torch", "fp32")]["peak_unit"] == "AVX-512"
    assert rows[("onnxruntime", "int8")]["fraction_of_peak"] * 32 == pytest.approx(
        rows[("torch", "fp32")]["fraction_of_peak"])  # 2048 vs 64 ops per cycle
    no_clock = _cpu(monkeypatch, CpuFeatures("Unknown", AMX_CPU.flags, None))
    row = {"flops_per_second": flops}
    add_peak(row, no_clock, "onnxruntime", "int8")
    assert row["peak_unit"] == "AMX-INT8" and row["peak_flops"] is None and row["fraction_of_peak"] is None


SLOW_FIRST_LAUNCH = 0.3  # seconds a fake backend's first launch of each graph takes (allocating, compiling)


class FakeGallery:
    """As many encoded items as ``size``: all ``score_for_seconds`` needs of a gallery."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def select(self, index: np.ndarray) -> FakeGallery:
        return FakeGallery(len(index))


class FirstLaunchSlowScorer:
    """A scorer whose first launch of each graph takes ``SLOW_FIRST_LAUNCH`` seconds, later ones none."""

    backend, precision, device, emulated = "fake", "fp32", "cpu", False

    def __init__(self) -> None:
        self.launches: dict[str, int] = {"images": 0, "texts": 0, "pairs": 0}

    @classmethod
    def load(cls, *args: object, **kwargs: object) -> FirstLaunchSlowScorer:
        return cls()

    def _launch(self, graph: str) -> None:
        if self.launches[graph] == 0:
            time.sleep(SLOW_FIRST_LAUNCH)
        self.launches[graph] += 1

    def encode_images(self, features: np.ndarray) -> FakeGallery:
        self._launch("images")
        return FakeGallery(len(features))

    def encode_texts(self, tokens: tuple[np.ndarray, np.ndarray]) -> FakeGallery:
        self._launch("texts")
        return FakeGallery(len(tokens[1]))

    def score(self, images: FakeGallery, texts: FakeGallery) -> None:
        self._launch("pairs")

    def stats(self) -> dict[str, float]:
        return {"padding_efficiency": 1.0}

    def __enter__(self) -> FirstLaunchSlowScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def test_a_backends_first_launch_is_not_timed(monkeypatch):
    scorer = FirstLaunchSlowScorer()
    pairs, seconds = score_for_seconds(scorer, FakeGallery(4), FakeGallery(10), 0.02, "cpu")
    assert seconds < SLOW_FIRST_LAUNCH and pairs % 4 == 0 and pairs >= 4
    assert scorer.launches["pairs"] >= 2  # the warm-up block and at least one timed one

    monkeypatch.setattr(offline_bench, "Scorer", FirstLaunchSlowScorer)
    monkeypatch.setattr(offline_bench, "split_scores", lambda scorer, split: None)
    inputs = random_inputs(4, 10, regions=2, img_dim=3, vocab_size=20)
    config = OfflineConfig(images=4, seconds=0.02, encode_captions=10, authors_seconds=0.02)
    row = measure_backend(Path("unused"), "fake", "fp32", "cpu", inputs, config, split=None)
    assert row["images_per_second"] > 4 / SLOW_FIRST_LAUNCH and row["captions_per_second"] > 10 / SLOW_FIRST_LAUNCH
    assert row["score_seconds_timed"] < SLOW_FIRST_LAUNCH


class FirstCallSlowModel:
    """The authors' loop's model as ``authors_baseline`` uses it: its first caption takes ``SLOW_FIRST_LAUNCH``."""

    def __init__(self) -> None:
        self.captions = 0

    def to(self, device: str) -> FirstCallSlowModel:
        return self

    def eval(self) -> FirstCallSlowModel:
        return self

    def encode_images(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def encode_texts(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return ids

    def score_authors_style(self, images: torch.Tensor, caption: torch.Tensor, lengths: torch.Tensor) -> None:
        if self.captions == 0:
            time.sleep(SLOW_FIRST_LAUNCH)
        self.captions += 1


def test_the_authors_loop_times_repeats_after_one_untimed_caption():
    model = FirstCallSlowModel()
    inputs = random_inputs(4, 10, regions=2, img_dim=3, vocab_size=20)
    authors = authors_baseline(model, inputs, OfflineConfig(images=4, encode_captions=10, authors_seconds=0.01,
                                                            authors_repeats=4), "cpu")
    assert authors["captions_timed"] == model.captions - 1 == sum(authors["captions_per_repeat"])
    assert authors["score_seconds_timed"] < SLOW_FIRST_LAUNCH
    assert len(authors["pairs_per_second_repeats"]) == 4 and min(authors["captions_per_repeat"]) >= 3
    assert authors["pairs_per_second"] == pytest.approx(statistics.median(authors["pairs_per_second_repeats"]))


def test_a_backend_that_cannot_run_gives_a_skipped_row_with_its_reason(monkeypatch):
    def load(*args: object, backend: str, **kwargs: object) -> None:
        raise BackendUnavailableError(f"{backend} is not installed: pip install {backend}\nmore detail")

    monkeypatch.setattr(offline_bench.Scorer, "load", load)
    row = measure_backend(Path("unused"), "openvino", "bf16", "cpu", None, OfflineConfig(), split=None)
    assert row == {"backend": "openvino", "precision": "bf16", "skipped": "openvino is not installed: pip install openvino"}


def test_cpu_utilisation_is_process_cpu_time_over_wall_time_and_cores():
    """One thread kept busy for 0.3 s: the monitor's figure is that thread's CPU time over the
    wall time and the cores (a little more for the sampler thread)."""
    cores, outer = len(os.sched_getaffinity(0)), time.perf_counter()
    with UtilisationMonitor("cpu", interval=0.01) as util:
        start, busy = time.perf_counter(), time.thread_time()
        while time.perf_counter() - start < 0.3:
            pass
        busy = time.thread_time() - busy
    outer = time.perf_counter() - outer
    assert 0.3 <= util.seconds <= outer
    process_cpu = util.cpu * util.seconds * cores  # os.times() ticks are 10 ms
    assert busy - 0.02 <= process_cpu <= busy + 0.05 + 0.1 * util.seconds, (process_cpu, busy)
    assert 0 < util.cpu <= 1.05 and util.peak_rss_bytes > 100 * 2**20 and util.gpu is None


def test_cli_runs_and_refuses_a_model_mismatch(setup, tmp_path):
    _, artifacts, data = setup
    args = ["serve-bench", "--artifacts", str(artifacts), "--data", str(data), "--out", str(tmp_path), "--images", "4",
            "--seconds", "0.05", "--online-seconds", "0.2", "--gallery", "3", "--backend", "onnxruntime,torch",
            "--precision", "fp32", "--device", "cpu"]
    result = invoke(*args, "--quick")
    assert result.exit_code == 0, result.output
    assert "Offline" in result.output and (tmp_path / "serve_bench.json").is_file()
    result = invoke(*args, "--model", "camp")
    assert result.exit_code == 2 and "holds a imram model, not camp" in " ".join(result.output.split())


def test_encoder_flops_match_torchs_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from xmr.models.flops import encoder_flops

    model = build_model(make_config("camp", vocab_size=50, word_dim=8, embed_size=16, img_dim=12)).eval()
    expected = encoder_flops(model.config, regions=5, length=7)
    with FlopCounterMode(display=False) as images, torch.no_grad():
        model.img_enc(torch.randn(1, 5, 12))
    with FlopCounterMode(display=False) as captions, torch.no_grad():
        model.txt_enc(torch.randint(4, 50, (1, 7)), torch.tensor([7]))
    assert (images.get_total_flops(), captions.get_total_flops()) == (expected["image"], expected["caption"])


def test_nothing_runnable_is_a_clear_error(setup, tmp_path):
    _, artifacts, data = setup
    config = ServeBenchConfig(model="imram", artifacts=artifacts, data=data, out=tmp_path, backends=("tensorrt",),
                              device="cpu", test_images=4, offline=OfflineConfig(images=2, seconds=0.01, authors_seconds=0.01))
    if torch.cuda.is_available():
        pytest.skip("TensorRT may run here")
    from xmr.errors import XmrError

    with pytest.raises(XmrError, match="no backend/precision could run here .*tensorrt fp16"):
        run_serve_bench(config, show_progress=False)
