"""Reconstruction: collapse (winner-take-all from the best student), least-squares output layer
(with the affine skip term for even+linear classes), the exact change of units back from
standardised data, and pruning of spurious and duplicate neurons."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ecdist
from ecdist import pipeline
from ecdist.activations import REGISTRY
from ecdist.cluster import Clusters
from ecdist.queries import Standardizer
from ecdist.reconstruct import (
    EXACT_FIT,
    REFERENCE_TOP,
    Collapsed,
    collapse,
    finetune_network,
    output_layer,
    prune,
    prune_network,
    refit_supported,
    to_original,
)
from ecdist.students import StudentPack


def _forward(V, A, c, S, X, activation):
    """Σ_j A[:, j] σ(v_j·[x;1]) + c + S x, computed directly: (n, d_out)."""
    Xt = np.hstack([X, np.ones((len(X), 1))])
    H = REGISTRY[activation].fn(torch.as_tensor(Xt @ V.T, dtype=torch.float64)).numpy()
    out = H @ A.T + c
    return out + X @ S.T if S is not None else out


def _standardised_neurons(V: np.ndarray, xs: Standardizer) -> np.ndarray:
    """Teacher neurons [w; b] in the coordinates x̂ = (x − μ)/s: w·x + b = (w ⊙ s)·x̂ + (b + w·μ)."""
    W, b = V[:, :-1], V[:, -1]
    return np.hstack([W * xs.scale, (b + W @ xs.mean)[:, None]])


# ----- collapse ------------------------------------------------------------------------------------
def test_collapse_takes_the_best_students_member_not_the_centroid():
    rng = np.random.default_rng(0)
    true = rng.standard_normal(5)
    sids = np.arange(6)
    noise = np.array([1e-2, 1e-3, 1e-8, 1e-1, 1e-4, 1e-5])  # student 2 is the most precise …
    V = true + noise[:, None] * rng.standard_normal((6, 5))
    losses = {int(s): float(n**2) for s, n in zip(sids, noise)}  # … and has the lowest loss
    col = collapse(V, sids, np.zeros(6, dtype=np.int64), losses)
    assert col.student.tolist() == [2] and col.row.tolist() == [2] and col.cluster.tolist() == [0]
    np.testing.assert_array_equal(col.vectors[0], V[2])
    assert not np.allclose(col.vectors[0], V.mean(axis=0), rtol=0, atol=1e-6)


def test_collapse_picks_the_best_students_member_nearest_the_cluster_median():
    """The best student holds three members; the one nearest the cluster's median wins."""
    center = np.array([1.0, -2.0, 0.5])
    others = np.tile(center, (7, 1))  # 7 copies in students 1..7 fix the median at ``center``
    mine = center + np.array([[0.5, 0.0, 0.0], [0.0, 0.05, 0.0], [-2.0, 1.0, 0.0]])
    V = np.vstack([mine, others])
    sids = np.array([0, 0, 0, 1, 2, 3, 4, 5, 6, 7])
    assert np.array_equal(np.median(V, axis=0), center)  # the construction's premise
    losses = {0: 1e-20} | {s: 1e-10 for s in range(1, 8)}
    col = collapse(V, sids, np.zeros(10, dtype=np.int64), losses)
    assert col.row.tolist() == [1]
    np.testing.assert_array_equal(col.vectors, V[[1]])


def test_collapse_ignores_unlabelled_rows_and_handles_several_clusters():
    rng = np.random.default_rng(1)
    V = rng.standard_normal((9, 4))
    sids = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    labels = np.array([0, 1, -1, 1, 0, -1, 0, 1, -1])
    losses = {0: 3e-3, 1: 1e-9, 2: 1e-6}
    col = collapse(V, sids, labels, losses)
    assert col.cluster.tolist() == [0, 1]
    assert col.student.tolist() == [1, 1]  # student 1 has the lowest loss and a member in each cluster
    assert col.row.tolist() == [4, 3]
    np.testing.assert_array_equal(col.vectors, V[[4, 3]])


