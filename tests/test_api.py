"""The public API contract of shared/DESIGN.md: names, meanings, and an end-to-end recovery."""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

import ecdist

D_IN = 10


def teacher():
    return ecdist.teachers.random_mlp([D_IN, 2, 1], activation="tanh", seed=0)


def queries():
    return ecdist.queries.gaussian(500, D_IN, seed=1)


def config(**changes):
    # threads=1: the test machine's two cores are shared; one thread is also fastest at this size
    return ecdist.Config(activation="tanh", student_widths=[8], n_students=8, seed=0, threads=1, backend="local").replace(**changes)


@pytest.fixture(scope="module")
def result():
    return ecdist.recover(teacher(), queries(), config())


def fresh():
    return ecdist.queries.gaussian(2000, D_IN, seed=2)


# ----- names ------------------------------------------------------------------------------------------
def test_public_names_exist():
    for name in ["teachers", "queries", "cluster", "Config", "recover", "Recovery", "load", "compare",
                 "EcdistError", "ConfigError", "TeacherError", "QueryError", "RunFolderError"]:
        assert hasattr(ecdist, name), name
    assert callable(ecdist.teachers.random_mlp) and callable(ecdist.teachers.load)
    assert callable(ecdist.queries.gaussian) and callable(ecdist.cluster.cluster_neurons)
    assert callable(ecdist.recover) and callable(ecdist.load) and callable(ecdist.compare)
    for err in ["ConfigError", "TeacherError", "QueryError", "RunFolderError"]:
        assert issubclass(getattr(ecdist, err), ecdist.EcdistError)


def test_config_fields_named_in_the_contract():
    names = {f.name for f in dataclasses.fields(ecdist.Config)}
    assert {"activation", "student_widths", "n_students", "gamma", "beta", "seed", "dtype", "backend",
            "cluster_backend"} <= names
    c = ecdist.Config(activation="tanh", student_widths=[32], n_students=20, seed=0)
    assert isinstance(c.student_widths, list) and c.beta == pytest.approx(math.pi / 3)  # radians
    assert c.backend == "auto" and c.cluster_backend == "auto"
    with pytest.raises(ecdist.ConfigError, match="n_students"):
        ecdist.Config(activation="tanh", student_widths=[32], n_students=0)


def test_teacher_and_queries_types():
    t = ecdist.teachers.random_mlp([20, 8, 1], activation="tanh", seed=0)
    assert isinstance(t, nn.Module)
    assert all(p.dtype == torch.float64 for p in t.parameters())
    X = ecdist.queries.gaussian(4000, 20, seed=1)
    assert isinstance(X, np.ndarray) and X.shape == (4000, 20) and X.dtype == np.float64


# ----- recover and compare ------------------------------------------------------------------------------
def test_recover_finds_the_teacher(result):
    assert isinstance(result, ecdist.Recovery)
    assert result.layer_sizes == [2]
    assert isinstance(result.network, nn.Module)
    report = ecdist.compare(result.network, teacher(), activation="tanh", X=fresh())
    assert report.layer_sizes == [2] and report.teacher_sizes == [2]
    assert len(report.max_weight_distance) == 1 and report.max_weight_distance[0] < 1e-6
    assert report.functional_mse < 1e-12
    # the recovered network, called like the teacher, gives the teacher's outputs
    X = fresh()
    with torch.no_grad():
        y_rec = result.network(torch.as_tensor(X)).numpy()
    y_t = teacher().predict(X)
    assert np.abs(y_rec - y_t).max() < 1e-6 * np.abs(y_t).max()


def test_recovered_neurons_are_the_teachers_up_to_sign_and_order(result):
    """1 − |cos| of each teacher [w; b] to the nearest recovered one, computed here from the weights."""
    t = teacher()
    T = np.hstack([t.layers[0].weight.detach().numpy(), t.layers[0].bias.detach().numpy()[:, None]])
    lin = [m for m in result.network.modules() if isinstance(m, nn.Linear)][0]
    R = np.hstack([lin.weight.detach().double().numpy(), lin.bias.detach().double().numpy()[:, None]])
    cos = (T / np.linalg.norm(T, axis=1, keepdims=True)) @ (R / np.linalg.norm(R, axis=1, keepdims=True)).T
    assert np.all(1 - np.abs(cos).max(axis=1) < 1e-6)


def test_recover_is_reproducible(result):
    again = ecdist.recover(teacher(), queries(), config())
    a, b = result.network.state_dict(), again.network.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert again.students.equals(result.students)


