import math

import numpy as np
import pytest

from alphaearth_height.plugin.core.metrics import binned_metrics, height_metrics, nice_bin_edges


def test_metrics_match_hand_computed_values():
    ref = np.array([10.0, 20.0, 30.0, 40.0, 50.0])
    pred = np.array([12.0, 18.0, 33.0, 40.0, 45.0])
    m = height_metrics(pred, ref)
    # diffs: 2, -2, 3, 0, -5 ; SSE = 42 ; SST = 1000
    assert m["n"] == 5
    assert m["r2"] == pytest.approx(1 - 42 / 1000)
    assert m["rmse"] == pytest.approx(math.sqrt(42 / 5))
    assert m["mae"] == pytest.approx(12 / 5)
    assert m["mean_diff"] == pytest.approx(-2 / 5)
    assert m["median_diff"] == pytest.approx(0.0)
    assert m["nmad"] == pytest.approx(1.4826 * 2.0)  # |d - 0| = 2,2,3,0,5 -> median 2
    assert m["le90"] == pytest.approx(4.2)  # 90th percentile of 0,2,2,3,5 (linear)
    assert m["pearson"] == pytest.approx(np.corrcoef(pred, ref)[0, 1])
    assert m["spearman"] == pytest.approx(1.0)  # same order as the reference


def test_spearman_of_a_shuffled_order():
    # ranks (3, 1, 2) vs (1, 2, 3): rho = 1 - 6 * (4 + 1 + 1) / (3 * (9 - 1)) = -0.5
    assert height_metrics(np.array([3.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0]))["spearman"] == pytest.approx(-0.5)


def test_spearman_uses_average_ranks_for_ties():
    ref = np.array([1.0, 2.0, 3.0, 4.0])
    pred = np.array([5.0, 5.0, 6.0, 7.0])  # ranks 1.5, 1.5, 3, 4
    m = height_metrics(pred, ref)
    rp = np.array([1.5, 1.5, 3, 4])
    rr = np.array([1, 2, 3, 4])
    assert m["spearman"] == pytest.approx(np.corrcoef(rp, rr)[0, 1])


def test_non_finite_pairs_are_ignored_and_empty_input_is_nan():
    m = height_metrics(np.array([1.0, np.nan, 3.0]), np.array([1.0, 2.0, np.inf]))
    assert m["n"] == 1 and m["rmse"] == 0.0
    empty = height_metrics(np.array([np.nan]), np.array([1.0]))
    assert empty["n"] == 0 and math.isnan(empty["r2"])


def test_bins_are_round_and_split_by_reference_height():
    ref = np.array([5.0, 15.0, 25.0, 95.0])
    edges = nice_bin_edges(ref, target_bins=9)
    assert edges[0] == 0.0 and edges[-1] >= 95.0 and np.allclose(np.diff(edges), 10.0)
    rows = binned_metrics(ref + np.array([1.0, -1.0, 2.0, 0.0]), ref, [0, 20, 100])
    assert [(r["bin_min"], r["bin_max"], r["n"]) for r in rows] == [(0, 20, 2), (20, 100, 2)]
    assert rows[1]["mean_diff"] == pytest.approx(1.0)
