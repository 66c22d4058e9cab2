"""The xmr command line end to end on tiny data: synth -> train -> eval, import, errors; the
library calls behind it (``xmr.train.defaults``)."""

import hashlib
import json
import re

import pytest

from conftest import FIXTURES, invoke, shared_vocab_path

METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "i2t_medr", "t2i_medr")
TINY_SYNTH = {"n_train": 20, "n_dev": 4, "n_test": 4, "img_dim": 8, "regions": 4}
TINY_TRAIN = {"embed_size": 8, "word_dim": 8}


def test_every_command_has_help():
    for command in ([], ["data", "synth"], ["train"], ["eval"], ["import-checkpoint"], ["export"], ["calibrate"],
                    ["serve-bench"]):
        result = invoke(*command, "--help")
        assert result.exit_code == 0 and "Usage" in result.output


def test_model_choices_come_from_the_registry():
    from xmr.models import cross_attention_models, list_models
    from xmr.models.authors import AUTHORS_STATES

    assert cross_attention_models() == ["camp", "imram"] and list_models() == ["camp", "imram", "dual"]
    for command, kinds in (("train", list_models()), ("export", cross_attention_models()),
                           ("calibrate", cross_attention_models()), ("serve-bench", cross_attention_models()),
                           ("import-checkpoint", list(AUTHORS_STATES))):
        result = invoke(command, "--model", "bogus")
        assert result.exit_code == 2, result.output
        assert f"'bogus' is not one of {', '.join(map(repr, kinds))}." in result.stderr, (command, result.stderr)


@pytest.mark.parametrize("options, schedule", [
    (["-m", "camp"], (8, 4)), (["-m", "imram"], (4, 2)), (["-m", "dual"], (4, 2)),
    (["-m", "camp", "--epochs", 3], (3, 4)), (["-m", "camp", "--lr-update", 1], (8, 1)),
    (["-m", "imram", "--epochs", 6, "--lr-update", 3], (6, 3))])
def test_train_schedule_defaults_per_model(monkeypatch, tmp_path, options, schedule):
    """``xmr train`` without --epochs/--lr-update trains with the model's schedule
    (``SCHEDULES``: CAMP's is longer), and either option given wins over it."""
    import xmr.train.defaults as defaults
    from xmr.train import default_config

    seen = {}

    def train_model(model, **kwargs):
        seen.update(model=model, config=kwargs["config"])
        return defaults.TrainedRun(tmp_path / "checkpoint.pt", {"best_dev_rsum": 0.0})

    monkeypatch.setattr(defaults, "train_model", train_model)
    result = invoke("train", *options)
    assert result.exit_code == 0, result.output
    assert (seen["config"].epochs, seen["config"].lr_update) == schedule
    model = options[1]
    if len(options) == 2:  # the library's default is the same schedule
        assert seen["config"] == default_config(model)


def _table_row(output: str) -> list[str]:
    """The cells of the one all-numeric row of the table ``xmr eval`` printed."""
    rows = [cells for line in output.splitlines()
            if (cells := [c.strip() for c in line.strip().strip("│┃").split("│")]) and len(cells) == len(METRIC_KEYS)
            and all(re.fullmatch(r"-?\d+\.\d", c) for c in cells)]
    assert len(rows) == 1, output
    return rows[0]


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
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    result = invoke("eval", checkpoint, "--data", data, "--json", out)
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert {k: written[k] for k in ("format", "checkpoint", "split", "fold5")} == {
        "format": "xmr-eval", "checkpoint": str(checkpoint), "split": "test", "fold5": False}
    from xmr.data import load_split
    from xmr.eval import evaluate
    from xmr.models import load_checkpoint

    net = load_checkpoint(checkpoint)
    expected = evaluate(net, load_split(data, "test", net.vocab), show_progress=False).report.to_dict()
    assert net.kind == model and written["metrics"] == pytest.approx(expected, abs=1e-9)
    assert expected["rsum"] == pytest.approx(sum(expected[k] for k in METRIC_KEYS[:6]))
    assert _table_row(result.output) == [f"{expected[k]:.1f}" for k in METRIC_KEYS]


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


