"""`xmr export`: artifacts and manifest from a trained checkpoint, and one-line errors."""

import hashlib
import json

import onnx
import pytest

from conftest import invoke


def one_line(result) -> str:
    return " ".join(result.output.split())  # the console wraps long lines


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny IMRAM trained by the CLI on 6-region synthetic data."""
    root = tmp_path_factory.mktemp("export_cli")
    assert invoke("data", "synth", "-o", root / "data", "--n-train", 20, "--n-dev", 4, "--n-test", 4,
                  "--img-dim", 8, "--regions", 6).exit_code == 0
    result = invoke("train", "--model", "imram", "--data", root / "data", "-o", root / "run", "--embed-size", 8,
                    "--word-dim", 8, "--epochs", 1, "--warmup-epochs", 1, "--batch-size", 16)
    assert result.exit_code == 0, result.output
    return root / "run" / "checkpoint.pt"


def test_export_writes_graphs_and_a_manifest_that_describes_them(trained, tmp_path):
    out = tmp_path / "artifacts"
    result = invoke("export", "--model", "imram", "--checkpoint", trained, "-o", out, "--no-engine")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == "imram" and manifest["config"]["mode"] == "full" and manifest["opset"] == 18
    assert manifest["regions"] == 6  # from the checkpoint's training data
    assert manifest["source_checkpoint"]["sha256"] == sha256(trained)
    assert manifest["vocab"]["sha256"] == sha256(out / manifest["vocab"]["file"])
    assert manifest["engines"] == {"built": False, "reason": "not requested"}
    assert manifest["profile"] == {"n_images": [1, 16, 64], "n_captions": [1, 64, 256], "length": [1, 32, 64]}
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest["tools"])
    assert set(manifest["graphs"]) == {"image_encoder", "text_encoder", "pair_scorer"}
    for name, graph in manifest["graphs"].items():
        assert set(graph["files"]) == {"fp32", "fp16"}
        for precision, entry in graph["files"].items():
            path = out / entry["file"]
            assert entry["sha256"] == sha256(path)
            assert max(entry["max_abs_diff_vs_torch_fp32"].values()) <= entry["tolerance"]
            model = onnx.load(str(path))
            assert [i.name for i in model.graph.input] == [t["name"] for t in graph["inputs"]]
            assert [o.name for o in model.graph.output] == [t["name"] for t in graph["outputs"]]
    scorer_inputs = {t["name"]: t["shape"] for t in manifest["graphs"]["pair_scorer"]["inputs"]}
    assert scorer_inputs["image_regions"] == ["n_images", 6, 8]


def test_export_only_fp32_when_asked(trained, tmp_path):
    result = invoke("export", "-m", "imram", "--checkpoint", trained, "-o", tmp_path, "--precision", "fp32", "--no-engine")
    assert result.exit_code == 0, result.output
    assert not list(tmp_path.glob("*.fp16.onnx")) and (tmp_path / "pair_scorer.onnx").is_file()


def test_export_bf16_when_asked_records_it_in_the_manifest(trained, tmp_path):
    result = invoke("export", "-m", "imram", "--checkpoint", trained, "-o", tmp_path, "--precision", "fp32,bf16",
                    "--no-engine")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert sorted(manifest["graphs"]["pair_scorer"]["files"]) == ["bf16", "fp32"]
    assert (tmp_path / "pair_scorer.bf16.onnx").is_file() and not list(tmp_path.glob("*.fp16.onnx"))


@pytest.mark.parametrize("args, message", [
    (["--model", "camp"], "holds a imram model, not camp"),
    (["--model", "imram", "--engine"], "cannot build TensorRT engines"),
    (["--model", "imram", "--precision", "fp32,bf8"], "unknown precision bf8"),
])
def test_bad_requests_are_one_line_errors(trained, tmp_path, args, message):
    result = invoke("export", "--checkpoint", trained, "-o", tmp_path, *args)
    assert result.exit_code == 2 and message in one_line(result) and "Traceback" not in result.output


def test_missing_or_corrupt_checkpoint(tmp_path):
    result = invoke("export", "--model", "camp", "--checkpoint", tmp_path / "none.pt")
    assert result.exit_code == 2 and "checkpoint not found" in one_line(result)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    result = invoke("export", "--model", "camp", "--checkpoint", tmp_path / "bad.pt")
    assert result.exit_code == 2 and "not an xmr checkpoint" in one_line(result)


@pytest.mark.filterwarnings("ignore:Use Deprecated in TensorRT-RTX:DeprecationWarning")  # timing cache: a no-op there
def test_engines_are_built_and_recorded_when_tensorrt_and_a_gpu_are_there(trained, tmp_path, monkeypatch):
    """The engine path of `xmr export`, driven by TensorRT-RTX in place of TensorRT and a GPU
    (portable engines; what a real GPU and TensorRT add is in docs/export.md)."""
    import torch

    import xmr.export.artifacts as artifacts
    from xmr.export.tensorrt import load_tensorrt

    rtx = load_tensorrt("tensorrt_rtx")
    if rtx is None:
        pytest.skip("tensorrt_rtx is not installed")
    monkeypatch.setattr(artifacts, "load_tensorrt", lambda name: rtx)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "test GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (8, 9))
    manifest = artifacts.export_artifacts(trained, tmp_path, ("fp32", "fp16"), engine=True)
    engines = manifest["engines"]
    assert engines["built"] and engines["gpu"] == "test GPU" and engines["compute_capability"] == "8.9"
    assert engines["tensorrt"] == rtx.__version__
    for graph, files in engines["files"].items():
        assert set(files) == {"fp32", "fp16"}
        for entry in files.values():
            assert (tmp_path / entry["file"]).stat().st_size > 1000 and entry["sha256"] == sha256(tmp_path / entry["file"])
    assert json.loads((tmp_path / "manifest.json").read_text())["engines"] == engines


def test_bf16_engines_are_skipped_with_the_reason_before_compute_capability_8(tmp_path, monkeypatch):
    """An older GPU gets its fp32 engines; bf16 is left out and says why, the export goes on."""
    import types

    import torch

    import xmr.export.artifacts as artifacts
    from xmr.export.tensorrt import BuildOptions, ProfileShapes

    built = []
    monkeypatch.setattr(artifacts, "load_tensorrt", lambda name: types.SimpleNamespace(__version__="10.0"))
    monkeypatch.setattr(artifacts, "build_engine", lambda trt, path, *args: built.append(path.name) or b"engine")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "old GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (7, 5))
    specs = dict.fromkeys(artifacts.GRAPHS)  # read by build_engine only
    engines = artifacts.build_engines(tmp_path, specs, ("fp32", "bf16"), ProfileShapes(), BuildOptions(), required=True)
    assert built == ["image_encoder.onnx", "text_encoder.onnx", "pair_scorer.onnx"]
    assert {graph: set(files) for graph, files in engines["files"].items()} == {
        "image_encoder": {"fp32"}, "text_encoder": {"fp32"}, "pair_scorer": {"fp32"}}
    assert engines["skipped"] == {"bf16": "bf16 engines need compute capability >= 8.0, this GPU has 7.5"}
