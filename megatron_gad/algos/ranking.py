"""How well one score ranks samples that another (the verifier) orders: pure torch."""

from __future__ import annotations

from torch import Tensor


def ranking_auc(scores: Tensor, labels: Tensor) -> float | None:
    """P(score_i > score_j | label_i > label_j), ties in ``scores`` counted half, over every pair of
    samples whose ``labels`` differ. With 0/1 labels this is the ROC AUC of ``scores`` for the
    positive class; with graded labels, the share of concordant pairs (a verifier scoring 0.3 vs 0.7
    asks for that order). None when no pair has different labels (e.g. every sample verified good).

    scores, labels: [N]. O(N^2) memory: N is one step's samples (thousands at most)."""
    s, y = scores.detach().double().reshape(-1), labels.detach().double().reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} differ in size")
    ordered = y[:, None] > y[None, :]  # pair (i, j): i should rank above j
    pairs = int(ordered.sum())
    if pairs == 0:
        return None
    gap = s[:, None] - s[None, :]
    wins = (gap > 0).double() + 0.5 * (gap == 0).double()
    return float((wins * ordered).sum() / pairs)
