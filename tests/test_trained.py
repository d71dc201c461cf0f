"""Trained teachers on real data (digits, MNIST-1D), the input mask, and the data-built queries."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import ecdist
from ecdist import ConfigError, QueryError, TeacherError, queries
from ecdist.datasets import load_dataset
from ecdist.network import MLP, from_layers
from ecdist.teachers import TrainedTeacher, expand_inputs, masked, train_on

DIGITS_CONSTANT_PIXELS = [0, 32, 39]  # always 0 in all 1,797 images of load_digits


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def digits_teacher():
    """64-16-10 tanh on digits, the default training (about 2 s on one core)."""
    return train_on("digits", [64, 16, 10], "tanh", seed=0)


def params(net: torch.nn.Module) -> list[np.ndarray]:
    return [p.detach().numpy().copy() for p in net.parameters()]


# ----- data sets -----------------------------------------------------------------------------------
def test_digits_split_and_scaling(digits):
    assert digits.X_train.shape == (1438, 64) and digits.X_test.shape == (359, 64)
    assert digits.X_train.dtype == np.float64 and digits.y_train.dtype == np.int64
    assert set(np.unique(digits.y_train)) == set(range(10)) and digits.shape == (8, 8)
    X = np.vstack([digits.X_train, digits.X_test])
    assert abs(X.mean()) < 1e-12 and abs(X.std() - 1) < 1e-12  # one global shift and scale
    again = load_dataset("digits")
    np.testing.assert_array_equal(again.X_train, digits.X_train)
    assert not np.array_equal(load_dataset("digits", seed=1).y_train, digits.y_train)


def test_mnist1d_is_generated_without_touching_global_random_state():
    np.random.seed(123)
    random.seed(123)
    before_np, before_py = np.random.get_state()[1].copy(), random.getstate()
    ds = load_dataset("mnist1d")
    assert np.array_equal(np.random.get_state()[1], before_np) and random.getstate() == before_py
    assert ds.X_train.shape == (4000, 40) and ds.X_test.shape == (1000, 40) and ds.shape == (40,)
    assert set(np.unique(ds.y_train)) == set(range(10))
    np.testing.assert_array_equal(load_dataset("mnist1d").X_test, ds.X_test)


@pytest.mark.parametrize("name", ["mnist", "Digits", "", None])
def test_unknown_dataset_names_the_choices(name):
    with pytest.raises(ConfigError, match="digits, mnist1d"):
        train_on(name, [64, 4, 10])


# ----- train_on --------------------------------------------------------------------------------------
def test_digits_teacher_accuracy_and_logits(digits_teacher):
    t = digits_teacher
    assert isinstance(t, TrainedTeacher) and isinstance(t, MLP)
    assert t.widths == [64, 16, 10] and t.activation == "tanh" and t.dataset == "digits"
    assert all(p.dtype == torch.float64 for p in t.parameters())
    assert t.accuracy == t.test_accuracy >= 0.95 and t.train_accuracy >= 0.98
    logits = ecdist.teachers.query(t, t.X_train)
    assert logits.shape == (1438, 10)
    assert not np.allclose(logits.sum(axis=1), 1) and (logits < 0).any()  # not probabilities
    ce = torch.nn.functional.cross_entropy(torch.as_tensor(logits), torch.as_tensor(t.y_train)).item()
    assert ce == pytest.approx(t.losses[-1], rel=0.1)  # the training loss was cross-entropy on these outputs
    assert t.score(t.X_test, t.y_test) == t.test_accuracy


def test_train_on_is_deterministic_under_its_seed():
    a, b = (train_on("digits", [64, 6, 10], "relu", seed=3, epochs=3) for _ in range(2))
    c = train_on("digits", [64, 6, 10], "relu", seed=4, epochs=3)
    for pa, pb in zip(params(a), params(b)):
        np.testing.assert_array_equal(pa, pb)
    np.testing.assert_array_equal(a.losses, b.losses)
    assert not np.array_equal(params(a)[0], params(c)[0])


def test_train_on_deep_network():
    t = train_on("digits", [64, 16, 16, 10], "relu", seed=0)
    assert t.hidden_widths == [16, 16] and t.test_accuracy >= 0.93


def test_train_on_mnist1d():
    """An MLP reaches ~55% on MNIST-1D (chance 10%; the data set is built to need convolutions)."""
    t = train_on("mnist1d", [40, 32, 10], "relu", seed=0)
    assert t.X_train.shape == (4000, 40) and t.test_accuracy >= 0.45


def test_train_on_takes_a_dataset_object(digits):
    t = train_on(digits, [64, 3, 10], "g", seed=0, epochs=1)
    assert t.data is digits and t.widths == [64, 3, 10]


@pytest.mark.parametrize(
    "widths,match",
    [
        ([40, 16, 10], "digits data set has 64 inputs and 10 classes"),
        ([64, 16, 2], "must start with 64 and end with 10"),
        ([64, 10], "at least one hidden layer"),
        ([64, 0, 10], "at least one hidden layer"),
        (["a", 3, 10], "list of integers"),
    ],
)
def test_train_on_widths_must_fit_the_data(widths, match):
    with pytest.raises(ConfigError, match=match):
        train_on("digits", widths)


@pytest.mark.parametrize(
    "kw,match",
    [({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"), ({"batch_size": 0}, "batch_size"),
     ({"weight_decay": -0.1}, "weight_decay"), ({"activation": "swish-ish"}, "activation")],
)
def test_train_on_bad_arguments(kw, match):
    with pytest.raises(ConfigError, match=match):
        train_on("digits", [64, 4, 10], **kw)


# ----- training on a subset of the images --------------------------------------------------------------
def test_subset_has_the_requested_size_and_is_deterministic_under_its_seed(digits):
    a, b, c = digits.subset(300, seed=0), digits.subset(300, seed=0), digits.subset(300, seed=1)
    assert a.X_train.shape == (300, 64) and a.y_train.shape == (300,)
    np.testing.assert_array_equal(a.X_train, b.X_train)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert not np.array_equal(a.X_train, c.X_train)
    rows = [np.flatnonzero((digits.X_train == x).all(axis=1))[0] for x in a.X_train]
    assert rows == sorted(rows) and len(set(rows)) == 300  # distinct training rows, in their original order
    np.testing.assert_array_equal(a.y_train, digits.y_train[rows])
    small = digits.subset(100, seed=0)  # nested: a smaller subset under the same seed is part of a larger one
    assert {x.tobytes() for x in small.X_train} <= {x.tobytes() for x in a.X_train}
    np.testing.assert_array_equal(a.X_test, digits.X_test)  # the held-out test set stays whole
    np.testing.assert_array_equal(a.y_test, digits.y_test)
    assert (a.name, a.shape, a.n_classes) == (digits.name, digits.shape, digits.n_classes)
    assert np.array_equal(digits.subset(1438, seed=5).X_train, digits.X_train)  # all rows: the training set


@pytest.mark.parametrize("n", [0, -3, 1439, 2.5, True, "400", None])
def test_subset_refuses_bad_sizes(digits, n):
    with pytest.raises(ConfigError, match=r"n_train: got .*expected an integer from 1 to 1438"):
        digits.subset(n)
    if n is not None:
        with pytest.raises(ConfigError, match="n_train"):
            train_on("digits", [64, 4, 10], n_train=n)


def test_train_on_a_subset_has_more_parameters_than_images():
    """digits 64-8-10 (610 parameters) on 400 images: the part (d) teacher of benchmarks/trained_teachers.py."""
    a, b = (train_on("digits", [64, 8, 10], "tanh", seed=0, epochs=5, n_train=400) for _ in range(2))
    assert a.X_train.shape == (400, 64) and a.X_test.shape == (359, 64)
    assert sum(p.numel() for p in a.parameters()) == 610 > len(a.X_train)
    np.testing.assert_array_equal(a.X_train, load_dataset("digits").subset(400, seed=0).X_train)
    for pa, pb in zip(params(a), params(b)):
        np.testing.assert_array_equal(pa, pb)
    assert a.test_accuracy == a.score(a.X_test, a.y_test)


# ----- the input mask and masked teachers ------------------------------------------------------------
def test_mask_finds_exactly_the_constant_pixels_of_digits(digits):
    X = np.vstack([digits.X_train, digits.X_test])
    mask = queries.input_mask(X)
    assert np.flatnonzero(~mask).tolist() == DIGITS_CONSTANT_PIXELS
    np.testing.assert_array_equal(queries.constant_inputs(X), np.ptp(X, axis=0) == 0)
    train_mask = queries.input_mask(digits.X_train)
    np.testing.assert_array_equal(train_mask, np.ptp(X[: len(digits.X_train)], axis=0) > 0)
    assert not train_mask[DIGITS_CONSTANT_PIXELS].any()


def test_constant_inputs_tolerance():
    X = np.array([[0.0, 1.0, 3.0], [1e-9, 2.0, 3.0], [0.0, 0.0, 3.0]])
    assert queries.constant_inputs(X).tolist() == [False, False, True]
    assert queries.constant_inputs(X, tol=1e-8).tolist() == [True, False, True]
    with pytest.raises(QueryError, match="tol"):
        queries.constant_inputs(X, tol=-1)
    with pytest.raises(QueryError, match="2-D"):
        queries.input_mask(np.zeros(3))


def test_masked_teacher_equals_the_full_teacher_on_filled_inputs(digits_teacher):
    t = digits_teacher
    mask = queries.input_mask(t.X_train)
    fill = t.X_train[0]
    tm = masked(t, mask, fill)
    assert type(tm) is MLP and tm.widths == [61, 16, 10] and tm.activation == "tanh"
    np.testing.assert_array_equal(tm.layers[0].weight.detach().numpy(), t.layers[0].weight.detach().numpy()[:, mask])
    np.testing.assert_allclose(tm.predict(t.X_train[:, mask]), t.predict(t.X_train), rtol=1e-12, atol=1e-12)
    Z = queries.gaussian(200, 61, seed=0)  # anywhere, with the masked inputs at fill
    full = np.tile(fill, (200, 1))
    full[:, mask] = Z
    np.testing.assert_allclose(tm.predict(Z), t.predict(full), rtol=1e-12, atol=1e-12)
    short = masked(t, mask, fill[~mask])  # fill may hold only the masked inputs' values
    np.testing.assert_array_equal(short.predict(Z), tm.predict(Z))


def test_masked_teacher_with_a_skip_path():
    rng = np.random.default_rng(0)
    t = from_layers([rng.standard_normal((3, 5)), rng.standard_normal((2, 3))], [rng.standard_normal(3),
                    rng.standard_normal(2)], "softplus", skip=rng.standard_normal((2, 5)))
    mask, fill = np.array([True, False, True, False, True]), np.array([0.0, 2.0, 0.0, -1.0, 0.0])
    tm = masked(t, mask, fill)
    Z = queries.gaussian(20, 3, seed=1)
    full = np.tile(fill, (20, 1))
    full[:, mask] = Z
    assert tm.skip is not None
    np.testing.assert_allclose(tm.predict(Z), t.predict(full), rtol=1e-12, atol=1e-12)


def test_masked_black_box(digits_teacher):
    t = digits_teacher
    mask = queries.input_mask(t.X_train)
    box = masked(lambda x: t.predict(x), mask, t.X_train[0])
    np.testing.assert_allclose(ecdist.teachers.query(box, t.X_train[:50, mask]), t.predict(t.X_train[:50]), atol=1e-12)
    with pytest.raises(TeacherError, match="takes \\(n, 61\\) inputs"):
        ecdist.teachers.query(box, t.X_train[:5])


def test_expand_inputs_undoes_masking(digits_teacher):
    t = digits_teacher
    mask = queries.input_mask(t.X_train)
    back = expand_inputs(masked(t, mask, t.X_train[0]), mask)
    assert back.widths == [64, 16, 10]
    assert not back.layers[0].weight.detach().numpy()[:, ~mask].any()
    np.testing.assert_allclose(back.predict(t.X_test), t.predict(t.X_test), rtol=1e-12, atol=1e-12)
    with pytest.raises(TeacherError, match="keeps 64 inputs but the network has 61"):
        expand_inputs(masked(t, mask, t.X_train[0]), np.ones(64, bool))


@pytest.mark.parametrize(
    "mask,fill,match",
    [
        (np.ones(64), np.zeros(64), "boolean"),
        (np.ones(63, bool), np.zeros(63), "63 entries but the teacher has 64"),
        (np.zeros(64, bool), np.zeros(64), "keeps no input"),
        (np.arange(64) > 2, np.zeros(5), "fill must hold a value"),
        (np.arange(64) > 2, np.full(64, np.nan), "NaN"),
    ],
)
def test_masked_validates(digits_teacher, mask, fill, match):
    with pytest.raises(TeacherError, match=match):
        masked(digits_teacher, mask, fill)


# ----- data-built query generators ------------------------------------------------------------------
def test_signed_noise_statistics(digits):
    X = digits.X_train
    Q = queries.signed_noise(X, seed=0)
    n = len(X)
    assert Q.shape == (2 * n, 64) and Q.dtype == np.float64
    up, down = Q[:n] - X, Q[n:] - X
    assert up.min() >= 0 and up.max() <= 1 and down.min() >= -1 and down.max() <= 0
    se = np.sqrt(1 / 12 / up.size)  # standard error of the mean of U[0, 1] noise
    assert abs(up.mean() - 0.5) < 6 * se and abs(down.mean() + 0.5) < 6 * se
    assert abs(up.var() - 1 / 12) < 0.002
    half = queries.signed_noise(X, seed=0, scale=0.5)[:n] - X
    assert half.max() <= 0.5 and abs(half.mean() - 0.25) < 6 * se


def test_signed_noise_seeds():
    X = queries.gaussian(10, 4, seed=0)
    np.testing.assert_array_equal(queries.signed_noise(X, seed=1), queries.signed_noise(X, seed=1))
    assert not np.array_equal(queries.signed_noise(X, seed=1), queries.signed_noise(X, seed=2))


@pytest.mark.parametrize("X,kw,match", [(np.zeros(5), {}, "2-D"), (np.zeros((3, 2)), {"scale": 0}, "scale"),
                                         (np.zeros((3, 2)), {"scale": np.inf}, "scale")])
def test_signed_noise_errors(X, kw, match):
    with pytest.raises(QueryError, match=match):
        queries.signed_noise(X, **kw)


def test_grid_composition_digits_quadrants(digits):
    X = digits.X_train
    Q, src = queries.grid_composition(X, 500, seed=0, shape=(8, 8), grid=2, return_sources=True)
    assert Q.shape == (500, 64) and src.shape == (500, 4) and Q.dtype == np.float64
    assert all(len(set(row)) == 4 for row in src.tolist())  # four different images
    images, comp = X.reshape(-1, 8, 8), Q.reshape(-1, 8, 8)
    for c, (rows, cols) in enumerate([(slice(0, 4), slice(0, 4)), (slice(0, 4), slice(4, 8)),
                                      (slice(4, 8), slice(0, 4)), (slice(4, 8), slice(4, 8))]):
        np.testing.assert_array_equal(comp[:, rows, cols], images[src[:, c], rows, cols])
    # without the sources: every quadrant of a query is that quadrant of some image
    quads = images.reshape(-1, 2, 4, 2, 4)
    for q in comp[:20].reshape(-1, 2, 4, 2, 4):
        for i in range(2):
            for j in range(2):
                assert (quads[:, i, :, j, :] == q[i, :, j, :]).all(axis=(1, 2)).any()
    assert not queries.input_mask(Q)[DIGITS_CONSTANT_PIXELS].any()  # constant pixels stay constant


def test_grid_composition_one_dimensional_segments():
    X = np.arange(40.0)[None, :] + 100 * np.arange(30.0)[:, None]  # row i: 100·i + position
    Q, src = queries.grid_composition(X, 50, seed=1, grid=4, return_sources=True)
    np.testing.assert_array_equal(Q % 100, np.tile(np.arange(40.0), (50, 1)))  # every value at its position
    np.testing.assert_array_equal(Q // 100, np.repeat(src, 10, axis=1))  # segments of 10 from the sources
    uneven = queries.grid_composition(np.arange(25.0).reshape(5, 5), 10, seed=0, grid=2, return_sources=True)
    np.testing.assert_array_equal(uneven[0] // 5, np.repeat(uneven[1], [2, 3], axis=1))  # cut at ⌊5/2⌋


def test_grid_composition_seeds(digits):
    a = queries.grid_composition(digits.X_train, 30, seed=5, shape=(8, 8))
    np.testing.assert_array_equal(a, queries.grid_composition(digits.X_train, 30, seed=5, shape=(8, 8)))
    assert not np.array_equal(a, queries.grid_composition(digits.X_train, 30, seed=6, shape=(8, 8)))
    few = queries.grid_composition(np.arange(16.0).reshape(4, 4), 20, seed=0, grid=4, return_sources=True)[1]
    assert (np.sort(few, axis=1) == np.arange(4)).all()  # as many images as cells: each used once


@pytest.mark.parametrize(
    "X,kw,match",
    [
        (np.zeros((10, 64)), {"shape": (8, 7)}, "cannot be read as images of shape"),
        (np.zeros((10, 64)), {"shape": (8, 8), "grid": 9}, "cells per axis"),
        (np.zeros((10, 64)), {"shape": (8, 8), "grid": (2, 2, 2)}, "cells per axis"),
        (np.zeros((10, 64)), {"shape": (8, 8), "grid": 1}, "at least 2 cells"),
        (np.zeros((3, 64)), {"shape": (8, 8), "grid": 2}, "4 distinct images, got 3"),
        (np.zeros((10, 64)), {"n": 0}, "n >= 1"),
        (np.zeros(64), {}, "2-D"),
    ],
)
def test_grid_composition_errors(X, kw, match):
    kw = {"n": 5, **kw}
    with pytest.raises(QueryError, match=match):
        queries.grid_composition(X, **kw)


def test_gaussian_like_matches_mean_and_covariance(digits):
    X = digits.X_train
    G = queries.gaussian_like(X, 100_000, seed=0)
    assert G.shape == (100_000, 64) and G.dtype == np.float64
    const = queries.constant_inputs(X)
    np.testing.assert_array_equal(G[:, const], np.tile(X[0, const], (len(G), 1)))  # exactly constant
    cov = np.cov(X, rowvar=False)
    se = np.sqrt(np.diag(cov) / len(G))
    assert (np.abs(G.mean(axis=0) - X.mean(axis=0)) <= 5 * se + 1e-12).all()
    # sample covariance error ~ √(2/n)·scale ≈ 0.5% of the variances
    assert np.abs(np.cov(G, rowvar=False) - cov).max() < 0.03 * np.diag(cov).max()


def test_gaussian_like_singular_covariance():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((5, 10)) @ rng.standard_normal((10, 10))  # rank 5 < 10 inputs
    X[:, 3] = 2 * X[:, 0] - X[:, 1]  # and collinear
    G = queries.gaussian_like(X, 2000, seed=1)
    assert np.isfinite(G).all()
    assert np.linalg.matrix_rank(G - X.mean(axis=0), tol=1e-8) == 4  # in the span of the centred data
    np.testing.assert_allclose(G[:, 3], 2 * G[:, 0] - G[:, 1], atol=1e-9)


def test_gaussian_like_seeds_and_errors():
    X = queries.gaussian(50, 3, seed=0)
    np.testing.assert_array_equal(queries.gaussian_like(X, 10, seed=1), queries.gaussian_like(X, 10, seed=1))
    assert not np.array_equal(queries.gaussian_like(X, 10, seed=1), queries.gaussian_like(X, 10, seed=2))
    np.testing.assert_array_equal(queries.gaussian_like(np.ones((4, 2)), 3), np.ones((3, 2)))  # all constant
    with pytest.raises(QueryError, match="at least 2 rows"):
        queries.gaussian_like(X[:1], 10)
    with pytest.raises(QueryError, match="n >= 1"):
        queries.gaussian_like(X, 0)
    with pytest.raises(QueryError, match="2-D"):
        queries.gaussian_like(X[0], 10)


# ----- end to end -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_recover_a_trained_digits_teacher_from_noise_queries():
    """digits 64-4-10 tanh → mask the 3 constant pixels → 500 images ± one-signed noise → width 4.

    About a minute on 2 busy cores (students: 8 × 12, Levenberg–Marquardt on 1,500 queries).
    """
    t = train_on("digits", [64, 4, 10], "tanh", seed=0)
    assert t.test_accuracy > 0.85
    mask = queries.input_mask(t.X_train)
    tm = masked(t, mask, t.X_train[0])
    X = t.X_train[:500]
    Q = np.vstack([X, queries.signed_noise(X, seed=1)])[:, mask]
    config = ecdist.Config(activation="tanh", student_widths=[12], n_students=8, seed=0)
    result = ecdist.recover(tm, Q, config)
    assert result.layer_sizes == [4]
    X_test = np.vstack([t.X_test, queries.signed_noise(t.X_test, seed=2)])[:, mask]
    report = ecdist.compare(result.network, tm, "tanh", X=X_test)
    assert report.teacher_sizes == [4] and max(report.max_weight_distance) < 1e-6
    assert report.functional_mse < 1e-10
    full = expand_inputs(result.network, mask)  # back on all 64 pixels: the teacher's function on the data
    np.testing.assert_allclose(full.predict(t.X_test), t.predict(t.X_test), rtol=1e-6, atol=1e-6)
