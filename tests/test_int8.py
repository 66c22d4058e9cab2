"""INT8: calibration from real splits, explicit Q/DQ graphs, sensitivity fallback, report, errors."""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import xmr.calibration.calibrate as calibrate_module
from xmr.calibration.accuracy import accuracy
from xmr.calibration.calibrate import calibrate_artifacts
from xmr.calibration.config import CalibrationConfig
from xmr.calibration.dataset import build_calibration_set
from xmr.calibration.fallback import Evaluation
from xmr.calibration.quantize import QUANTIZED_OPS, quantizable_nodes, quantized_nodes
from xmr.data import SynthConfig, Vocabulary, load_split, write_synthetic
from xmr.errors import CalibrationError
from xmr.eval.metrics import rank_agreement, recall_report, spearman_rows
from xmr.calibration.fallback import graph_scorer
from xmr.eval import split_scores
from xmr.runtime import OnnxRuntimeBackend, Scorer
from xmr.runtime.backends import OpenVINOBackend
from xmr.runtime.artifacts import Artifacts
from xmr.export.artifacts import export_artifacts
from xmr.export.graphs import GRAPHS
from xmr.models import build_model, make_config, save_checkpoint

from conftest import invoke

SMALL = CalibrationConfig(images=12, caption_batch=10, pair_images=4)


def one_line(result) -> str:
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8_data")
    write_synthetic(out, SynthConfig(n_train=30, n_dev=12, n_test=12, regions=6, img_dim=8, seed=5))
    return out


def _random_checkpoint(kind, data, path, **fields):
    vocab = Vocabulary.load(data / "vocab.json")
    torch.manual_seed(0)
    model = build_model(make_config(kind, vocab_size=len(vocab), img_dim=8, embed_size=8, word_dim=8, **fields), vocab)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # non-degenerate activations (the default init of a tiny model is nearly constant)
    return save_checkpoint(model, path, {"regions": 6})


@pytest.fixture(scope="module", params=["camp", "imram"])
def exported(request, data, tmp_path_factory):
    """An fp32+fp16 artifact directory of a small random CAMP or IMRAM (full mode)."""
    root = tmp_path_factory.mktemp(request.param)
    checkpoint = _random_checkpoint(request.param, data, root / "model.pt")
    export_artifacts(checkpoint, root / "artifacts", ("fp32", "fp16"), engine=False)
    return root / "artifacts"


