import numpy as np
import pytest
import torch

from xmr.errors import ShapeError
from xmr.eval.metrics import recall_report
from xmr.models.losses import bce_loss, triplet_loss


def test_triplet_hardest_negative_by_hand():
    s = torch.tensor([[0.9, 0.8, 0.1], [0.45, 0.5, 0.6], [0.0, 0.2, 0.7]])
    # rows (image -> captions): hardest violations 0.2+0.8-0.9=0.1, 0.2+0.6-0.5=0.3, 0.2+0.2-0.7<0 -> 0
    # columns (caption -> images): 0.2+0.45-0.9<0 -> 0, 0.2+0.8-0.5=0.5, 0.2+0.6-0.7=0.1
    assert triplet_loss(s, 0.2).item() == pytest.approx(0.1 + 0.3 + 0.0 + 0.0 + 0.5 + 0.1)
    # all negatives: row 1 also violates with 0.2+0.45-0.5=0.15
    assert triplet_loss(s, 0.2, hardest=False).item() == pytest.approx(0.1 + (0.15 + 0.3) + 0.5 + 0.1)


def test_bce_hardest_negative_by_hand():
    s = torch.tensor([[0.9, 0.8], [0.3, 0.6]])
    expected = -(2 * (np.log(0.9) + np.log(0.6)) + (np.log(0.2) + np.log(0.7)) + (np.log(0.7) + np.log(0.2)))
    assert bce_loss(s).item() == pytest.approx(expected, rel=1e-6)
    all_negatives = -((np.log(0.9) + np.log(0.6)) / 2 + (np.log(0.2) + np.log(0.7)) / 4)
    assert bce_loss(s, hardest=False).item() == pytest.approx(all_negatives, rel=1e-6)


def test_recall_on_a_matrix_with_known_ranks():
    n, per = 4, 5
    scores = np.zeros((n, n * per))
    for i in range(n):
        scores[i, i * per : (i + 1) * per] = 1.0  # every caption of image i scores 1 with it
    scores[0, 5] = 2.0  # image 0 ranks a caption of image 1 first: its best true caption is at rank 2
    report = recall_report(scores, per)
    assert report.i2t_r1 == 75.0 and report.i2t_r5 == 100.0
    # caption 5 (image 1): image 0 scores 2 > 1, so its image is ranked second
    assert report.t2i_r1 == pytest.approx(100 * 19 / 20) and report.t2i_r5 == 100.0
    assert report.rsum == pytest.approx(75 + 100 + 100 + 95 + 100 + 100)
    assert report.i2t_medr == 1.0 and report.t2i_meanr == pytest.approx(1 + 1 / 20)


def test_recall_needs_n_by_5n():
    with pytest.raises(ShapeError, match=r"\[N, N\*5\]"):
        recall_report(np.zeros((3, 14)), 5)
