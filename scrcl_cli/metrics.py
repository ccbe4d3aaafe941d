"""Clustering accuracy against known labels: ACC, NMI, ARI and macro-F1.

Evaluation only: nothing in training or clustering imports this module,
so labels can never steer a fit. Every function reads its inputs and never writes to them;
the reference's ``clustering_acc`` overwrote predictions in place when the number of
clusters differed from the number of classes, which is what this avoids.

All four scores come from one contingency table, shape ``(n_classes, n_clusters)``, so
labels may be strings, ints or any mix of hashable values, and the number of predicted
clusters may differ from the number of true classes.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import linear_sum_assignment

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

__all__ = ["accuracy", "ari", "evaluate", "macro_f1", "match_clusters", "nmi", "rare_type_recall", "type_recall"]

log = logging.getLogger(__name__)


def _encode(labels: ArrayLike, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (categories, codes) for a 1-D label vector without touching the input."""
    # np.array (not asarray) so a caller's array is never a view we could write through.
    arr = np.array(labels, copy=True)
    if arr.ndim != 1:
        msg = f"{name} must be 1-D, got shape {arr.shape}. Pass one label per cell."
        raise ValueError(msg)
    try:
        categories, codes = np.unique(arr, return_inverse=True)
    except TypeError:
        # Mixed types (for example str and None) cannot be sorted: compare their text.
        categories, codes = np.unique(arr.astype(str), return_inverse=True)
    return categories, codes.reshape(-1)


def _contingency(y_true: ArrayLike, y_pred: ArrayLike) -> np.ndarray:
    """Count cells per (true class, predicted cluster), shape ``(n_classes, n_clusters)``, int64."""
    _, t = _encode(y_true, "y_true")
    _, p = _encode(y_pred, "y_pred")
    if t.size != p.size:
        msg = f"y_true has {t.size} labels but y_pred has {p.size}. Pass one label per cell in both."
        raise ValueError(msg)
    if t.size == 0:
        msg = "y_true and y_pred are empty. Pass at least one labelled cell."
        raise ValueError(msg)
    n_classes, n_clusters = int(t.max()) + 1, int(p.max()) + 1
    flat = np.bincount(t * n_clusters + p, minlength=n_classes * n_clusters)
    return flat.reshape(n_classes, n_clusters).astype(np.int64)


