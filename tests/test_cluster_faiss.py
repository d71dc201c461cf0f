"""The FAISS backend against the exact scipy backend.

Layers are built like ``test_cluster.perfect_students``, larger: n students of a given width,
each holding every teacher neuron (random order and signs, one of them split into two copies)
plus debris N(0, s²) with outgoing weight 0, canonicalised with the tanh symmetry. Partitions
are compared as sets of sets of rows. Three claims are tested:

* equal partitions where the clusters the rules keep are decided below the pieces' thresholds
  (every kept cluster certified), for both rules, with and without the debris;
* every cluster FAISS certifies (``Clusters.exact``) is one the exact backend keeps, also where
  the two backends disagree elsewhere (low dimension, no weights, no exact budget);
* the FAISS dendrogram is the exact one inside each certified cluster (same cophenetic distances).

The torch search (``knn="torch"``, the GPU path where FAISS has no GPU) runs one test body per
device: on the CPU here, on CUDA where there is one. It must find FAISS's neighbours and give
FAISS's labels, and it needs no FAISS.
"""
from __future__ import annotations

import importlib.util
import math
import sys
import tracemalloc

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import cophenet, is_monotonic, is_valid_linkage

import ecdist
from ecdist.activations import REGISTRY
from ecdist.cluster import NeuronIndex, cluster_layer, cluster_neurons, faiss_backend, rules, scipy_backend, torch_knn

TANH = REGISTRY["tanh"]


def layer(d_in: int, r: int, n: int, width: int, debris_std: float = 0.1, seed: int = 0, noise: float = 0.0):
    """Canonical rows of n perfect students; returns vectors, student ids, owner (−1: debris), contributions."""
    rng = np.random.default_rng(seed)
    T = rng.standard_normal((r, d_in + 1))
    a = rng.choice([-1.0, 1.0], r) * rng.uniform(0.5, 2.0, r)
    n_debris = width - r - 1
    V, A, own = [], [], []
    for _ in range(n):
        dup, t = rng.integers(r), rng.uniform(0.2, 0.8)
        v = np.vstack([T, T[dup : dup + 1], debris_std * rng.standard_normal((n_debris, d_in + 1))])
        v[: r + 1] += noise * rng.standard_normal((r + 1, d_in + 1))
        out = np.concatenate([a, [(1 - t) * a[dup]], np.zeros(n_debris)])
        out[dup] *= t
        o = np.concatenate([np.arange(r), [dup], np.full(n_debris, -1)])
        sign, perm = rng.choice([-1.0, 1.0], width), rng.permutation(width)
        V.append((v * sign[:, None])[perm])
        A.append((out * sign)[perm])
        own.append(o[perm])
    V, A = np.vstack(V), np.concatenate(A)
    can = TANH.symmetry.canonicalize(V, A[:, None])
    contrib = np.abs(A) * np.linalg.norm(V[:, :-1], axis=1)
    return can.vectors, np.repeat(np.arange(n), width), np.concatenate(own), contrib


def partition(labels: np.ndarray) -> set[frozenset[int]]:
    return {frozenset(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels) if c >= 0}


def certified(res) -> set[frozenset[int]]:
    return {frozenset(np.flatnonzero(res.labels == c).tolist()) for c in range(res.n_clusters) if res.exact[c]}


@pytest.fixture
def no_budget(monkeypatch):
    """FAISS with no exact-linkage budget: pieces are single neurons' copies and small debris."""
    monkeypatch.setattr(faiss_backend, "WORK_MIN", 0)
    monkeypatch.setattr(faiss_backend, "WORK_PER_ROW", 0)


# ----- equal partitions -------------------------------------------------------------------------------
CASES = [  # d_in, debris std, weights, rule — where every kept cluster is decided below the thresholds
    (5, 0.1, False, "stable"), (5, 1.0, False, "stable"), (20, 1.0, False, "stable"), (64, 0.1, False, "stable"),
    (20, 0.1, False, "reference"), (64, 0.1, False, "reference"),
    (5, 1.0, True, "stable"), (5, 1.0, True, "reference"), (20, 0.1, True, "reference"),
]


