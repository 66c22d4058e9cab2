"""Imported authors' checkpoints score exactly as the authors' own code did.

The fixtures under fixtures/authors/ were produced by running the released CAMP and
IMRAM code (unmodified, outside this repository) on small seeded weights; see the
README.md beside each. Only their outputs and checkpoints are stored here.
"""

import builtins
import sys

import numpy as np
import pytest
import torch

from xmr.data import Vocabulary
from xmr.errors import CheckpointError
from xmr.models.authors import import_authors_checkpoint, read_authors_checkpoint
from conftest import FIXTURES

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
