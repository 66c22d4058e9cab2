"""Imported authors' checkpoints score exactly as the authors' own code did.

The fixtures under fixtures/authors/ were produced by running the released CAMP and
IMRAM code (unmodified, outside this repository) on small seeded weights; see the
README.md beside each. Only their outputs and checkpoints are stored here.
"""

import builtins
import hashlib
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
import types
import warnings
import zipfile
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import torch

from xmr.data import Vocabulary
from xmr.errors import CheckpointError
from xmr.models.authors import check_output_is_not_input, import_authors_checkpoint, read_authors_checkpoint
from conftest import FIXTURES, shared_vocab_path

IMRAM = FIXTURES / "authors" / "imram"
CAMP = FIXTURES / "authors" / "camp"


def _run(model, golden):
    features, ids, lengths = (torch.from_numpy(golden[k]) for k in ("features", "ids", "lengths"))
    with torch.no_grad():
        img, cap = model.encode_images(features), model.encode_texts(ids, lengths)
        return img, cap, lengths, model.score(img, cap, lengths)


@pytest.mark.parametrize("mode", ["full", "text", "image"])
def test_imram_import_matches_authors_scores(f30k_vocab, mode):
    golden = np.load(IMRAM / "golden.npz")
    model = import_authors_checkpoint(IMRAM / f"checkpoint_{mode}.pth.tar", "imram", f30k_vocab)
    assert model.config.mode == mode and model.config.steps == 3 and not model.config.memory_norm
    img, cap, lengths, scores = _run(model, golden)
    np.testing.assert_allclose(img.numpy(), golden["img_emb"], atol=1e-6)
    np.testing.assert_allclose(cap.numpy(), golden["cap_emb"], atol=1e-6)
    np.testing.assert_allclose(scores.numpy(), golden[f"scores_{mode}"], atol=1e-4, rtol=0)
    if mode == "full":
        with torch.no_grad():
            np.testing.assert_allclose(model.text_steps(img, cap, lengths).numpy(), golden["steps_t2i"], atol=1e-5)
            np.testing.assert_allclose(model.image_steps(img, cap, lengths).numpy(), golden["steps_i2t"], atol=1e-5)


def test_imram_memory_norm_matches_authors(f30k_vocab):
    golden = np.load(IMRAM / "golden.npz")
    model = import_authors_checkpoint(IMRAM / "checkpoint_full.pth.tar", "imram", f30k_vocab)
    model.config.memory_norm = True
    np.testing.assert_allclose(_run(model, golden)[3].numpy(), golden["scores_full_imramnorm"], atol=1e-4, rtol=0)


def test_imram_training_loss_matches_authors(f30k_vocab):
    golden = np.load(IMRAM / "golden.npz")
    model = import_authors_checkpoint(IMRAM / "checkpoint_full.pth.tar", "imram", f30k_vocab).train()
    ids, lengths = torch.from_numpy(golden["ids"]), torch.from_numpy(golden["lengths"])
    loss = model.loss(model.similarity(torch.from_numpy(golden["loss_features"]), ids, lengths))
    assert loss.item() == pytest.approx(float(golden["loss_full"]), rel=1e-5)
    loss.backward()
    np.testing.assert_allclose(model.memory_t2i.linear.weight.grad.numpy(), golden["grad_full_linear_t2i_weight"], atol=1e-5)


def test_vocabulary_must_match_checkpoint():
    small = Vocabulary.from_words(["dog"])
    with pytest.raises(CheckpointError, match="vocab_size=8481 but the vocabulary has 5 words"):
        import_authors_checkpoint(IMRAM / "checkpoint_full.pth.tar", "imram", small)


def _tampered_camp(tmp_path, edit):
    """The CAMP fixture edited; its options re-saved as a plain dict (no easydict here)."""
    blob = read_authors_checkpoint(CAMP / "checkpoint.pth.tar")
    edit(blob)
    path = tmp_path / "tampered_camp.pth.tar"
    torch.save(blob, path)
    return path


