"""Clustering the students' neurons: the neurons that recur across students are the teacher's.

``cluster_neurons`` is the one entry point; the backend only decides how the dendrogram is
built, and the rules in ``rules`` decide which of its nodes are kept. ``scipy``: exact average
linkage over all pairwise distances (O(M²) memory, the authors' method). ``faiss``: a kNN graph
from a FAISS index, exact linkage inside pieces of it, the same rules (memory linear in M; see
``faiss_backend`` for what is exact; on a GPU that FAISS cannot use, torch searches the
neighbours: ``torch_knn``). ``auto``: scipy up to ``AUTO_SCIPY_MAX`` rows, FAISS above.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> teacher = rng.standard_normal((3, 6))                  # 3 neurons, d_in = 5 (+ bias)
    >>> vecs = np.vstack([teacher[rng.permutation(3)] for _ in range(10)])
    >>> sids = np.repeat(np.arange(10), 3)
    >>> labels = cluster_neurons(vecs, sids, gamma=0.5, beta=np.pi / 6, backend="scipy")
    >>> len(set(labels) - {-1})
    3
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..queries import MAX_ABS
from . import rules, scipy_backend
from .faiss_backend import NeuronIndex

RULES = ("stable", "reference")
BACKENDS = ("auto", "scipy", "faiss")
SCIPY_MAX_ROWS = 40_000  # pdist of 4·10⁴ rows is already 6.4 GB (calibration.md)
AUTO_SCIPY_MAX = 5_000  # "auto" links up to this many rows exactly (0.6 s, 100 MB), FAISS above


@dataclass(frozen=True)
class Clusters:
    """Result of clustering one layer.

    labels: (M,) cluster of each row, −1 for none; dropped: (M,) rows removed as negligible
    before linkage; per kept cluster (K,): size (rows), n_students (distinct), height (of its
    dendrogram node), separation (parent height / height; nan for the reference rule),
    median_cos_dist, exact (True where the cluster is provably the one the exact scipy backend
    keeps: always for scipy; for FAISS see ``faiss_backend``); cut_height: the reference rule's
    cut (nan for stable); backend: the one that ran ("scipy" or "faiss").
    """

    labels: np.ndarray
    dropped: np.ndarray
    size: np.ndarray
    n_students: np.ndarray
    height: np.ndarray
    separation: np.ndarray
    median_cos_dist: np.ndarray
    cut_height: float
    min_students: int
    rule: str
    backend: str
    exact: np.ndarray | None = None

    @property
    def n_clusters(self) -> int:
        return int(self.size.size)


def min_students(gamma: float, n_students: int) -> int:
    """⌊γN⌋, the number of students a cluster must span; at least 2 or clustering is meaningless."""
    m = math.floor(gamma * n_students + 1e-9)
    if m < 2:
        raise ConfigError(
            f"gamma: gamma·n_students = {gamma}·{n_students} gives a threshold of {m} < 2 students; "
            "raise gamma or n_students so that ⌊gamma·n_students⌋ >= 2"
        )
    return m


def cluster_layer(
    vectors: np.ndarray,
    student_ids: np.ndarray,
    gamma: float = 0.5,
    beta: float = math.pi / 3,
    *,
    backend: str = "auto",
    rule: str = "stable",
    weights: np.ndarray | None = None,
    drop: float = 1e-3,
    n_students: int | None = None,
    min_separation: float = 3.0,
    device: str = "auto",
    knn: str = "auto",
) -> Clusters:
    """Cluster canonicalised neuron vectors of one layer and keep the teacher's neurons.

    vectors: (M, D) canonical [w; b] rows (see ``ecdist.symmetry``); student_ids: (M,) which
    student each row comes from; gamma: a kept cluster spans ≥ ⌊γN⌋ students; beta (radians):
    its members' median pairwise angle stays below β; weights: (M,) output contribution of
    each neuron — rows below ``drop`` × the largest are ignored (they are debris whose
    incoming vector is arbitrary); n_students: N (default: distinct ``student_ids``);
    backend: "auto", "scipy" or "faiss"; device: where the FAISS backend searches the
    neighbours ("auto": a GPU when there is one, "cpu", "cuda"); knn: who searches them ("auto":
    FAISS on a GPU it can use, else torch on a CUDA GPU, else FAISS on the CPU; "faiss";
    "torch"; see ``NeuronIndex``).
    """
    vectors, student_ids = numeric("vectors", vectors), numeric("student_ids", student_ids, "iu")
    _validate(vectors, student_ids, gamma, beta, backend, rule, weights, drop)
    if n_students is not None and not (_real(n_students) and float(n_students).is_integer() and n_students >= 1):
        raise ConfigError(f"n_students: expected an int >= 1 (or None: the distinct student_ids), got {n_students!r}")
    if not (_real(min_separation) and min_separation >= 1):
        raise ConfigError(f"min_separation: expected a number >= 1, got {min_separation!r}")
    dropped = np.zeros(len(vectors), dtype=bool)
    if weights is not None and len(vectors):
        w = np.asarray(weights, dtype=np.float64)
        dropped = w < drop * w.max()
    rows = np.flatnonzero(~dropped)
    used = backend if backend != "auto" else ("scipy" if rows.size <= AUTO_SCIPY_MAX else "faiss")
    if used == "faiss":
        index = NeuronIndex(vectors.shape[1], device=device, knn=knn)
        index.add(vectors, student_ids, weights)
        return index.cluster(
            gamma, beta, rule=rule, drop=drop, n_students=n_students, min_separation=min_separation
        )
    n = int(n_students) if n_students is not None else int(np.unique(student_ids).size)
    m_req = min_students(gamma, n)
    if rows.size > SCIPY_MAX_ROWS:
        raise ConfigError(
            f"cluster_backend: {rows.size} neuron vectors are too many for the exact scipy backend "
            f"(O(M²) memory, limit {SCIPY_MAX_ROWS}); use cluster_backend='faiss' or 'auto'"
        )
    v = vectors[rows].astype(np.float64)
    max_cd = 1 - math.cos(beta)
    if rows.size >= 2:
        Z = scipy_backend.average_linkage(v)
        if rule == "reference":
            res = rules.reference_rule(Z, v, m_req, max_cd)
        else:
            res = rules.stable_rule(Z, v, student_ids[rows], m_req, max_cd, min_separation)
    else:
        res = rules._empty(rows.size)
    return _finish(vectors, student_ids, rows, dropped, res, m_req, rule, "scipy", np.ones(res.heights.size, bool))


def _finish(vectors, student_ids, rows, dropped, res: rules.RuleResult, m_req, rule, backend, exact) -> Clusters:
    """``Clusters`` from a rule's result on the kept ``rows`` (shared by the backends)."""
    labels = np.full(len(vectors), -1, dtype=np.int64)
    labels[rows] = res.labels
    k = res.heights.size
    size = np.bincount(labels[labels >= 0], minlength=k)[:k]
    in_kept = labels >= 0
    _, sid = np.unique(student_ids, return_inverse=True)
    n_sid = int(sid.max()) + 1 if sid.size else 1
    pairs = np.unique(labels[in_kept] * n_sid + sid[in_kept])
    n_st = np.bincount(pairs // n_sid, minlength=k)[:k].astype(np.int64)
    return Clusters(
        labels, dropped, size, n_st, res.heights, res.separation, res.median_cos_dist,
        res.cut_height, m_req, rule, backend, np.asarray(exact, dtype=bool),
    )


def cluster_neurons(
    vectors: np.ndarray,
    student_ids: np.ndarray,
    gamma: float = 0.5,
    beta: float = math.pi / 3,
    backend: str = "auto",
    **kwargs,
) -> np.ndarray:
    """One label per row of ``vectors``, −1 for rows in no kept cluster (see ``cluster_layer``)."""
    return cluster_layer(vectors, student_ids, gamma, beta, backend=backend, **kwargs).labels


def numeric(name: str, a, kinds: str = "biuf") -> np.ndarray:
    """``a`` as an array whose dtype kind is in ``kinds`` (dtype kept: FAISS may hold float32), else ConfigError."""
    try:
        arr = np.asarray(a)
    except (TypeError, ValueError) as exc:  # ragged nested lists
        raise ConfigError(f"{name}: expected a numeric array: {exc}") from None
    if arr.dtype.kind not in kinds:
        what = "integer student ids" if kinds == "iu" else "numbers"
        raise ConfigError(f"{name}: expected {what}, got an array of {arr.dtype}")
    return arr


def finite(vectors: np.ndarray) -> bool:
    """No NaN, no infinity, no |value| above ``MAX_ABS`` (cosines of such vectors overflow).

    Infinity is tested on its own: compared with MAX_ABS cast to float32 (which overflows to
    infinity), an infinite float32 value would pass."""
    v = np.asarray(vectors)
    if not np.isfinite(v).all():
        return False
    if v.dtype.kind != "f":  # integers and booleans: finite, and far below MAX_ABS
        return True
    return bool(float(np.finfo(v.dtype).max) <= MAX_ABS or (np.abs(v) <= MAX_ABS).all())


def _validate(vectors, student_ids, gamma, beta, backend, rule, weights, drop) -> None:
    _validate_params(gamma, beta, backend, rule, drop)
    if vectors.ndim != 2 or vectors.shape[1] == 0:
        raise ConfigError(f"vectors: expected a 2-D array (M, D) with D >= 1, got shape {vectors.shape}")
    if student_ids.shape != (vectors.shape[0],):
        raise ConfigError(
            f"student_ids: expected shape ({vectors.shape[0]},) to match vectors, got {student_ids.shape}"
        )
    if not finite(vectors):
        raise ConfigError(
            f"vectors: contain NaN, infinite or huge (|v| > {MAX_ABS:g}) values; the students diverged or the "
            "input is corrupt"
        )
    if weights is not None:
        w = numeric("weights", weights)
        if w.shape != (vectors.shape[0],) or not np.isfinite(w).all() or (w < 0).any():
            raise ConfigError("weights: expected one finite, non-negative output contribution per row")


def _validate_params(gamma, beta, backend, rule, drop) -> None:
    if not (_real(gamma) and 0 < gamma <= 1):
        raise ConfigError(f"gamma: must be in (0, 1], got {gamma!r}")
    if not (_real(beta) and 0 < beta <= math.pi / 2):
        raise ConfigError(f"beta: must be an angle in radians in (0, π/2], got {beta!r}")
    if backend not in BACKENDS:
        raise ConfigError(f"backend: unknown clustering backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if rule not in RULES:
        raise ConfigError(f"rule: unknown clustering rule {rule!r}; choose one of {', '.join(RULES)}")
    if not (_real(drop) and 0 <= drop < 1):
        raise ConfigError(f"drop: must be in [0, 1), got {drop!r}")


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
