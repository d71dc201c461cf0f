"""Clustering: perfect students (reference §11 item 2), the cut rule, the γ/β filters, input
validation, and invariance of the kept partition to the order of the students.

Tests that cluster run on every backend (the ``backend`` fixture): ``scipy``; ``faiss`` (which
links a layer this small in one exact piece); and ``faiss-pieces``, FAISS with no exact-linkage
budget, so that every neuron's copies are a piece of their own and the tree above them is built
from the kNN graph — the path a layer of a million rows takes.

A "perfect student" holds every teacher neuron exactly (random order, random sign with the
outgoing weight flipped to match, one neuron split into two copies whose outgoing weights add
up to the teacher's) and fills its other slots with small debris of outgoing weight 0. Every
expectation is derived from that construction: a kept cluster must be exactly the copies of
one teacher neuron.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.cluster.hierarchy import fcluster, linkage

import ecdist
from ecdist.activations import REGISTRY
from ecdist.cluster import Clusters, cluster_layer, cluster_neurons, faiss_backend, min_students, rules

TANH = REGISTRY["tanh"]
R, N, WIDTH = 4, 10, 16
SEEDS = range(10)


def perfect_students(d_in: int, seed: int, r: int = R, n: int = N, width: int = WIDTH, debris_std: float = 0.1):
    """Canonical (tanh) vectors of n perfect students, with what each row is.

    Returns dict: vectors (n·width, d_in+1) canonical, outgoing (n·width,) canonical, sid (n·width,),
    owner (n·width,) teacher neuron of each row (−1 for debris), contrib |a|·‖w‖ (0 for debris),
    teacher (r, d_in+1), a (r,).
    """
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((r, d_in + 1))
    # |a| bounded away from 0, so that no copy falls under the default drop = 1e-3 × max contribution
    a = rng.choice([-1.0, 1.0], r) * rng.uniform(0.5, 2.0, r)
    V, A, sid, owner = [], [], [], []
    for s in range(n):
        dup = rng.integers(r)
        t = rng.uniform(0.2, 0.8)
        slots = [(j, a[j]) for j in range(r) if j != dup] + [(dup, t * a[dup]), (dup, (1 - t) * a[dup])]
        rows = []
        for j, aj in slots:
            sign = rng.choice([-1.0, 1.0])
            rows.append((sign * teacher[j], sign * aj, j))
        rows += [(debris_std * rng.standard_normal(d_in + 1), 0.0, -1) for _ in range(width - len(slots))]
        for k in rng.permutation(width):
            v, aj, j = rows[k]
            V.append(v)
            A.append(aj)
            owner.append(j)
            sid.append(s)
    V, A = np.array(V), np.array(A)
    can = TANH.symmetry.canonicalize(V, A[:, None])
    return {
        "vectors": can.vectors,
        "outgoing": can.outgoing[:, 0],
        "sid": np.array(sid),
        "owner": np.array(owner),
        "contrib": np.abs(A) * np.linalg.norm(V[:, :-1], axis=1),
        "teacher": teacher,
        "a": a,
    }


def partition(labels: np.ndarray) -> set[frozenset[int]]:
    """Kept clusters as sets of row indices (label numbers do not matter)."""
    return {frozenset(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels) if c >= 0}


def teacher_partition(owner: np.ndarray) -> set[frozenset[int]]:
    return {frozenset(np.flatnonzero(owner == j).tolist()) for j in np.unique(owner) if j >= 0}


def owner_codes(owner: np.ndarray) -> np.ndarray:
    """Owner names as integer codes (for ``teacher_partition``)."""
    return np.unique(owner, return_inverse=True)[1]


@pytest.fixture(params=["scipy", "faiss", "faiss-pieces"])
def backend(request, monkeypatch) -> str:
    if request.param == "faiss-pieces":  # no exact-linkage budget: each neuron's copies form their own piece
        monkeypatch.setattr(faiss_backend, "WORK_MIN", 0)
        monkeypatch.setattr(faiss_backend, "WORK_PER_ROW", 0)
        return "faiss"
    return request.param


# ----- perfect students: the default rule -------------------------------------------------------
@pytest.mark.parametrize("auto", [False, True])
@pytest.mark.parametrize("d_in", [2, 5, 20])
def test_stable_rule_with_weights_keeps_exactly_the_teacher_neurons(d_in, backend, auto):
    if auto and backend != "scipy":
        pytest.skip("auto is one backend")
    for seed in SEEDS:
        p = perfect_students(d_in, seed)
        res = cluster_layer(
            p["vectors"], p["sid"], 0.5, math.pi / 6, rule="stable", weights=p["contrib"],
            backend="auto" if auto else backend,
        )
        assert res.backend == backend  # "auto" is scipy for a layer this small
        assert res.exact.all()
        assert res.n_clusters == R, f"seed {seed}"
        assert partition(res.labels) == teacher_partition(p["owner"]), f"seed {seed}"
        np.testing.assert_array_equal(res.dropped, p["owner"] < 0)  # debris has contribution 0, nothing else
        assert np.all(res.n_students == N)
        assert np.all(res.median_cos_dist <= 1e-12)
        # cluster_neurons is the same thing, one label per row
        labels = cluster_neurons(p["vectors"], p["sid"], 0.5, math.pi / 6, res.backend, weights=p["contrib"])
        np.testing.assert_array_equal(labels, res.labels)


@pytest.mark.parametrize("d_in", [2, 20])
def test_kept_clusters_recover_teacher_vectors_and_summed_outgoing_weights(d_in, backend):
    """§11 item 2: each cluster's vector matches its teacher neuron to 1 − |cos| < 1e-12, and the
    outgoing weights of one student's copies add up to the teacher's (in canonical sign)."""
    p = perfect_students(d_in, seed=3)
    labels = cluster_neurons(p["vectors"], p["sid"], 0.5, math.pi / 6, weights=p["contrib"], backend=backend)
    teacher_can = TANH.symmetry.canonicalize(p["teacher"], p["a"][:, None])
    for c in range(labels.max() + 1):
        rows = np.flatnonzero(labels == c)
        j = int(np.unique(p["owner"][rows]).item())
        d_w = TANH.symmetry.distance(p["vectors"][rows], p["teacher"][j : j + 1])
        assert d_w.max() < 1e-12
        for s in np.unique(p["sid"][rows]):
            mine = rows[p["sid"][rows] == s]
            np.testing.assert_allclose(p["outgoing"][mine].sum(), teacher_can.outgoing[j, 0], rtol=1e-12, atol=1e-14)


def test_stable_rule_without_weights_high_dimension(backend):
    for seed in SEEDS:
        p = perfect_students(20, seed)
        labels = cluster_neurons(p["vectors"], p["sid"], 0.5, math.pi / 6, rule="stable", backend=backend)
        assert partition(labels) == teacher_partition(p["owner"]), f"seed {seed}"


def test_stable_rule_without_weights_low_dimension_with_min_separation(backend):
    for seed in SEEDS:
        p = perfect_students(2, seed)
        labels = cluster_neurons(p["vectors"], p["sid"], 0.5, math.pi / 6, rule="stable", min_separation=10, backend=backend)
        assert partition(labels) == teacher_partition(p["owner"]), f"seed {seed}"


# ----- the reference rule: negative control --------------------------------------------------------
def test_reference_rule_over_counts_at_low_dimension(backend):
    """Reference §10/§11: at d_in = 2 small blobs of debris pass the authors' size and angle filters."""
    counts = [
        cluster_layer(p["vectors"], p["sid"], 0.5, math.pi / 6, rule="reference", backend=backend).n_clusters
        for p in (perfect_students(2, seed) for seed in SEEDS)
    ]
    assert sum(k > R for k in counts) > len(counts) // 2, counts
    assert min(counts) >= R


