"""Offline evaluation metrics: pure numpy, no Spark, no torch.

Every evaluation in streamrank (the nightly `evaluate`, the leave-one-out benchmark, the
reports) goes through these functions, so a figure called `ndcg_at_10` means the same
thing everywhere. The definitions are stated exactly in each docstring because small
choices - 0- or 1-based ranks, how ties count, what an empty input gives - change the
numbers more than most model changes do.

Ranking conventions
-------------------
Each ranked row has ONE relevant item (the target). Its **rank** is 0-based: the number
of competitors that score at least as high as the target (``>=``). Ties therefore count
against the target (pessimistic): a model that gives every item the same score ranks each
target last instead of first, so a collapsed model cannot look good. The same rule is used
by the training worker's early stopping (train_worker.target_ranks), so the numbers agree.
A non-finite target score is treated as -inf and a non-finite competitor score as +inf,
again so that a broken model scores badly rather than well.

Empty inputs return ``None`` (not 0, not NaN): "no data" must not read as "bad model",
and None is what the callers skip when they log figures.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "auc", "calibration_table", "catalogue_coverage", "ece", "hit_rate_at_k", "log_loss", "mrr", "ndcg_at_k",
    "precision_recall_f1", "ranks_from_scores", "top_k_indices",
]


def ranks_from_scores(target_scores: np.ndarray, competitor_scores: np.ndarray,
                      competitor_mask: np.ndarray | None = None) -> np.ndarray:
    """0-based rank of each row's target among that row's competitors (ties count against).

    ``target_scores`` is [B]; ``competitor_scores`` is [B, N]; ``competitor_mask`` [B, N]
    marks real competitors (False for padding and for the target itself if it appears among
    them). ``rank[b] = #{j : mask[b, j] and competitor[b, j] >= target[b]}``. Non-finite
    target scores become -inf and non-finite competitor scores +inf (a NaN never helps).
    """
    t = np.asarray(target_scores, dtype=np.float64).reshape(-1)
    c = np.asarray(competitor_scores, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != t.shape[0]:
        raise ValueError(f"competitor_scores must be [B, N] with B={t.shape[0]}, got {c.shape}")
    t = np.where(np.isfinite(t), t, -np.inf)
    c = np.where(np.isfinite(c), c, np.inf)
    beats = c >= t[:, None]
    if competitor_mask is not None:
        beats &= np.asarray(competitor_mask, dtype=bool)
    return beats.sum(axis=1).astype(np.int64)


def _ranks(ranks: Iterable[int] | np.ndarray) -> np.ndarray:
    r = np.asarray(ranks, dtype=np.int64).reshape(-1)
    if (r < 0).any():
        raise ValueError("ranks are 0-based and must be >= 0")
    return r


def ndcg_at_k(ranks: Iterable[int] | np.ndarray, k: int) -> float | None:
    """Mean NDCG@k with one relevant item per row.

    With a single relevant item the ideal DCG is 1, so per row
    ``ndcg = 1 / log2(rank + 2)`` if ``rank < k`` else 0 (rank 0-based: first place -> 1,
    second -> 0.631, tenth -> 0.289). Returns the mean over rows, None for no rows.
    """
    r = _ranks(ranks)
    if r.size == 0:
        return None
    return float(np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0).mean())


def hit_rate_at_k(ranks: Iterable[int] | np.ndarray, k: int) -> float | None:
    """HR@k: the share of rows whose target is in the top k (``rank < k``); None for no rows."""
    r = _ranks(ranks)
    if r.size == 0:
        return None
    return float((r < k).mean())


def mrr(ranks: Iterable[int] | np.ndarray) -> float | None:
    """Mean reciprocal rank, uncut: mean of ``1 / (rank + 1)`` over rows; None for no rows."""
    r = _ranks(ranks)
    if r.size == 0:
        return None
    return float((1.0 / (r + 1.0)).mean())


def top_k_indices(scores: np.ndarray, k: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Column indices of each row's k best scores, best first, [B, min(k, N)].

    Masked-out or non-finite entries sort last; ties are broken by column order (stable),
    so the result is deterministic. Callers drop positions whose mask is False when a row
    has fewer than k valid entries.
    """
    s = np.asarray(scores, dtype=np.float64)
    s = np.where(np.isfinite(s), s, -np.inf)
    if mask is not None:
        s = np.where(np.asarray(mask, dtype=bool), s, -np.inf)
    neg = -s
    n = s.shape[1]
    k = min(int(k), n)
    if k == 0 or k == n:
        return np.argsort(neg, axis=1, kind="stable")[:, :k]
    # A full sort of a catalogue-wide row per viewer dominated evaluate (84 of 208 s at
    # scale 1); torch.topk selects the k best (40x faster than numpy's sort of 5,000
    # columns), then only those k are ordered by (score, column). Where the k-th value is
    # tied with entries left outside, topk's choice among them is arbitrary, so those rows
    # (rare: constant or masked rows) take the stable sort.
    import torch

    top, part_t = torch.topk(torch.from_numpy(np.ascontiguousarray(s)), k, dim=1, largest=True, sorted=False)
    part, vals = part_t.numpy(), -top.numpy()
    kth = vals.max(axis=1, keepdims=True)
    out = np.take_along_axis(part, np.lexsort((part, vals), axis=-1), axis=1)
    split_ties = (neg == kth).sum(axis=1) != (vals == kth).sum(axis=1)
    if split_ties.any():
        out[split_ties] = np.argsort(neg[split_ties], axis=1, kind="stable")[:, :k]
    return out


