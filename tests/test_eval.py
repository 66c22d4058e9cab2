import numpy as np
import pytest
import torch

from xmr.data import Vocabulary, load_split
from xmr.errors import ShapeError
from xmr.eval import encode_split, evaluate, recall_report, score_matrix
from xmr.eval.scoring import block_shape
from xmr.models import build_model, make_config


@pytest.fixture(scope="module")
def model_and_split(tiny_synth):
    vocab = Vocabulary.load(tiny_synth / "vocab.json")
    split = load_split(tiny_synth, "test", vocab)
    torch.manual_seed(0)
    model = build_model(make_config("imram", vocab_size=len(vocab), img_dim=split.img_dim, embed_size=8, word_dim=8), vocab)
    return model.eval(), split


def test_blocked_scores_equal_one_big_call(model_and_split):
    model, split = model_and_split
    encoded = encode_split(model, split, batch_size=7, show_progress=False)
    tiny_blocks = score_matrix(model, encoded, show_progress=False, budget=1)  # one pair per block
    with torch.no_grad():
        direct = model.score(encoded.img_emb, encoded.cap_emb, encoded.lengths).numpy()
    np.testing.assert_allclose(tiny_blocks, direct, atol=1e-5)
    assert tiny_blocks.shape == (10, 50)


def test_block_shape_respects_budget():
    images, captions = block_shape(1000, 5000, tokens=36 + 20, dim=1024, budget=1 << 26)
    assert images * captions * 56 * 2048 <= 1 << 26 and images >= 1 and captions >= 1


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
