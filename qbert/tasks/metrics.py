"""Official GLUE and SQuAD v1.1 metrics, computed with scikit-learn and scipy.

The ``evaluate`` package is not used: it loads metric scripts from the hub at run time.
All functions return plain floats on the 0-100 scale for accuracy, F1 and EM, and on the -1..1
scale scaled by 100 for correlations, as the GLUE leaderboard and the papers report them.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np


def accuracy(labels: Sequence[int], preds: Sequence[int]) -> float:
    """Percentage of predictions equal to the label."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    return float((labels == preds).mean() * 100)


def binary_f1(labels: Sequence[int], preds: Sequence[int]) -> float:
    """F1 of the positive class (label 1), as GLUE scores MRPC and QQP."""
    from sklearn.metrics import f1_score

    return float(f1_score(labels, preds, pos_label=1, average="binary", zero_division=0) * 100)


def matthews(labels: Sequence[int], preds: Sequence[int]) -> float:
    """Matthews correlation coefficient (CoLA), times 100."""
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(labels, preds) * 100)


def pearson(labels: Sequence[float], preds: Sequence[float]) -> float:
    """Pearson correlation (STS-B), times 100; 0 when the predictions are constant."""
    from scipy.stats import pearsonr

    if np.std(preds) == 0:
        return 0.0
    return float(pearsonr(labels, preds)[0] * 100)


def spearman(labels: Sequence[float], preds: Sequence[float]) -> float:
    """Spearman rank correlation (STS-B), times 100; 0 when the predictions are constant."""
    from scipy.stats import spearmanr

    if np.std(preds) == 0:
        return 0.0
    return float(spearmanr(labels, preds)[0] * 100)


# ------------------------------------------------------------------ SQuAD v1.1 (official script)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace (official v1.1)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_exact(prediction: str, truth: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(truth))


def squad_f1(prediction: str, truth: str) -> float:
    """Token-overlap F1 of the normalised strings."""
    pred_tokens = normalize_answer(prediction).split()
    truth_tokens = normalize_answer(truth).split()
    common = Counter(pred_tokens) & Counter(truth_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: dict[str, str], answers: dict[str, list[str]]) -> dict[str, float]:
    """Exact match and F1 over questions, each the max over the gold answers, times 100."""
    if not answers:
        return {"exact_match": 0.0, "f1": 0.0}
    exact = f1 = 0.0
    for qid, truths in answers.items():
        pred = predictions.get(qid, "")
        exact += max(squad_exact(pred, t) for t in truths)
        f1 += max(squad_f1(pred, t) for t in truths)
    return {"exact_match": 100 * exact / len(answers), "f1": 100 * f1 / len(answers)}