@pytest.mark.parametrize("d_in,std,weighted,rule", CASES)
def test_faiss_partition_equals_scipy_on_3000_rows(d_in, std, weighted, rule):
    V, sid, _, contrib = layer(d_in, r=40, n=20, width=150, debris_std=std, seed=d_in, noise=1e-9)
    w = contrib if weighted else None
    exact = cluster_layer(V, sid, 0.5, math.pi / 6, rule=rule, weights=w, backend="scipy")
    fast = cluster_layer(V, sid, 0.5, math.pi / 6, rule=rule, weights=w, backend="faiss")
    assert fast.backend == "faiss" and exact.backend == "scipy"
    assert partition(fast.labels) == partition(exact.labels)
    assert exact.n_clusters >= 40 and exact.exact.all()
    np.testing.assert_array_equal(fast.dropped, exact.dropped)
    np.testing.assert_array_equal(np.sort(fast.n_students), np.sort(exact.n_students))
    if rule == "stable":
        assert fast.exact.all()  # the stable rule's clusters are certified here


@pytest.mark.slow
def test_faiss_partition_equals_scipy_on_20000_rows():
    """M = 20,000 (50 students × 400 neurons, 100 teacher neurons): both rules, with and without
    the debris; scipy's dendrogram is computed once and read by both rules."""
    V, sid, _, contrib = layer(20, r=100, n=50, width=400, debris_std=0.1, seed=7, noise=1e-9)
    Z = scipy_backend.average_linkage(V)
    m_req, max_cd = 25, 1 - math.cos(math.pi / 6)
    for rule in ("stable", "reference"):
        ref = (rules.stable_rule(Z, V, sid, m_req, max_cd) if rule == "stable" else rules.reference_rule(Z, V, m_req, max_cd))
        fast = cluster_layer(V, sid, 0.5, math.pi / 6, rule=rule, backend="faiss")
        assert fast.min_students == m_req
        assert partition(fast.labels) == partition(ref.labels), rule
    assert len(partition(ref.labels)) == 100
    # with the pipeline's weights the debris is dropped before clustering
    a = cluster_layer(V, sid, 0.5, math.pi / 6, weights=contrib, backend="scipy")
    b = cluster_layer(V, sid, 0.5, math.pi / 6, weights=contrib, backend="faiss")
    assert partition(a.labels) == partition(b.labels) and b.exact.all()


# ----- what is certified is exact ------------------------------------------------------------------------
@pytest.mark.parametrize("d_in", [2, 5])
@pytest.mark.parametrize("seed", range(6))
def test_certified_clusters_are_kept_by_scipy(d_in, seed, no_budget):
    """Low dimension, no weights, no exact budget: the backends may disagree about debris, but
    every cluster FAISS certifies is one that scipy keeps, with the same rows."""
    V, sid, _, _ = layer(d_in, r=4, n=12, width=24, debris_std=[0.01, 0.1, 1.0][seed % 3], seed=seed)
    for min_sep in (3.0, 10.0):
        exact = cluster_layer(V, sid, 0.5, math.pi / 6, backend="scipy", min_separation=min_sep)
        fast = cluster_layer(V, sid, 0.5, math.pi / 6, backend="faiss", min_separation=min_sep)
        assert certified(fast) <= partition(exact.labels)
        assert certified(fast), "the teacher's neurons are certified"


@pytest.mark.parametrize("d_in", [5, 20])
def test_dendrogram_is_exact_inside_certified_clusters(d_in, no_budget):
    """Cophenetic distances between rows of a certified cluster equal scipy's: below each piece's
    threshold the FAISS dendrogram is the exact one."""
    V, sid, _, _ = layer(d_in, r=6, n=15, width=30, debris_std=0.3, seed=d_in, noise=1e-6)
    index = NeuronIndex(V.shape[1]).add(V, sid)
    fast = index.cluster(0.5, math.pi / 6)
    Z = index.linkage_
    assert is_valid_linkage(Z) and is_monotonic(Z) and Z.shape == (len(V) - 1, 4)
    assert index.info_["leaves"] > 1  # the multi-piece path ran
    exact_coph = cophenet(scipy_backend.average_linkage(V))
    fast_coph = cophenet(Z)
    m = len(V)
    checked = 0
    for c in np.flatnonzero(fast.exact):
        rows = np.flatnonzero(fast.labels == c)
        i, j = np.triu_indices(rows.size, 1)
        a, b = rows[i], rows[j]  # condensed index of (a, b), a < b
        k = m * a - a * (a + 1) // 2 + b - a - 1
        np.testing.assert_allclose(fast_coph[k], exact_coph[k], rtol=1e-12, atol=1e-15)
        checked += 1
    assert checked == 6