def test_reference_rule_keeps_exactly_four_at_high_dimension(backend):
    for seed in SEEDS:
        p = perfect_students(20, seed)
        res = cluster_layer(p["vectors"], p["sid"], 0.5, math.pi / 6, rule="reference", backend=backend)
        assert res.n_clusters == R, f"seed {seed}"
        assert np.isfinite(res.cut_height)
        # every kept cluster holds every copy of its teacher neuron, and nothing of another one
        for rows in partition(res.labels):
            owners = set(p["owner"][list(rows)].tolist()) - {-1}
            assert len(owners) == 1
            (j,) = owners
            assert set(np.flatnonzero(p["owner"] == j).tolist()) <= rows


# ----- cut rule ----------------------------------------------------------------------------------------
def test_plateau_cut_index_reference_example():
    """§11 item 3: the top of the first maximal plateau, not index 2 or 6."""
    assert rules.plateau_cut_index([1, 3, 4, 4, 4, 2, 4, 1]) == 4
    assert rules.plateau_cut_index(np.array([1, 3, 4, 4, 4, 2, 4, 1])) == 4


@settings(max_examples=80, deadline=None)
@given(counts=st.lists(st.integers(0, 6), min_size=1, max_size=30))
def test_plateau_cut_index_property(counts):
    i = rules.plateau_cut_index(counts)
    top = max(counts)
    first = counts.index(top)
    assert first <= i and all(c == top for c in counts[first : i + 1])
    assert i == len(counts) - 1 or counts[i + 1] != top


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    m=st.integers(2, 40),
    d=st.integers(1, 4),
    n_dup=st.integers(0, 15),
    grid=st.booleans(),
    min_size=st.integers(1, 8),
)
def test_big_cluster_counts_matches_fcluster(seed, m, d, n_dup, grid, min_size):
    """For every merge i, the number of fcluster(Z, Z[i,2], 'distance') clusters with ≥ min_size members;
    duplicated rows (ties at 0) and integer grids (ties at other heights) included."""
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 3, (m, d)).astype(float) if grid else rng.standard_normal((m, d))
    if n_dup:
        X = np.vstack([X, X[rng.integers(0, m, n_dup)]])
    Z = linkage(X, method="average")
    got = rules.big_cluster_counts(Z, min_size)
    assert got.shape == (len(Z),)
    for i in range(len(Z)):
        flat = fcluster(Z, Z[i, 2], criterion="distance")
        expected = int((np.bincount(flat) >= min_size).sum())
        assert got[i] == expected, (i, Z[i, 2])


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(2, 30))
def test_median_cos_distance_matches_direct_computation(seed, k):
    rng = np.random.default_rng(seed)
    V = rng.standard_normal((k + 3, 5))
    rows = np.sort(rng.choice(k + 3, size=k, replace=False))
    U = V[rows] / np.linalg.norm(V[rows], axis=1, keepdims=True)
    expected = np.median([1 - U[i] @ U[j] for i in range(k) for j in range(i + 1, k)])
    assert abs(rules.median_cos_distance(V, rows) - expected) < 1e-14
    assert rules.median_cos_distance(V, rows[:1]) == 0.0


