"""Training really learns, and cross-attention beats pooling where binding matters.

Small versions of the measured result in docs/benchmarks.md (full size: bench/train_synthetic.py).
"""

import pytest
import torch

from xmr.data import SynthConfig, Vocabulary, load_split, write_synthetic
from xmr.eval import evaluate
from xmr.models import build_model, make_config
from xmr.train import TrainConfig, train


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_e2e")
    write_synthetic(out, SynthConfig(n_train=400, n_dev=20, n_test=60, regions=6, img_dim=32, seed=1))
    vocab = Vocabulary.load(out / "vocab.json")
    return out, vocab, {s: load_split(out, s, vocab) for s in ("train", "dev", "test")}


def _train_and_test(kind, small_synth, tmp_path):
    _, vocab, splits = small_synth
    torch.manual_seed(0)
    model = build_model(make_config(kind, vocab_size=len(vocab), img_dim=32, embed_size=32, word_dim=32), vocab)
    untrained = evaluate(model, splits["test"], show_progress=False).report
    cfg = TrainConfig(epochs=4, batch_size=32, warmup_epochs=2, lr_update=2)
    train(model, splits["train"], splits["dev"], cfg, tmp_path / kind, show_progress=False)
    return untrained, evaluate(model, splits["test"], show_progress=False).report


@pytest.mark.slow
def test_imram_learns_and_beats_a_dual_encoder(small_synth, tmp_path):
    untrained, imram = _train_and_test("imram", small_synth, tmp_path)
    _, dual = _train_and_test("dual", small_synth, tmp_path)
    assert imram.i2t_r1 + imram.t2i_r1 >= 3 * (untrained.i2t_r1 + untrained.t2i_r1)
    assert imram.rsum >= dual.rsum + 10, (imram.rsum, dual.rsum)