def _matching(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one class/cluster pairs that maximise matched cells (Hungarian algorithm).

    Returns (class_index, cluster_index), each of length ``min(n_classes, n_clusters)``.
    """
    return linear_sum_assignment(table, maximize=True)


def _accuracy(table: np.ndarray) -> float:
    rows, cols = _matching(table)
    return float(table[rows, cols].sum() / table.sum())


def _macro_f1(table: np.ndarray) -> float:
    rows, cols = _matching(table)
    class_sizes = table.sum(axis=1)
    cluster_sizes = table.sum(axis=0)
    f1 = np.zeros(table.shape[0], dtype=np.float64)
    # F1 of class i against its matched cluster j: 2*TP / (|class i| + |cluster j|).
    f1[rows] = 2.0 * table[rows, cols] / (class_sizes[rows] + cluster_sizes[cols])
    return float(f1.mean())


def _ari(table: np.ndarray) -> float:
    """ARI from the contingency table, by scikit-learn's pair counts."""
    from sklearn.metrics import adjusted_rand_score

    t, p = _codes_from_table(table)
    return float(adjusted_rand_score(t, p))


def _codes_from_table(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class codes, cluster codes) of the cells a contingency table counts, each (n_cells,) int64."""
    i, j = np.nonzero(table)
    reps = table[i, j]
    return np.repeat(i, reps).astype(np.int64), np.repeat(j, reps).astype(np.int64)


def _nmi(table: np.ndarray) -> float:
    """NMI (arithmetic normalisation) from the contingency table, by scikit-learn."""
    from sklearn.metrics import normalized_mutual_info_score

    t, p = _codes_from_table(table)
    return float(normalized_mutual_info_score(t, p, average_method="arithmetic"))


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Clustering accuracy (ACC) after the best one-to-one cluster-to-class matching.

    Parameters
    ----------
    y_true
        Ground-truth labels, shape ``(n_cells,)``; strings or ints.
    y_pred
        Cluster labels, shape ``(n_cells,)``; the names need not match ``y_true``, and the
        number of clusters may differ from the number of classes.

    Returns
    -------
    Fraction of cells in ``[0, 1]`` whose cluster is matched to their class. Each class is
    matched to at most one cluster (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``);
    cells of unmatched clusters count as wrong.
    """
    return _accuracy(_contingency(y_true, y_pred))


def macro_f1(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Macro-averaged F1 over the true classes, after the same matching as `accuracy`.

    Parameters
    ----------
    y_true
        Ground-truth labels, shape ``(n_cells,)``.
    y_pred
        Cluster labels, shape ``(n_cells,)``.

    Returns
    -------
    Mean over true classes of ``2 * TP / (|class| + |matched cluster|)`` in ``[0, 1]``.
    A class left without a cluster (more classes than clusters) scores 0. Cells of
    unmatched clusters (more clusters than classes) count as false negatives of their
    class and as false positives of no class; the mean is over true classes only.
    """
    return _macro_f1(_contingency(y_true, y_pred))


def nmi(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Normalised mutual information, arithmetic normalisation.

    Parameters
    ----------
    y_true
        Ground-truth labels, shape ``(n_cells,)``.
    y_pred
        Cluster labels, shape ``(n_cells,)``.

    Returns
    -------
    ``MI / ((H(true) + H(pred)) / 2)`` in ``[0, 1]``, computed by
    ``sklearn.metrics.normalized_mutual_info_score(..., average_method="arithmetic")``,
    with its edge cases (1.0 when both sides have a single group).
    """
    return _nmi(_contingency(y_true, y_pred))


def ari(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Adjusted Rand index (Hubert and Arabie).

    Parameters
    ----------
    y_true
        Ground-truth labels, shape ``(n_cells,)``.
    y_pred
        Cluster labels, shape ``(n_cells,)``.

    Returns
    -------
    ARI in ``[-0.5, 1]``, 0 in expectation for random labels; computed by
    ``sklearn.metrics.adjusted_rand_score``, with its edge cases.
    """
    return _ari(_contingency(y_true, y_pred))


def match_clusters(y_true: ArrayLike, y_pred: ArrayLike) -> dict[object, object]:
    """The cluster-to-class matching used by `accuracy` and `macro_f1`.

    Parameters
    ----------
    y_true
        Ground-truth labels, shape ``(n_cells,)``.
    y_pred
        Cluster labels, shape ``(n_cells,)``.

    Returns
    -------
    Dict from predicted cluster label to its matched true class label, with
    ``min(n_classes, n_clusters)`` entries; unmatched clusters are absent.
    """
    classes, _ = _encode(y_true, "y_true")
    clusters, _ = _encode(y_pred, "y_pred")
    rows, cols = _matching(_contingency(y_true, y_pred))
    # tolist() turns numpy scalars into plain Python values and leaves objects as they are.
    class_values, cluster_values = classes.tolist(), clusters.tolist()
    return {cluster_values[c]: class_values[r] for r, c in zip(rows, cols, strict=True)}


def type_recall(y_true: ArrayLike, y_pred: ArrayLike) -> dict[object, float]:
    """Recall of every true class under the Hungarian matching of `accuracy`.

    Parameters
    ----------
    y_true
        Ground-truth labels, shape ``(n_cells,)``.
    y_pred
        Cluster labels, shape ``(n_cells,)``.

    Returns
    -------
    Dict from class label to the fraction of its cells that lie in the cluster matched to it;
    0.0 for a class left without a cluster. A rare type merged into a big neighbour loses the
    matching to that neighbour and scores 0 here, while ARI barely moves.
    """
    classes, _ = _encode(y_true, "y_true")
    table = _contingency(y_true, y_pred)
    rows, cols = _matching(table)
    recall = np.zeros(table.shape[0], dtype=np.float64)
    recall[rows] = table[rows, cols] / table.sum(axis=1)[rows]
    return dict(zip(classes.tolist(), recall.tolist(), strict=True))


def rare_type_recall(y_true: ArrayLike, y_pred: ArrayLike, max_fraction: float = 0.03) -> dict[object, float]:
    """`type_recall` restricted to the classes holding less than `max_fraction` of the cells.

    Returns an empty dict when no class is that small.
    """
    _, t = _encode(y_true, "y_true")
    sizes = np.bincount(t)
    small = set(np.flatnonzero(sizes < max_fraction * t.size).tolist())
    recalls = type_recall(y_true, y_pred)
    return {c: r for i, (c, r) in enumerate(recalls.items()) if i in small}


def evaluate(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float | int]:
    """All scores at once, from a single contingency table.

    Parameters
    ----------
    y_true
        Ground-truth labels, shape ``(n_cells,)``.
    y_pred
        Cluster labels, shape ``(n_cells,)``.

    Returns
    -------
    Dict with float keys ``"acc"``, ``"nmi"``, ``"ari"``, ``"f1"`` (as the functions of the
    same names) and int keys ``"n_classes"``, ``"n_clusters"``.
    """
    table = _contingency(y_true, y_pred)
    scores: dict[str, float | int] = {
        "acc": _accuracy(table),
        "nmi": _nmi(table),
        "ari": _ari(table),
        "f1": _macro_f1(table),
        "n_classes": int(table.shape[0]),
        "n_clusters": int(table.shape[1]),
    }
    log.debug("evaluated %d cells: %s", int(table.sum()), scores)
    return scores


def ari_against_annotation(h5ad: str | os.PathLike[str], y_pred: ArrayLike, column: str = "cell_type") -> float:
    """ARI of `y_pred` against the annotation column `column` of an `.h5ad` file.

    For evaluation after clustering only (the demo's score); nothing in training calls it.
    """
    import anndata

    truth = anndata.read_h5ad(h5ad).obs[column].to_numpy()
    return ari(truth, y_pred)
