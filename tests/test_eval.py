import numpy as np
import pytest
import torch

from xmr.data import Vocabulary, load_split
from xmr.errors import ShapeError
from xmr.eval import evaluate, model_scorer, recall_report, split_scores
from xmr.models import build_model, make_config
from xmr.runtime import Scorer, TorchBackend


@pytest.fixture(scope="module")
def model_and_split(tiny_synth):
    vocab = Vocabulary.load(tiny_synth / "vocab.json")
    split = load_split(tiny_synth, "test", vocab)
    torch.manual_seed(0)
    model = build_model(make_config("imram", vocab_size=len(vocab), img_dim=split.img_dim, embed_size=8, word_dim=8), vocab)
    return model.eval(), split


def test_eval_scores_are_the_models_own_whatever_the_blocks(model_and_split):
    """``xmr eval`` scores through the runtime's planner: one pair per launch or the default
    blocks, the scores are the model's ``similarity`` of the whole split."""
    model, split = model_and_split
    ids, lengths = split.caption_batch(range(split.n_captions))
    with torch.no_grad():
        direct = model.similarity(split.image_batch(range(split.n_images)), ids, lengths).numpy()
    tiny_blocks = split_scores(Scorer(TorchBackend.from_model(model, split.regions), block_budget=1), split)
    np.testing.assert_allclose(tiny_blocks, direct, atol=1e-5)
    np.testing.assert_allclose(evaluate(model, split, show_progress=False).scores, direct, atol=1e-5)
    assert tiny_blocks.shape == (10, 50)


def test_eval_of_a_model_equals_the_scorer_on_its_exported_artifacts(model_and_split, tmp_path):
    """Same path: ``xmr eval``'s scores and ``Scorer.score`` on the exported fp32 graphs agree to 1e-5."""
    from xmr.export.artifacts import export_artifacts
    from xmr.models import save_checkpoint

    model, split = model_and_split
    checkpoint = save_checkpoint(model, tmp_path / "m.pt", {"regions": split.regions})
    export_artifacts(checkpoint, tmp_path / "art", ("fp32",), engine=False)
    exported = split_scores(Scorer.load(tmp_path / "art", backend="onnxruntime"), split)
    np.testing.assert_allclose(exported, evaluate(model, split, show_progress=False).scores, atol=1e-5, rtol=0)
    assert model_scorer(model, split).backend == "torch"


def test_fold5_scores_each_fold_against_its_own_captions(model_and_split):
    model, split = model_and_split
    full = evaluate(model, split, show_progress=False)
    folds = evaluate(model, split, fold5=True, show_progress=False)
    assert len(folds.folds) == 5
    expected = recall_report(full.scores[2:4, 10:20], 5)
    assert folds.folds[1].to_dict() == pytest.approx(expected.to_dict())
    assert folds.report.rsum == pytest.approx(np.mean([f.rsum for f in folds.folds]))


def test_fold5_needs_images_divisible_by_5(tiny_synth):
    vocab = Vocabulary.load(tiny_synth / "vocab.json")
    split = load_split(tiny_synth, "test", vocab)
    split.features = split.features[:8]
    split.captions = split.captions[:40]
    model = build_model(make_config("dual", vocab_size=len(vocab), img_dim=split.img_dim, embed_size=8, word_dim=8))
    with pytest.raises(ShapeError, match="divisible by 5"):
        evaluate(model, split, fold5=True, show_progress=False)