# ----- filters -------------------------------------------------------------------------------------
def _three_neurons(n_q: int, noise: float = 1e-9, seed: int = 0):
    """N = 10 students; P in students 0–4 (5 = ⌊0.5·10⌋), R in all 10, Q in the first ``n_q``.

    P and R are 14 apart, Q is 1000 away from both: the reference rule cuts between P and R
    (count plateau of big clusters), so for both rules Q's fate is decided by its size alone.
    """
    rng = np.random.default_rng(seed)
    e = np.eye(6)
    centers = {"P": 10 * e[0], "R": 10 * e[1], "Q": 1000 * e[2]}
    holders = {"P": range(5), "R": range(N), "Q": range(n_q)}
    V, sid, owner = [], [], []
    for name, students in holders.items():
        for s in students:
            V.append(centers[name] + noise * rng.standard_normal(6))
            sid.append(s)
            owner.append(name)
    return np.array(V), np.array(sid), np.array(owner)


@pytest.mark.parametrize("rule", ["stable", "reference"])
def test_cluster_with_one_student_too_few_is_dropped(rule, backend):
    gamma = 0.5
    need = math.floor(gamma * N)
    V, sid, owner = _three_neurons(n_q=need - 1)
    res = cluster_layer(V, sid, gamma, math.pi / 6, rule=rule, n_students=N, backend=backend)
    assert res.min_students == need
    kept = {frozenset(np.flatnonzero(owner == x).tolist()) for x in ("P", "R")}
    assert partition(res.labels) == kept
    assert np.all(res.labels[owner == "Q"] == -1)


