"""Outputs are never lost: xmr replaces only what it wrote, installs directories whole, and a
kill or a failure at any moment leaves the previous or the new artifacts, loadable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import xmr.outputs as outputs
from xmr.calibration.calibrate import calibrate_artifacts
from xmr.calibration.config import CalibrationConfig
from xmr.data import SynthConfig, Vocabulary, write_synthetic
from xmr.errors import ArtifactError, OutputError
from xmr.export.artifacts import export_artifacts
from xmr.models import build_model, make_config
from xmr.models.checkpoint import save_checkpoint
from xmr.runtime.artifacts import Artifacts

REGIONS, IMG_DIM = 4, 8
CALIBRATION = CalibrationConfig(images=8, image_batch=4, caption_batch=20, pair_images=4)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "synth"
    write_synthetic(out, SynthConfig(n_train=20, n_dev=8, n_test=8, regions=REGIONS, img_dim=IMG_DIM, seed=5))
    return out


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory) -> Path:
    vocab = Vocabulary.load(data / "vocab.json")
    torch.manual_seed(0)
    model = build_model(make_config("imram", vocab_size=len(vocab), img_dim=IMG_DIM, embed_size=8, word_dim=8), vocab)
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "imram.pt", {"regions": REGIONS})


def precisions(directory: Path) -> set[str]:
    """The precisions of a complete artifact directory (every file checked against its sha256)."""
    return set(Artifacts.open(directory).precisions())


def calibrate(directory: Path, data: Path) -> None:
    calibrate_artifacts(directory, data, CALIBRATION, accuracy_target=0.01, eval_images=8, report_split=None,
                        show_progress=False, engine=False)


# -- what xmr may replace


def test_a_manifest_naming_files_outside_cannot_make_export_or_calibrate_delete_them(checkpoint, data, tmp_path):
    out, victim_dir, victim_file = tmp_path / "art", tmp_path / "victim_dir", tmp_path / "victim.txt"
    victim_dir.mkdir()
    (victim_dir / "keep.txt").write_text("precious")
    victim_file.write_text("precious")
    export_artifacts(checkpoint, out, ("fp32",), engine=False)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["graphs"]["pair_scorer"]["files"]["fp16"] = {"file": "../victim_dir", "sha256": "0" * 64}
    manifest["graphs"]["text_encoder"]["files"]["fp16"] = {"file": str(victim_file), "sha256": "0" * 64}
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="not a plain file name"):
        calibrate(out, data)  # such a manifest is not read at all
    with pytest.raises(OutputError, match="did not write"):
        export_artifacts(checkpoint, out, ("fp32",), engine=False)  # nor taken for xmr's own
    export_artifacts(checkpoint, out, ("fp32",), engine=False, overwrite=True)
    assert (victim_dir / "keep.txt").read_text() == "precious" and victim_file.read_text() == "precious"
    assert precisions(out) == {"fp32"}


def test_export_refuses_a_non_empty_directory_it_did_not_write(checkpoint, tmp_path):
    users = tmp_path / "userdata"
    users.mkdir()
    (users / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="non-empty directory that xmr did not write.*--overwrite"):
        export_artifacts(checkpoint, users, ("fp32",), engine=False)
    assert sorted(p.name for p in users.iterdir()) == ["thesis.tex"]
    export_artifacts(checkpoint, users, ("fp32",), engine=False, overwrite=True)  # told to: writes beside the file
    assert (users / "thesis.tex").read_text() == "years of work" and precisions(users) == {"fp32"}


def test_files_a_user_added_to_artifacts_survive_export_and_calibrate(checkpoint, data, tmp_path):
    out = tmp_path / "art"
    export_artifacts(checkpoint, out, ("fp32", "fp16"), engine=False)
    (out / "NOTES.md").write_text("deployed on host 3")
    (out / "extra").mkdir()
    (out / "extra" / "a.txt").write_text("a")
    export_artifacts(checkpoint, out, ("fp32",), engine=False)  # fp16 graphs dropped: xmr wrote them
    assert precisions(out) == {"fp32"} and not list(out.glob("*.fp16.onnx"))
    calibrate(out, data)
    assert precisions(out) == {"fp32", "int8"}
    assert (out / "NOTES.md").read_text() == "deployed on host 3" and (out / "extra" / "a.txt").read_text() == "a"


@pytest.mark.parametrize("make", ["file", "parent_file"])
def test_output_paths_that_cannot_hold_a_directory_fail_before_any_work(checkpoint, tmp_path, make):
    target = tmp_path / "x"
    target.write_text("a file")
    out = target if make == "file" else target / "art"
    with pytest.raises(OutputError, match="is a file"):
        export_artifacts(checkpoint, out, ("fp32",), engine=False)
    assert target.read_text() == "a file"


def test_what_a_killed_run_left_beside_the_target_is_removed_by_the_next(checkpoint, tmp_path):
    out = tmp_path / "art"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".art.xmr-new-{int(dead.stdout)}-0000abcd"
    leftover.mkdir()
    (leftover / "image_encoder.onnx").write_bytes(b"half")
    alive = tmp_path / f".art.xmr-new-{os.getpid()}-0000abcd"  # a run still going: left alone
    alive.mkdir()
    export_artifacts(checkpoint, out, ("fp32",), engine=False)
    assert not leftover.exists() and alive.exists()


# -- failures and kills at every step of an install


def _failing_at(monkeypatch, step: int) -> list[str]:
    """Make the ``step``-th file-system call of the install (rename, replace, exchange, link,
    copy, remove) fail; returns the calls made so far."""
    calls: list[str] = []

    def wrap(name, fn):
        def failing(*args, **kwargs):
            calls.append(name)
            if len(calls) == step:
                raise OSError(28, "No space left on device (injected)")
            return fn(*args, **kwargs)
        return failing

    for module, name in ((outputs.os, "rename"), (outputs.os, "replace"), (outputs.os, "link"),
                         (outputs.shutil, "copy2"), (outputs, "_exchange"), (outputs, "_remove")):
        monkeypatch.setattr(module, name, wrap(name, getattr(module, name)))
    return calls


@pytest.mark.parametrize("command", ["export", "calibrate"])
def test_a_failure_at_any_step_of_the_install_leaves_the_old_or_the_new_artifacts(checkpoint, data, tmp_path,
                                                                                  command):
    out = tmp_path / "art"
    export_artifacts(checkpoint, out, ("fp32",), engine=False)
    old, new = {"fp32"}, ({"fp32", "fp16"} if command == "export" else {"fp32", "int8"})
    step, seen = 1, set()
    while True:
        with pytest.MonkeyPatch.context() as patch:
            calls = _failing_at(patch, step)
            try:
                export_artifacts(checkpoint, out, ("fp32", "fp16"), engine=False) if command == "export" \
                    else calibrate(out, data)
                failed = False
            except OSError:
                failed = True
        found = precisions(out)
        seen.add(frozenset(found))
        assert found in (old, new), f"step {step} ({calls[-1]}) left {found}"
        if not failed:
            break
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".art.")], "staging left behind"
        if found == new:  # the swap happened before the failure: start again from the old directory
            export_artifacts(checkpoint, out, ("fp32",), engine=False)
        step += 1
    assert step > 3 and seen == {frozenset(old), frozenset(new)}


KILL_SCRIPT = """
import sys
from pathlib import Path
from xmr.calibration.calibrate import calibrate_artifacts
from xmr.calibration.config import CalibrationConfig
from xmr.export.artifacts import export_artifacts
command, checkpoint, out, data = sys.argv[1:]
print("started", flush=True)
if command == "export":
    export_artifacts(Path(checkpoint), Path(out), ("fp32", "fp16"), engine=False)