def _mtimes(*directories):
    return {p: p.stat().st_mtime_ns for d in directories for p in sorted(d.rglob("*")) if p.is_file()}


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_ensure_checkpoint_and_artifacts_make_only_what_is_missing(tmp_path, monkeypatch):
    """README's defaults (data/synth, runs/MODEL, artifacts/MODEL) made on first use, then reused as they are."""
    from xmr.data import SynthConfig
    from xmr.models import load_checkpoint
    from xmr.train import TrainConfig
    from xmr.train.defaults import ensure_artifacts, ensure_checkpoint

    monkeypatch.chdir(tmp_path)
    tiny = {"synth": SynthConfig(**TINY_SYNTH), **TINY_TRAIN,
            "config": TrainConfig(epochs=1, warmup_epochs=1, batch_size=16), "show_progress": False}
    checkpoint = ensure_checkpoint("imram", **tiny)
    assert checkpoint == tmp_path.joinpath("runs", "imram", "checkpoint.pt").relative_to(tmp_path)
    net = load_checkpoint(checkpoint)
    assert net.kind == "imram" and net.config.embed_size == 8 and net.config.img_dim == 8
    assert json.loads((tmp_path / "data" / "synth" / "synth_config.json").read_text())["n_train"] == 20
    made = _mtimes(tmp_path / "data", tmp_path / "runs")
    assert ensure_checkpoint("imram", **tiny) == checkpoint  # there: no data written, no training
    assert _mtimes(tmp_path / "data", tmp_path / "runs") == made

    artifacts = ensure_artifacts("imram", show_progress=False)  # exports runs/imram/checkpoint.pt, trains nothing
    assert artifacts == tmp_path.joinpath("artifacts", "imram").relative_to(tmp_path)
    manifest = json.loads((artifacts / "manifest.json").read_text())
    assert manifest["model"] == "imram" and manifest["source_checkpoint"]["sha256"] == _sha256(checkpoint)
    assert manifest["regions"] == TINY_SYNTH["regions"]
    assert _mtimes(tmp_path / "data", tmp_path / "runs") == made
    exported = _mtimes(artifacts)
    assert ensure_artifacts("imram", checkpoint=tmp_path / "elsewhere.pt", show_progress=False) == artifacts
    assert _mtimes(artifacts) == exported  # a manifest is there: nothing exported (the checkpoint is not even read)

    # and the commands use them: `xmr export` without --checkpoint takes runs/imram/checkpoint.pt as it is
    result = invoke("export", "--model", "imram", "-o", tmp_path / "again", "--precision", "fp32", "--no-engine")
    assert result.exit_code == 0, result.output
    assert "no checkpoint" not in result.output and _mtimes(tmp_path / "data", tmp_path / "runs") == made
    assert json.loads((tmp_path / "again" / "manifest.json").read_text())["source_checkpoint"]["sha256"] == _sha256(checkpoint)


def test_training_twice_with_one_seed_gives_the_same_checkpoint(tmp_path):
    """``--seed`` decides the whole run, the initial weights included; another seed, other weights."""
    import torch

    from xmr.data import SynthConfig, write_synthetic
    from xmr.train import TrainConfig
    from xmr.train.defaults import train_model

    data = write_synthetic(tmp_path / "data", SynthConfig(**TINY_SYNTH, seed=3))
    weights = []
    for run, seed in (("a", 5), ("b", 5), ("c", 6)):
        config = TrainConfig(epochs=1, warmup_epochs=1, batch_size=16, max_steps=2, seed=seed)
        trained = train_model("imram", data, tmp_path / run, **TINY_TRAIN, config=config, show_progress=False)
        weights.append(torch.load(trained.checkpoint, weights_only=True)["state_dict"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_ensure_checkpoint_trains_on_given_data_into_given_run(tmp_path):
    from xmr.data import SynthConfig, write_synthetic
    from xmr.train import TrainConfig
    from xmr.train.defaults import ensure_checkpoint

    data = write_synthetic(tmp_path / "data", SynthConfig(**TINY_SYNTH, seed=3))
    written = _mtimes(data)
    checkpoint = ensure_checkpoint("camp", data, tmp_path / "run", synth=SynthConfig(n_train=998), **TINY_TRAIN,
                                   config=TrainConfig(epochs=1, warmup_epochs=1, batch_size=16, max_steps=1),
                                   show_progress=False)
    assert checkpoint == tmp_path / "run" / "checkpoint.pt" and checkpoint.is_file()
    assert _mtimes(data) == written  # a dataset was there: used, not rewritten with ``synth``
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert log["model"] == "camp" and log["train_config"]["max_steps"] == 1
