"""How well one ranking agrees with another: Kendall's tau (tau-b, ties counted), Yu et al.'s
sparse Kendall tau (in the study's form and as tau-b), Spearman's rho (average ranks for
ties) and top-k overlap.

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
    """Yu et al.'s sparse Kendall tau as their code computes it (the default, so that the numbers
    compare with the study's): tau-b between the stand-alone bins sorted ascending and the same
    bins read in the supernet's order (architectures sorted by ``predicted``, ascending).

    Source: kcyu2014/nas-landmarkreg, ``nasws/cnn/utils.py`` (``compute_sparse_kendalltau``, which
    calls ``compute_sparse_rank_metric`` with ``sparse_rank_by_simple_bin``), used with a threshold
    of 1e-3 by ``_save_ranking_results`` in ``nasws/cnn/policy/cnn_general_search_policies.py``.

    Position k pairs the k-th smallest bin with the bin of the architecture the supernet ranks
    k-th, so architectures in one bin are interchangeable: a supernet that orders the bins
    correctly scores 1 whatever it does inside a bin, which is what the sparse tau is for.
    Ties among the supernet's scores keep the order of the architectures as given (the study's
    ``np.argsort`` leaves their order to its sort). ``sparse_kendall_tau_b`` is the per-architecture
    form.
    """
    bins = bin_values(standalone, threshold)
    _check(bins, predicted)
    supernet_order = sorted(range(len(bins)), key=lambda i: predicted[i])
    return kendall_tau(sorted(bins), [bins[i] for i in supernet_order])


def sparse_kendall_tau_b(standalone: Sequence[float], predicted: Sequence[float], threshold=SPARSE_THRESHOLD) -> float:
    """Kendall's tau-b between each architecture's stand-alone bin (width ``threshold``) and its
    supernet score: architectures in one bin count as tied, as do equal scores.

    It depends on no tie-breaking, but a supernet that orders the bins perfectly scores below 1
    whenever a bin holds two architectures with different scores (the tie in x has no tie in y to
    match); ``sparse_kendall_tau`` (the study's form) scores 1 there. Without ties in the bins or
    in the scores both equal Kendall's tau.
    """
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
        "sparse_kendall_tau_b": sparse_kendall_tau_b(standalone, predicted, threshold),
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
