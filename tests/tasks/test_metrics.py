"""Metrics against values worked out by hand."""

import math

import pytest

from qbert.tasks import metrics as M


def test_accuracy():
    assert M.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 50.0


def test_binary_f1_counts_positive_class():
    # TP=2 (idx 0, 4), FP=1 (idx 3), FN=1 (idx 1): P = R = 2/3, F1 = 2/3
    assert M.binary_f1([1, 1, 0, 0, 1], [1, 0, 0, 1, 1]) == pytest.approx(200 / 3)


def test_binary_f1_all_negative_predictions_is_zero():
    assert M.binary_f1([1, 0, 1], [0, 0, 0]) == 0.0


def test_matthews():
    # TP=1 TN=2 FP=0 FN=1: (1*2 - 0*1) / sqrt(1 * 2 * 2 * 3)
    assert M.matthews([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx(100 * 2 / math.sqrt(12))


def test_pearson_and_spearman():
    # x = 1,2,3; y = 1,2,4: cov-sum 3, |dx| sqrt(2), |dy| sqrt(42)/3 -> r = 9 / sqrt(84)
    assert M.pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(100 * 9 / math.sqrt(84))
    assert M.spearman([1, 2, 3], [1, 2, 4]) == pytest.approx(100.0)
    assert M.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-100.0)


def test_constant_predictions_correlate_zero():
    assert M.pearson([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]) == 0.0


def test_squad_normalisation():
    assert M.normalize_answer("The  Cat's hat!") == "cats hat"
    assert M.normalize_answer("an Apple, a pear") == "apple pear"


def test_squad_exact_and_f1():
    assert M.squad_exact("the Denver Broncos", "Denver Broncos") == 1.0
    # "cat sat" vs "cat sat down": overlap 2, precision 1, recall 2/3 -> 0.8
    assert M.squad_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert M.squad_f1("dog", "cat") == 0.0


def test_squad_scores_take_best_gold_answer():
    scores = M.squad_scores({"a": "Norse raiders", "b": "Paris"},
                            {"a": ["Norse raiders and pirates", "Norse raiders"], "b": ["France"]})
    assert scores == {"exact_match": 50.0, "f1": 50.0}