# ----- real students from the pipeline ------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained():
    teacher = ecdist.teachers.random_mlp([6, 3, 1], "tanh", seed=0)
    X = ecdist.queries.gaussian(600, 6, seed=1)
    config = ecdist.Config(activation="tanh", student_widths=[12], n_students=10, seed=0, threads=1)
    return teacher, X, ecdist.recover(teacher, X, config)


def _trained_layer(result):
    neurons = result.layers[0].neurons
    V = np.asarray(neurons.column("vector").combine_chunks().flatten()).reshape(neurons.num_rows, -1)
    return V, np.asarray(neurons.column("student")), np.asarray(neurons.column("contribution"))


def test_trained_students_cluster_alike(trained, no_budget):
    """The stable rule through many FAISS pieces: the same partition as scipy, certified clusters kept."""
    V, sid, w = _trained_layer(trained[2])
    for weights in (w, None):
        a = cluster_layer(V, sid, 0.5, math.pi / 3, rule="stable", weights=weights, backend="scipy")
        b = cluster_layer(V, sid, 0.5, math.pi / 3, rule="stable", weights=weights, backend="faiss")
        assert partition(a.labels) == partition(b.labels), weights is None
        assert certified(b) <= partition(a.labels)


def test_trained_students_reference_rule_alike_within_the_exact_budget(trained):
    """The reference rule cuts at one global height, so FAISS matches scipy only when the layer fits
    one exact linkage (the module's documented limit; through many pieces it may differ)."""
    V, sid, w = _trained_layer(trained[2])
    for weights in (w, None):
        a = cluster_layer(V, sid, 0.5, math.pi / 3, rule="reference", weights=weights, backend="scipy")
        b = cluster_layer(V, sid, 0.5, math.pi / 3, rule="reference", weights=weights, backend="faiss")
        assert partition(a.labels) == partition(b.labels), weights is None


def test_recluster_with_faiss_gives_the_same_network(trained):
    teacher, X, result = trained
    assert result.plan["cluster_backend"] == "scipy"  # auto, for 120 rows
    again = ecdist.recluster(result, teacher, X, cluster_backend="faiss")
    assert again.config.cluster_backend == "faiss" and again.layers[0].clustering.backend == "faiss"
    assert again.layer_sizes == result.layer_sizes == [3]
    for p, q in zip(result.network.parameters(), again.network.parameters()):
        np.testing.assert_array_equal(p.detach().numpy(), q.detach().numpy())


# ----- streaming, edge cases ------------------------------------------------------------------------------
@pytest.mark.parametrize("exact_max", [None, 100])  # flat index, or IVF trained on the first packs
def test_packs_added_one_by_one_give_the_layer_result(exact_max):
    V, sid, _, contrib = layer(20, r=10, n=20, width=60, debris_std=0.5, seed=3, noise=1e-9)
    whole = cluster_layer(V, sid, 0.5, math.pi / 6, weights=contrib, backend="scipy")
    index = NeuronIndex(V.shape[1], expected_rows=len(V), exact_max=exact_max, work=0)
    for s in range(20):  # one pack per student, as the Ray packs would hand them over
        rows = sid == s
        index.add(V[rows], sid[rows], contrib[rows])
        if exact_max is None:  # a flat index takes each pack as it comes
            assert index._index.ntotal == rows.sum() * (s + 1)
    assert index.ntotal == len(V)
    assert index._index is not None and index._index.ntotal == len(V)  # an IVF index once its sample filled
    streamed = index.cluster(0.5, math.pi / 6)
    assert index.info_["index"]["kind"] == ("flat" if exact_max is None else "ivf")
    assert partition(streamed.labels) == partition(whole.labels)
    np.testing.assert_array_equal(streamed.dropped, whole.dropped)