else:
    calibrate_artifacts(Path(out), Path(data), CalibrationConfig(images=8, image_batch=4, caption_batch=20,
                        pair_images=4), accuracy_target=0.01, eval_images=8, report_split=None,
                        show_progress=False, engine=False)
"""


def _run(command: str, checkpoint: Path, out: Path, data: Path, kill_after: float | None) -> float:
    """Run ``command`` in a child process, SIGKILLed ``kill_after`` seconds after it started
    working (None: to the end); returns the seconds it worked."""
    child = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, command, str(checkpoint), str(out), str(data)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert child.stdout.readline().strip() == "started"  # imports done
        start = time.perf_counter()
        if kill_after is None:
            assert child.wait(timeout=120) == 0
        else:
            try:
                child.wait(timeout=kill_after)
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGKILL)
                child.wait(timeout=30)
        return time.perf_counter() - start
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["export", "calibrate"])
def test_sigkill_at_any_moment_leaves_the_old_or_the_new_artifacts(checkpoint, data, tmp_path, command):
    out = tmp_path / "art"
    old, new = {"fp32"}, ({"fp32", "fp16"} if command == "export" else {"fp32", "int8"})
    export_artifacts(checkpoint, out, ("fp32",), engine=False)
    duration = _run(command, checkpoint, out, data, None)
    assert precisions(out) == new
    outcomes = []
    for fraction in (0.05, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.98, 1.0, 1.5):
        export_artifacts(checkpoint, out, ("fp32",), engine=False)  # back to the old directory (cleans leftovers)
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".art.")]
        _run(command, checkpoint, out, data, duration * fraction)
        found = precisions(out)
        assert found in (old, new), f"killed at {fraction:.0%} of the run: {found}"
        outcomes.append(found == new)
    assert not outcomes[0] and outcomes[-1]  # killed early: the old one; after the end: the new one


def test_overwrite_replaces_xmrs_files_and_keeps_the_users(tmp_path):
    """``--overwrite`` into a foreign directory, and re-writing xmr's own: the user's files stay."""
    out = tmp_path / "synth"
    out.mkdir()
    (out / "README.txt").write_text("mine")
    with pytest.raises(OutputError, match="did not write"):
        write_synthetic(out, SynthConfig(n_train=4, n_dev=2, n_test=2, regions=3, img_dim=4))
    write_synthetic(out, SynthConfig(n_train=4, n_dev=2, n_test=2, regions=3, img_dim=4), overwrite=True)
    write_synthetic(out, SynthConfig(n_train=6, n_dev=2, n_test=2, regions=3, img_dim=4))  # its own: replaced
    assert (out / "README.txt").read_text() == "mine" and len((out / "train_caps.txt").read_text().split("\n")) == 31


def test_saving_a_gallery_keeps_what_the_user_put_beside_it(checkpoint, data, tmp_path):
    from xmr.export.artifacts import export_artifacts
    from xmr.runtime import Scorer

    export_artifacts(checkpoint, tmp_path / "art", ("fp32",), engine=False)
    with Scorer.load(tmp_path / "art", backend="onnxruntime") as scorer:
        gallery = scorer.encode_texts(["a red car .", "a white dog ."])
        gallery.save(tmp_path / "g")
        (tmp_path / "g" / "notes.txt").write_text("mine")
        scorer.encode_texts(["a cat ."]).save(tmp_path / "g")
        assert (tmp_path / "g" / "notes.txt").read_text() == "mine" and len(scorer.load_gallery(tmp_path / "g")) == 1