def _tampered(tmp_path, source, edit):
    blob = torch.load(source, weights_only=False)
    edit(blob)
    path = tmp_path / "tampered.pth.tar"
    torch.save(blob, path)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda b: b["model"].pop("module.gate_i2t.bias"), "missing key for 'memory_i2t.gate.bias'"),
    (lambda b: b["model"].__setitem__("module.extra.weight", torch.zeros(1)), "cannot map key 'module.extra.weight'"),
    (lambda b: b["model"].__setitem__("module.linear_t2i.weight", torch.zeros(3, 3)), "shape mismatch for 'memory_t2i.linear.weight'"),
    (lambda b: setattr(b["opt"], "raw_feature_norm", "softmax"), "raw_feature_norm='softmax'"),
    (lambda b: setattr(b["opt"], "model_mode", "vse"), "model_mode='vse'"),
])
def test_unmappable_imram_checkpoints_are_refused(tmp_path, f30k_vocab, edit, message):
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[")):
        import_authors_checkpoint(_tampered(tmp_path, IMRAM / "checkpoint_full.pth.tar", edit), "imram", f30k_vocab)


def test_arbitrary_pickled_code_is_not_run(tmp_path, f30k_vocab):
    path = _tampered(tmp_path, IMRAM / "checkpoint_full.pth.tar", lambda b: b.__setitem__("evil", builtins.print))
    with pytest.raises(CheckpointError, match="cannot read"):
        import_authors_checkpoint(path, "imram", f30k_vocab)


def test_camp_import_matches_authors_scores_without_easydict(f30k_vocab, monkeypatch):
    monkeypatch.setitem(sys.modules, "easydict", None)  # `import easydict` would fail
    golden = np.load(CAMP / "golden.npz")
    model = import_authors_checkpoint(CAMP / "checkpoint.pth.tar", "camp", f30k_vocab)
    assert model.config.num_heads == 4 and not model.config.img_norm and not model.config.txt_norm
    assert model.authors_metadata == {"epoch": 7, "best_rsum": 123.4, "Eiters": 100}
    img, cap, lengths, scores = _run(model, golden)
    np.testing.assert_allclose(img.numpy(), golden["img_emb"], atol=1e-6)
    np.testing.assert_allclose(cap.numpy(), golden["cap_emb"], atol=1e-6)
    np.testing.assert_allclose(scores.numpy(), golden["scores"], atol=1e-4, rtol=0)


def test_camp_training_loss_matches_authors(f30k_vocab):
    golden = np.load(CAMP / "golden.npz")
    model = import_authors_checkpoint(CAMP / "checkpoint.pth.tar", "camp", f30k_vocab).train()
    ids, lengths = torch.from_numpy(golden["ids"]), torch.from_numpy(golden["lengths"])
    scores = model.similarity(torch.from_numpy(golden["loss_features"]), ids, lengths)
    np.testing.assert_allclose(scores.detach().numpy(), golden["loss_scores"], atol=1e-5)
    assert model.loss(scores).item() == pytest.approx(float(golden["loss"]), rel=1e-5)


@pytest.mark.parametrize("edit, message", [
    (lambda b: b["opt"].__setitem__("measure", "cross_attention_new"), "measure='cross_attention_new'"),
    (lambda b: b["opt"].__setitem__("bi_gru", False), "bi_gru=False"),
    (lambda b: b["model"][2].pop("module.fc_out.3.bias"), "missing key for 'out_logit.bias'"),
    (lambda b: b["model"].pop(), "must be [image encoder, text encoder, similarity]"),
])
def test_unmappable_camp_checkpoints_are_refused(tmp_path, f30k_vocab, edit, message):
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[")):
        import_authors_checkpoint(_tampered_camp(tmp_path, edit), "camp", f30k_vocab)


def test_old_torch_format_and_numpy_scalars_load(tmp_path, f30k_vocab):
    """Checkpoints of the authors' era: legacy (non-zip) serialisation, best_rsum a numpy float."""
    blob = torch.load(IMRAM / "checkpoint_full.pth.tar", weights_only=False)
    blob["best_rsum"] = np.float64(512.25)
    path = tmp_path / "legacy.pth.tar"
    torch.save(blob, path, _use_new_zipfile_serialization=False)
    model = import_authors_checkpoint(path, "imram", f30k_vocab)
    assert model.authors_metadata["best_rsum"] == 512.25


# --- files that must be refused without running anything they carry -------------------------


class _WritesFileOnLoad(torch.nn.Module):
    """Scripted, its ``__setstate__`` is compiled into the archive's code/ and runs when
    torch.jit.load rebuilds the module: it writes a file (aten::save) at a path chosen here."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:
        return (self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:
        self.target = state[0]
        self.training = state[1]
        torch.save(torch.tensor([1]), self.target)


class _RefuseEveryGlobal(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing {module}.{name}")


# what read_authors_checkpoint used to pass torch.load, at its strictest: no global at all
_REFUSING_PICKLE = types.SimpleNamespace(
    __name__="refusing_pickle", Unpickler=_RefuseEveryGlobal, load=lambda f, **kw: _RefuseEveryGlobal(f, **kw).load())


def _refused(path, match=".*"):
    """The message of the one-line CheckpointError, naming the file, that reading ``path`` raises."""
    with pytest.raises(CheckpointError) as info:
        read_authors_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    assert re.search(match, message), message
    return message


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_payload_is_refused_unrun(tmp_path):
    marker, archive = tmp_path / "written_by_payload", tmp_path / "checkpoint.pth.tar"
    torch.jit.script(_WritesFileOnLoad(str(marker))).save(str(archive))
    assert not marker.exists()
    # the hole: torch.load hands the archive to torch.jit.load, past any pickle_module, and it runs
    with pytest.warns(UserWarning, match="TorchScript archive"):
        torch.load(archive, map_location="cpu", weights_only=False, pickle_module=_REFUSING_PICKLE)
    assert marker.exists()
    marker.unlink()
    message = _refused(archive)
    assert not marker.exists(), "the payload ran"
    assert "TorchScript" in message, message


class _Runs:
    """Pickles as a call of ``func(arg)``, made when the pickle is loaded."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def _payload(how, marker):
    if how == "os.system":
        return _Runs(os.system, f"touch '{marker}'"), f"{os.system.__module__}.system"
    return _Runs(exec, f"open({str(marker)!r}, 'w').close()"), "builtins.exec"


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("how", ["os.system", "builtins.exec"])
def test_pickled_code_is_refused_unrun(tmp_path, how, legacy):
    marker, path = tmp_path / "written_by_payload", tmp_path / "evil.pth.tar"
    payload, name = _payload(how, marker)
    blob = torch.load(IMRAM / "checkpoint_full.pth.tar", weights_only=False)
    blob["opt"].resume = payload
    torch.save(blob, path, _use_new_zipfile_serialization=not legacy)
    torch.load(path, weights_only=False)  # the payload is live: an unrestricted load runs it
    assert marker.exists()
    marker.unlink()
    message = _refused(path)
    assert not marker.exists(), "the payload ran"
    assert f"refusing to unpickle {name}" in message, message


def _rezip(tmp_path, edit, source=IMRAM / "checkpoint_full.pth.tar"):
    """``source`` (a torch.save zip) rewritten by Python's zipfile after ``edit`` of its [(name, bytes)]."""
    with zipfile.ZipFile(source) as archive:
        entries = [(info.filename, archive.read(info)) for info in archive.infolist()]
    path = tmp_path / "rezipped.pth.tar"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
            for name, data in edit(entries):
                archive.writestr(name, data)
    return path


PREFIX = "checkpoint_full.pth"


def test_pickle_with_stack_global_in_zip_is_refused_unrun(tmp_path):
    marker = tmp_path / "written_by_payload"
    evil = pickle.dumps({"model": {}, "opt": _payload("builtins.exec", marker)[0]}, protocol=4)
    path = _rezip(tmp_path, lambda es: [(n, evil if n.endswith("/data.pkl") else d) for n, d in es])
    torch.load(path, weights_only=False)  # the payload is live: an unrestricted load runs it
    assert marker.exists()
    marker.unlink()
    message = _refused(path)
    assert not marker.exists(), "the payload ran"
    assert "refusing to unpickle (a global named through STACK_GLOBAL)" in message, message


def test_rezipped_fixture_still_loads(tmp_path):
    """Python-written zips are accepted: the refusals below are the validation's, not the zip writer's."""
    blob = read_authors_checkpoint(_rezip(tmp_path, lambda es: es))
    assert blob["opt"]["model_mode"] == "full_IMRAM"


def test_any_constants_pkl_is_refused_as_torchscript(tmp_path):
    """A record named constants.pkl is all it takes for torch.load to hand a zip to torch.jit.load."""
    path = _rezip(tmp_path, lambda es: es + [(f"{PREFIX}/constants.pkl", pickle.dumps(()))])
    with open(path, "rb") as file:
        assert torch.serialization._is_torchscript_zip(torch._C.PyTorchFileReader(file))
    _refused(path, "TorchScript")


@pytest.mark.parametrize("edit, message", [
    (lambda es: es + [(f"{PREFIX}/code/__torch__.py", b"")], "TorchScript"),
    (lambda es: es + [(f"{PREFIX}/extra/model.json", b"{}")], "TorchScript"),
    (lambda es: es + [(f"{PREFIX}/bytecode.pkl", b"")], "TorchScript"),
    (lambda es: es + [(f"{PREFIX}/notes.txt", b"hi")], "unexpected entries"),
    (lambda es: es + [("other/data.pkl", b"")], "unexpected entries"),
    (lambda es: es + [("data.pkl", b"")], "unexpected entries"),
    (lambda es: [e for e in es if not e[0].endswith("/data.pkl")], "no data.pkl"),
    (lambda es: es + [e for e in es if e[0].endswith("/data/0")], "duplicate entries"),
], ids=["code", "extra", "bytecode", "notes", "second-prefix", "top-level", "no-data.pkl", "duplicate"])
def test_zip_with_unexpected_entries_is_refused(tmp_path, edit, message):
    _refused(_rezip(tmp_path, edit), message)


def _legacy_copy(tmp_path):
    path = tmp_path / "legacy.pth.tar"
    torch.save(torch.load(IMRAM / "checkpoint_full.pth.tar", weights_only=False), path,
               _use_new_zipfile_serialization=False)
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("keep", [0.5, 0.99, 3000, 30, 21, 4, 0])
def test_truncated_checkpoints_are_one_line_errors(tmp_path, legacy, keep):
    source = _legacy_copy(tmp_path) if legacy else IMRAM / "checkpoint_full.pth.tar"
    data = source.read_bytes()
    path = tmp_path / "truncated.pth.tar"
    path.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    _refused(path, "cannot read|neither a torch.save")


@pytest.mark.parametrize("data", [b"hello, world\n" * 10, b"\x80\x02}q\x00.", pickle.dumps({"model": 1, "opt": 2})])
def test_files_of_other_formats_are_refused(tmp_path, data):
    path = tmp_path / "other.pth.tar"
    path.write_bytes(data)
    _refused(path, "neither a torch.save zip archive nor a legacy torch.save file")


@pytest.mark.parametrize("kind", ["directory", "fifo", "device"])
def test_things_that_are_not_files_are_refused_unread(tmp_path, kind):
    path = tmp_path / "checkpoint.pth.tar"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs here")
        os.mkfifo(path)
    else:
        path = Path("/dev/zero")
        if not path.exists():
            pytest.skip("no /dev/zero here")
    outcome = {}

    def read():
        try:
            read_authors_checkpoint(path)
        except Exception as e:
            outcome["error"] = e

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(20)
    assert not reader.is_alive(), f"reading {kind} blocked or never ended"
    assert isinstance(outcome.get("error"), CheckpointError), outcome
    assert "not a regular file" in str(outcome["error"]) and "\n" not in str(outcome["error"])


def test_missing_checkpoint_is_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_authors_checkpoint(tmp_path / "missing.pth.tar")


def test_reading_leaves_torch_safe_globals_as_they_were():
    before = set(map(repr, torch.serialization.get_safe_globals()))
    read_authors_checkpoint(CAMP / "checkpoint.pth.tar")
    assert set(map(repr, torch.serialization.get_safe_globals())) == before


# --- the output of an import must not be its input --------------------------------------


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_output_that_is_the_input_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("x").mkdir()
    source = Path("x/checkpoint.pth.tar")
    shutil.copy(IMRAM / "checkpoint_full.pth.tar", source)
    os.symlink("x/checkpoint.pth.tar", "link.pth.tar")
    os.link(source, "hard.pth.tar")
    for out in (source, Path("./x/../x/checkpoint.pth.tar"), tmp_path / source, Path("link.pth.tar"), Path("hard.pth.tar")):
        with pytest.raises(CheckpointError, match="would overwrite the authors' original"):
            check_output_is_not_input(source, out)
    shutil.copy(source, "copy.pth.tar")
    for out in (Path("x/imported.pt"), Path("copy.pth.tar"), Path("missing/dir/imported.pt")):
        check_output_is_not_input(source, out)  # other files, even with the same bytes, are fine


@pytest.mark.parametrize("spelling, extra", [
    ("x/checkpoint.pth.tar", []),
    ("./x/../x/checkpoint.pth.tar", []),
    ("link.pth.tar", []),
    ("link.pth.tar", ["--overwrite"]),
], ids=["same", "dotdot", "symlink", "symlink-overwrite"])
def test_cli_import_refuses_to_overwrite_its_input(tmp_path, spelling, extra):
    """`xmr import-checkpoint X -o X`, however X is spelt, exits 2 and leaves X as it was
    (needs the command to call check_output_is_not_input before it writes)."""
    vocab = shared_vocab_path("f30k")
    Path(tmp_path / "x").mkdir()
    shutil.copy(IMRAM / "checkpoint_full.pth.tar", tmp_path / "x" / "checkpoint.pth.tar")
    os.symlink("x/checkpoint.pth.tar", tmp_path / "link.pth.tar")
    before = _sha256(tmp_path / "x" / "checkpoint.pth.tar")
    result = subprocess.run(
        [sys.executable, "-m", "xmr.cli", "import-checkpoint", "x/checkpoint.pth.tar", "--model", "imram",
         "--vocab", str(vocab), "-o", spelling, *extra], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2, output
    assert "would overwrite the authors' original" in output and "Traceback" not in output
    assert _sha256(tmp_path / "x" / "checkpoint.pth.tar") == before and (tmp_path / "link.pth.tar").is_symlink()