def test_float32_rows_give_the_float64_partition():
    V, sid, _, _ = layer(20, r=30, n=20, width=120, debris_std=0.3, seed=5, noise=1e-6)
    p64 = cluster_layer(V, sid, 0.5, math.pi / 6, backend="faiss")
    p32 = cluster_layer(V.astype(np.float32), sid, 0.5, math.pi / 6, backend="faiss")
    s32 = cluster_layer(V.astype(np.float32), sid, 0.5, math.pi / 6, backend="scipy")
    assert partition(p32.labels) == partition(p64.labels) == partition(s32.labels)
    assert len(partition(p64.labels)) == 30


def test_duplicate_rows_and_no_kept_cluster(no_budget):
    """Exact copies (distance 0, also across neurons' pieces) and a layer where no neuron reaches
    ⌊γN⌋ students: the same answer as scipy, all −1 for the second."""
    rng = np.random.default_rng(2)
    T = rng.standard_normal((3, 8))
    V = np.vstack([T[[0, 1, 1, 2]]] * 12 + [np.zeros((5, 8))])  # 5 identical zero rows too
    sid = np.concatenate([np.repeat(np.arange(12), 4), np.arange(5)])
    for rule in ("stable", "reference"):
        a = cluster_layer(V, sid, 0.5, math.pi / 6, rule=rule, backend="scipy")
        b = cluster_layer(V, sid, 0.5, math.pi / 6, rule=rule, backend="faiss")
        assert partition(a.labels) == partition(b.labels) and len(partition(b.labels)) == 3
    few = cluster_layer(V[:20], sid[:20], 0.5, math.pi / 6, backend="faiss", n_students=12)  # 5 of 12 students
    np.testing.assert_array_equal(few.labels, -1)
    assert few.n_clusters == 0 and few.exact.shape == (0,)


def test_single_student_raises_like_scipy():
    V = np.random.default_rng(0).standard_normal((30, 5))
    for backend in ("scipy", "faiss"):
        with pytest.raises(ecdist.ConfigError, match="gamma"):
            cluster_layer(V, np.zeros(30, dtype=int), 0.5, math.pi / 6, backend=backend)


def test_memory_stays_linear_in_the_rows():
    """20,000 rows: scipy's condensed distances alone would take 1.6 GB; FAISS's Python-side peak
    (numpy allocations, which tracemalloc sees) stays near the size of the vectors."""
    V, sid, _, _ = layer(20, r=100, n=50, width=400, debris_std=0.1, seed=1, noise=1e-9)
    V = V.astype(np.float32)  # 1.7 MB
    tracemalloc.start()
    res = cluster_layer(V, sid, 0.5, math.pi / 6, backend="faiss")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert res.n_clusters == 100 and res.exact.all()
    assert peak < 120e6, f"peak {peak / 1e6:.0f} MB"  # the work budget: ≤ 2·10⁶ pairs, 16 MB each copy


def test_missing_faiss_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss → ImportError
    with pytest.raises(ecdist.ConfigError, match="pip install faiss-cpu"):
        faiss_backend.gpu_count()


def test_cuda_without_a_gpu_is_a_config_error():
    if torch.cuda.is_available() or faiss_backend._faiss_gpus() > 0:
        pytest.skip("a GPU is present")
    with pytest.raises(ecdist.ConfigError, match="device"):
        NeuronIndex(5, device="cuda")


def test_config_accepts_the_faiss_backend():
    cfg = ecdist.Config(activation="tanh", student_widths=[8], cluster_backend="faiss")
    assert cfg.cluster_backend == "faiss"
    with pytest.raises(ecdist.ConfigError, match="cluster_backend"):
        ecdist.Config(activation="tanh", student_widths=[8], cluster_backend="hnsw")


