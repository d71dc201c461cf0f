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
    assert t.train_seconds < 30
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
    assert t.X_train.shape == (4000, 40) and t.test_accuracy >= 0.45 and t.train_seconds < 30


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