@pytest.mark.parametrize("rule", ["stable", "reference"])
def test_cluster_with_exactly_enough_students_is_kept(rule, backend):
    gamma = 0.5
    V, sid, owner = _three_neurons(n_q=math.floor(gamma * N))
    res = cluster_layer(V, sid, gamma, math.pi / 6, rule=rule, n_students=N, backend=backend)
    assert partition(res.labels) == teacher_partition(owner_codes(owner))
    assert sorted(res.n_students.tolist()) == [5, 5, 10]


def _spread_cluster(cos: float = 0.4):
    """10 students; in each, one unit vector of an equiangular family (every pairwise cosine = ``cos``,
    so the median pairwise cosine distance is exactly 1 − cos) and one copy of a far neuron."""
    k = N
    D = k + 2
    e = np.eye(D)
    spread = np.array([math.sqrt(cos) * e[0] + math.sqrt(1 - cos) * e[1 + i] for i in range(k)])
    far = np.tile(100 * e[-1], (k, 1))
    V = np.vstack([spread, far])
    sid = np.concatenate([np.arange(k), np.arange(k)])
    return V, sid, np.arange(k), np.arange(k, 2 * k)


@pytest.mark.parametrize("rule", ["stable", "reference"])
def test_angle_filter(rule, backend):
    """§11 item 4: median pairwise cosine distance 0.6: dropped at β = π/3 (0.5), kept at β = π/2.4 (≈0.741)."""
    V, sid, spread_rows, far_rows = _spread_cluster(cos=0.4)
    assert abs(rules.median_cos_distance(V, spread_rows) - 0.6) < 1e-12
    assert 1 - math.cos(math.pi / 3) < 0.6 < 1 - math.cos(math.pi / 2.4)
    strict = cluster_layer(V, sid, 0.5, math.pi / 3, rule=rule, backend=backend)
    assert partition(strict.labels) == {frozenset(far_rows.tolist())}
    loose = cluster_layer(V, sid, 0.5, math.pi / 2.4, rule=rule, backend=backend)
    assert partition(loose.labels) == {frozenset(far_rows.tolist()), frozenset(spread_rows.tolist())}
    spread_label = loose.labels[spread_rows[0]]
    assert abs(loose.median_cos_dist[spread_label] - 0.6) < 1e-12


# ----- validation ------------------------------------------------------------------------------------
def _ok_input():
    p = perfect_students(3, seed=0)
    return p["vectors"], p["sid"]


def test_gamma_times_n_below_two_raises_naming_gamma():
    V, sid = _ok_input()
    with pytest.raises(ecdist.ConfigError, match="gamma"):
        cluster_layer(V, sid, gamma=0.1, beta=math.pi / 6)  # ⌊0.1·10⌋ = 1
    with pytest.raises(ecdist.ConfigError, match="gamma"):
        min_students(0.19, 10)


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_single_student_raises(gamma, backend):
    V = np.random.default_rng(0).standard_normal((6, 4))
    with pytest.raises(ecdist.ConfigError, match="gamma"):
        cluster_neurons(V, np.zeros(6, dtype=int), gamma, math.pi / 6, backend=backend)