# ----- the torch search: one body per device ---------------------------------------------------------------
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
HAS_FAISS = importlib.util.find_spec("faiss") is not None


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 7 queries × 40 rows: the query blocks and the merge across tiles are exercised."""
    monkeypatch.setattr(torch_knn, "QUERY_TILE", 7)
    monkeypatch.setattr(torch_knn, "TILE_BYTES_CPU", 4 * 7 * 40)
    monkeypatch.setattr(torch_knn, "TILE_BYTES_GPU", 4 * 7 * 40)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_search_finds_the_exact_neighbours(device, small_tiles):
    """Against float64 brute force: the same neighbour sets up to near ties, and distances within
    the float32 bound ``faiss_backend`` assumes; against ``IndexFlatL2`` (where FAISS is installed):
    the same sets, distances to float32 rounding. Rows are added in two packs."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 33))
    x[1::50] = x[::50] + 1e-9  # near copies, as students' neurons are
    x32 = x.astype(np.float32)
    k = 10
    index = torch_knn.TorchFlatIndex(33, device)
    index.add(x32[:250])
    index.add(x32[250:])
    assert index.ntotal == 600
    D, I = index.search(x32, k)
    assert D.dtype == np.float32 and I.dtype == np.int64 and I.shape == (600, k)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    exact = np.sort(d, axis=1)
    delta = faiss_backend.F32_ERR * math.sqrt(33 + 8) * np.linalg.norm(x, axis=1).max()
    assert np.abs(np.sqrt(D) - np.sqrt(exact[:, :k])).max() <= delta
    clear = exact[:, k] - exact[:, k - 1] > 1e-3  # no near tie at the k-th neighbour
    assert clear.mean() > 0.9
    for r in np.flatnonzero(clear):
        assert set(I[r]) == set(np.argsort(d[r])[:k])
    if HAS_FAISS:
        import faiss

        flat = faiss.IndexFlatL2(33)
        flat.add(x32)
        Df, If = flat.search(x32, k)
        np.testing.assert_allclose(D, Df, rtol=1e-5, atol=1e-4)
        assert all(set(I[r]) == set(If[r]) for r in np.flatnonzero(clear))
    D, I = torch_knn.knn(x32[:3], x32[:5], 8, device)  # fewer rows than k: −1 and inf, as FAISS pads
    assert (I[:, 5:] == -1).all() and np.isinf(D[:, 5:]).all() and (np.sort(I[:, :5], axis=1) == np.arange(5)).all()