def test_black_box_numpy_teacher():
    t = teacher()
    W1, b1 = t.layers[0].weight.detach().numpy(), t.layers[0].bias.detach().numpy()
    W2, b2 = t.layers[1].weight.detach().numpy(), t.layers[1].bias.detach().numpy()

    def black_box(X: np.ndarray) -> np.ndarray:
        return (np.tanh(X @ W1.T + b1) @ W2.T + b2)[:, 0]  # numpy in, (n,) out

    res = ecdist.recover(black_box, queries(), config())
    assert res.layer_sizes == [2]
    report = ecdist.compare(res.network, black_box, activation="tanh", X=fresh())
    assert report.teacher_sizes is None and report.max_weight_distance is None
    assert report.layer_sizes == [2] and report.functional_mse < 1e-12
    assert ecdist.compare(res.network, t, activation="tanh", X=fresh()).max_weight_distance[0] < 1e-6


def test_save_and_load_round_trip(result, tmp_path):
    result.save(tmp_path / "out")
    back = ecdist.load(tmp_path / "out")
    assert back.layer_sizes == result.layer_sizes
    X = fresh()
    np.testing.assert_array_equal(back.network.predict(X), result.network.predict(X))


# ----- compare on constructed networks -------------------------------------------------------------------
def _layers(t):
    return [l.weight.detach().numpy() for l in t.layers], [l.bias.detach().numpy() for l in t.layers]


def test_compare_a_teacher_with_itself_and_a_sign_flipped_copy():
    t = ecdist.teachers.random_mlp([5, 3, 1], "tanh", seed=4)
    report = ecdist.compare(t, t, "tanh")
    assert report.layer_sizes == [3] and report.max_weight_distance[0] < 1e-15 and report.functional_mse == 0.0
    assert report.n_test == 2000  # the default fresh inputs
    (W1, W2), (b1, b2) = _layers(t)
    flip = np.array([1.0, -1.0, -1.0])  # tanh is odd: flipping a neuron and its outgoing weight is the same net
    perm = [2, 0, 1]
    same = ecdist.teachers.from_layers([(W1 * flip[:, None])[perm], (W2 * flip)[:, perm]],
                                       [(b1 * flip)[perm], b2], "tanh")
    report = ecdist.compare(same, t, "tanh", X=ecdist.queries.gaussian(500, 5, seed=1))
    assert report.max_weight_distance[0] < 1e-15 and report.functional_mse < 1e-28


def test_compare_detects_a_missing_neuron():
    t = ecdist.teachers.random_mlp([5, 3, 1], "tanh", seed=4)
    (W1, W2), (b1, b2) = _layers(t)
    partial = ecdist.teachers.from_layers([W1[:2], W2[:, :2]], [b1[:2], b2], "tanh")
    report = ecdist.compare(partial, t, "tanh", X=ecdist.queries.gaussian(500, 5, seed=1))
    assert report.layer_sizes == [2] and report.teacher_sizes == [3]
    assert report.max_weight_distance[0] > 1e-3
    T = np.hstack([W1, b1[:, None]])
    cos = T[2] @ T[:2].T / (np.linalg.norm(T[2]) * np.linalg.norm(T[:2], axis=1))
    assert report.max_weight_distance[0] == pytest.approx(1 - np.abs(cos).max(), rel=1e-9)
    var = t.predict(ecdist.queries.gaussian(500, 5, seed=1)).var()
    diff = partial.predict(ecdist.queries.gaussian(500, 5, seed=1)) - t.predict(ecdist.queries.gaussian(500, 5, seed=1))
    assert report.functional_mse == pytest.approx((diff ** 2).mean() / var, rel=1e-9)


