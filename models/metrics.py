"""Metrics shared by the evaluation report and the service's monitoring: bootstrap AUROC, ECE.

Bootstrap AUROC is vectorised:
A thousand resamples through ``sklearn.metrics.roc_auc_score`` cost about a second (the
call's input checks dominate); ranking all resamples at once with the Mann–Whitney form
gives the same values in a few milliseconds.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def bootstrap_aurocs(
    labels: np.ndarray, scores: np.ndarray, rounds: int = 1000, seed: int = 0, chunk: int = 100
) -> np.ndarray:
    """AUROC of each bootstrap resample (cases drawn with replacement) that has both classes.

    The resamples are those of ``rounds`` successive ``rng.integers(0, n, n)`` draws of
    ``numpy.random.default_rng(seed)``; ties count one half, as in ``roc_auc_score``.

    Args:
        labels: 1 for positive, 0 for negative.
        scores: higher means more likely positive.
        rounds: resamples drawn (single-class ones are dropped).
        seed: resampling seed.
        chunk: resamples ranked at once (bounds memory at ``chunk × n``).

    Returns:
        One AUROC per kept resample, in draw order.
    """
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    n = len(labels)
    rng = np.random.default_rng(seed)
    values = []
    for start in range(0, rounds, chunk):
        pick = rng.integers(0, n, (min(chunk, rounds - start), n))
        positive = labels[pick]
        ranks = rankdata(scores[pick], axis=1)
        n1 = positive.sum(axis=1)
        n0 = n - n1
        kept = (n1 > 0) & (n0 > 0)
        rank_sum = (ranks * positive).sum(axis=1)
        values.append((rank_sum[kept] - n1[kept] * (n1[kept] + 1) / 2) / (n1[kept] * n0[kept]))
    return np.concatenate(values) if values else np.empty(0)


def reliability(
    labels: np.ndarray, scores: np.ndarray, bins: int = 10
) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error of the positive-class probability, with its bins.

    The one ECE of the project (evaluation reports, model cards and the service's
    monitoring): ``bins`` equal-width bins, each ``[low, high)`` except the last, which
    also holds 1.0 (the convention of ``numpy.histogram`` and of the cards' risk
    histograms); ECE is the count-weighted mean of ``|mean score - fraction positive|``.

    Args:
        labels: 1 for positive, 0 for negative.
        scores: calibrated positive-class probabilities in ``[0, 1]``.
        bins: number of bins.

    Returns:
        ``(ece, bins)`` where each bin has ``low``, ``high``, ``count``, ``confidence``
        (mean score) and ``frequency`` (fraction positive); ECE is 0.0 for no score.
    """
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    edges = np.asarray([i / bins for i in range(bins + 1)])  # exact: 0.3 falls in [0.3, 0.4)
    which = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, bins - 1)
    table, weighted = [], 0.0
    for b in range(bins):
        mask = which == b
        count = int(mask.sum())
        confidence = float(scores[mask].mean()) if count else 0.0
        frequency = float(labels[mask].mean()) if count else 0.0
        weighted += count * abs(confidence - frequency)
        table.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "count": count,
                "confidence": confidence,
                "frequency": frequency,
            }
        )
    return weighted / max(len(scores), 1), table