@settings(max_examples=80, deadline=None)
@given(hundredths=st.integers(1, 100), n=st.integers(1, 200))
def test_min_students_is_floor_of_gamma_n(hundredths, n):
    """⌊γN⌋ of the decimal γ, not of its binary rounding (0.57·100 = 56.99999999999999 in floats)."""
    gamma = hundredths / 100
    exact = math.floor(Fraction(hundredths, 100) * n)
    if exact < 2:
        with pytest.raises(ecdist.ConfigError, match="gamma"):
            min_students(gamma, n)
    else:
        assert min_students(gamma, n) == exact


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"vectors": np.ones(160)}, "vectors"),
        ({"vectors": np.ones((2, 80, 4))}, "vectors"),
        ({"student_ids": np.zeros(159, dtype=int)}, "student_ids"),
        ({"student_ids": np.zeros((160, 1), dtype=int)}, "student_ids"),
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": 1.5}, "gamma"),
        ({"gamma": "half"}, "gamma"),
        ({"beta": 0.0}, "beta"),
        ({"beta": -0.1}, "beta"),
        ({"beta": math.pi / 2 + 1e-9}, "beta"),
        ({"beta": 60}, "beta"),  # degrees by mistake
        ({"backend": "nope"}, "backend"),
        ({"rule": "kmeans"}, "rule"),
        ({"weights": np.ones(159)}, "weights"),
        ({"weights": -np.ones(160)}, "weights"),
        ({"weights": np.full(160, np.nan)}, "weights"),
        ({"drop": 1.0}, "drop"),
        ({"drop": -0.1}, "drop"),
    ],
)
def test_bad_input_raises_config_error_naming_the_field(kwargs, field):
    V, sid = _ok_input()
    args = {"vectors": V, "student_ids": sid, "gamma": 0.5, "beta": math.pi / 6} | kwargs
    with pytest.raises(ecdist.ConfigError, match=field):
        cluster_layer(**args)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_vectors_raise(bad):
    V, sid = _ok_input()
    V = V.copy()
    V[7, 1] = bad
    with pytest.raises(ecdist.ConfigError, match="vectors"):
        cluster_neurons(V, sid, 0.5, math.pi / 6)


def test_beta_of_exactly_half_pi_is_allowed(backend):
    V, sid = _ok_input()
    labels = cluster_neurons(V, sid, 0.5, math.pi / 2, backend=backend)
    assert labels.shape == (len(V),)


def test_scipy_backend_refuses_more_rows_than_it_can_hold():
    from ecdist.cluster import SCIPY_MAX_ROWS

    m = SCIPY_MAX_ROWS + 1
    V = np.ones((m, 2))
    with pytest.raises(ecdist.ConfigError, match="cluster_backend.*faiss"):
        cluster_layer(V, np.arange(m) % 10, 0.5, math.pi / 6, backend="scipy")


def test_auto_backend_is_scipy_up_to_its_limit_and_faiss_above():
    from ecdist.cluster import AUTO_SCIPY_MAX

    rng = np.random.default_rng(0)
    T = rng.standard_normal((4, 6))
    for m, expected in ((AUTO_SCIPY_MAX, "scipy"), (AUTO_SCIPY_MAX + 1, "faiss")):
        sid = np.arange(m) % 10
        V = T[np.arange(m) % 4] + 1e-9 * rng.standard_normal((m, 6))  # copies of 4 neurons in every student
        res = cluster_layer(V, sid, 0.5, math.pi / 6, backend="auto")
        assert res.backend == expected
        assert partition(res.labels) == teacher_partition(np.arange(m) % 4)


# ----- invariance and edge cases ---------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    backend=st.sampled_from(["scipy", "faiss"]),
    seed=st.sampled_from(list(SEEDS)),
    d_in=st.sampled_from([5, 20]),
    use_weights=st.booleans(),
    rule=st.sampled_from(["stable", "reference"]),
    perm_seed=st.integers(0, 2**32 - 1),
    relabel=st.booleans(),
)
def test_partition_does_not_depend_on_student_order(backend, seed, d_in, use_weights, rule, perm_seed, relabel):
    p = perfect_students(d_in, seed)
    kw = {"rule": rule, "weights": p["contrib"] if use_weights else None, "backend": backend}
    base = cluster_neurons(p["vectors"], p["sid"], 0.5, math.pi / 6, **kw)
    rng = np.random.default_rng(perm_seed)
    order = rng.permutation(N)
    rows = np.concatenate([np.flatnonzero(p["sid"] == s) for s in order])  # students' blocks reordered
    sid = p["sid"][rows]
    if relabel:  # student ids are names, not positions
        sid = rng.choice(10_000, size=N, replace=False)[sid]
    if use_weights:
        kw["weights"] = p["contrib"][rows]
    permuted = cluster_neurons(p["vectors"][rows], sid, 0.5, math.pi / 6, **kw)
    back = {frozenset(rows[list(c)].tolist()) for c in partition(permuted)}
    assert back == partition(base)