def catalogue_coverage(top_lists: Iterable[Sequence[int]] | np.ndarray, catalogue_size: int,
                       ignore: Iterable[int] = (0, 1)) -> float | None:
    """Share of the catalogue that appears in at least one top-k list.

    ``|distinct items over all lists, minus the ``ignore`` ids (padding 0, unknown 1)| /
    catalogue_size``. It shows whether a ranker recommends the same few items to everyone
    (most-popular covers ~k items) or uses the whole catalogue. None if the catalogue is empty.
    """
    if catalogue_size <= 0:
        return None
    seen: set[int] = set()
    for row in top_lists:
        seen.update(int(x) for x in np.asarray(row).reshape(-1))
    seen.difference_update(int(x) for x in ignore)
    return float(len(seen) / catalogue_size)


def auc(labels: Iterable[int] | np.ndarray, scores: Iterable[float] | np.ndarray) -> float | None:
    """ROC AUC: P(score of a random positive > score of a random negative), ties counted 1/2.

    Computed by the Mann-Whitney rank-sum formula with average ranks for ties:
    ``(sum of positive ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg)`` (1-based ranks).
    None when the labels hold one class only (AUC is undefined, not 0.5).
    """
    y = np.asarray(labels).reshape(-1).astype(bool)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    _, start, counts = np.unique(s[order], return_index=True, return_counts=True)
    ranks[order] = np.repeat(start + (counts - 1) / 2.0 + 1.0, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(labels: Iterable[int] | np.ndarray, probs: Iterable[float] | np.ndarray, eps: float = 1e-7) -> float | None:
    """Mean binary cross-entropy ``-mean(y log p + (1 - y) log(1 - p))`` with p clipped to
    [eps, 1 - eps] (one confident mistake must not make the figure infinite); None if empty."""
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.clip(np.asarray(probs, dtype=np.float64).reshape(-1), eps, 1.0 - eps)
    if y.size == 0:
        return None
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)))


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bins on [0, 1]: bin i holds [i/n, (i+1)/n), the last bin also holds 1.0."""
    return np.minimum((p * n_bins).astype(np.int64), n_bins - 1)


def calibration_table(labels: Iterable[int] | np.ndarray, probs: Iterable[float] | np.ndarray,
                      n_bins: int = 10) -> list[dict[str, float]]:
    """Reliability diagram data: per non-empty bin, count, mean predicted p and observed rate."""
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.clip(np.asarray(probs, dtype=np.float64).reshape(-1), 0.0, 1.0)
    idx = _bin_index(p, n_bins)
    out = []
    for b in range(n_bins):
        sel = idx == b
        if sel.any():
            out.append({"bin": b, "lo": b / n_bins, "hi": (b + 1) / n_bins, "count": int(sel.sum()),
                        "mean_prob": float(p[sel].mean()), "rate": float(y[sel].mean())})
    return out


def ece(labels: Iterable[int] | np.ndarray, probs: Iterable[float] | np.ndarray, n_bins: int = 10) -> float | None:
    """Expected calibration error with ``n_bins`` equal-width bins on [0, 1].

    ``ECE = sum over bins of (n_bin / N) * |mean(p in bin) - mean(y in bin)|``; bin i holds
    p in [i/n, (i+1)/n), the last bin also holds p = 1. 0 is perfectly calibrated; a model
    that says 0.8 for events that happen 40 % of the time contributes 0.4 for those rows.
    None if empty.
    """
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if y.size == 0:
        return None
    return float(sum(r["count"] / y.size * abs(r["mean_prob"] - r["rate"]) for r in calibration_table(y, probs, n_bins)))


def precision_recall_f1(labels: Iterable[int] | np.ndarray, probs: Iterable[float] | np.ndarray,
                        threshold: float) -> dict[str, float | None]:
    """Precision, recall and F1 of the decision ``p >= threshold``.

    precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2PR / (P + R). A ratio whose
    denominator is 0 is 0.0 (sklearn's zero_division=0): predicting nobody buys earns no
    precision credit. All None for an empty input.
    """
    y = np.asarray(labels).reshape(-1).astype(bool)
    pred = np.asarray(probs, dtype=np.float64).reshape(-1) >= float(threshold)
    if y.size == 0:
        return {"precision": None, "recall": None, "f1": None}
    tp = int((pred & y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}
