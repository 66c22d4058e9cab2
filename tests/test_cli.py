"""The xmr command line end to end on tiny data: synth -> train -> eval, import, errors."""

import json

import pytest

from conftest import FIXTURES, invoke, shared_vocab_path


def test_every_command_has_help():
    for command in ([], ["data", "synth"], ["train"], ["eval"], ["import-checkpoint"], ["export"]):
        result = invoke(*command, "--help")
        assert result.exit_code == 0 and "Usage" in result.output


@pytest.mark.parametrize("model", ["camp", "imram", "dual"])
def test_synth_train_eval(tmp_path, model):
    data = tmp_path / "data"
    assert invoke("data", "synth", "-o", data, "--n-train", 20, "--n-dev", 4, "--n-test", 4, "--img-dim", 8).exit_code == 0
    result = invoke("train", "--model", model, "--data", data, "-o", tmp_path / "run", "--embed-size", 8,
                    "--word-dim", 8, "--epochs", 2, "--warmup-epochs", 1, "--batch-size", 16, "--steps", 2)
    assert result.exit_code == 0, result.output
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert len(log["epochs"]) == 2 and log["epochs"][1]["steps"] == 12
    out = tmp_path / "metrics.json"
    result = invoke("eval", tmp_path / "run" / "checkpoint.pt", "--data", data, "--json", out)
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())["metrics"]
    assert 0 <= metrics["rsum"] <= 600 and metrics["i2t_r10"] >= metrics["i2t_r1"]


def test_import_checkpoint_then_eval_needs_no_authors_code(tmp_path):
    out = tmp_path / "imram.pt"
    result = invoke("import-checkpoint", FIXTURES / "authors" / "imram" / "checkpoint_full.pth.tar",
                    "--model", "imram", "--vocab", shared_vocab_path("f30k"), "-o", out)
    assert result.exit_code == 0, result.output
    from xmr.models import load_checkpoint

    model = load_checkpoint(out)
    assert model.kind == "imram" and len(model.vocab) == 8481
    assert model.checkpoint_metadata["epoch"] == 7 and len(model.checkpoint_metadata["source_sha256"]) == 64


@pytest.mark.parametrize("args, message", [
    (["eval", "missing.pt"], "checkpoint not found: missing.pt"),
    (["train", "--model", "camp", "--data", "nowhere"], "nowhere"),
    (["import-checkpoint", "x.pth", "--model", "imram", "--vocab", "v.json", "-o", "o.pt"], "not found"),
])
def test_user_errors_are_one_line_without_traceback(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = invoke(*args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