@pytest.fixture(scope="module")
def calibrated(exported, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibrated") / "artifacts"
    shutil.copytree(exported, out)
    calibrate_artifacts(out, data, SMALL, accuracy_target=0.5, eval_images=12, show_progress=False, engine=False)
    return out


def manifest_of(artifacts):
    return json.loads((artifacts / "manifest.json").read_text())


def int8_model(artifacts, graph):
    return onnx.load(str(artifacts / manifest_of(artifacts)["graphs"][graph]["files"]["int8"]["file"]))


def _initializers(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_every_matmul_is_quantized_weights_per_channel_activations_per_tensor_symmetric(calibrated):
    manifest = manifest_of(calibrated)
    for graph in GRAPHS:
        model = int8_model(calibrated, graph)
        fp32_nodes = quantizable_nodes(calibrated / manifest["graphs"][graph]["files"]["fp32"]["file"])
        assert sorted(quantized_nodes(model)) == sorted(fp32_nodes)  # no matmul left without Q/DQ (no fallback here)
        assert manifest["int8"]["nodes"][graph]["quantized"] == quantized_nodes(model)
        inits = _initializers(model)
        producers = {o: n for n in model.graph.node for o in n.output}
        for node in model.graph.node:
            if node.op_type not in QUANTIZED_OPS or node.name not in fp32_nodes:
                continue
            for position, name in enumerate(node.input[:2]):
                dq = producers[name]
                assert dq.op_type == "DequantizeLinear"
                scale, zero_point = inits[dq.input[1]], inits[dq.input[2]]
                assert zero_point.dtype == np.int8 and not zero_point.any()  # symmetric int8
                if dq.input[0] in inits:  # a weight: int8, one scale per output channel
                    weight = inits[dq.input[0]]
                    assert weight.dtype == np.int8 and position == 1
                    channels = weight.shape[1] if node.op_type == "MatMul" else weight.shape[0]
                    assert scale.shape == (channels,)
                else:  # an activation: quantized at run time with one calibrated scale
                    assert scale.shape == () and scale > 0 and producers[dq.input[0]].op_type == "QuantizeLinear"
        # TensorRT rejects int32 biases; ONNX Runtime fuses Q/DQ only when parameters are not shared
        assert not any(a.dtype == np.int32 for a in inits.values())
        qdq_parameters = [i for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") for i in n.input[1:]]
        assert len(qdq_parameters) == len(set(qdq_parameters))


def test_int8_graphs_run_in_onnx_runtime_and_the_report_figures_are_what_they_claim(calibrated, data):
    manifest = manifest_of(calibrated)
    report = json.loads((calibrated / "int8_report.json").read_text())
    assert (calibrated / "int8_report.md").read_text().count("| int8 |") == 1
    assert list(report["rows"]) == ["fp32", "fp16", "bf16", "int8"] and report["split"] == "test"
    split = load_split(data, "test", Vocabulary.load(calibrated / "vocab.json"))
    paths = {p: {g: calibrated / manifest["graphs"][g]["files"][p]["file"] for g in GRAPHS} for p in ("fp32", "int8")}
    scores = {p: split_scores(graph_scorer(Artifacts.open(calibrated), paths[p], p), split) for p in paths}
    int8 = report["rows"]["int8"]
    assert int8["rsum"] == pytest.approx(recall_report(scores["int8"], split.per_image).rsum)
    assert int8["delta_rsum"] == pytest.approx(int8["rsum"] - recall_report(scores["fp32"], split.per_image).rsum)
    assert int8["max_abs_score_error"] == pytest.approx(np.abs(scores["int8"] - scores["fp32"]).max(), rel=1e-5)
    assert 0 < int8["mean_abs_score_error"] < 0.1
    assert int8["t2i_spearman_mean"] == pytest.approx(rank_agreement(scores["fp32"], scores["int8"])["t2i_spearman_mean"])
    assert int8["t2i_spearman_min"] <= int8["t2i_spearman_mean"] < 1.0
    assert report["rows"]["fp32"]["delta_rsum"] == 0 and report["rows"]["fp32"]["i2t_spearman_min"] == pytest.approx(1.0)
    with Scorer(OpenVINOBackend(Artifacts.open(calibrated), "bf16", "cpu")) as bf16:  # the CPU's bf16 path
        bf16_scores = split_scores(bf16, split)
    assert report["rows"]["bf16"]["max_abs_score_error"] == pytest.approx(np.abs(bf16_scores - scores["fp32"]).max(),
                                                                          rel=1e-5)
    assert 0 < report["rows"]["bf16"]["mean_abs_score_error"] < 0.05


def test_calibration_uses_matching_and_non_matching_pairs_of_every_length_and_is_cached(calibrated, data):
    manifest = manifest_of(calibrated)
    calibration = manifest["int8"]["calibration"]
    assert calibration["split"] == "train" and calibration["method"] == "minmax" and calibration["images"] == 12
    assert calibration["matching_pairs"] > 0 and calibration["non_matching_pairs"] > calibration["matching_pairs"]
    split = load_split(data, "train", Vocabulary.load(calibrated / "vocab.json"))
    lengths = [len(split.caption_ids(i)) for i in range(split.n_captions)]
    assert calibration["caption_lengths"][0] <= np.median(lengths) <= calibration["caption_lengths"][1]
    record = json.loads((calibrated / "calibration" / "calibration_set.json").read_text())
    assert record["sha256"] == calibration["sha256"]
    assert {p.name for p in (calibrated / "calibration").glob("*.minmax.json")} == {f"{g}.minmax.json" for g in GRAPHS}
    before = {g: manifest["graphs"][g]["files"]["int8"]["sha256"] for g in GRAPHS}
    again = calibrate_artifacts(calibrated, data, SMALL, accuracy_target=0.5, eval_images=12, report_split=None,
                                show_progress=False, engine=False)
    assert again["int8"]["calibration"]["ranges_reused"] and not calibration["ranges_reused"]
    assert {g: again["graphs"][g]["files"]["int8"]["sha256"] for g in GRAPHS} == before
    other_seed = calibrate_artifacts(calibrated, data, CalibrationConfig(**{**SMALL.__dict__, "seed": 1}),
                                     accuracy_target=0.5, eval_images=12, report_split=None, show_progress=False, engine=False)
    assert other_seed["int8"]["calibration"]["sha256"] != calibration["sha256"]
    assert not other_seed["int8"]["calibration"]["ranges_reused"]


def test_methods_give_different_scales(exported, data, tmp_path):
    vocab = Vocabulary.load(exported / "vocab.json")
    fp32 = {g: exported / manifest_of(exported)["graphs"][g]["files"]["fp32"]["file"] for g in GRAPHS}
    split = load_split(data, "train", vocab)
    scales = {}
    for method in ("minmax", "percentile", "entropy"):
        config = CalibrationConfig(**{**SMALL.__dict__, "method": method, "percentile": 99.0})
        calibration = build_calibration_set(split, OnnxRuntimeBackend(Artifacts.open(exported), "fp32", "cpu"), config)
        from xmr.calibration.fallback import Quantizer

        paths = Quantizer(fp32, calibration, config, tmp_path / method).build(tmp_path / method)
        model = onnx.load(str(paths["pair_scorer"]))
        inits = _initializers(model)
        scales[method] = sorted(float(inits[n.input[1]]) for n in model.graph.node
                                if n.op_type == "QuantizeLinear")
    assert scales["percentile"] != scales["minmax"] and scales["entropy"] != scales["minmax"]
    assert sum(scales["percentile"]) < sum(scales["minmax"])  # percentiles clip the extremes


def test_calibration_never_reads_the_test_split(exported, data, tmp_path, monkeypatch):
    no_test = tmp_path / "data"
    shutil.copytree(data, no_test)
    for name in ("test_ims.npy", "test_caps.txt"):
        (no_test / name).unlink()
    read = []
    original = calibrate_module.load_split
    monkeypatch.setattr(calibrate_module, "load_split", lambda d, split, v: read.append(split) or original(d, split, v))
    out = tmp_path / "artifacts"
    shutil.copytree(exported, out)
    manifest = calibrate_artifacts(out, no_test, SMALL, accuracy_target=0.5, eval_images=12, report_split=None,
                                   show_progress=False, engine=False)
    assert set(read) == {"train", "dev"} and "int8" in manifest["graphs"]["pair_scorer"]["files"]
    for split in ("test", "testall"):
        with pytest.raises(CalibrationError, match="train or dev"):
            calibrate_artifacts(out, data, CalibrationConfig(split=split), report_split=None)
        with pytest.raises(CalibrationError, match="train or dev"):
            calibrate_artifacts(out, data, SMALL, eval_split=split, report_split=None)


def _penalising(harmful):
    """An evaluation whose rank agreement drops 0.01 for each quantized (graph, node) in ``harmful``."""
    real = Evaluation.__call__

    def evaluate(self, paths):
        metrics = real(self, paths)
        quantized = {(g, n) for g, path in paths.items() for n in quantized_nodes(onnx.load(str(path)))}
        drop = 0.01 * len(quantized & harmful)
        return {**metrics, "i2t_spearman_mean": 1.0 - drop, "t2i_spearman_mean": 1.0 - drop,
                "rsum": 100.0, "delta_rsum": 0.0}

    return evaluate


def test_fallback_keeps_the_most_sensitive_nodes_in_float32_until_the_target_holds(exported, data, tmp_path, monkeypatch):
    nodes = quantizable_nodes(exported / "pair_scorer.onnx")
    harmful = {nodes[0], nodes[-1]}
    monkeypatch.setattr(Evaluation, "__call__", _penalising({("pair_scorer", n) for n in harmful}))
    out = tmp_path / "artifacts"
    shutil.copytree(exported, out)
    manifest = calibrate_artifacts(out, data, SMALL, accuracy_target=0.995, eval_images=12, report_split=None,
                                   show_progress=False, engine=False)
    fallback = manifest["int8"]["nodes"]["pair_scorer"]["fallback"]
    assert {f["node"] for f in fallback} == harmful
    assert all(f["rank_correlation_drop"] == pytest.approx(0.01) and "0.995" in f["reason"] for f in fallback)
    assert manifest["int8"]["evaluation"]["all_nodes_int8"]["t2i_spearman_mean"] == pytest.approx(0.98)
    assert manifest["int8"]["evaluation"]["chosen"]["t2i_spearman_mean"] == pytest.approx(1.0)
    assert [s["float32_nodes"] for s in manifest["int8"]["fallback_steps"]] == [1, 2]
    quantized = set(quantized_nodes(int8_model(out, "pair_scorer")))
    assert quantized == set(nodes) - harmful and manifest["graphs"]["pair_scorer"]["files"]["int8"]["fallback_nodes"] == 2
    assert all(not n["fallback"] for g, n in manifest["int8"]["nodes"].items() if g != "pair_scorer")


def test_unreachable_target_is_an_error_that_leaves_the_artifacts_as_they_were(exported, data, tmp_path, monkeypatch):
    every_node = {(g, n) for g in GRAPHS for n in quantizable_nodes(exported / f"{g}.onnx")}
    monkeypatch.setattr(Evaluation, "__call__", _penalising(every_node))
    out = tmp_path / "artifacts"
    shutil.copytree(exported, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(CalibrationError, match="accuracy target 0.9999 not met.*lower --accuracy-target"):
        calibrate_artifacts(out, data, SMALL, accuracy_target=0.9999, eval_images=12, report_split=None,
                            show_progress=False, engine=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no int8 files, no temporary directory


@pytest.mark.parametrize("case, message", [
    ("images", "too small: use at least 4"),
    ("no_captions", "cannot read the calibration split: captions file not found"),
    ("feature_dim", "features are 10-d but the model takes 8-d"),
    ("regions", "have 4 regions but the graphs were exported for 6"),
    ("tiny_split", "has 2 images; calibration needs at least 4"),
    ("target", "must be in \\(0, 1\\]"),
])
def test_bad_calibration_input_is_a_clear_error(exported, data, tmp_path, case, message):
    config, target, data_dir = SMALL, 0.99, tmp_path / "data"
    if case in ("feature_dim", "regions", "tiny_split"):
        dims = {"feature_dim": {"img_dim": 10}, "regions": {"regions": 4}, "tiny_split": {"n_train": 2}}[case]
        write_synthetic(data_dir, SynthConfig(**{"n_train": 30, "n_dev": 12, "n_test": 12, "regions": 6, "img_dim": 8, **dims}))
    else:
        shutil.copytree(data, data_dir)
    if case == "images":
        config = CalibrationConfig(images=2)
    if case == "no_captions":
        (data_dir / "train_caps.txt").unlink()
    if case == "target":
        target = 1.5
    with pytest.raises(CalibrationError, match=message):
        calibrate_artifacts(exported, data_dir, config, accuracy_target=target, report_split=None, engine=False)


def test_spearman_agreement_is_one_for_a_monotone_map_and_minus_one_reversed():
    scores = np.random.default_rng(0).standard_normal((4, 20))
    assert np.allclose(spearman_rows(scores, 3 * scores + 1), 1.0)
    assert np.allclose(spearman_rows(scores, -scores), -1.0)
    metrics = accuracy(scores[:, :20].reshape(4, 20), scores.reshape(4, 20), per_image=5)
    assert metrics["mean_abs_score_error"] == 0 and metrics["i2t_spearman_min"] == pytest.approx(1.0)


def test_cli_export_int8_and_calibrate_errors(data, tmp_path):
    checkpoint = _random_checkpoint("imram", data, tmp_path / "model.pt")
    out = tmp_path / "artifacts"
    result = invoke("export", "--model", "imram", "--checkpoint", checkpoint, "-o", out, "--precision", "fp16,int8",
                    "--data", data, "--no-engine")
    assert result.exit_code == 0, result.output
    manifest = manifest_of(out)
    assert all(set(g["files"]) == {"fp32", "fp16", "int8"} for g in manifest["graphs"].values())
    assert "INT8 meets the target" in one_line(result) or "INT8 MISSES the target" in one_line(result)
    assert (out / "int8_report.md").is_file()
    result = invoke("calibrate", "--model", "imram", "--artifacts", out, "--data", data, "--split", "test")
    assert result.exit_code == 2 and "error: calibration reads the train or dev split, not 'test'" in one_line(result)
    result = invoke("export", "--model", "imram", "--checkpoint", checkpoint, "-o", out, "--precision", "int4")
    assert result.exit_code == 2 and "unknown precision int4" in one_line(result)
    # re-exporting without int8 removes the previous int8 files and report
    assert invoke("export", "--model", "imram", "--checkpoint", checkpoint, "-o", out, "--no-engine").exit_code == 0
    assert not list(out.glob("*.int8.onnx")) and not (out / "int8_report.json").exists() and not (out / "calibration").exists()