def test_labels_are_numbered_by_smallest_member(backend):
    p = perfect_students(20, seed=1)
    labels = cluster_neurons(p["vectors"], p["sid"], 0.5, math.pi / 6, weights=p["contrib"], backend=backend)
    assert labels.dtype.kind == "i"
    assert set(np.unique(labels).tolist()) == {-1, 0, 1, 2, 3}
    first_rows = [np.flatnonzero(labels == c).min() for c in range(4)]
    assert first_rows == sorted(first_rows)


def test_cluster_result_fields_agree_with_labels(backend):
    p = perfect_students(5, seed=2)
    res = cluster_layer(p["vectors"], p["sid"], 0.5, math.pi / 6, weights=p["contrib"], backend=backend)
    assert isinstance(res, Clusters)
    assert res.rule == "stable" and res.backend == backend and res.min_students == 5
    assert res.exact.shape == (res.n_clusters,) and res.exact.all()
    assert np.isnan(res.cut_height)
    for c in range(res.n_clusters):
        rows = np.flatnonzero(res.labels == c)
        assert res.size[c] == rows.size
        assert res.n_students[c] == np.unique(p["sid"][rows]).size
        assert res.separation[c] >= 3.0  # the default min_separation
        assert res.median_cos_dist[c] == pytest.approx(rules.median_cos_distance(p["vectors"], rows), abs=1e-15)
    assert np.all(res.labels[res.dropped] == -1)


@pytest.mark.parametrize("rule", ["stable", "reference"])
@pytest.mark.parametrize("d_in", [5, 20])
def test_float32_gives_the_float64_partition(rule, d_in, backend):
    p = perfect_students(d_in, seed=4)
    kw = {"rule": rule, "weights": p["contrib"]}
    l64 = cluster_neurons(p["vectors"], p["sid"], 0.5, math.pi / 6, **kw, backend=backend)
    l32 = cluster_neurons(p["vectors"].astype(np.float32), p["sid"], 0.5, math.pi / 6, **kw, backend=backend)
    assert partition(l32) == partition(l64) == teacher_partition(p["owner"])


@pytest.mark.parametrize("rule", ["stable", "reference"])
def test_no_cluster_spans_enough_students_gives_all_minus_one(rule, backend):
    """One neuron held by 4 of N = 10 students (and nothing else): no cluster reaches ⌊0.5·10⌋ = 5."""
    rng = np.random.default_rng(0)
    V = np.tile(rng.standard_normal((1, 5)), (4, 1)) + 1e-9 * rng.standard_normal((4, 5))
    res = cluster_layer(V, np.arange(4), 0.5, math.pi / 6, rule=rule, n_students=N, backend=backend)
    assert res.n_clusters == 0
    np.testing.assert_array_equal(res.labels, -1)
    assert res.size.shape == res.height.shape == res.median_cos_dist.shape == (0,)


def test_every_cluster_failing_the_angle_test_gives_all_minus_one(backend):
    """Reference rule, one spread cluster over all 10 students: dropped at β = π/3, kept at π/2.4."""
    V, sid, spread_rows, far_rows = _spread_cluster(cos=0.4)
    V, sid = V[spread_rows], sid[spread_rows]
    labels = cluster_neurons(V, sid, 0.5, math.pi / 3, rule="reference", backend=backend)
    np.testing.assert_array_equal(labels, -1)
    np.testing.assert_array_equal(cluster_neurons(V, sid, 0.5, math.pi / 2.4, rule="reference", backend=backend), 0)


def test_rows_below_drop_are_left_out(backend):
    """A teacher neuron whose copies contribute less than ``drop`` × the largest contribution."""
    p = perfect_students(20, seed=0)
    weak = 2
    w = p["contrib"].copy()
    w[p["owner"] == weak] *= 1e-4
    res = cluster_layer(p["vectors"], p["sid"], 0.5, math.pi / 6, weights=w, drop=1e-3, backend=backend)
    np.testing.assert_array_equal(res.dropped, w < 1e-3 * w.max())
    assert res.dropped[p["owner"] == weak].all()
    assert partition(res.labels) == teacher_partition(np.where(p["owner"] == weak, -1, p["owner"]))
    # drop = 0 keeps every row with a positive contribution
    res0 = cluster_layer(p["vectors"], p["sid"], 0.5, math.pi / 6, weights=w, drop=0.0, backend=backend)
    assert not res0.dropped.any()