def test_compare_wrong_input_dimension():
    t = ecdist.teachers.random_mlp([5, 3, 1], "tanh", seed=4)
    with pytest.raises(ecdist.TeacherError, match="inputs"):
        ecdist.compare(t, t, "tanh", X=ecdist.queries.gaussian(10, 4, seed=0))


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_identifiable_leaves_out_dead_and_always_on_kinked_neurons(activation):
    t = ecdist.teachers.random_mlp([5, 4, 3, 1], activation, seed=0)
    X = ecdist.queries.gaussian(2000, 5, seed=1)
    w2 = t.layers[0].weight.detach().numpy()[2]
    with torch.no_grad():  # layer 1: neuron 1 never fires, neuron 2 always does (just)
        t.layers[0].bias[1], t.layers[0].bias[2] = -1e3, float(-(X @ w2).min() + 0.1)
        h = ecdist.activations.get(activation).fn(torch.as_tensor(X) @ t.layers[0].weight.T + t.layers[0].bias)
        # layer 2: neuron 0 never fires; neurons 1 and 2 read layer 1's neurons 0 and 3 against half their maxima
        t.layers[1].weight.zero_()
        t.layers[1].weight[1, 0] = t.layers[1].weight[2, 3] = 1.0
        t.layers[1].bias.copy_(torch.stack([torch.tensor(-1e3, dtype=h.dtype), -h[:, 0].max() / 2, -h[:, 3].max() / 2]))
    first, second = ecdist.identifiable(t, activation, X)
    assert first.tolist() == [True, False, False, True]
    assert second.tolist() == [False, True, True]
    # what the mask claims: a dead neuron is zero on X, an always-on one is linear in x there
    z = X @ t.layers[0].weight.detach().numpy().T + t.layers[0].bias.detach().numpy()
    assert (z[:, 1] < 0).all() and (z[:, 2] > 0).all() and ((z[:, 0] > 0).any() and (z[:, 0] < 0).any())


KINK_CASES = [  # activation, teacher, side with 3 rows: is the neuron's weights determined (weights=True)?
    ("relu", [5, 2, 1], "active", False), ("relu", [5, 2, 1], "inactive", False),
    ("relu", [5, 2, 2, 1], "active", False), ("relu", [5, 2, 2, 1], "inactive", True),
    ("leaky_relu", [5, 2, 1], "active", False), ("leaky_relu", [5, 2, 1], "inactive", False),
    ("leaky_relu", [5, 2, 2, 1], "active", True), ("leaky_relu", [5, 2, 2, 1], "inactive", True),
]


@pytest.mark.parametrize("activation,widths,side,determined", KINK_CASES)
def test_identifiable_leaves_out_a_kink_that_few_rows_cross(activation, widths, side, determined):
    """A kinked neuron with only 3 rows of 5-dimensional inputs on one side of its kink: other
    hyperplanes split the rows alike (see the next test). ``weights=True`` leaves it out where
    the tilt provably changes no output — the active side of a ReLU in any layer, either side
    with the one-hidden-layer affine path — while the default mask (it does change the outputs)
    keeps it; with 6 rows on that side (d + 1, in general position) its weights are determined."""
    X = ecdist.queries.gaussian(500, 5, seed=1)
    t = ecdist.teachers.random_mlp(widths, activation, seed=0)
    w = t.layers[0].weight.detach().numpy()[0].copy()
    proj = np.sort(X @ w)
    sign = 1.0 if side == "active" else -1.0
    masks = []
    for k in (3, 6):
        with torch.no_grad():  # the split between the k-th and (k+1)-th row from the top of w·x
            t.layers[0].weight[0] = torch.as_tensor(sign * w)
            t.layers[0].bias[0] = -sign * float(proj[-k] + proj[-k - 1]) / 2
        masks.append(ecdist.identifiable(t, activation, X, weights=True)[0])
        assert ecdist.identifiable(t, activation, X)[0].tolist() == [True, True]
        z = X @ t.layers[0].weight.detach().numpy()[0] + t.layers[0].bias.detach().numpy()[0]
        assert ((z > 0) if side == "active" else (z < 0)).sum() == k
    assert masks[0].tolist() == [determined, True] and masks[1].tolist() == [True, True]


