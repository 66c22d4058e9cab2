"""``xmr serve-bench`` at toy sizes: every reported figure is a measurement or derived from one."""

from __future__ import annotations

import json
import os
import resource
import time

import numpy as np
import pytest
import torch

import xmr.benchmark.hardware as hardware
from xmr.benchmark.hardware import UtilisationMonitor, cpu_hardware
from xmr.benchmark.offline_bench import OfflineConfig
from xmr.benchmark.online_bench import OnlineConfig, percentiles, stats_delta
from xmr.benchmark.serve_bench import PLOT, ServeBenchConfig, run_serve_bench, write_report
from xmr.benchmark.serve_report import plot_report
from xmr.benchmark.workload import MAX_WORDS, MIN_WORDS, caption_lengths, random_inputs
from xmr.calibration.accuracy import accuracy
from xmr.calibration.calibrate import calibrate_artifacts
from xmr.calibration.config import CalibrationConfig
from xmr.data import SynthConfig, Vocabulary, load_split, write_synthetic
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
    model = build_model(make_config("imram", vocab_size=len(vocab), img_dim=8, embed_size=8, word_dim=8), vocab)
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
                                                  delays_ms=(0.0, 3.0)))
    return run_serve_bench(config, show_progress=False)


def test_every_available_backend_and_precision_has_a_row_and_the_rest_say_why(report):
    rows = {(r["backend"], r["precision"]): r for r in report["offline"]["rows"]}
    for measured in (("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16"), ("onnxruntime", "int8")):
        assert "skipped" not in rows[measured], rows[measured]
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in rows[("torch", "fp16")]["skipped"]
        assert "tensorrt" in rows[("tensorrt", "int8")]["skipped"]
    assert report["matrix"] == {"images": 6, "captions": 30, "pairs": 180}


def test_throughput_figures_are_the_timed_work_over_the_timed_seconds(report):
    authors = report["offline"]["authors"]
    assert authors["pairs_timed"] == 6 * authors["captions_timed"]
    assert authors["pairs_per_second"] == pytest.approx(authors["pairs_timed"] / authors["score_seconds_timed"])
    torch_fp32 = next(r for r in report["offline"]["rows"] if (r["backend"], r["precision"]) == ("torch", "fp32"))
    peaks = report["hardware"]["peak_flops"]
    for row in (r for r in report["offline"]["rows"] if "skipped" not in r):
        assert row["pairs_timed"] % 6 == 0 and row["pairs_timed"] >= 6  # whole captions against all 6 images
        assert row["pairs_per_second"] == pytest.approx(row["pairs_timed"] / row["score_seconds_timed"])
        assert row["score_seconds"] == pytest.approx(180 / row["pairs_per_second"])
        assert row["total_seconds"] == pytest.approx(row["score_seconds"] + row["encode_seconds"])
        assert row["speedup_vs_authors"] == pytest.approx(row["pairs_per_second"] / authors["pairs_per_second"])
        assert row["speedup_vs_torch_fp32"] == pytest.approx(row["pairs_per_second"] / torch_fp32["pairs_per_second"])
        flops = report["offline"]["cost_model"]["graphs"]["pair_scorer_flops_per_pair"] * row["pairs_per_second"]
        assert row["flops_per_second"] == pytest.approx(flops)
        if peaks[row["precision"]]:
            assert row["fraction_of_peak"] == pytest.approx(flops / peaks[row["precision"]])
        assert 0 < row["padding_efficiency"] <= 1
        # sampled RSS while the row ran: above what torch alone takes, never above the process's peak so far
        assert 100 * 2**20 < row["peak_process_bytes"] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
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
        assert r["mean_batch_size"] == pytest.approx(r["requests"] / r["batches"])
        # a request's latency covers its wait in the queue; the single worker computes no longer than the setting ran
        assert 0 <= r["mean_queue_ms"] <= r["mean_ms"]
        assert r["mean_compute_ms_per_batch"] * r["batches"] <= 1e3 * r["seconds"]
        assert 0 < r["cpu_utilisation"] <= 1.05, r  # the scorer was busy all along, on the cores it may use


def test_report_is_written_as_json_and_plotted(report, tmp_path):
    path = write_report(report, tmp_path)
    loaded = json.loads(path.read_text())
    assert loaded["format"] == "xmr-serve-bench" and loaded["environment"]["versions"]["torch"]
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


def test_cpu_peak_is_cores_times_clock_times_vector_width(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    assert cpu_hardware().cores == cores
    info = {"model name": "Test CPU", "cpu MHz": "2600.0", "flags": "fma avx2 avx512f avx512_vnni"}
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: info)
    cpu = cpu_hardware()
    assert (cpu.name, cpu.cores) == ("Test CPU", cores)
    assert cpu.peak_flops == {"fp32": cores * 2.6e9 * 64, "fp16": cores * 2.6e9 * 64, "int8": cores * 2.6e9 * 256}
    info["flags"] = "fma avx2"
    assert cpu_hardware().peak_flops["int8"] == cpu_hardware().peak_flops["fp32"] == cores * 2.6e9 * 32
    del info["cpu MHz"]
    assert cpu_hardware().peak_flops == {"fp32": None, "fp16": None, "int8": None}


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
