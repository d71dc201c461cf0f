"""Rules that turn a dendrogram of neuron vectors into kept clusters.

Both rules read an average-linkage dendrogram (scipy's ``Z`` format: row i merges nodes
``Z[i,0]`` and ``Z[i,1]`` at height ``Z[i,2]`` into node M+i of ``Z[i,3]`` leaves):

* ``reference`` — the authors' rule, exactly: cut at the top of the first plateau of the
  maximal number of clusters with ≥ ⌊γN⌋ *neurons*, keep those clusters, drop the ones whose
  median pairwise cosine distance exceeds 1 − cos β. At low input dimension small blobs of
  debris reach the size threshold and pass the angle test, so it over-counts (reference §10).
* ``stable`` — ours, HDBSCAN's condensed tree with size counted in *distinct students*. A node
  is *big* when it spans ≥ ⌊γN⌋ students. Going up the dendrogram, a big cluster lives on while
  it absorbs small pieces (late, imprecise copies; stray debris) and dies only where it merges
  with another big cluster. A teacher neuron's copies agree to the students' precision and sit
  far from the other neurons, so its cluster lives over decades of height; debris forms a
  continuum whose big clusters meet each other almost at once. Keep the clusters whose
  lifetime (death height / birth height, scale-free) is ≥ ``min_separation`` and that pass the
  β test, longest-lived first, a kept cluster excluding its ancestors and descendants. Members
  are taken at the geometric middle of the lifetime, which leaves out what joins late.
  Students may hold several copies of a neuron (duplicates whose outgoing weights add up), so
  copies per student are not limited.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_ALIGN_SAMPLE = 2000  # members used for a cluster's median pairwise angle (O(s²))


@dataclass(frozen=True)
class Chains:
    """The stable rule's view of a dendrogram: chains of big nodes, their birth and death.

    Per node (2M−1): height, parent (−1 for the root), big, split (both children big), chain
    (−1 when not big). Per chain: top node, birth (lowest height), death (height of the split
    above its top; ∞ for a root chain without split, its birth when the root chain holds a
    split). floor: the height floor that makes identical copies' lifetimes finite.
    """

    m: int
    left: np.ndarray
    right: np.ndarray
    height: np.ndarray
    parent: np.ndarray
    big: np.ndarray
    split: np.ndarray
    chain: np.ndarray
    tops: np.ndarray
    birth: np.ndarray
    death: np.ndarray
    floor: float

    @property
    def life(self) -> np.ndarray:
        return (self.death + self.floor) / (self.birth + self.floor)


@dataclass(frozen=True)
class RuleResult:
    """Leaf labels (−1: no kept cluster) and one entry per kept cluster, in label order."""

    labels: np.ndarray
    heights: np.ndarray  # merge height of the kept node (0 for identical copies)
    separation: np.ndarray  # parent height / own height (inf for the root); nan for reference
    median_cos_dist: np.ndarray
    cut_height: float  # the reference rule's cut; nan for stable
    nodes: np.ndarray | None = None  # dendrogram node of each kept cluster
    chains: Chains | None = None  # the stable rule's chains (for callers that check its decisions)


def height_floor(vectors: np.ndarray) -> float:
    """64 ulp of the median row norm: below it, merge heights are rounding (identical copies)."""
    step = 1 << 16  # in blocks: a float32 layer of a million rows is not copied to float64 at once
    norms = np.concatenate(
        [np.linalg.norm(np.asarray(vectors[i : i + step], dtype=np.float64), axis=1) for i in range(0, len(vectors), step)]
    )
    return float(64 * np.finfo(np.float64).eps * max(float(np.median(norms)), 1e-300))


def median_cos_distance(vectors: np.ndarray, rows: np.ndarray) -> float:
    """Median over member pairs of 1 − cos (the authors' alignment statistic).

    Large clusters use an evenly spaced sample of members, so the cost stays bounded.
    """
    if rows.size < 2:
        return 0.0
    if rows.size > MAX_ALIGN_SAMPLE:
        rows = rows[np.linspace(0, rows.size - 1, MAX_ALIGN_SAMPLE).astype(np.int64)]
    v = vectors[rows].astype(np.float64)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), np.finfo(float).tiny)
    iu = np.triu_indices(len(rows), 1)
    return float(np.median(1 - (v @ v.T)[iu]))


def plateau_cut_index(counts: np.ndarray) -> int:
    """Index of the top of the first plateau of the maximal count (the authors' cut).

    >>> plateau_cut_index(np.array([1, 3, 4, 4, 4, 2, 4, 1]))
    4
    """
    counts = np.asarray(counts)
    first = int(np.argmax(counts == counts.max()))
    end = first
    while end + 1 < len(counts) and counts[end + 1] == counts[first]:
        end += 1
    return end


def _leaves(Z: np.ndarray, node: int, m: int) -> np.ndarray:
    stack, out = [node], []
    while stack:
        v = stack.pop()
        if v < m:
            out.append(v)
        else:
            stack.extend((int(Z[v - m, 0]), int(Z[v - m, 1])))
    return np.asarray(out, dtype=np.int64)


def big_cluster_counts(Z: np.ndarray, min_size: int) -> np.ndarray:
    """Number of clusters with ≥ min_size leaves when cutting at each merge height.

    Equal to calling ``fcluster(Z, Z[i, 2], 'distance')`` for every i, in O(M): merges are
    applied in order, and merges at tied heights all count at that height.
    """
    m = Z.shape[0] + 1
    size = np.ones(2 * m - 1, dtype=np.int64)
    count = m if min_size <= 1 else 0
    out = np.empty(m - 1, dtype=np.int64)
    for i, (a, b, _, s) in enumerate(Z):
        a, b = int(a), int(b)
        size[m + i] = int(s)
        count += int(size[m + i] >= min_size) - int(size[a] >= min_size) - int(size[b] >= min_size)
        out[i] = count
    h = Z[:, 2]
    for i in range(m - 3, -1, -1):  # ties: a cut at h includes every merge at height ≤ h
        if h[i] == h[i + 1]:
            out[i] = out[i + 1]
    return out


def reference_rule(Z: np.ndarray, vectors: np.ndarray, min_size: int, max_cos_dist: float) -> RuleResult:
    """The authors' cut, size and angle filters (see module docstring)."""
    from scipy.cluster.hierarchy import fcluster, leaders

    m = vectors.shape[0]
    if m < max(2, min_size):
        return _empty(m)
    counts = big_cluster_counts(Z, min_size)
    if counts.max() == 0:
        return _empty(m)
    cut = float(Z[plateau_cut_index(counts), 2])
    flat = fcluster(Z, cut, criterion="distance")
    roots, root_labels = leaders(Z, flat)
    root_of = dict(zip(root_labels.tolist(), roots.tolist()))
    counts = np.bincount(flat)
    order = np.argsort(flat, kind="stable")  # rows of each flat cluster, ascending
    starts = np.concatenate([[0], np.cumsum(counts)])
    kept, heights, meds, nodes = [], [], [], []
    for c in np.flatnonzero(counts >= min_size):
        rows = order[starts[c] : starts[c + 1]]
        med = median_cos_distance(vectors, rows)
        if med > max_cos_dist:
            continue
        kept.append(rows)
        meds.append(med)
        root = root_of[int(c)]
        nodes.append(root)
        heights.append(float(Z[root - m, 2]) if root >= m else 0.0)
    return _result(m, kept, heights, [np.nan] * len(kept), meds, cut, nodes)


def stable_chains(Z: np.ndarray, student_ids: np.ndarray, min_students: int, floor: float) -> Chains | None:
    """Chains of big nodes (spanning ≥ ``min_students`` students) of ``Z``; None when no node is big."""
    m = Z.shape[0] + 1
    n_nodes = 2 * m - 1
    left, right = Z[:, 0].astype(np.int64), Z[:, 1].astype(np.int64)
    height = np.zeros(n_nodes)
    height[m:] = Z[:, 2]
    parent = np.full(n_nodes, -1, dtype=np.int64)
    parent[left] = parent[right] = np.arange(m, n_nodes)
    # distinct students per node, as bitsets merged bottom-up
    _, sid = np.unique(student_ids, return_inverse=True)
    bits = np.zeros((n_nodes, (sid.max() + 64) // 64), dtype=np.uint64)
    bits[np.arange(m), sid // 64] = np.uint64(1) << (sid % 64).astype(np.uint64)
    for i in range(m - 1):
        bits[m + i] = bits[left[i]] | bits[right[i]]
    big = np.bitwise_count(bits).sum(axis=1) >= min_students
    del bits
    split = np.zeros(n_nodes, dtype=bool)  # both children big: two clusters meet here
    split[m:] = big[left] & big[right]
    # chains of big nodes, top-down (a parent's index is above its children's)
    chain = np.full(n_nodes, -1, dtype=np.int64)
    tops: list[int] = []
    for v in np.flatnonzero(big)[::-1].tolist():
        p = parent[v]
        if p >= 0 and not split[p]:
            chain[v] = chain[p]
        else:
            chain[v] = len(tops)
            tops.append(v)
    if not tops:
        return None
    tops_a = np.asarray(tops)
    members = np.flatnonzero(chain >= 0)
    birth = np.full(len(tops), np.inf)
    np.minimum.at(birth, chain[members], height[members])
    # a chain dies where its top merges with another big cluster; the root's chain never does:
    # it is one cluster when no split lies below it (lifetime ∞), else it is the union of others
    root = n_nodes - 1
    death = np.where(parent[tops_a] >= 0, height[np.maximum(parent[tops_a], 0)], np.inf)
    if split[m:][chain[m:] == chain[root]].any():
        death[chain[root]] = birth[chain[root]]
    return Chains(m, left, right, height, parent, big, split, chain, tops_a, birth, death, floor)


def stable_rule(
    Z: np.ndarray,
    vectors: np.ndarray,
    student_ids: np.ndarray,
    min_students: int,
    max_cos_dist: float,
    min_separation: float = 3.0,
    floor: float | None = None,
) -> RuleResult:
    """Our rule (see module docstring); ``separation`` in the result is each kept lifetime.

    floor: height floor (default ``height_floor(vectors)``; a caller that passes a subset of
    the rows passes the floor of all of them).
    """
    m = vectors.shape[0]
    if m < max(2, min_students):
        return _empty(m)
    if floor is None:
        floor = height_floor(vectors)
    ch = stable_chains(Z, student_ids, min_students, floor)
    if ch is None:
        return _empty(m)
    left, right, height, parent, chain, tops = ch.left, ch.right, ch.height, ch.parent, ch.chain, ch.tops
    birth, death = ch.birth, ch.death
    life = ch.life
    middle = np.sqrt((death + floor) * (birth + floor)) - floor
    blocked = np.zeros(2 * m - 1, dtype=bool)
    kept, heights, lives, meds, nodes = [], [], [], [], []
    for c in sorted(np.flatnonzero(life >= min_separation), key=lambda c: (-life[c], birth[c], tops[c])):
        top = int(tops[c])
        if blocked[top]:
            continue
        core = top if np.isinf(death[c]) else _core(Z, chain, c, top, middle[c], height, m)
        rows = _leaves(Z, core, m)
        med = median_cos_distance(vectors, rows)
        if med > max_cos_dist:
            continue
        kept.append(rows)
        heights.append(height[core])
        lives.append(life[c])
        meds.append(med)
        nodes.append(core)
        u = top
        while u >= 0:  # ancestors
            blocked[u] = True
            u = parent[u]
        below = [top]
        while below:  # descendants
            x = below.pop()
            blocked[x] = True
            if x >= m:
                below.extend((left[x - m], right[x - m]))
    res = _result(m, kept, heights, lives, meds, np.nan, nodes)
    return RuleResult(res.labels, res.heights, res.separation, res.median_cos_dist, res.cut_height, res.nodes, ch)


def _core(Z: np.ndarray, chain: np.ndarray, c: int, top: int, middle: float, height: np.ndarray, m: int) -> int:
    """The highest node of chain ``c`` at or below the middle of its lifetime (its members)."""
    core = top
    while height[core] > middle:
        kids = (int(Z[core - m, 0]), int(Z[core - m, 1]))
        core = kids[0] if chain[kids[0]] == c else kids[1]
    return core


def _empty(m: int) -> RuleResult:
    e = np.zeros(0)
    return RuleResult(np.full(m, -1, dtype=np.int64), e, e, e, np.nan, np.zeros(0, dtype=np.int64))


def _result(m, kept, heights, seps, meds, cut, nodes) -> RuleResult:
    """Label kept clusters 0..K−1 by their smallest member, so labels follow the data, not the rule."""
    order = np.argsort([rows.min() for rows in kept], kind="stable") if kept else []
    labels = np.full(m, -1, dtype=np.int64)
    for new, i in enumerate(order):
        labels[kept[i]] = new
    pick = lambda xs: np.asarray([xs[i] for i in order], dtype=float)  # noqa: E731
    node_ids = np.asarray([nodes[i] for i in order], dtype=np.int64)
    return RuleResult(labels, pick(heights), pick(seps), pick(meds), float(cut), node_ids)
