"""How well one ranking agrees with another: Kendall's tau (tau-b, ties counted), Yu et al.'s
sparse Kendall tau, Spearman's rho (average ranks for ties) and top-k overlap.

Written out (O(n^2) pairs, exact) so that the definitions are visible; rankings of
architectures hold tens to hundreds of entries. A ranking with every value tied
has no correlation with anything: the coefficients are NaN there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Yu et al. ("An Analysis of Super-Net Heuristics in Weight-Sharing NAS"): stand-alone
# accuracies closer than this are not told apart.
SPARSE_THRESHOLD = 0.001


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b: (concordant - discordant) / sqrt((pairs - ties in x) (pairs - ties in y)).

    A pair tied in x (or in y) counts neither as concordant nor as discordant;
    tau-b is 1 for identical orders with the same ties.
    """
    n = _check(x, y)
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = _sign(x[i] - x[j]), _sign(y[i] - y[j])
            if dx == 0:
                ties_x += 1
            if dy == 0:
                ties_y += 1
            if dx and dy:
                if dx == dy:
                    concordant += 1
                else:
                    discordant += 1
    pairs = n * (n - 1) // 2
    denominator = math.sqrt((pairs - ties_x) * (pairs - ties_y))
    return (concordant - discordant) / denominator if denominator > 0 else float("nan")


def bin_values(values: Sequence[float], threshold: float) -> list[int]:
    """Each value's bin of width ``threshold`` (Yu et al. floor the accuracies to bins of 0.1%)."""
    if not threshold > 0:
        raise ValueError(f"the bin width must be positive, got {threshold}")
    # The epsilon keeps 0.3 / 0.001 = 299.999... in bin 300.
    return [math.floor(v / threshold + 1e-9) for v in values]


def sparse_kendall_tau(standalone: Sequence[float], predicted: Sequence[float], threshold=SPARSE_THRESHOLD) -> float:
    """Kendall's tau-b after binning the stand-alone accuracies (fractions) at ``threshold``:
    architectures whose stand-alone accuracies fall in one bin count as tied (Yu et al.)."""
    return kendall_tau(bin_values(standalone, threshold), predicted)


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ascending; tied values share the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's correlation of the average ranks."""
    _check(x, y)
    rx, ry = average_ranks(x), average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def top_k(values: Sequence[float], k: int) -> list[int]:
    """Indices of the k largest values; among equal values the earlier index first."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


def top_k_overlap(x: Sequence[float], y: Sequence[float], k: int) -> float:
    """The fraction of the top k by ``x`` that are also in the top k by ``y``."""
    _check(x, y)
    k = min(k, len(x))
    return len(set(top_k(x, k)) & set(top_k(y, k))) / k if k > 0 else float("nan")


def rank_report(standalone: Sequence[float], predicted: Sequence[float], threshold=SPARSE_THRESHOLD, k=5) -> dict:
    """Every coefficient at once, and the stand-alone accuracies of the predicted top 3."""
    best = top_k(predicted, 3)
    order = top_k(standalone, len(standalone))
    return {
        "architectures": len(standalone),
        "kendall_tau": kendall_tau(standalone, predicted),
        "sparse_kendall_tau": sparse_kendall_tau(standalone, predicted, threshold),
        "sparse_threshold": threshold,
        "spearman_rho": spearman_rho(standalone, predicted),
        "top_k": min(k, len(standalone)),
        "top_k_overlap": top_k_overlap(predicted, standalone, k),
        "supernet_top3_standalone": [standalone[i] for i in best],
        # 1-based places of the supernet's top 3 among the stand-alone accuracies.
        "supernet_top3_standalone_rank": [order.index(i) + 1 for i in best],
        "best_standalone": max(standalone) if len(standalone) else float("nan"),
    }


def _sign(v: float) -> int:
    return (v > 0) - (v < 0)


def _check(x, y) -> int:
    if len(x) != len(y):
        raise ValueError(f"the two rankings differ in length: {len(x)} and {len(y)}")
    return len(x)