@pytest.mark.parametrize("activation,side", [("relu", "active"), ("relu", "inactive"), ("leaky_relu", "active")])
def test_a_kink_that_three_rows_cross_is_not_determined_by_them(activation, side):
    """What the mask above claims: tilting the hyperplane along [u; c] with u·x + c = 0 on the 3
    rows changes the neuron's weights, and the outputs on every row stay the same — at once for
    a ReLU's active side, after an affine correction (the one-hidden-layer affine path) else."""
    act = ecdist.activations.get(activation)
    X = ecdist.queries.gaussian(500, 5, seed=1)
    w = ecdist.teachers.random_mlp([5, 2, 1], "relu", seed=0).layers[0].weight.detach().numpy()[0]
    proj = np.sort(X @ w)
    sign = 1.0 if side == "active" else -1.0
    wb = sign * np.r_[w, -(proj[-3] + proj[-4]) / 2]
    Xa = np.hstack([X, np.ones((500, 1))])
    few = (Xa @ wb > 0) if side == "active" else (Xa @ wb < 0)
    assert few.sum() == 3
    tilt = np.linalg.svd(Xa[few])[2][-1]  # orthogonal to the 3 rows
    tilted = wb + 0.01 * tilt
    before, after = (act.fn(torch.as_tensor(Xa @ v)).numpy() for v in (wb, tilted))
    if activation == "relu" and side == "active":
        assert np.abs(after - before).max() < 1e-12
    else:
        assert np.abs(after - before).max() > 1e-4  # the tilt alone changes a linear piece ...
        theta = np.linalg.lstsq(Xa, before - after, rcond=None)[0]
        assert np.abs(after + Xa @ theta - before).max() < 1e-12  # ... which the affine path undoes
    assert 1 - abs(tilted[:5] @ wb[:5]) / np.linalg.norm(tilted[:5]) / np.linalg.norm(wb[:5]) > 1e-6


def test_identifiable_counts_every_neuron_of_a_smooth_teacher_and_checks_the_inputs():
    t = ecdist.teachers.random_mlp([5, 4, 1], "softplus", seed=0)
    with torch.no_grad():
        t.layers[0].bias[1] = -1e3  # softplus is still not piecewise linear: its mask stays True
    assert ecdist.identifiable(t, "softplus", ecdist.queries.gaussian(100, 5, seed=1))[0].all()
    with pytest.raises(ecdist.TeacherError, match="X has 4 inputs"):
        ecdist.identifiable(t, "softplus", np.zeros((3, 4)))


# ----- errors before training ------------------------------------------------------------------------------
BAD_TEACHERS = {
    "too few rows": (lambda X: np.zeros(len(X) - 1), "answered"),
    "too many rows": (lambda X: np.zeros((len(X) + 3, 1)), "answered"),
    "NaN": (lambda X: np.where(np.arange(len(X)) == 4, np.nan, X[:, 0]), r"NaN.*\[4\]"),
    "inf": (lambda X: np.where(np.arange(len(X)) >= 498, np.inf, X[:, 0]), r"infinite.*\[498, 499\]"),
    "constant": (lambda X: np.ones(len(X)), "constant"),
    "constant 1e-16": (lambda X: np.full(len(X), 1e-16), "constant"),  # its np.std is 1e-32, not 0
    "raises": (lambda X: 1 / 0, "ZeroDivisionError"),
    "wrong d_in module": (ecdist.teachers.random_mlp([3, 2, 1], "tanh"), "takes 3 inputs but the queries have 10"),
}


@pytest.mark.parametrize("case", list(BAD_TEACHERS))
def test_bad_teacher_fails_before_training(case, tmp_path):
    bad, match = BAD_TEACHERS[case]
    events = []
    with pytest.raises(ecdist.TeacherError, match=match):
        ecdist.recover(bad, queries(), config(teacher_backoff=0.0), out=tmp_path / "run",
                       progress=lambda e, i: events.append(e))
    assert events == []  # not even the query report: nothing ran
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "X", [np.zeros((0, D_IN)), np.ones(D_IN), np.full((5, D_IN), np.nan)], ids=["empty", "1-D", "NaN"]
)
def test_bad_queries_fail_before_the_teacher_is_called(X):
    calls = []
    with pytest.raises(ecdist.QueryError):
        ecdist.recover(lambda x: calls.append(1) or x[:, 0], X, config())
    assert calls == []


def _no_call(calls):
    return lambda x: calls.append(1) or x[:, 0]


@pytest.mark.parametrize(
    "teacher_widths,student_widths,match",
    [([D_IN, 6, 1], [4], r"narrower than the teacher's hidden widths \[6\].*\[24\]"),
     ([D_IN, 3, 2, 1], [8], r"1 hidden layer\(s\), but the teacher has 2"),
     ([D_IN, 2, 1], [8, 8], r"2 hidden layer\(s\), but the teacher has 1")],
    ids=["narrower", "shallower", "deeper"],
)
def test_students_that_cannot_hold_a_known_teacher_are_refused(teacher_widths, student_widths, match):
    t = ecdist.teachers.random_mlp(teacher_widths, "tanh", seed=0)
    forward = []
    t.register_forward_hook(lambda *a: forward.append(1))
    with pytest.raises(ecdist.ConfigError, match=match):
        ecdist.recover(t, queries(), config(student_widths=student_widths))
    assert forward == []  # refused before the teacher was asked


