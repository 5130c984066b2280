"""Metrics against values computed by hand."""

import math

import numpy as np
import pytest

from gptjax.finetune.metrics import accuracy, compute, f1, matthews, pearson, rank, spearman


def test_accuracy():
    assert accuracy([0, 1, 1, 2], [0, 1, 0, 2]) == 0.75


def test_f1_by_hand():
    # TP = 2 (idx 0, 3), FP = 1 (idx 1), FN = 1 (idx 4): F1 = 4 / (4 + 1 + 1)
    y = [1, 0, 0, 1, 1]
    p = [1, 1, 0, 1, 0]
    assert f1(y, p) == pytest.approx(4 / 6)
    assert f1([0, 0], [0, 0]) == 0.0  # no positives anywhere


def test_matthews_binary_by_hand():
    y = [1, 1, 1, 0, 0, 0, 0]
    p = [1, 1, 0, 0, 0, 1, 0]
    tp, tn, fp, fn = 2, 3, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert matthews(y, p) == pytest.approx(expected)
    assert matthews([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert matthews([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert matthews([0, 1, 0, 1], [1, 1, 1, 1]) == 0.0  # constant prediction


def test_matthews_multiclass_by_hand():
    y = [0, 1, 2, 0, 1, 2]
    p = [0, 2, 2, 0, 1, 1]
    # C = [[2,0,0],[0,1,1],[0,1,1]]; t = p = (2, 2, 2); c = 4; s = 6
    expected = (4 * 6 - 12) / math.sqrt((36 - 12) * (36 - 12))
    assert matthews(y, p) == pytest.approx(expected)


def test_pearson_by_hand():
    x = [1.0, 2.0, 3.0, 4.0]
    y = [2.0, 1.0, 4.0, 3.0]
    # deviations (-1.5, -.5, .5, 1.5), (-.5, -1.5, 1.5, .5): sum prod = 3, sum squares = 5
    assert pearson(x, y) == pytest.approx(3 / 5)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


def test_rank_averages_ties():
    np.testing.assert_array_equal(rank([10, 20, 20, 5]), [2, 3.5, 3.5, 1])


def test_spearman_by_hand():
    x = [1, 2, 3, 4, 5]
    y = [5, 6, 7, 8, 7]
    # ranks y: (1, 2, 3.5, 5, 3.5)
    assert spearman(x, y) == pytest.approx(pearson([1, 2, 3, 4, 5], [1, 2, 3.5, 5, 3.5]))
    assert spearman(x, [v ** 3 for v in x]) == pytest.approx(1.0)


def test_compute_and_errors():
    out = compute(["accuracy", "f1"], [1, 0], [1, 1])
    assert out == {"accuracy": 0.5, "f1": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="unknown metric"):
        compute(["bleu"], [1], [1])
    with pytest.raises(ValueError, match="length"):
        accuracy([1, 2], [1])
    with pytest.raises(ValueError, match="no examples"):
        accuracy([], [])