UNWEIGHTED = [c for c in CASES if not c[2]][::2]  # the kNN path runs (weights drop the debris: one exact linkage)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d_in,std,weighted,rule", UNWEIGHTED)
def test_torch_search_gives_the_faiss_labels(device, d_in, std, weighted, rule):
    """The torch search through the whole backend: FAISS's labels and certificates, scipy's partition."""
    V, sid, _, _ = layer(d_in, r=40, n=20, width=150, debris_std=std, seed=d_in, noise=1e-9)
    index = NeuronIndex(V.shape[1], device=device, knn="torch").add(V, sid)
    fast = index.cluster(0.5, math.pi / 6, rule=rule)
    assert index.info_["index"] == {"kind": "flat", "lib": "torch", "gpu": device == "cuda", "nlist": 0, "nprobe": 0}
    exact = cluster_layer(V, sid, 0.5, math.pi / 6, rule=rule, backend="scipy")
    assert partition(fast.labels) == partition(exact.labels)
    if HAS_FAISS:
        ref = cluster_layer(V, sid, 0.5, math.pi / 6, rule=rule, backend="faiss", device="cpu", knn="faiss")
        np.testing.assert_array_equal(fast.labels, ref.labels)
        np.testing.assert_array_equal(fast.exact, ref.exact)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_search_streams_packs_and_needs_no_faiss(device, monkeypatch, no_budget):
    """Without FAISS: packs streamed into a torch index, many leaves (no exact budget) and exact
    copies (a centroid search) give FAISS's labels and certificates; ``cluster_neurons`` takes knn."""
    V, sid, _, _ = layer(5, r=6, n=15, width=30, debris_std=0.3, seed=5, noise=1e-6)
    V = np.vstack([V, np.repeat(V[:1], 30, axis=0)])  # 30 exact copies of one row: more ties than k
    sid = np.concatenate([sid, np.arange(30) % 15])
    ref = cluster_layer(V, sid, 0.5, math.pi / 6, backend="faiss", device="cpu", knn="faiss") if HAS_FAISS else None
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss → ImportError
    index = NeuronIndex(V.shape[1], device=device, knn="torch", expected_rows=len(V))
    for s in range(0, len(V), 30):
        index.add(V[s : s + 30], sid[s : s + 30])
        assert index._index.ntotal == min(s + 30, len(V))
    fast = index.cluster(0.5, math.pi / 6)
    assert index.info_["leaves"] > 1 and index.info_["index"]["lib"] == "torch"
    exact = cluster_layer(V, sid, 0.5, math.pi / 6, backend="scipy")
    assert certified(fast) <= partition(exact.labels) and len(certified(fast)) == 5  # not the copies' own
    if ref is not None:
        np.testing.assert_array_equal(fast.labels, ref.labels)
        np.testing.assert_array_equal(fast.exact, ref.exact)
    labels = cluster_neurons(V, sid, 0.5, math.pi / 6, backend="faiss", device=device, knn="torch")
    np.testing.assert_array_equal(labels, fast.labels)
    with pytest.raises(ecdist.ConfigError, match="pip install faiss-cpu"):  # FAISS's own search still needs it
        cluster_layer(V, sid, 0.5, math.pi / 6, backend="faiss", device="cpu", knn="faiss")


@pytest.mark.parametrize(
    "device,knn,faiss_gpus,cuda,lib,gpu",
    [
        ("auto", "auto", 1, True, "faiss", True),  # faiss-gpu first
        ("auto", "auto", 0, True, "torch", True),  # then torch on CUDA
        ("auto", "auto", 0, False, "faiss", False),  # then FAISS on the CPU
        ("cuda", "auto", 0, True, "torch", True),
        ("cpu", "auto", 1, True, "faiss", False),
        ("auto", "faiss", 0, True, "faiss", False),
        ("auto", "torch", 1, True, "torch", True),
        ("auto", "torch", 0, False, "torch", False),
        ("cuda", "faiss", 0, True, None, None),  # FAISS sees no GPU
        ("cuda", "torch", 1, False, None, None),  # torch sees none
        ("cuda", "auto", 0, False, None, None),
    ],
)
def test_the_search_is_chosen_once(device, knn, faiss_gpus, cuda, lib, gpu, monkeypatch):
    monkeypatch.setattr(faiss_backend, "_faiss_gpus", lambda: faiss_gpus)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    if lib is None:
        with pytest.raises(ecdist.ConfigError, match="device: 'cuda'"):
            NeuronIndex(5, device=device, knn=knn)
        return
    index = NeuronIndex(5, device=device, knn=knn)
    assert (index._lib, index._gpu) == (lib, gpu)
    assert index._make_plan(10_000).kind == ("flat" if gpu else "ivf")  # EXACT_MAX_GPU on any GPU
    with pytest.raises(ecdist.ConfigError, match="knn"):
        NeuronIndex(5, knn="hnsw")


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9")
def test_torch_search_runs_in_true_float32(monkeypatch):
    """A process that allows TF32 / bf16 products (``set_float32_matmul_precision("medium")``)
    still gets full float32 distances, which the error bound needs; its setting is kept."""
    seen = []
    inner = torch_knn._search_block

    def spy(*args):
        seen.append((torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision))
        return inner(*args)

    monkeypatch.setattr(torch_knn, "_search_block", spy)
    x = np.random.default_rng(1).standard_normal((50, 8)).astype(np.float32)
    torch.set_float32_matmul_precision("medium")
    try:
        torch_knn.knn(x, x, 3)
        after = torch.get_float32_matmul_precision()
    finally:
        torch.set_float32_matmul_precision("highest")
    assert seen == [("ieee", "ieee")] and after == "medium"
