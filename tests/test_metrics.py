"""Tests for scrcl_cli.metrics: hand-computed cases, invariances, sklearn parity, no mutation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from scrcl_cli import metrics
from scrcl_cli.metrics import accuracy, ari, evaluate, macro_f1, match_clusters, nmi

# Six cells, three classes, three clusters.
#   y_true: a a a b b c
#   y_pred: 0 0 1 1 1 2
# Contingency (rows a, b, c; columns 0, 1, 2):
#   a: 2 1 0
#   b: 0 2 0
#   c: 0 0 1
# Best matching: 0->a (2 cells), 1->b (2 cells), 2->c (1 cell): ACC = 5/6.
# F1 per class = 2*TP / (|class| + |cluster|):
#   a: 2*2/(3+2) = 0.8;  b: 2*2/(2+3) = 0.8;  c: 2*1/(1+1) = 1.0  -> macro-F1 = 2.6/3.
# ARI: sum C(n_ij,2) = 1+1 = 2; classes 3,2,1 -> 3+1 = 4; clusters 2,3,1 -> 1+3 = 4;
#   C(6,2) = 15, expected = 4*4/15 = 16/15, max = (4+4)/2 = 4
#   ARI = (2 - 16/15) / (4 - 16/15) = 14/44 = 7/22.
SIX_TRUE = ["a", "a", "a", "b", "b", "c"]
SIX_PRED = [0, 0, 1, 1, 1, 2]


def test_accuracy_hand_computed_six_cells() -> None:
    assert accuracy(SIX_TRUE, SIX_PRED) == pytest.approx(5 / 6)


def test_macro_f1_hand_computed_six_cells() -> None:
    assert macro_f1(SIX_TRUE, SIX_PRED) == pytest.approx(2.6 / 3)


def test_ari_hand_computed_six_cells() -> None:
    assert ari(SIX_TRUE, SIX_PRED) == pytest.approx(7 / 22)


def test_match_clusters_hand_computed_six_cells() -> None:
    assert match_clusters(SIX_TRUE, SIX_PRED) == {0: "a", 1: "b", 2: "c"}


def test_accuracy_more_clusters_than_classes_counts_unmatched_as_wrong() -> None:
    # y_true: 0 0 0 1 1 1; y_pred: 0 0 1 2 2 2. Cluster 0 -> class 0 (2 cells), cluster 2 ->
    # class 1 (3 cells); cluster 1 has no class left, its one cell is wrong: ACC = 5/6.
    # F1: class 0: 2*2/(3+2) = 0.8, class 1: 2*3/(3+3) = 1.0 -> 0.9 (mean over 2 classes).
    y_true = np.array([0, 0, 0, 1, 1, 1])
    y_pred = np.array([0, 0, 1, 2, 2, 2])
    assert accuracy(y_true, y_pred) == pytest.approx(5 / 6)
    assert macro_f1(y_true, y_pred) == pytest.approx(0.9)
    assert match_clusters(y_true, y_pred) == {0: 0, 2: 1}


def test_accuracy_fewer_clusters_than_classes_leaves_a_class_unmatched() -> None:
    # y_true: 0 0 1 1 2 2; y_pred: 0 0 0 0 1 1. Cluster 0 takes class 0 or 1 (2 cells),
    # cluster 1 takes class 2 (2 cells): ACC = 4/6. F1: 2*2/(2+4) = 2/3, 1.0, and 0 for the
    # class left without a cluster -> (2/3 + 1) / 3 = 5/9.
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 0, 0, 0, 1, 1]
    assert accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    assert macro_f1(y_true, y_pred) == pytest.approx(5 / 9)


def test_accuracy_one_cluster_per_cell_is_one_over_n_times_classes() -> None:
    y_true = ["x", "x", "y", "y"]
    y_pred = [0, 1, 2, 3]
    # Each class gets one singleton cluster: 2 of 4 cells matched.
    assert accuracy(y_true, y_pred) == pytest.approx(0.5)


def test_metrics_perfect_clustering_score_one_with_other_names() -> None:
    y_true = ["T", "T", "B", "NK", "B", "NK"]
    y_pred = [7, 7, 3, 9, 3, 9]
    scores = evaluate(y_true, y_pred)
    assert scores["acc"] == pytest.approx(1.0)
    assert scores["f1"] == pytest.approx(1.0)
    assert scores["nmi"] == pytest.approx(1.0)
    assert scores["ari"] == pytest.approx(1.0)
    assert scores["n_classes"] == 3
    assert scores["n_clusters"] == 3


def test_metrics_invariant_to_cluster_renaming_and_cell_order() -> None:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 5, size=300)
    y_pred = np.where(rng.random(300) < 0.7, y_true, rng.integers(0, 7, size=300))
    base = evaluate(y_true, y_pred)

    renamed = np.array([f"c{v}" for v in rng.permutation(7)])[y_pred]
    assert evaluate(y_true, renamed) == pytest.approx(base)

    order = rng.permutation(300)
    assert evaluate(y_true[order], y_pred[order]) == pytest.approx(base)


def test_nmi_ari_symmetric_in_arguments() -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(0, 4, size=100)
    b = rng.integers(0, 6, size=100)
    assert nmi(a, b) == pytest.approx(nmi(b, a))
    assert ari(a, b) == pytest.approx(ari(b, a))


@pytest.mark.parametrize(("n", "k_true", "k_pred", "seed"), [
    (10, 2, 2, 0),
    (50, 3, 8, 1),
    (200, 10, 4, 2),
    (1000, 14, 14, 3),
    (5000, 30, 25, 4),
])
def test_nmi_ari_match_sklearn_on_random_labels(n: int, k_true: int, k_pred: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, k_true, size=n)
    # Half informative, half noise, so scores are neither 0 nor 1.
    y_pred = np.where(rng.random(n) < 0.5, y_true % k_pred, rng.integers(0, k_pred, size=n))
    assert nmi(y_true, y_pred) == pytest.approx(
        normalized_mutual_info_score(y_true, y_pred, average_method="arithmetic"), abs=1e-12
    )
    assert ari(y_true, y_pred) == pytest.approx(adjusted_rand_score(y_true, y_pred), abs=1e-12)


@pytest.mark.parametrize(("y_true", "y_pred"), [
    ([0], [0]),
    ([0, 0], [1, 1]),
    ([0, 1], [0, 1]),
    ([0, 1], [0, 0]),
    ([0, 0, 0, 0], [0, 1, 2, 3]),
    ([0, 1, 2, 3], [0, 1, 2, 3]),
    ([0, 0, 1, 1], [0, 1, 0, 1]),
    (["a", "a", "b", "b", "b"], ["x", "x", "x", "y", "y"]),
])
def test_nmi_ari_match_sklearn_on_edge_cases(y_true: list, y_pred: list) -> None:
    assert nmi(y_true, y_pred) == pytest.approx(
        normalized_mutual_info_score(y_true, y_pred, average_method="arithmetic"), abs=1e-12
    )
    assert ari(y_true, y_pred) == pytest.approx(adjusted_rand_score(y_true, y_pred), abs=1e-12)


def test_accuracy_matches_brute_force_over_all_matchings() -> None:
    from itertools import permutations

    rng = np.random.default_rng(5)
    for _ in range(20):
        y_true = rng.integers(0, 4, size=40)
        y_pred = rng.integers(0, 5, size=40)
        best = 0
        # Every injective map of the 4 classes into the 5 clusters.
        for clusters in permutations(range(5), 4):
            best = max(best, sum(int(np.sum((y_true == c) & (y_pred == k))) for c, k in enumerate(clusters)))
        assert accuracy(y_true, y_pred) == pytest.approx(best / 40)


@pytest.mark.parametrize("kind", ["int_array", "str_array", "list", "series", "categorical"])
def test_evaluate_leaves_inputs_unchanged(kind: str) -> None:
    # More clusters than classes: the case where the reference overwrote y_pred.
    true_ints = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    pred_ints = np.array([5, 5, 4, 3, 3, 1, 0, 0])
    makers = {
        "int_array": lambda v: v.copy(),
        "str_array": lambda v: v.astype(str),
        "list": lambda v: v.tolist(),
        "series": lambda v: pd.Series(v.astype(str), index=[f"cell{i}" for i in range(v.size)]),
        "categorical": lambda v: pd.Categorical(v.astype(str)),
    }
    y_true, y_pred = makers[kind](true_ints), makers[kind](pred_ints)
    true_before, pred_before = np.array(y_true, copy=True), np.array(y_pred, copy=True)

    for fn in (accuracy, nmi, ari, macro_f1, match_clusters, evaluate):
        fn(y_true, y_pred)

    np.testing.assert_array_equal(np.asarray(y_true), true_before)
    np.testing.assert_array_equal(np.asarray(y_pred), pred_before)
    if isinstance(y_true, pd.Series):
        assert list(y_true.index) == [f"cell{i}" for i in range(8)]


def test_evaluate_accepts_read_only_arrays() -> None:
    y_true = np.array([0, 0, 1, 1, 2])
    y_pred = np.array([1, 1, 0, 0, 0])
    y_true.setflags(write=False)
    y_pred.setflags(write=False)
    scores = evaluate(y_true, y_pred)
    # Cluster 1 -> class 0 (2 cells), cluster 0 -> class 1 (2 cells); class 2 unmatched.
    assert scores["acc"] == pytest.approx(4 / 5)


def test_evaluate_mixed_string_and_int_labels() -> None:
    y_true = np.array(["B", "B", "T", "T"], dtype=object)
    y_pred = np.array([1, 1, 2, 2])
    assert evaluate(y_true, y_pred)["acc"] == pytest.approx(1.0)


def test_evaluate_unsortable_labels_fall_back_to_text() -> None:
    y_true = np.array(["B", None, "B", None], dtype=object)
    assert accuracy(y_true, [0, 1, 0, 1]) == pytest.approx(1.0)


def test_evaluate_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="y_true has 3 labels but y_pred has 2"):
        evaluate([0, 1, 2], [0, 1])


def test_evaluate_empty_raises() -> None:
    with pytest.raises(ValueError, match="empty"):
        evaluate([], [])


def test_evaluate_two_dimensional_raises() -> None:
    with pytest.raises(ValueError, match="must be 1-D"):
        evaluate([[0, 1]], [[0, 1]])


def test_metrics_module_does_not_print(capsys: pytest.CaptureFixture[str]) -> None:
    evaluate(SIX_TRUE, SIX_PRED)
    assert capsys.readouterr().out == ""
    assert metrics.log.name == "scrcl_cli.metrics"


# Forty cells: "big" 30, "mid" 9, "rare" 1 (2.5 % < 3 %).
#   big: 20 in cluster 0, 10 in cluster 1; mid: 9 in cluster 1; rare: 1 in cluster 0.
# Contingency (rows big, mid, rare; columns 0, 1): [[20, 10], [0, 9], [1, 0]].
# Best matching: 0->big (20), 1->mid (9); rare is left without a cluster.
# Recall: big 20/30, mid 9/9, rare 0 (merged into big's cluster).
RECALL_TRUE = ["big"] * 30 + ["mid"] * 9 + ["rare"]
RECALL_PRED = [0] * 20 + [1] * 10 + [1] * 9 + [0]


def test_type_recall_hand_computed_rare_type_merged() -> None:
    got = metrics.type_recall(RECALL_TRUE, RECALL_PRED)
    assert got == pytest.approx({"big": 20 / 30, "mid": 1.0, "rare": 0.0})
    assert metrics.rare_type_recall(RECALL_TRUE, RECALL_PRED) == {"rare": 0.0}


def test_type_recall_hand_computed_rare_type_kept_apart() -> None:
    # The rare cell in a cluster of its own: matched to it, recall 1; big and mid unchanged.
    pred = RECALL_PRED[:-1] + [2]
    assert metrics.type_recall(RECALL_TRUE, pred) == pytest.approx({"big": 20 / 30, "mid": 1.0, "rare": 1.0})
    assert metrics.rare_type_recall(RECALL_TRUE, pred) == {"rare": 1.0}
    # The threshold is a fraction of all cells: at 25 % "mid" (9 of 40) counts as rare too.
    assert set(metrics.rare_type_recall(RECALL_TRUE, pred, max_fraction=0.25)) == {"mid", "rare"}


def test_rare_type_recall_empty_without_small_types() -> None:
    assert metrics.rare_type_recall(SIX_TRUE, SIX_PRED) == {}
