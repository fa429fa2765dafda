"""The two forms of Yu et al.'s sparse Kendall tau, by hand and against an independent construction."""

import math
import random

import pytest

from fastnas.tools.rank_metrics import kendall_tau, rank_report, sparse_kendall_tau, sparse_kendall_tau_b


def test_sparse_tau_forms_differ_on_tied_bins():
    # Bins [900, 900, 912]; the supernet ranks them 0 < 2 < 1.
    standalone, predicted = [0.9001, 0.9004, 0.912], [0.1, 0.3, 0.2]
    # Study's form: sorted bins [900, 900, 912] against the bins in supernet order [900, 912, 900]:
    # (0,1) tied in x, (0,2) tied in y, (1,2) discordant: -1 / sqrt((3 - 1) (3 - 1)).
    assert sparse_kendall_tau(standalone, predicted) == pytest.approx(-0.5, abs=1e-12)
    # tau-b form: (0,1) tied bins, (0,2) concordant, (1,2) discordant: 0 / sqrt((3 - 1) 3).
    assert sparse_kendall_tau_b(standalone, predicted) == 0.0


def test_sparse_tau_forms_on_a_perfect_supernet_with_a_shared_bin():
    standalone, predicted = [0.9001, 0.9004, 0.912, 0.95], [1, 2, 3, 4]
    # The study's form pairs the tie in the sorted bins with the same tie in supernet order: 5 / 5.
    assert sparse_kendall_tau(standalone, predicted) == 1.0
    # tau-b: the tie in the bins has no tie in the scores to match: 5 / sqrt(5 * 6).
    assert sparse_kendall_tau_b(standalone, predicted) == pytest.approx(5 / math.sqrt(30), abs=1e-12)


def test_sparse_tau_forms_agree_without_ties():
    # Bins 910, 930, 920, 950 against scores 1, 2, 4, 3: 4 concordant, 2 discordant pairs of 6.
    standalone, predicted = [0.91, 0.93, 0.92, 0.95], [1, 2, 4, 3]
    assert kendall_tau(standalone, predicted) == pytest.approx(1 / 3, abs=1e-12)
    assert sparse_kendall_tau(standalone, predicted) == pytest.approx(1 / 3, abs=1e-12)
    assert sparse_kendall_tau_b(standalone, predicted) == pytest.approx(1 / 3, abs=1e-12)


def test_study_form_breaks_tied_scores_by_the_given_order():
    # Distinct bins, two equal scores: the tau-b form counts the tie, 2 / sqrt(3 * 2) either way round.
    assert sparse_kendall_tau_b([0.91, 0.92, 0.93], [1, 1, 2]) == pytest.approx(2 / math.sqrt(6), abs=1e-12)
    assert sparse_kendall_tau_b([0.92, 0.91, 0.93], [1, 1, 2]) == pytest.approx(2 / math.sqrt(6), abs=1e-12)
    # The study's form reads the tied scores in the given order: [910, 920, 930] is the sorted
    # order (1), [920, 910, 930] has one discordant pair of 3 (1/3).
    assert sparse_kendall_tau([0.91, 0.92, 0.93], [1, 1, 2]) == 1.0
    assert sparse_kendall_tau([0.92, 0.91, 0.93], [1, 1, 2]) == pytest.approx(1 / 3, abs=1e-12)


def test_sparse_tau_threshold_and_degenerate_cases():
    # At a 1% bin width 0.911 and 0.919 share bin 91: the example above at a wider bin.
    assert sparse_kendall_tau([0.911, 0.919, 0.93], [0.1, 0.3, 0.2], threshold=0.01) == pytest.approx(-0.5)
    assert sparse_kendall_tau([0.911, 0.919, 0.93], [0.1, 0.3, 0.2], threshold=0.001) == pytest.approx(1 / 3)
    # Every architecture in one bin: no order to agree with.
    assert math.isnan(sparse_kendall_tau([0.9001, 0.9002], [1, 2]))
    assert math.isnan(sparse_kendall_tau_b([0.9001, 0.9002], [1, 2]))
    with pytest.raises(ValueError, match="differ in length"):
        sparse_kendall_tau([0.9, 0.8], [1])
    with pytest.raises(ValueError, match="positive"):
        sparse_kendall_tau([0.9, 0.8], [1, 2], threshold=0)


def test_rank_report_gives_both_forms():
    report = rank_report([0.9001, 0.9004, 0.912], [0.1, 0.3, 0.2])
    assert report["sparse_kendall_tau"] == pytest.approx(-0.5)
    assert report["sparse_kendall_tau_b"] == 0.0


def _study_construction(gt, pred, threshold):
    """The study's steps, written out with numpy and scipy: sort by supernet score and by
    ground truth, number the ground-truth bins densely in ascending order, read them back in
    supernet order, and take scipy's Kendall tau of the two sequences."""
    np = pytest.importorskip("numpy")
    stats = pytest.importorskip("scipy.stats")
    by_score = np.argsort(np.asarray(pred, dtype=float), kind="stable")
    by_truth = np.argsort(np.asarray(gt, dtype=float), kind="stable")
    rank_of, sorted_ranks, rank, last = {}, [], -1, None
    for i in by_truth:
        b = math.floor(gt[i] / threshold + 1e-9)
        if b != last:
            rank, last = rank + 1, b
        rank_of[int(i)] = rank
        sorted_ranks.append(rank)
    return float(stats.kendalltau(sorted_ranks, [rank_of[int(i)] for i in by_score]).statistic)


def test_study_form_matches_the_study_construction():
    rng = random.Random(5)
    for _ in range(200):
        n = rng.randint(3, 20)
        # Accuracies on a 0.05% grid (two per 0.1% bin) and scores with ties.
        gt = [0.9 + 0.0005 * rng.randint(0, 12) for _ in range(n)]
        pred = [rng.randint(0, 6) / 10 for _ in range(n)]
        ours, theirs = sparse_kendall_tau(gt, pred), _study_construction(gt, pred, 0.001)
        assert (math.isnan(ours) and math.isnan(theirs)) or ours == pytest.approx(theirs, abs=1e-12)