@pytest.mark.parametrize("rule", ["stable", "reference"])
def test_weights_that_drop_almost_everything(rule, backend):
    """Only one row above ``drop`` × max: nothing left to cluster, every label is −1, no error."""
    V, sid = _ok_input()
    w = np.zeros(len(V))
    w[3] = 1.0
    res = cluster_layer(V, sid, 0.5, math.pi / 6, rule=rule, weights=w, backend=backend)
    assert res.dropped.sum() == len(V) - 1
    np.testing.assert_array_equal(res.labels, -1)


@pytest.mark.parametrize("rule", ["stable", "reference"])
def test_exact_duplicates_of_two_neurons(rule, backend):
    """Every student holds identical copies (all merge heights 0 within a neuron), one duplicated."""
    rng = np.random.default_rng(5)
    T = rng.standard_normal((2, 4))
    V = np.vstack([T[0], T[1], T[1]] * N)
    sid = np.repeat(np.arange(N), 3)
    owner = np.tile([0, 1, 1], N)
    labels = cluster_neurons(V, sid, 0.5, math.pi / 6, rule=rule, backend=backend)
    assert partition(labels) == teacher_partition(owner)


def test_stable_rule_keeps_a_lone_teacher_neuron(backend):
    rng = np.random.default_rng(0)
    neuron = rng.standard_normal(4)
    V, sid, w = [], [], []
    for s in range(N):
        V.append(neuron)
        sid.append(s)
        w.append(1.0)
        for _ in range(5):  # debris with outgoing weight 0
            V.append(0.1 * rng.standard_normal(4))
            sid.append(s)
            w.append(0.0)
    V, sid, w = np.array(V), np.array(sid), np.array(w)
    labels = cluster_neurons(V, sid, 0.5, math.pi / 6, rule="stable", weights=w, backend=backend)
    assert partition(labels) == {frozenset(np.flatnonzero(w > 0).tolist())}


def test_reference_rule_keeps_a_lone_teacher_neuron(backend):
    """The same lone cluster under the authors' rule."""
    V = np.tile(np.random.default_rng(0).standard_normal((1, 4)), (N, 1))
    labels = cluster_neurons(V, np.arange(N), 0.5, math.pi / 6, rule="reference", backend=backend)
    np.testing.assert_array_equal(labels, 0)


def test_cluster_neurons_returns_one_label_per_row(backend):
    for d_in in (2, 20):
        p = perfect_students(d_in, seed=7)
        labels = cluster_neurons(p["vectors"], p["sid"], backend=backend)
        assert isinstance(labels, np.ndarray)
        assert labels.shape == (len(p["vectors"]),)
        assert labels.min() >= -1
        kept = np.unique(labels[labels >= 0])
        np.testing.assert_array_equal(kept, np.arange(kept.size))


@pytest.mark.parametrize("gamma", [np.float32(0.5), np.int64(1)])
def test_numpy_scalar_gamma_is_accepted(gamma, backend):
    p = perfect_students(20, seed=0)
    labels = cluster_neurons(p["vectors"], p["sid"], gamma, math.pi / 6, weights=p["contrib"], backend=backend)
    assert len(partition(labels)) == R


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_infinite_vectors_are_refused_in_any_float_dtype(dtype):
    """MAX_ABS cast to float32 overflows to infinity, so a comparison with it let float32 infinities through."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((40, 5)).astype(dtype)
    vectors[3, 2] = np.inf
    with pytest.raises(ecdist.ConfigError, match="infinite"):
        ecdist.cluster.cluster_neurons(vectors, np.repeat(np.arange(8), 5))
    assert ecdist.cluster.finite(np.arange(6).reshape(2, 3))  # integer rows are finite