def test_students_too_large_for_this_machine_are_refused():
    calls = []
    with pytest.raises(ecdist.ConfigError, match=r"^student_widths:.*GiB"):
        ecdist.recover(_no_call(calls), queries(), config(student_widths=[10**9], n_students=10**4))
    assert calls == []


@pytest.mark.parametrize("where", ["under a file", "is a file"])
def test_an_output_folder_that_cannot_be_written_fails_before_the_teacher_is_asked(tmp_path, where):
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "run" if where == "under a file" else tmp_path / "file"
    calls = []
    with pytest.raises(ecdist.RunFolderError, match="is a file, not a folder"):
        ecdist.recover(_no_call(calls), queries(), config(), out=out)
    assert calls == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_fails_before_the_teacher_is_asked(tmp_path):
    tmp_path.chmod(0o500)
    calls = []
    try:
        with pytest.raises(ecdist.RunFolderError, match="cannot be written"):
            ecdist.recover(_no_call(calls), queries(), config(), out=tmp_path / "run")
    finally:
        tmp_path.chmod(0o700)
    assert calls == []


def test_recover_retries_the_teacher_as_configured():
    calls = []

    def offline(x):
        calls.append(1)
        raise ConnectionError("oracle offline")

    with pytest.raises(ecdist.TeacherError, match=r"ConnectionError on queries 0\.\.99: oracle offline \(tried 3"):
        ecdist.recover(offline, queries(), config(teacher_batch=100, teacher_retries=2, teacher_backoff=0.0))
    assert len(calls) == 3


def test_recover_needs_a_config():
    with pytest.raises(ecdist.ConfigError, match="config"):
        ecdist.recover(teacher(), queries(), {"activation": "tanh", "student_widths": [8]})


# ----- cluster_neurons --------------------------------------------------------------------------------------
def synthetic_layer(n_students=10, seed=0):
    """3 'teacher' vectors recurring in every student (tiny noise, shuffled order) + 3 debris rows each."""
    rng = np.random.default_rng(seed)
    T = rng.standard_normal((3, 6))
    vecs, sids, truth = [], [], []
    for s in range(n_students):
        order = rng.permutation(3)
        vecs += [T[order] + 1e-9 * rng.standard_normal((3, 6)), rng.standard_normal((3, 6))]
        sids += [s] * 6
        truth += list(order) + [-1] * 3
    return np.vstack(vecs), np.array(sids), np.array(truth)


@pytest.mark.parametrize("backend", ["auto", "scipy"])
def test_cluster_neurons_contract(backend):
    vectors, sids, truth = synthetic_layer()
    labels = ecdist.cluster.cluster_neurons(vectors, sids, gamma=0.5, beta=math.pi / 3, backend=backend)
    assert labels.shape == (len(vectors),)
    kept = sorted(set(labels.tolist()) - {-1})
    assert len(kept) == 3
    for k in range(3):  # each teacher neuron's copies form exactly one cluster
        assert len(set(labels[truth == k].tolist())) == 1 and labels[truth == k][0] != -1
    assert np.all(labels[truth == -1] == -1)  # debris belongs to no kept cluster


def test_cluster_neurons_gamma_is_a_student_count():
    vectors, sids, truth = synthetic_layer(n_students=10)
    keep = ~((truth == 0) & (sids >= 4))  # teacher neuron 0 appears in only 4 of 10 students
    labels = ecdist.cluster.cluster_neurons(vectors[keep], sids[keep], gamma=0.5, beta=math.pi / 3, backend="scipy")
    assert np.all(labels[truth[keep] == 0] == -1)  # 4 < ⌊0.5·10⌋ students: not kept
    assert len(set(labels.tolist()) - {-1}) == 2






@pytest.mark.parametrize(
    "args, kwargs, match",
    [((), {"activation": "tanh", "student_widths": [8], "foo": 1}, "unknown config field"),
     ((), {}, "missing the required field"),
     (("tanh", [8]), {"activation": "g"}, "given twice"),
     (tuple(range(100)), {}, "at most")],
)
def test_config_call_mistakes_are_config_errors(args, kwargs, match):
    """Python would raise a TypeError from the dataclass's __init__; users get a ConfigError naming the field."""
    with pytest.raises(ecdist.ConfigError, match=match):
        ecdist.Config(*args, **kwargs)