def test_collapse_ties_in_loss_go_to_the_lower_student_id():
    V = np.array([[1.0, 0.0], [1.0, 1e-3], [1.0, 2e-3]])
    col = collapse(V, np.array([5, 3, 9]), np.zeros(3, dtype=np.int64), {5: 1e-9, 3: 1e-9, 9: 1e-9})
    assert col.student.tolist() == [3] and col.row.tolist() == [1]


def test_collapse_top_drops_clusters_held_by_none_of_the_best_students():
    n = 8
    losses = {s: 10.0 ** (-12 + s) for s in range(n)}  # student s has rank s
    # cluster 0 lives in students 5, 6, 7 (ranks beyond the top 5); cluster 1 in students 4..7
    rows = [(s, 0) for s in (5, 6, 7)] + [(s, 1) for s in (4, 5, 6, 7)]
    sids = np.array([s for s, _ in rows])
    labels = np.array([c for _, c in rows])
    V = np.vstack([np.eye(3)[c] * (1 + 0.01 * s) for s, c in rows])
    top5 = collapse(V, sids, labels, losses, top=REFERENCE_TOP)
    assert REFERENCE_TOP == 5
    assert top5.cluster.tolist() == [1]
    assert top5.student.tolist() == [4]  # rank 4: the 5th best student
    everyone = collapse(V, sids, labels, losses, top=None)
    assert everyone.cluster.tolist() == [0, 1]
    assert everyone.student.tolist() == [5, 4]


def test_collapse_with_no_kept_cluster():
    V = np.random.default_rng(2).standard_normal((4, 3))
    col = collapse(V, np.arange(4), np.full(4, -1), {s: 1.0 for s in range(4)})
    assert col.vectors.shape == (0, 3)
    assert col.student.size == col.row.size == col.cluster.size == 0


