"""FAISS backend: average-linkage clustering of up to millions of neuron vectors, in memory linear in M.

Exact average linkage reads all M² distances. It is also *reducible*: if every row of a set S is
farther than τ from every row outside S, then below height τ the full dendrogram merges S's rows
exactly as S's own linkage does (a merge across S's border averages distances > τ, and heights
only grow). The backend builds on that:

1. **kNN graph.** The rows go into a FAISS index (exact ``IndexFlatL2`` up to ``exact_max`` rows,
   IVF above; moved to the GPU when FAISS has one), searched in blocks for k neighbours each.
   On a GPU that FAISS cannot use (faiss-cpu, or no FAISS: faiss-gpu's wheels need CUDA 12) the
   exact search is torch's (``torch_knn``: same expansion, same results, same rounding bound).
   Copies of one neuron that the graph leaves apart (more ties than k, IVF list borders) are
   joined by a search over the centroids of groups of near-identical rows.
2. **Leaves.** The graph's minimum spanning tree, read bottom-up (single linkage), grows sets of
   rows ("leaves") while their exact linkage fits a work budget (pairs of rows) and
   ``max_component`` rows; near-identical rows (copies of one neuron) always join.
3. **Dendrogram.** Exact average linkage (scipy, float64) inside each leaf that could hold a
   cluster the rule keeps; single linkage inside the others (they hold no big node). Above the
   leaves the tree follows the spanning tree at heights estimated from the leaves' centroids and
   spreads (root-mean-square distance of their members), made monotone.
4. **Rules.** The same ``rules.stable_rule`` / ``rules.reference_rule`` read that dendrogram.

What is exact. For a set S of rows (a neuron's copies under a kept cluster; a leaf), τ_S bounds
from below the distance from S to every other row; it comes from all rows' exact distances to S's
centroid (``_ball``), so it holds whatever the index missed. The exact dendrogram merges S's rows
below τ_S as S's own linkage does, and the FAISS one does too. A kept cluster of the stable rule
is *certified* (``Clusters.exact``) when the rule's decision about it depends only on heights
below τ_S, whatever the exact dendrogram does above: its birth, its core, and a lifetime that
beats its ancestors' (``_certify``). A certified cluster is kept, with the same rows, by the
exact backend. The exact backend can keep clusters born above every τ — debris that coalesces
late, at low input dimension — and the reference rule cuts at one global height that usually
lies above them, so its FAISS result is exact only when the whole layer fits one exact linkage
(``WORK_MIN``: 1,000 rows): those are the cases where the two backends can differ.

Memory: the vectors, a float32 copy in the index, k neighbours per row (int64 + float32), the
spanning tree and the dendrogram (a few arrays of M), and the condensed distances of one exact
linkage at a time (at most ``max_component`` rows).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from ..errors import ConfigError
from . import rules, scipy_backend, torch_knn

LOG = logging.getLogger(__name__)

K = 24  # neighbours per row in the kNN graph
EXACT_MAX_CPU = 5_000  # rows searched with an exact flat index on a CPU (O(M²·D)); IVF above
EXACT_MAX_GPU = 2_000_000  # a GPU searches a million rows exactly in seconds (torch on an H200: 16 s)
KNN = ("auto", "faiss", "torch")  # libraries that search the neighbours
NLIST_PER_SQRT = 4.0  # IVF lists per √M
NPROBE = 2  # IVF lists searched per query (pre-assigned CPU search: 1, 2 for rows near a list border)
MAX_COMPONENT = 4096  # rows of the largest exact linkage: 8 M pairs, 67 MB of condensed distances
WORK_MIN = 500_000  # exact-linkage budget in pairs of rows: a layer of ≤ 1,000 rows is linked exactly...
WORK_PER_ROW = 64  # ... and above that 64 pairs per row, so the exact step stays linear in M
BLOCK = 1 << 15  # query rows per search call
F32_ERR = float(np.sqrt(4 * np.finfo(np.float32).eps))  # float32 distance error: × √(D+8) × radius (bound), × radius (copies)


def _faiss():
    try:
        import faiss
    except ImportError:  # faiss-cpu is a dependency, but a GPU machine can do without it
        raise ConfigError(
            "cluster_backend: the 'faiss' backend needs FAISS here (a search on the CPU, or an IVF index "
            "above exact_max rows); install it with `pip install faiss-cpu` (or `pip install 'ecdist[gpu]'` "
            "for faiss-gpu), search with torch (knn='torch', and exact_max above the row count), or use cluster_backend='scipy'"
        ) from None
    return faiss


def gpu_count() -> int:
    """GPUs that FAISS can use (0 for faiss-cpu, or faiss-gpu on a machine without one)."""
    faiss = _faiss()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def _resolve(device: str, knn: str) -> tuple[str, bool]:
    """(library, on a GPU) of the neighbour search: faiss-gpu, else torch on CUDA, else FAISS on the CPU."""
    cuda = device != "cpu" and torch.cuda.is_available()
    if knn == "torch":
        lib, gpu = "torch", cuda
    elif device != "cpu" and _faiss_gpus() > 0:
        lib, gpu = "faiss", True
    elif knn == "auto" and cuda:
        lib, gpu = "torch", True
    else:
        lib, gpu = "faiss", False
    if device == "cuda" and not gpu:
        why = {"torch": "torch sees no CUDA GPU", "faiss": "FAISS sees no GPU (install faiss-gpu, or pass knn='torch')"}
        raise ConfigError(f"device: 'cuda' was asked for but {why.get(knn, 'neither FAISS nor torch sees a GPU')}; "
                          "use device='auto' or 'cpu'")
    return lib, gpu


def _faiss_gpus() -> int:
    """``gpu_count``, 0 without FAISS."""
    try:
        return gpu_count()
    except ConfigError:
        return 0


@dataclass
class _Plan:
    """How the index is built, resolved once from the row count and the device."""

    kind: str  # "flat" (exact) or "ivf"
    lib: str  # "faiss" or "torch" (flat only)
    gpu: bool
    nlist: int = 0
    nprobe: int = 0


class NeuronIndex:
    """The neuron vectors of one layer, added pack by pack as students finish, and clustered once.

    The FAISS index is built while packs arrive when ``expected_rows`` is given (a flat index takes
    each pack at once; an IVF index trains on the first packs that reach its sample size);
    otherwise at ``cluster``. ``cluster`` returns the same ``Clusters`` as ``cluster_layer``.

    dim: D of the rows [w; b]; device: "auto" (a GPU when there is one), "cpu" or "cuda";
    knn: who searches the neighbours: "auto" (FAISS on a GPU it can use, else torch on a CUDA
    GPU, else FAISS on the CPU), "faiss", or "torch" (exact brute force on ``device``, the CPU
    being for tests; needs no FAISS for up to exact_max rows);
    k: neighbours per row; exact_max: rows searched exactly (flat index: FAISS's or torch's),
    a FAISS IVF index above (default ``EXACT_MAX_CPU``, or ``EXACT_MAX_GPU`` on a GPU);
    max_component: rows of the largest exact linkage; work: pairs of rows linked exactly
    (default max(WORK_MIN, WORK_PER_ROW · M)).

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> teacher = rng.standard_normal((3, 6))
        >>> index = NeuronIndex(6)
        >>> for s in range(10):                          # one student per pack
        ...     rows = np.vstack([teacher[rng.permutation(3)], rng.standard_normal((2, 6))])
        ...     _ = index.add(rows, np.full(5, s))
        >>> index.cluster(gamma=0.5, beta=np.pi / 6).n_clusters
        3
    """

    def __init__(
        self,
        dim: int,
        *,
        device: str = "auto",
        knn: str = "auto",
        k: int = K,
        exact_max: int | None = None,
        max_component: int = MAX_COMPONENT,
        work: int | None = None,
        expected_rows: int | None = None,
        seed: int = 0,
    ) -> None:
        if not (isinstance(dim, int) and dim >= 1):
            raise ConfigError(f"dim: expected a positive int, got {dim!r}")
        if device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device: expected 'auto', 'cpu' or 'cuda', got {device!r}")
        if knn not in KNN:
            raise ConfigError(f"knn: expected one of {', '.join(map(repr, KNN))}, got {knn!r}")
        for name, v, lo in (("k", k, 1), ("exact_max", exact_max, 0), ("max_component", max_component, 2)):
            if not (isinstance(v, int) and v >= lo) and not (name == "exact_max" and v is None):
                raise ConfigError(f"{name}: expected an int >= {lo}, got {v!r}")
        self.dim, self.device, self.knn, self.k = dim, device, knn, k
        self._lib, self._gpu = _resolve(device, knn)
        self.exact_max, self.max_component, self.work = exact_max, max_component, work
        self.expected_rows, self.seed = expected_rows, seed
        self._packs: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
        self._shift: np.ndarray | None = None
        self._index = None  # built while streaming, over every row added
        self._plan: _Plan | None = None
        self._pending: list[np.ndarray] = []  # float32 packs waiting for an IVF index to be trained
        self._res = None  # GPU resources, kept alive with the index
        self.info_: dict = {}  # after ``cluster``: sizes and seconds of each step
        self.linkage_: np.ndarray | None = None  # after ``cluster``: the dendrogram the rule read (kept rows)

    # ----- adding rows ---------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return sum(len(p[0]) for p in self._packs)

    def add(self, vectors: np.ndarray, student_ids: np.ndarray, weights: np.ndarray | None = None) -> NeuronIndex:
        """Add one pack of rows: vectors (n, dim), student_ids (n,), weights (n,) output contributions."""
        from . import finite, numeric

        vectors, student_ids = numeric("vectors", vectors), numeric("student_ids", student_ids, "iu")
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ConfigError(f"vectors: expected shape (n, {self.dim}), got {vectors.shape}")
        if student_ids.shape != (len(vectors),):
            raise ConfigError(f"student_ids: expected shape ({len(vectors)},) to match vectors, got {student_ids.shape}")
        if not finite(vectors):
            raise ConfigError(
                "vectors: contain NaN, infinite or huge values; the students diverged or the input is corrupt"
            )
        if weights is not None:
            weights = numeric("weights", weights).astype(np.float64)
            if weights.shape != (len(vectors),) or not np.isfinite(weights).all() or (weights < 0).any():
                raise ConfigError("weights: expected one finite, non-negative output contribution per row")
        if self._packs and (weights is None) != (self._packs[0][2] is None):
            raise ConfigError("weights: give weights with every pack or with none")
        if not len(vectors):
            return self
        if self._shift is None:  # centring shrinks float32 rounding; the first pack's mean is close enough
            self._shift = vectors.mean(axis=0, dtype=np.float64)
        self._packs.append((vectors, student_ids, weights))
        if self.expected_rows is not None:
            self._stream(self._f32(vectors))
        return self

    def _f32(self, v: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(v - self._shift, dtype=np.float32)

    def _stream(self, x: np.ndarray) -> None:
        if self._plan is None:
            self._plan = self._make_plan(int(self.expected_rows))
        if self._index is None:
            self._pending.append(x)
            n = sum(len(p) for p in self._pending)
            if self._plan.kind == "ivf" and n < _train_size(self._plan.nlist):
                return
            self._index = self._new_index(self._plan, np.concatenate(self._pending))
            for p in self._pending:
                self._index.add(p)
            self._pending = []
        else:
            self._index.add(x)

    # ----- the index ---------------------------------------------------------------------------------
    def _make_plan(self, n: int) -> _Plan:
        exact_max = self.exact_max if self.exact_max is not None else (EXACT_MAX_GPU if self._gpu else EXACT_MAX_CPU)
        if n <= exact_max:
            return _Plan("flat", self._lib, self._gpu)
        nlist = int(min(65536, max(16, NLIST_PER_SQRT * math.sqrt(n))))
        return _Plan("ivf", "faiss", self._gpu and self._lib == "faiss", nlist, NPROBE)

    def _new_index(self, plan: _Plan, train: np.ndarray):
        """An empty index of the plan's kind, trained on ``train`` if it needs training."""
        if plan.lib == "torch":
            return torch_knn.TorchFlatIndex(self.dim, "cuda" if plan.gpu else "cpu")
        faiss = _faiss()
        if plan.kind == "flat":
            index = faiss.IndexFlatL2(self.dim)
        else:
            quantizer = "" if plan.nlist <= 1024 or plan.gpu else "_HNSW32"  # coarse assignment in log time
            index = faiss.index_factory(self.dim, f"IVF{plan.nlist}{quantizer},Flat")
            ivf = faiss.extract_index_ivf(index)
            ivf.cp.niter = 4  # the partition only has to be balanced, not optimal
            ivf.cp.min_points_per_centroid = 4
            ivf.nprobe = plan.nprobe
            rng = np.random.default_rng(self.seed)
            sample = train[np.sort(rng.choice(len(train), min(len(train), _train_size(plan.nlist)), replace=False))]
            index.train(sample)
        if plan.gpu:  # the device only changes where the index lives
            self._res = self._res or faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, 0, index)
            if plan.kind == "ivf":
                index.nprobe = plan.nprobe
        return index

    # ----- clustering --------------------------------------------------------------------------------
    def cluster(
        self,
        gamma: float = 0.5,
        beta: float = math.pi / 3,
        *,
        rule: str = "stable",
        drop: float = 1e-3,
        n_students: int | None = None,
        min_separation: float = 3.0,
    ):
        """Cluster every row added so far (see ``ecdist.cluster.cluster_layer`` for the arguments)."""
        from . import _finish, _validate_params, min_students

        _validate_params(gamma, beta, "faiss", rule, drop)
        vectors, sids, weights = self._stacked()
        n = int(n_students) if n_students is not None else int(np.unique(sids).size)
        m_req = min_students(gamma, n)
        dropped = np.zeros(len(vectors), dtype=bool)
        if weights is not None and len(vectors):
            dropped = weights < drop * weights.max()
        rows = np.flatnonzero(~dropped)
        t0 = time.perf_counter()
        self.linkage_ = None
        if rows.size >= 2:
            res, exact = self._cluster_rows(vectors, sids, rows, m_req, 1 - math.cos(beta), rule, min_separation)
        else:
            res, exact = rules._empty(rows.size), np.zeros(0, dtype=bool)
        self.info_["total_s"] = time.perf_counter() - t0
        return _finish(vectors, sids, rows, dropped, res, m_req, rule, "faiss", exact)

    def _stacked(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        if not self._packs:
            return np.zeros((0, self.dim)), np.zeros(0, dtype=np.int64), None
        if len(self._packs) > 1:  # one array from here on (the packs are released)
            v = np.concatenate([p[0] for p in self._packs])
            s = np.concatenate([p[1] for p in self._packs])
            w = None if self._packs[0][2] is None else np.concatenate([p[2] for p in self._packs])
            self._packs = [(v, s, w)]
        return self._packs[0]

    def _cluster_rows(self, vectors, sids, rows, m_req, max_cd, rule, min_sep):
        info = self.info_ = {"rows": int(rows.size)}
        t = time.perf_counter()
        m = rows.size
        kept_vectors = vectors if m == len(vectors) else vectors[rows]
        kept_sids = sids[rows]
        shift = self._shift
        radius = _max_norm(kept_vectors, shift)  # R: rows lie within R of the shift
        h_max = 2 * radius  # no average-linkage height exceeds the largest distance
        delta = F32_ERR * math.sqrt(self.dim + 8) * radius  # float32 distances are within δ of the truth
        floor = rules.height_floor(kept_vectors)
        work = self.work if self.work is not None else max(WORK_MIN, WORK_PER_ROW * m)
        cap = max(self.max_component, 3 * int(np.unique(kept_sids).size))  # a neuron's copies fit one leaf

        if m * (m - 1) // 2 <= work and m <= cap:  # the whole layer fits one exact linkage
            info["index"] = None
            Zhat = scipy_backend.average_linkage(np.asarray(kept_vectors, dtype=np.float64))
            if rule == "reference":
                res = rules.reference_rule(Zhat, kept_vectors, m_req, max_cd)
            else:
                res = rules.stable_rule(Zhat, kept_vectors, kept_sids, m_req, max_cd, min_sep, floor=floor)
            info["leaves"] = 1
            self.linkage_ = Zhat
            return res, np.ones(res.heights.size, dtype=bool)
        # 1. kNN graph
        copy_h = F32_ERR * radius  # rows closer than this are copies of one neuron to float32 precision
        nbr, dist = self._knn(vectors, rows, copy_h=copy_h)
        same = _copy_edges(nbr, dist, copy_h, kept_vectors, shift, self._small_knn)
        info["knn_s"] = time.perf_counter() - t
        plan = self._plan
        info["index"] = {"kind": plan.kind, "lib": plan.lib, "gpu": plan.gpu, "nlist": plan.nlist, "nprobe": plan.nprobe}
        t = time.perf_counter()
        # 2. leaves, grown along the spanning tree
        u, v, h = _spanning_tree(nbr, dist, m, extra=same)
        del nbr, dist
        grow = _grow(u, v, h, m, cap, work, m_req, copy_h=copy_h)
        info["tree_s"] = time.perf_counter() - t
        t = time.perf_counter()
        # 3. dendrogram
        dendro = _Dendrogram(m)
        leaf_of = grow.leaf_of
        leaves, leaf_idx = np.unique(leaf_of, return_inverse=True)
        leaf_rows = _group(leaf_idx, leaves.size)
        n_st = _distinct_per_group(leaf_idx, kept_sids, leaves.size)
        size = np.bincount(leaf_idx, minlength=leaves.size)
        relevant = (n_st if rule == "stable" else size) >= m_req
        relevant &= size >= 2
        leaf_node = np.empty(leaves.size, dtype=np.int64)
        sl_keep = ~relevant[np.searchsorted(leaves, leaf_of[grow.rep])] if grow.rep.size else np.zeros(0, bool)
        sl_ids = dendro.add_many(grow.left[sl_keep], grow.right[sl_keep], grow.height[sl_keep], grow.size[sl_keep])
        sl_map = np.full(grow.left.size, -1, dtype=np.int64)
        sl_map[sl_keep] = sl_ids
        for i in np.flatnonzero(~relevant):
            node = grow.node[leaves[i]]
            leaf_node[i] = node if node < m else sl_map[node - m]
        dendro.remap_children(sl_ids, m, sl_map)
        exact_work = 0
        for i in np.flatnonzero(relevant):
            r = leaf_rows[i]
            Z = scipy_backend.average_linkage(np.asarray(kept_vectors[r], dtype=np.float64))
            leaf_node[i] = dendro.add_linkage(Z, r, leaf=i)
            exact_work += r.size * (r.size - 1) // 2
        info["leaves"] = int(leaves.size)
        info["exact_leaves"] = int(relevant.sum())
        info["largest_leaf"] = int(size.max())
        info["exact_pairs"] = exact_work
        info["linkage_s"] = time.perf_counter() - t
        t = time.perf_counter()
        _upper(dendro, kept_vectors, shift, leaf_idx, leaf_rows, leaf_node, grow.refused, self._small_knn)
        Zhat = self.linkage_ = dendro.linkage()
        info["upper_s"] = time.perf_counter() - t
        t = time.perf_counter()
        # 4. rules
        if rule == "reference":
            res = rules.reference_rule(Zhat, kept_vectors, m_req, max_cd)
            exact = np.full(res.heights.size, leaves.size == 1)
        else:
            res = rules.stable_rule(Zhat, kept_vectors, kept_sids, m_req, max_cd, min_sep, floor=floor)
            exact = np.zeros(res.heights.size, dtype=bool)
            if res.heights.size:
                if leaves.size == 1:  # one leaf: the dendrogram is the exact one
                    exact[:] = True
                else:
                    exact = _certify(res, dendro.node_leaf(), partial(_ball, self, kept_vectors, shift, delta=delta), h_max, min_sep)
        info["rules_s"] = time.perf_counter() - t
        info["exact_clusters"] = int(exact.sum())
        LOG.info("faiss backend: %s", info)
        return res, exact

    def _knn(self, vectors, rows, copy_h: float = 0.0):
        """k nearest other rows of every kept row (positions among the kept rows; −1 where none).

        A CPU IVF index built here reads one list per row, and also the second nearest list of
        a row whose two nearest centroids are within 2·copy_h of each other: only there can a
        copy of the row (within copy_h; copy_h is itself a generous float32 rounding scale) lie
        in another list. Missing one only leaves a cluster uncertified, never wrong."""
        m = rows.size
        k = min(self.k, m - 1)
        streamed = self._index is not None and self._plan is not None
        if streamed and self._index.ntotal < self.ntotal:  # the IVF sample never filled: build now
            streamed = False
        if streamed:
            index, pos, assign = self._index, np.full(len(vectors), -1, dtype=np.int64), None
            pos[rows] = np.arange(m)
            extra = len(vectors) - m  # dropped rows are in the index: ask for more neighbours
        else:
            self._plan = self._make_plan(m)
            data = self._f32(vectors[rows]) if m < len(vectors) else self._f32(vectors)
            index = self._new_index(self._plan, data)
            del data
            pos, extra = None, 0
            if self._plan.kind == "ivf" and not self._plan.gpu:  # the rows are the queries: assign them once
                assign, near_border = self._preassign(index, vectors, rows, copy_h)
            else:
                assign = None
                for s in range(0, m, BLOCK):
                    index.add(self._f32(vectors[rows[s : s + BLOCK]]))
        kk = min(index.ntotal, k + 1 + min(extra, k))
        nbr = np.empty((m, k), dtype=np.int64)
        dist = np.empty((m, k), dtype=np.float32)
        for s in range(0, m, BLOCK):
            q = rows[s : s + BLOCK]
            xq = self._f32(vectors[q])
            if assign is None:
                D, I = index.search(xq, kk)
            else:
                D, I = _search_lists(index, xq, kk, assign[s : s + BLOCK], near_border[s : s + BLOCK])
            D = np.sqrt(np.maximum(D, 0))
            if pos is not None:
                I = np.where(I >= 0, pos[np.maximum(I, 0)], -1)
            I, D = _drop_self(I, D, np.arange(s, s + len(q)), k)
            nbr[s : s + len(q)] = I
            dist[s : s + len(q)] = D
        return nbr, dist

    def _small_knn(self, xq: np.ndarray, xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact search among a few group centroids, with the index's library (``faiss.knn``'s output)."""
        if self._lib == "torch":
            return torch_knn.knn(xq, xb, k, "cuda" if self._gpu else "cpu")
        return _faiss().knn(xq, xb, k)

    def _preassign(self, index, vectors, rows, copy_h: float) -> tuple[np.ndarray, np.ndarray]:
        """Add the rows to a CPU IVF index by one pass of its quantizer; return each row's two
        nearest lists and whether a copy of the row could lie in the second (one pass serves
        adding and searching)."""
        from faiss.contrib.ivf_tools import add_preassigned

        ivf = _faiss().extract_index_ivf(index)
        assign = np.empty((rows.size, 2), dtype=np.int64)
        near = np.empty(rows.size, dtype=bool)
        for s in range(0, rows.size, BLOCK):
            x = self._f32(vectors[rows[s : s + BLOCK]])
            d, a = ivf.quantizer.search(x, 2)
            add_preassigned(ivf, x, np.ascontiguousarray(a[:, 0]))  # ids run on: s, s+1, …
            assign[s : s + len(x)] = a
            d = np.sqrt(np.maximum(d, 0))
            near[s : s + len(x)] = (a[:, 1] >= 0) & (d[:, 1] - d[:, 0] <= 2 * copy_h)
        return assign, near


def _search_lists(index, xq, k, assign, two) -> tuple[np.ndarray, np.ndarray]:
    """IVF search of pre-assigned queries in their first list, and (``two``) in their second
    list too, merging the hits."""
    from faiss.contrib.ivf_tools import search_preassigned

    ivf = _faiss().extract_index_ivf(index)
    ivf.nprobe = 1
    D, I = search_preassigned(ivf, xq, k, np.ascontiguousarray(assign[:, :1]), None)
    if two.any():
        D2, I2 = search_preassigned(ivf, np.ascontiguousarray(xq[two]), k, np.ascontiguousarray(assign[two, 1:2]), None)
        Dm, Im = np.hstack([D[two], D2]), np.hstack([I[two], I2])
        Dm = np.where(Im >= 0, Dm, np.inf)
        order = np.argsort(Dm, axis=1, kind="stable")[:, :k]
        D[two], I[two] = np.take_along_axis(Dm, order, 1), np.take_along_axis(Im, order, 1)
    return D, I


def _train_size(nlist: int) -> int:
    return 8 * nlist


def _max_norm(vectors: np.ndarray, shift: np.ndarray) -> float:
    out = 0.0
    for s in range(0, len(vectors), BLOCK):
        b = np.asarray(vectors[s : s + BLOCK], dtype=np.float64) - shift
        out = max(out, float(np.sqrt(np.einsum("ij,ij->i", b, b).max())))
    return out


def _drop_self(I: np.ndarray, D: np.ndarray, self_pos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own row (or, if ties hid it, its farthest hit) and rows out of the
    clustering (−1), keeping the first k hits."""
    is_self = I == self_pos[:, None]
    missing = ~is_self.any(axis=1)
    is_self[missing, -1] = True
    n = len(I)
    I = I[~is_self].reshape(n, -1)
    D = D[~is_self].reshape(n, -1)
    if (I < 0).any():  # move the valid hits first, in order
        order = np.argsort(I < 0, axis=1, kind="stable")
        I, D = np.take_along_axis(I, order, 1), np.take_along_axis(D, order, 1)
    I, D = I[:, :k], D[:, :k]
    D = np.where(I >= 0, D, np.inf).astype(np.float32)
    if I.shape[1] < k:  # fewer rows than k: pad
        I = np.hstack([I, np.full((n, k - I.shape[1]), -1, dtype=np.int64)])
        D = np.hstack([D, np.full((n, k - D.shape[1]), np.inf, dtype=np.float32)])
    return I, D


def _copy_edges(nbr, dist, copy_h, vectors, shift, knn) -> tuple[np.ndarray, np.ndarray]:
    """Edges that join the pieces of one neuron's copies which the kNN graph left apart.

    More than k rows within float32 rounding of each other tie, and k neighbours each need not
    link them all. Groups of such rows (joined by kNN edges under ``copy_h``, every row's k-th
    neighbour under it) are searched by their centroids; groups whose centroids lie within
    ``copy_h`` are joined. knn: exact search, as ``faiss.knn``.
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    m = len(nbr)
    saturated = np.isfinite(dist[:, -1]) & (dist[:, -1] <= copy_h)
    if saturated.sum() < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    ok = (nbr >= 0) & (dist <= copy_h) & saturated[:, None]
    src = np.broadcast_to(np.arange(m)[:, None], nbr.shape)[ok]
    _, comp = connected_components(csr_matrix((np.ones(src.size), (src, nbr[ok])), shape=(m, m)), directed=False)
    groups, inv = np.unique(comp[saturated], return_inverse=True)
    if groups.size < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    rows = np.flatnonzero(saturated)
    x = np.asarray(vectors[rows], dtype=np.float64) - shift
    cent = np.zeros((groups.size, x.shape[1]))
    np.add.at(cent, inv, x)
    cent /= np.bincount(inv, minlength=groups.size)[:, None]
    kc = min(8, groups.size - 1)
    c32 = np.ascontiguousarray(cent, dtype=np.float32)
    D, I = knn(c32, c32, kc + 1)
    a = np.repeat(np.arange(groups.size), kc + 1)
    b, d = I.ravel(), np.sqrt(np.maximum(D.ravel(), 0))
    keep = (b >= 0) & (b != a) & (d <= copy_h)
    first = np.full(groups.size, -1, dtype=np.int64)  # one row of each group stands for it
    first[inv[::-1]] = rows[::-1]
    return first[a[keep]], first[b[keep]]


def _spanning_tree(nbr: np.ndarray, dist: np.ndarray, m: int, extra=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges of the kNN graph's minimum spanning forest (plus ``extra`` edges of length 0), by increasing length."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import minimum_spanning_tree

    ok = nbr >= 0
    src = np.broadcast_to(np.arange(m)[:, None], nbr.shape)[ok]
    dst = nbr[ok]
    # a stored 0 would be read as "no edge": identical rows get the smallest positive length
    w = np.maximum(dist[ok].astype(np.float64), np.finfo(np.float64).tiny)
    if extra is not None and len(extra[0]):
        src, dst = np.concatenate([src, extra[0]]), np.concatenate([dst, extra[1]])
        w = np.concatenate([w, np.full(len(extra[0]), np.finfo(np.float64).tiny)])
    g = csr_matrix((w, (src, dst)), shape=(m, m))
    del src, dst, w
    t = minimum_spanning_tree(g).tocoo()
    order = np.argsort(t.data, kind="stable")
    return t.row[order].astype(np.int64), t.col[order].astype(np.int64), t.data[order]


@dataclass
class _Grown:
    leaf_of: np.ndarray  # (M,) root row of each row's leaf
    node: np.ndarray  # (M,) for a root row: its single-linkage node (row id, or M + index into left/right)
    left: np.ndarray  # single-linkage merges inside the leaves
    right: np.ndarray
    height: np.ndarray
    size: np.ndarray
    rep: np.ndarray  # a row under each merge (to find its leaf)
    refused: tuple[np.ndarray, np.ndarray, np.ndarray]  # spanning-tree edges between leaves


def _grow(u, v, h, m, cap, work, m_req, copy_h) -> _Grown:
    """Single linkage along the spanning tree, joining two sets while their exact linkage stays in budget.

    A refused edge freezes both sets: a set that later joined another across a longer edge would
    still be as close to the outside as the refused edge, so growing it gains no exactness.
    Edges shorter than ``copy_h`` (copies of one neuron, within float32 rounding) always join.
    """
    parent = list(range(m))
    size = [1] * m
    node = list(range(m))
    frozen = [math.inf] * m
    L, R, H, S, REP = [], [], [], [], []
    ref_u, ref_v, ref_h = [], [], []
    spent = 0

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def cost(s: int) -> int:
        return s * (s - 1) // 2 if s >= m_req else 0

    for a, b, w in zip(u.tolist(), v.tolist(), h.tolist()):
        ra, rb = find(a), find(b)
        if frozen[ra] == math.inf and frozen[rb] == math.inf:
            s = size[ra] + size[rb]
            dc = cost(s) - cost(size[ra]) - cost(size[rb])
            if s <= cap and (w <= copy_h or spent + dc <= work):
                if size[ra] < size[rb]:
                    ra, rb = rb, ra
                parent[rb] = ra
                L.append(node[ra])
                R.append(node[rb])
                H.append(w)
                S.append(s)
                REP.append(a)
                node[ra] = m + len(L) - 1
                size[ra] = s
                spent += dc
                continue
        frozen[ra] = min(frozen[ra], w)
        frozen[rb] = min(frozen[rb], w)
        ref_u.append(a)
        ref_v.append(b)
        ref_h.append(w)
    root = np.asarray(parent, dtype=np.int64)
    while True:  # pointer jumping: every row's leaf root
        nxt = root[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    def i64(x):
        return np.asarray(x, dtype=np.int64)

    return _Grown(
        root, i64(node), i64(L), i64(R), np.asarray(H, dtype=np.float64), i64(S), i64(REP),
        (i64(ref_u), i64(ref_v), np.asarray(ref_h, dtype=np.float64)),
    )


class _Dendrogram:
    """Merges collected in any topological order, emitted as a scipy linkage matrix sorted by height."""

    def __init__(self, m: int) -> None:
        self.m = m
        self.parts: list[tuple[np.ndarray, ...]] = []  # (left, right, height, size, leaf) per batch
        self.n = 0  # nodes so far; node ids are m + creation index
        self._h: list[np.ndarray] = []

    def add_many(self, left, right, height, size, leaf: int = -1) -> np.ndarray:
        ids = np.arange(self.m + self.n, self.m + self.n + len(left), dtype=np.int64)
        self.parts.append([np.asarray(left, dtype=np.int64), np.asarray(right, dtype=np.int64),
                           np.asarray(height, dtype=np.float64), np.asarray(size, dtype=np.int64),
                           np.full(len(left), leaf, dtype=np.int64)])
        self.n += len(left)
        return ids

    def remap_children(self, ids: np.ndarray, m: int, sl_map: np.ndarray) -> None:
        """The last batch referred to single-linkage node numbers: translate them to node ids."""
        if not len(ids):
            return
        part = self.parts[-1]
        for j in (0, 1):
            c = part[j]
            part[j] = np.where(c < m, c, sl_map[np.maximum(c - m, 0)])

    def add_linkage(self, Z: np.ndarray, rows: np.ndarray, leaf: int) -> int:
        """Add a leaf's own linkage (local ids: rows 0..s−1, nodes s..); returns its root's id."""
        s = len(rows)
        base = self.m + self.n
        local = Z[:, :2].astype(np.int64)
        glob = np.where(local < s, rows[np.minimum(local, s - 1)], base + local - s)
        ids = self.add_many(glob[:, 0], glob[:, 1], Z[:, 2], Z[:, 3].astype(np.int64), leaf)
        return int(ids[-1])

    def heights(self) -> np.ndarray:
        """Height of every node so far, rows (0) first."""
        return np.concatenate([np.zeros(self.m)] + [p[2] for p in self.parts])

    def linkage(self) -> np.ndarray:
        left, right, height, size, leaf = (np.concatenate([p[j] for p in self.parts]) for j in range(5))
        if len(left) != self.m - 1:
            raise AssertionError(f"dendrogram has {len(left)} merges for {self.m} rows")
        order = np.lexsort((np.arange(len(left)), height))  # by height; children (created first) win ties
        final = np.empty(len(left), dtype=np.int64)
        final[order] = np.arange(len(left))
        def ren(c):
            return np.where(c < self.m, c, self.m + final[np.maximum(c - self.m, 0)])

        a, b = ren(left[order]), ren(right[order])
        self._leaf = leaf[order]
        return np.column_stack([np.minimum(a, b), np.maximum(a, b), height[order], size[order]]).astype(np.float64)

    def node_leaf(self) -> np.ndarray:
        """Per node of the emitted linkage (2M−1): the exact leaf it lies in, −1 if none."""
        out = np.full(2 * self.m - 1, -1, dtype=np.int64)
        out[self.m :] = self._leaf
        return out


def _group(idx: np.ndarray, n: int) -> list[np.ndarray]:
    """Rows of each group, ascending."""
    order = np.argsort(idx, kind="stable")
    bounds = np.cumsum(np.bincount(idx, minlength=n))[:-1]
    return np.split(order, bounds)


def _distinct_per_group(idx: np.ndarray, sids: np.ndarray, n: int) -> np.ndarray:
    _, s = np.unique(sids, return_inverse=True)
    pairs = np.unique(idx.astype(np.int64) * (int(s.max()) + 1) + s)
    return np.bincount(pairs // (int(s.max()) + 1), minlength=n)


class _Stats:
    """Count, sum and sum of squared norms of each set of rows: the RMS distance between two sets."""

    def __init__(self, vectors: np.ndarray, shift: np.ndarray) -> None:
        self.v, self.shift = vectors, shift
        self.d: dict[int, tuple[int, np.ndarray, float]] = {}

    def of(self, rows: np.ndarray) -> tuple[int, np.ndarray, float]:
        if len(rows) == 1:
            x = self.v[rows[0]].astype(np.float64) - self.shift
            return 1, x, float(x @ x)
        x = np.asarray(self.v[rows], dtype=np.float64) - self.shift
        return len(x), x.sum(axis=0), float(np.einsum("ij,ij->", x, x))

    @staticmethod
    def rms(a, b) -> float:
        (na, sa, qa), (nb, sb, qb) = a, b
        return math.sqrt(max(0.0, qa / na + qb / nb - 2 * float(sa @ sb) / (na * nb)))

    @staticmethod
    def join(a, b):
        return a[0] + b[0], a[1] + b[1], a[2] + b[2]


def _upper(dendro: _Dendrogram, vectors, shift, leaf_idx, leaf_rows, leaf_node, refused, knn) -> None:
    """Join the leaves into one tree: along the refused spanning-tree edges (shortest first), then
    across the kNN graph's components by their centroids (knn: exact search, as ``faiss.knn``);
    heights are RMS distances, made monotone."""
    stats = _Stats(vectors, shift)
    n = len(leaf_rows)
    parent = list(range(n))
    node = leaf_node.tolist()
    all_h = dendro.heights()
    height = {int(x): float(all_h[x]) for x in leaf_node if x >= dendro.m}
    size = [len(r) for r in leaf_rows]
    st: dict[int, tuple] = {}

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def get(g: int):
        if g not in st:
            st[g] = stats.of(leaf_rows[g])
        return st[g]

    L, R, H, S = [], [], [], []

    def merge(a: int, b: int) -> None:
        sa, sb = get(a), get(b)
        h = max(_Stats.rms(sa, sb), height.get(node[a], 0.0), height.get(node[b], 0.0))
        if size[a] < size[b]:
            a, b = b, a
        parent[b] = a
        L.append(node[a])
        R.append(node[b])
        H.append(h)
        size[a] += size[b]
        S.append(size[a])
        new = dendro.m + dendro.n + len(L) - 1
        height[new] = h
        node[a] = new
        st[a] = _Stats.join(sa, sb)
        st.pop(b, None)

    ru, rv, _ = refused
    for a, b in zip(leaf_idx[ru].tolist(), leaf_idx[rv].tolist()):
        ga, gb = find(a), find(b)
        if ga != gb:
            merge(ga, gb)
    while True:  # the kNN graph may fall apart (a neuron's copies outnumber k): join its pieces by centroids
        roots = sorted({find(g) for g in range(n)}) if len(L) < n - 1 else []
        if len(roots) <= 1:
            break
        cent = np.vstack([get(g)[1] / get(g)[0] for g in roots])
        kc = min(16, len(roots) - 1)
        c32 = np.ascontiguousarray(cent, dtype=np.float32)
        Dc, Ic = knn(c32, c32, kc + 1)
        Ic, Dc = _drop_self(Ic, Dc, np.arange(len(roots)), kc)
        cu, cv, _ = _spanning_tree(Ic, np.sqrt(np.maximum(Dc, 0)).astype(np.float32), len(roots))
        if not len(cu):  # identical centroids everywhere: join in order
            cu, cv = np.zeros(len(roots) - 1, dtype=np.int64), np.arange(1, len(roots))
        for a, b in zip(cu.tolist(), cv.tolist()):
            ga, gb = find(roots[a]), find(roots[b])
            if ga != gb:
                merge(ga, gb)
    dendro.add_many(L, R, H, S)


def _ball(owner: NeuronIndex, vectors, shift, sets: list[np.ndarray], *, delta: float) -> np.ndarray:
    """For each set S of rows, a lower bound τ_S on the distance from its rows to every other row.

    Every row is compared (exactly: all rows, in blocks, one matrix product per block) with each
    set's centroid c: a row outside S lies at least ‖x − c‖ − ρ from every member (ρ: the set's
    radius around c), and float32 rounding costs at most δ.
    """
    m = len(vectors)
    out = np.full(len(sets), np.inf)
    if not sets:
        return out
    xs = [np.asarray(vectors[r], dtype=np.float64) - shift for r in sets]
    cents = np.vstack([x.mean(axis=0) for x in xs])
    rho = np.array([np.sqrt(np.einsum("ij,ij->i", x - c, x - c).max()) for x, c in zip(xs, cents)])
    c32 = cents.astype(np.float32)
    cc = np.einsum("ij,ij->i", c32, c32)
    member_row = np.concatenate(sets)
    member_set = np.repeat(np.arange(len(sets)), [len(r) for r in sets])
    order = np.argsort(member_row, kind="stable")
    member_row, member_set = member_row[order], member_set[order]
    nearest = np.full(len(sets), np.inf, dtype=np.float32)
    step = max(1024, (1 << 26) // max(1, len(sets)))  # a block's distance matrix stays near 256 MB
    for s in range(0, m, step):
        xb = owner._f32(vectors[s : s + step])
        d2 = np.einsum("ij,ij->i", xb, xb)[:, None] + cc[None, :] - 2 * (xb @ c32.T)
        lo, hi = np.searchsorted(member_row, [s, s + len(xb)])
        d2[member_row[lo:hi] - s, member_set[lo:hi]] = np.inf  # a set's own rows are not outside it
        np.minimum(nearest, d2.min(axis=0), out=nearest)
    for j, r in enumerate(sets):
        if len(r) < m:
            out[j] = math.sqrt(max(float(nearest[j]), 0.0)) - rho[j] - delta
    return out


def _certify(res: rules.RuleResult, node_leaf: np.ndarray, ball, h_max: float, min_sep: float) -> np.ndarray:
    """Which kept clusters the exact backend keeps too, whatever the dendrogram does above the exact part.

    Take a kept core on chain c (birth b; floor f; H: twice the largest distance from the centre
    bounds every height). Let y be the highest node of c at or under m_hi = √((H+f)(b+f)) − f
    and S its rows; τ_S bounds S's distance to every other row (``_ball``). If τ_S > m_hi, then in
    the exact tree, too, S merges with nothing below τ_S: c's nodes under m_hi are S's own exact
    linkage, c dies at some height in [τ_S, H], its lifetime is at least (τ_S+f)/(b+f) (which must
    reach min_separation) and beats every ancestor's (at most (H+f)/(τ_S+f)), and its core, the
    highest node of c under √(death·birth) ∈ [√((τ_S+f)(b+f)) − f, m_hi], is the same for every
    such death if no node of c lies in that range. The exact tree must also split somewhere (else
    its root chain keeps every row): two such cores, disjoint, are enough. When c dies inside
    its leaf L below τ_L, instead, its lifetime is exact and its ancestors are checked one by one.
    """
    ch = res.chains
    f = ch.floor
    m = ch.m
    life = ch.life
    k = res.nodes.size
    closed_ok = np.zeros(k, dtype=bool)
    open_ok = np.zeros(k, dtype=bool)
    sets: list[np.ndarray] = []
    asks: list[tuple] = []  # (kind, cluster, ...) per set
    rows_of: dict[int, np.ndarray] | None = None
    for i, core in enumerate(res.nodes.tolist()):
        leaf = int(node_leaf[core])
        if leaf < 0:
            continue
        c = int(ch.chain[core])
        b = float(ch.birth[c])
        m_hi = math.sqrt((h_max + f) * (b + f)) - f
        nodes = np.flatnonzero(ch.chain == c)
        under = nodes[ch.height[nodes] <= m_hi]
        if under.size and (node_leaf[under] == leaf).all():
            sets.append(rules._leaves(_ZView(ch), int(under.max()), m))  # the chain is a path: its top-most node
            asks.append(("open", i, c, b, m_hi, nodes))
    taus = ball(sets).tolist()
    first = {ask[1]: (t, ask) for t, ask in zip(taus, asks)}
    sets, asks = [], []
    for i, core in enumerate(res.nodes.tolist()):
        leaf = int(node_leaf[core])
        if leaf < 0 or _open_ok(ch, first.get(i), min_sep):
            continue
        c = int(ch.chain[core])
        p = int(ch.parent[int(ch.tops[c])])
        if p >= 0 and node_leaf[p] == leaf:  # dies inside its leaf: exact if below τ_L
            if rows_of is None:
                rows_of = _rows_by_leaf(node_leaf, ch)
            sets.append(rows_of[leaf])
            asks.append(("closed", i, c, leaf, p))
    for t, ask in [*first.values(), *zip(ball(sets).tolist(), asks)]:
        if ask[0] == "closed":
            _, i, c, leaf, p = ask
            if not ch.height[p] < t:
                continue
            lc = float(life[c])
            while True:  # ancestors: exact ones must live shorter; the first open one is bounded
                a = int(ch.chain[p])
                pa = int(ch.parent[int(ch.tops[a])])
                if pa >= 0 and node_leaf[pa] == leaf and ch.height[pa] < t:
                    if not float(life[a]) < lc:
                        break
                    p = pa
                    continue
                closed_ok[i] = (h_max + f) / (float(ch.birth[a]) + f) < lc
                break
            continue
        open_ok[ask[1]] = _open_ok(ch, (t, ask), min_sep)
    if open_ok.sum() >= 2 or closed_ok.any():  # the exact tree has a split
        return closed_ok | open_ok
    return closed_ok


def _open_ok(ch: rules.Chains, t_ask, min_sep: float) -> bool:
    """The open case of ``_certify`` for one cluster, given τ_S."""
    if t_ask is None:
        return False
    t, (_, _, _, b, m_hi, nodes) = t_ask
    f = ch.floor
    if not (m_hi < t and (t + f) / (b + f) >= min_sep):
        return False
    m_lo = math.sqrt((t + f) * (b + f)) - f
    hs = ch.height[nodes]
    return not ((hs > m_lo) & (hs <= m_hi)).any()


class _ZView:
    """Just enough of a linkage matrix for ``rules._leaves``: its two child columns."""

    def __init__(self, ch: rules.Chains) -> None:
        self.ch = ch

    def __getitem__(self, key):
        i, j = key
        return self.ch.left[i] if j == 0 else self.ch.right[i]


def _rows_by_leaf(node_leaf: np.ndarray, ch: rules.Chains) -> dict[int, np.ndarray]:
    """Rows of each exact leaf, read off the dendrogram (a row belongs to its parent's leaf)."""
    leaf_of_row = node_leaf[ch.parent[: ch.m]]
    return {int(g): np.flatnonzero(leaf_of_row == g) for g in np.unique(leaf_of_row) if g >= 0}
