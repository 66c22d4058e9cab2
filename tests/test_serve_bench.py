"""``xmr serve-bench`` at toy sizes: every reported figure is a measurement or derived from one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from xmr.calibration.accuracy import accuracy
from xmr.calibration.calibrate import calibrate_artifacts
from xmr.calibration.dataset import CalibrationConfig
from xmr.data import SynthConfig, Vocabulary, load_split, write_synthetic
from xmr.eval.hardware import cpu_hardware
from xmr.eval.offline_bench import OfflineConfig
from xmr.eval.online_bench import OnlineConfig, percentiles
from xmr.eval.serve_bench import PLOT, ServeBenchConfig, run_serve_bench, write_report
from xmr.eval.serve_report import plot_report
from xmr.eval.workload import MAX_WORDS, MIN_WORDS, caption_lengths, random_inputs
from xmr.export.artifacts import export_artifacts
from xmr.models import build_model, make_config
from xmr.models.checkpoint import save_checkpoint
from xmr.runtime import Scorer

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
        assert row["peak_process_bytes"] > 0 and 0 < row["padding_efficiency"] <= 1


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
        assert r["failed"] == 0 and 0 <= r["cpu_utilisation"]


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
    assert (inputs.ids[np.arange(7), inputs.lengths - 1] == 2).all() and cpu_hardware().cores >= 1


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