# ----- output layer --------------------------------------------------------------------------------
@pytest.mark.parametrize("d_out", [1, 3])
def test_output_layer_recovers_exact_outgoing_weights_tanh(d_out):
    teacher = ecdist.teachers.random_mlp([5, 4, d_out], "tanh", seed=11)
    X = ecdist.queries.gaussian(400, 5, seed=12)
    Y = teacher.predict(X)
    V = teacher.neuron_vectors(0)
    A, c, S = output_layer(V, X, Y, "tanh", affine=False)
    assert S is None
    assert A.shape == (d_out, 4) and c.shape == (d_out,)
    np.testing.assert_allclose(A, teacher.outgoing(0).T, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(c, teacher.layers[-1].bias.detach().numpy(), rtol=1e-9, atol=1e-10)


def test_output_layer_fits_the_affine_skip_term_for_softplus():
    """Canonicalising flips some softplus neurons; their covert linear term must land in S and c."""
    act = REGISTRY["softplus"]
    teacher = ecdist.teachers.random_mlp([4, 5, 2], "softplus", seed=3)
    X = ecdist.queries.gaussian(500, 4, seed=4)
    Y = teacher.predict(X)
    can = act.symmetry.canonicalize(teacher.neuron_vectors(0), teacher.outgoing(0), act.linear_coef)
    assert (can.sign < 0).any(), "the construction needs at least one flipped neuron"
    A, c, S = output_layer(can.vectors, X, Y, "softplus", affine=True)
    assert S.shape == (2, 4)
    np.testing.assert_allclose(_forward(can.vectors, A, c, S, X, "softplus"), Y, rtol=0, atol=1e-10 * np.abs(Y).max())
    # the least-squares solution is unique, so it is the canonical one: a' and the affine term
    np.testing.assert_allclose(A, can.outgoing.T, rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(S, can.affine[:-1].T, rtol=1e-8, atol=1e-9)
    bias = teacher.layers[-1].bias.detach().numpy()
    np.testing.assert_allclose(c, bias + can.affine[-1], rtol=1e-8, atol=1e-9)
    # negative control: without the affine path the flipped neurons cannot be fitted
    A0, c0, _ = output_layer(can.vectors, X, Y, "softplus", affine=False)
    resid = _forward(can.vectors, A0, c0, None, X, "softplus") - Y
    assert np.mean(resid**2) > 1e-6 * np.var(Y)


def test_output_layer_without_neurons_fits_the_mean():
    X = ecdist.queries.gaussian(50, 3, seed=0)
    Y = np.random.default_rng(0).standard_normal((50, 2))
    A, c, S = output_layer(np.zeros((0, 4)), X, Y, "tanh", affine=False)
    assert A.shape == (2, 0) and S is None
    np.testing.assert_allclose(c, Y.mean(axis=0), rtol=1e-12, atol=1e-14)


# ----- to_original ---------------------------------------------------------------------------------
@pytest.mark.parametrize("activation, skip", [("tanh", False), ("softplus", True), ("relu", True)])
def test_to_original_reproduces_the_standardised_network_on_raw_inputs(activation, skip):
    rng = np.random.default_rng(7)
    d_in, k, d_out = 4, 3, 2
    X = rng.normal(loc=[3.0, -1.0, 0.0, 10.0], scale=[5.0, 0.2, 1.0, 30.0], size=(200, d_in))
    X[:, 2] = 4.0  # a constant column keeps scale 1
    Yraw = rng.normal(loc=[7.0, -2.0], scale=[0.3, 40.0], size=(200, d_out))
    xs, ys = Standardizer.fit(X), Standardizer.fit(Yraw)
    assert xs.scale[2] == 1.0
    V = rng.standard_normal((k, d_in + 1))
    A = rng.standard_normal((d_out, k))
    c = rng.standard_normal(d_out)
    S = rng.standard_normal((d_out, d_in)) if skip else None
    net = to_original(V, A, c, S, xs, ys, activation)
    assert net.widths == [d_in, k, d_out] and net.activation == activation
    assert (net.skip is not None) == skip
    expected = ys.scale * _forward(V, A, c, S, xs(X), activation) + ys.mean
    got = net.predict(X)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())


def test_to_original_of_the_teachers_standardised_weights_is_the_teacher():
    teacher = ecdist.teachers.random_mlp([3, 4, 1], "tanh", seed=5)
    X = ecdist.queries.gaussian(300, 3, seed=6, mean=2.0, std=3.0)
    Y = teacher.predict(X)
    xs, ys = Standardizer.fit(X), Standardizer.fit(Y)
    Vs = _standardised_neurons(teacher.neuron_vectors(0), xs)
    A, c, _ = output_layer(Vs, xs(X), ys(Y), "tanh", affine=False)
    net = to_original(Vs, A, c, None, xs, ys, "tanh")
    np.testing.assert_allclose(net.neuron_vectors(0), teacher.neuron_vectors(0), rtol=1e-12, atol=1e-12)
    X_new = ecdist.queries.gaussian(100, 3, seed=8, mean=2.0, std=3.0)
    np.testing.assert_allclose(net.predict(X_new), teacher.predict(X_new), rtol=0, atol=1e-9)


# ----- prune ---------------------------------------------------------------------------------------
def _prune_problem(seed: int, n: int = 400):
    """A tanh 6-3-1 teacher: standardised X, Y tensors (float64) and its neurons in those units."""
    teacher = ecdist.teachers.random_mlp([6, 3, 1], "tanh", seed=seed)
    X = ecdist.queries.gaussian(n, 6, seed=seed + 100)
    Y = teacher.predict(X)
    xs, ys = Standardizer.fit(X), Standardizer.fit(Y)
    Xt = torch.as_tensor(xs(X), dtype=torch.float64)
    Yt = torch.as_tensor(ys(Y), dtype=torch.float64)
    return _standardised_neurons(teacher.neuron_vectors(0), xs), Xt, Yt


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prune_keeps_exactly_the_true_neurons(seed):
    true, Xt, Yt = _prune_problem(seed)
    rng = np.random.default_rng(seed)
    V = np.vstack([true, rng.standard_normal((2, 7))])
    order = rng.permutation(5)
    V = V[order]
    true_idx = np.flatnonzero(order < 3)
    loss, Vf, A, c, S, kept = prune(V, Xt, Yt, "tanh", iters=0)
    np.testing.assert_array_equal(kept, true_idx)
    assert loss < 1e-20
    assert S is None and Vf.shape == (3, 7) and A.shape == (1, 3)
    np.testing.assert_array_equal(Vf, V[kept])  # iters = 0: no fine-tune moves them
    pred = _forward(Vf, A, c, None, Xt.numpy(), "tanh")
    assert np.mean((pred - Yt.numpy()) ** 2) < 1e-20


def test_prune_with_a_few_levenberg_marquardt_steps():
    true, Xt, Yt = _prune_problem(0, n=200)
    V = np.vstack([np.random.default_rng(9).standard_normal((1, 7)), true])
    loss, Vf, A, c, S, kept = prune(V, Xt, Yt, "tanh", iters=2)
    np.testing.assert_array_equal(kept, [1, 2, 3])
    assert loss < 1e-20
    np.testing.assert_allclose(Vf, true, rtol=0, atol=1e-8)


@pytest.mark.parametrize("seed", [0, 3])
def test_prune_without_an_exact_fit_removes_no_real_neuron(seed):
    """Only 2 of the 3 true neurons plus a spurious one: no fit is exact, so nothing is pruned."""
    true, Xt, Yt = _prune_problem(seed)
    V = np.vstack([true[1:], np.random.default_rng(seed).standard_normal((1, 7))])
    loss, Vf, A, c, S, kept = prune(V, Xt, Yt, "tanh", iters=0)
    assert loss > EXACT_FIT
    np.testing.assert_array_equal(kept, [0, 1, 2])
    assert Vf.shape == (3, 7)


def test_prune_merges_exact_duplicates():
    """A copy and a sign-flipped copy (the same tanh neuron) are merged, with or without an exact fit."""
    true, Xt, Yt = _prune_problem(1)
    spurious = np.random.default_rng(4).standard_normal(7)
    V = np.vstack([true[0], true[1], true[0], true[2], -true[1], spurious])
    _, _, _, _, _, kept = prune(V, Xt, Yt, "tanh", iters=0)
    np.testing.assert_array_equal(kept, [0, 1, 3])
    # without the third true neuron: only the duplicates go
    W = np.vstack([true[0], true[1], true[0], -true[1], spurious])
    loss, _, _, _, _, kept = prune(W, Xt, Yt, "tanh", iters=0)
    assert loss > EXACT_FIT
    np.testing.assert_array_equal(kept, [0, 1, 4])


def test_prune_softplus_fits_with_the_affine_term():
    """Even+linear class: the fit includes the skip path, so flipped true neurons still fit exactly."""
    act = REGISTRY["softplus"]
    teacher = ecdist.teachers.random_mlp([4, 3, 1], "softplus", seed=2)
    X = ecdist.queries.gaussian(300, 4, seed=3)
    Y = teacher.predict(X)
    xs, ys = Standardizer.fit(X), Standardizer.fit(Y)
    true = _standardised_neurons(teacher.neuron_vectors(0), xs)
    V = np.vstack([-true[0], true[1:], np.random.default_rng(0).standard_normal((1, 5))])
    Xt, Yt = torch.as_tensor(xs(X)), torch.as_tensor(ys(Y))
    loss, Vf, A, c, S, kept = prune(V, Xt, Yt, act.name, iters=0)
    np.testing.assert_array_equal(kept, [0, 1, 2])
    assert S is not None and S.shape == (1, 4)
    assert loss < 1e-20


# ----- prune_network: the lower hidden layers of a deep network ----------------------------------------------
def deep_network(seed: int = 0):
    """A random 4-3-3-2 tanh network as blocks [w | b] per hidden layer, A and c; and its data."""
    rng = np.random.default_rng(seed)
    blocks, A, c = [rng.normal(size=(3, 5)), rng.normal(size=(3, 4))], rng.normal(size=(2, 3)), rng.normal(size=2)
    X = torch.as_tensor(rng.normal(size=(400, 4)))
    return blocks, A, c, X, network_outputs(blocks, A, c, X)


def network_outputs(blocks, A, c, X):
    theta = np.concatenate([b.ravel() for b in blocks] + [np.hstack([A, c[:, None]]).ravel()])
    widths = [X.shape[1], *(len(b) for b in blocks), len(A)]
    return StudentPack(torch.as_tensor(theta[None]), widths, "tanh", [0]).forward(X)[0]


@pytest.mark.parametrize("at", [0, 1, 3])
def test_prune_network_removes_a_lower_neuron_the_fit_does_not_need(at):
    """A fourth neuron in layer 1 whose outgoing weights are tiny (the MNIST-1D case: 2.6e-5) goes;
    the kept indices say which rows of the clustered layer survive."""
    blocks, A, c, X, Y = deep_network()
    spurious = [np.insert(blocks[0], at, np.random.default_rng(5).normal(size=5), axis=0),
                np.insert(blocks[1], at, 1e-5, axis=1)]
    start, spurious, A, c = finetune_network(spurious, A, c, X, Y, "tanh", 50)  # as the pipeline does first
    assert start <= EXACT_FIT
    final, out, A2, c2, kept = prune_network(spurious, A, c, start, X, Y, "tanh", iters=50)
    assert [len(b) for b in out] == [3, 3] and final < 1e-24
    np.testing.assert_array_equal(kept[0], np.delete(np.arange(4), at))
    assert kept[1].tolist() == [0, 1, 2]  # the last layer keeps its needed neurons
    assert float(((network_outputs(out, A2, c2, X) - Y) ** 2).mean()) < 1e-24


def test_prune_network_keeps_every_needed_neuron_and_needs_an_exact_fit():
    blocks, A, c, X, Y = deep_network(seed=1)
    final, out, _, _, kept = prune_network(blocks, A, c, 0.0, X, Y, "tanh", iters=20)
    assert [len(b) for b in out] == [3, 3] and [k.tolist() for k in kept] == [[0, 1, 2], [0, 1, 2]]
    spurious = [np.vstack([blocks[0], np.ones((1, 5))]), np.hstack([blocks[1][:, :3], np.zeros((3, 1)), blocks[1][:, 3:]])]
    final, out, _, _, kept = prune_network(spurious, A, c, 1e-10, X, Y, "tanh", iters=20)  # not exact: nothing goes
    assert final == 1e-10 and [len(b) for b in out] == [4, 3] and kept[0].tolist() == [0, 1, 2, 3]


def test_prune_network_prunes_the_last_hidden_layer_too():
    """A spurious last-layer neuron (output weights 1e-5) goes as well; lower layers stay whole."""
    blocks, A, c, X, Y = deep_network(seed=2)
    spurious = [blocks[0], np.vstack([blocks[1], np.random.default_rng(6).normal(size=(1, 4))])]
    start, spurious, A2, c2 = finetune_network(spurious, np.hstack([A, np.full((2, 1), 1e-5)]), c, X, Y, "tanh", 50)
    assert start <= EXACT_FIT
    final, out, A3, _, kept = prune_network(spurious, A2, c2, start, X, Y, "tanh", iters=50)
    assert [len(b) for b in out] == [3, 3] and A3.shape == (2, 3) and final < 1e-24
    assert [k.tolist() for k in kept] == [[0, 1, 2], [0, 1, 2]]


def test_prune_network_error_stays_within_10x_of_the_start():
    """Fourteen real but weak layer-1 neurons (outgoing weights 1e-9·1.6^i): each removal alone
    costs little, so a bound on the previous removal's error would let them go one by one until
    the fit is far from exact (it ended at 2.4e-14). The bound is the starting fit's."""
    rng = np.random.default_rng(0)
    b0, b1 = rng.normal(size=(17, 5)), rng.normal(size=(3, 18))
    b1[:, 3:17] *= 1e-9 * 1.6 ** np.arange(14)
    A, c = rng.normal(size=(2, 3)), rng.normal(size=2)
    X = torch.as_tensor(rng.normal(size=(400, 4)))
    Y = network_outputs([b0, b1], A, c, X)
    start, blocks, A1, c1 = finetune_network([b0, b1], A, c, X, Y, "tanh", 50)
    final, out, *_ = prune_network(blocks, A1, c1, start, X, Y, "tanh", iters=50)
    assert final <= 10 * max(start, 1e-20) and final <= EXACT_FIT
    assert len(out[0]) >= 10  # the neurons whose removal would cost more than that stay


def test_prune_network_removes_a_twin_behind_a_weak_real_neuron():
    """A split cluster (neuron j twice, outgoing weights half and half) and a real neuron weaker
    than either copy: the weak one is tried first and is needed, and the twin is still removed."""
    blocks, A, c, X, _ = deep_network(seed=0)
    b0, b1 = blocks[0], blocks[1].copy()
    j = int(np.argmax(np.linalg.norm(b1[:, :3], axis=0)))
    weak = next(i for i in range(3) if i != j)
    b1[:, weak] *= 0.1
    Y = network_outputs([b0, b1], A, c, X)
    twin0 = np.vstack([b0, b0[j] * (1 + 1e-9)])
    twin1 = np.hstack([b1[:, :3], 0.5 * b1[:, j : j + 1], b1[:, 3:]])
    twin1[:, j] *= 0.5
    start, bl, A1, c1 = finetune_network([twin0, twin1], A, c, X, Y, "tanh", 50)
    final, out, *_, kept = prune_network(bl, A1, c1, start, X, Y, "tanh", iters=50)
    assert [len(b) for b in out] == [3, 3] and final < 1e-24
    assert weak in kept[0] and len(set(kept[0]) & {j, 3}) == 1  # one copy of neuron j stays


# ----- refit_supported: a deep network's best-supported candidates ----------------------------------------------
def supported_candidates(seed: int = 3):
    """The 4-3-3-2 tanh network's neurons among debris: two extra layer-1 rows (their weights into
    layer 2 at 0.05, so the candidates' function is not the teacher's) and one extra layer-2 row."""
    blocks, A, c, X, Y = deep_network(seed)
    rng = np.random.default_rng(seed + 10)
    b0 = np.vstack([blocks[0], rng.normal(size=(2, 5))])
    b1 = np.hstack([blocks[1][:, :3], np.full((3, 2), 0.05), blocks[1][:, 3:]])
    b1 = np.vstack([b1, rng.normal(size=(1, 6))])
    return [b0, b1], X, Y


def test_refit_supported_drops_the_least_supported_first_and_returns_the_first_exact_set():
    """Supports 2 and 3 on layer 1's debris, 2 on layer 2's: the clusters of 2 students go first, and
    that set — layer 1's debris of 3 still in it — already fits exactly, so it is the answer (its
    extra neuron is prune_network's to remove), not a smaller exact set."""
    blocks, X, Y = supported_candidates()
    support = [np.array([6, 7, 8, 2, 3]), np.array([5, 9, 6, 2])]
    fit = refit_supported(blocks, support, X, Y, "tanh", iters=100, stall_window=10)
    assert fit is not None
    final, out, A, c, rows = fit
    assert [r.tolist() for r in rows] == [[0, 1, 2, 4], [0, 1, 2]]
    assert [b.shape for b in out] == [(4, 5), (3, 5)] and A.shape == (2, 3)
    assert final <= EXACT_FIT
    assert float(((network_outputs(out, A, c, X) - Y) ** 2).mean()) / float(Y.var()) <= 10 * EXACT_FIT


def test_refit_supported_keeps_no_fit_that_is_not_exact():
    """A teacher neuron in the fewest students: every set without it misses the teacher, so there is
    no answer (None), however well the smaller sets fit."""
    blocks, X, Y = supported_candidates()
    support = [np.array([2, 7, 8, 5, 5]), np.array([5, 9, 6, 3])]
    assert refit_supported(blocks, support, X, Y, "tanh", iters=30, stall_window=10) is None


def test_refit_supported_tries_at_most_levels_sets():
    """Seed 7: with the clusters of 2 students gone the fit still stalls (the debris of 3 holds it);
    the next level is exact — found with 2 levels allowed, not with 1."""
    blocks, X, Y = supported_candidates(seed=7)
    support = [np.array([6, 7, 8, 2, 3]), np.array([5, 9, 6, 2])]
    assert refit_supported(blocks, support, X, Y, "tanh", iters=100, levels=1) is None
    fit = refit_supported(blocks, support, X, Y, "tanh", iters=100, levels=2)
    assert fit is not None and fit[0] <= EXACT_FIT and [r.tolist() for r in fit[4]] == [[0, 1, 2], [0, 1, 2]]


def _clusters(n_students: list[int], rule: str = "stable"):
    k = len(n_students)
    return Clusters(labels=np.arange(k), dropped=np.zeros(k, bool), size=np.asarray(n_students),
                    n_students=np.asarray(n_students), height=np.zeros(k), separation=np.ones(k),
                    median_cos_dist=np.zeros(k), cut_height=float("nan"), min_students=2, rule=rule, backend="scipy")


def _supported_run(rule: str):
    """The seed-7 candidates as a deep run holds them, in no particular order: layer 1's rows (debris
    first) with supports 2, 6, 3, 7, 8 through their clusters; the last layer's fitted rows are rows
    0, 1, 2, 4 of its candidates (row 3 went in its own fit), supports 2, 5, 9, 6."""
    blocks, X, Y = supported_candidates(seed=7)
    order0, order1 = [3, 0, 4, 1, 2], [3, 0, 1, 2]
    b0, b1 = blocks[0][order0], blocks[1][order1][:, order0 + [5]]
    col = Collapsed(b0, np.zeros(5, int), np.arange(5), np.array([3, 0, 4, 1, 2]))
    lower = [(None, _clusters([6, 7, 8, 2, 3]), col)]
    last = Collapsed(np.zeros((5, 6)), np.zeros(5, int), np.arange(5), np.array([1, 2, 0, 3, 4]))
    best = pipeline._Attempt(_clusters([9, 2, 5, 4, 6], rule), last, 1.0, (), np.array([0, 1, 2, 4]))
    H = np.tanh(np.hstack([X.numpy(), np.ones((len(X), 1))]) @ b0.T)
    A, c, _ = output_layer(b1, H, Y.numpy(), "tanh", affine=False)
    return lower, best, [b0, b1], A, c, X, Y


@pytest.mark.parametrize("rule", ["stable", "student"])
def test_a_deep_joint_fit_that_is_not_exact_is_refitted_on_its_best_supported_candidates(rule):
    """The whole set's joint fit stalls short of exact (the debris holds it in a flat valley); without
    the clusters of 2 and 3 students it is exact and pruned. The rows kept are the candidates' rows,
    through the supports' order and the pruning; a last layer from one student alone (rule
    "student") is never thinned by support, only pruned."""
    lower, best, blocks, A, c, X, Y = _supported_run(rule)
    events = []
    config = ecdist.Config(activation="tanh", student_widths=[8, 8], finetune_iter=100)
    final, out, A2, c2, kept = pipeline._joint_fit(config, lower, best, blocks, A, c, X, Y,
                                                   lambda e, i: events.append((e, i)))
    assert [k.tolist() for k in kept] == [[1, 3, 4], [1, 2, 3]] and [b.shape for b in out] == [(3, 5), (3, 4)]
    assert final <= EXACT_FIT
    assert float(((network_outputs(out, A2, c2, X) - Y) ** 2).mean()) / float(Y.var()) <= 10 * EXACT_FIT
    assert [e for e, _ in events] == ["refit"] and events[0][1]["was"] > EXACT_FIT
    assert events[0][1]["widths"] == ([3, 3] if rule == "stable" else [3, 4])


@pytest.mark.parametrize("change", [{"fallback": False}, {"dtype": "float32"}])
def test_the_deep_refit_is_the_float64_fallbacks(change):
    """Without the fallback, or in float32 (where no fit reaches 1e-16), the stalled joint fit stands."""
    lower, best, blocks, A, c, X, Y = _supported_run("stable")
    events = []
    config = ecdist.Config(activation="tanh", student_widths=[8, 8], finetune_iter=100, **change)
    final, out, *_, kept = pipeline._joint_fit(config, lower, best, blocks, A, c, X, Y, lambda e, i: events.append(e))
    assert final > EXACT_FIT and events == [] and [len(k) for k in kept] == [5, 4] == [len(b) for b in out]
