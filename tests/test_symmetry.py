"""Symmetry classes: canonicalisation keeps the layer's function (up to the affine term), is
idempotent, maps every symmetric copy of a neuron to one vector, and commutes with permutations.

Property tests over every registered activation, with random neurons V (M, d+1) and outgoing
weights A (M, d_out) drawn by hypothesis.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ecdist.activations import REGISTRY
from ecdist.symmetry import Canonical

NAMES = sorted(REGISTRY)
SIGN_NAMES = [n for n in NAMES if REGISTRY[n].symmetry.sign]
NONE_NAMES = [n for n in NAMES if not REGISTRY[n].symmetry.sign]
ODD_NAMES = [n for n in NAMES if REGISTRY[n].symmetry.flips_outgoing]
EVEN_NAMES = [n for n in NAMES if REGISTRY[n].symmetry.linear_shift]
SCALING_NAMES = [n for n in NAMES if REGISTRY[n].symmetry.scaling]

PROPS = settings(max_examples=50, deadline=None)
# zero, or a magnitude in [1e-6, 5]: far from underflow, where ‖v‖ loses digits (‖v‖² subnormal)
ELEMENTS = st.one_of(st.just(0.0), st.floats(1e-6, 5.0), st.floats(-5.0, -1e-6))


def test_classes_are_registered_as_the_paper_says():
    assert set(NONE_NAMES) == {"g"}
    assert set(ODD_NAMES) == {"tanh", "identity", "sigmoid"}
    assert set(EVEN_NAMES) == {"softplus", "gelu", "silu", "relu", "leaky_relu"}
    assert set(SCALING_NAMES) == {"relu", "leaky_relu"}
    assert {n for n in NAMES if REGISTRY[n].symmetry.constant_shift} == {"sigmoid"}
    for n in NAMES:
        assert REGISTRY[n].symmetry.needs_affine == (n in EVEN_NAMES)


@st.composite
def layers(draw, min_rows: int = 1):
    """(V, A, X): neurons (M, d+1), outgoing weights (M, d_out), probe inputs (n, d)."""
    m = draw(st.integers(min_rows, 8))
    d = draw(st.integers(1, 5))
    d_out = draw(st.integers(1, 3))
    V = draw(hnp.arrays(np.float64, (m, d + 1), elements=ELEMENTS))
    A = draw(hnp.arrays(np.float64, (m, d_out), elements=ELEMENTS))
    seed = draw(st.integers(0, 2**32 - 1))
    X = np.random.default_rng(seed).normal(scale=2.0, size=(16, d))
    return V, A, X


def _terms(act, V: np.ndarray, A: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Per-neuron contributions a_j σ(v_j·[x;1]): (n, M, d_out)."""
    Xt = np.hstack([X, np.ones((len(X), 1))])
    H = act.fn(torch.as_tensor(Xt @ V.T, dtype=torch.float64)).numpy()
    return H[:, :, None] * A[None, :, :]


def _canon(name: str, V: np.ndarray, A: np.ndarray | None = None) -> Canonical:
    act = REGISTRY[name]
    return act.symmetry.canonicalize(V, A, act.linear_coef)


def _nonzero_rows(V: np.ndarray) -> np.ndarray:
    return np.linalg.norm(V, axis=1) > 1e-3


@pytest.mark.parametrize("name", NAMES)
@PROPS
@given(data=layers())
def test_canonical_form_computes_the_same_function(name, data):
    V, A, X = data
    act = REGISTRY[name]
    can = _canon(name, V, A)
    assert can.vectors.shape == V.shape and can.outgoing.shape == A.shape
    assert can.sign.shape == can.scale.shape == (len(V),)
    assert can.affine.shape == (V.shape[1], A.shape[1])
    Xt = np.hstack([X, np.ones((len(X), 1))])
    before = _terms(act, V, A, X)
    after = _terms(act, can.vectors, can.outgoing, X)
    lin = Xt @ can.affine
    lhs, rhs = before.sum(axis=1), after.sum(axis=1) + lin
    size = np.abs(before).sum(axis=1) + np.abs(after).sum(axis=1) + np.abs(lin) + 1e-300
    assert np.all(np.abs(lhs - rhs) <= 1e-10 * size)


@pytest.mark.parametrize("name", NAMES)
@PROPS
@given(data=layers())
def test_canonical_form_matches_its_sign_and_scale(name, data):
    """v_canon = sign·v/scale; scale is 1 without the scaling symmetry, sign is 1 without a sign symmetry."""
    V, A, _ = data
    sym = REGISTRY[name].symmetry
    can = _canon(name, V, A)
    assert set(np.unique(can.sign)) <= {-1.0, 1.0}
    np.testing.assert_allclose(can.vectors, can.sign[:, None] * V / can.scale[:, None], rtol=1e-15, atol=0)
    if not sym.scaling:
        assert np.all(can.scale == 1.0)
    if not sym.sign:
        assert np.all(can.sign == 1.0)
    # the canonical sign makes the largest-magnitude coordinate positive
    pivot = np.abs(can.vectors).argmax(axis=1)
    assert np.all(can.vectors[np.arange(len(V)), pivot] >= 0) or not sym.sign


@pytest.mark.parametrize("name", NAMES)
@PROPS
@given(data=layers())
def test_canonicalize_is_idempotent(name, data):
    V, A, _ = data
    sym = REGISTRY[name].symmetry
    once = _canon(name, V, A)
    twice = _canon(name, once.vectors, once.outgoing)
    assert np.all(twice.sign == 1.0)
    assert np.all(twice.affine == 0.0)
    if sym.scaling:  # re-normalising a unit vector moves it by rounding only
        np.testing.assert_allclose(twice.vectors, once.vectors, rtol=0, atol=1e-15)
        np.testing.assert_allclose(twice.outgoing, once.outgoing, rtol=1e-15, atol=0)
        np.testing.assert_allclose(twice.scale[_nonzero_rows(V)], 1.0, rtol=0, atol=1e-15)
    else:
        np.testing.assert_array_equal(twice.vectors, once.vectors)
        np.testing.assert_array_equal(twice.outgoing, once.outgoing)
        assert np.all(twice.scale == 1.0)


@pytest.mark.parametrize("name", SIGN_NAMES)
@PROPS
@given(data=layers())
def test_v_and_minus_v_share_one_canonical_vector(name, data):
    V, A, _ = data
    sym = REGISTRY[name].symmetry
    plus, minus = _canon(name, V, A), _canon(name, -V, A)
    np.testing.assert_array_equal(plus.vectors, minus.vectors)
    nz = np.any(V != 0, axis=1)
    assert np.all(plus.sign[nz] == -minus.sign[nz])
    if sym.flips_outgoing:  # odd classes: (v, a) → (−v, −a) is the symmetry
        np.testing.assert_array_equal(minus.outgoing[nz], -plus.outgoing[nz])
        flipped = _canon(name, -V, -A)
        np.testing.assert_array_equal(flipped.vectors, plus.vectors)
        np.testing.assert_array_equal(flipped.outgoing[nz], plus.outgoing[nz])  # a zero v has no sign
    else:  # even+linear: the outgoing weight keeps its sign
        np.testing.assert_array_equal(minus.outgoing, plus.outgoing)


@pytest.mark.parametrize("name", NONE_NAMES)
@PROPS
@given(data=layers())
def test_class_none_leaves_neurons_unchanged(name, data):
    V, A, _ = data
    can = _canon(name, V, A)
    np.testing.assert_array_equal(can.vectors, V)
    np.testing.assert_array_equal(can.outgoing, A)
    assert np.all(can.sign == 1.0) and np.all(can.scale == 1.0) and np.all(can.affine == 0.0)
    minus = _canon(name, -V, A)
    np.testing.assert_array_equal(minus.vectors, -V)


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_outgoing_flips_with_the_vector(name):
    V = np.array([[-2.0, 1.0, 0.5], [3.0, -1.0, 0.0]])  # first row has a negative pivot
    A = np.array([[1.5], [-0.25]])
    can = _canon(name, V, A)
    np.testing.assert_array_equal(can.sign, [-1.0, 1.0])
    np.testing.assert_array_equal(can.vectors, [[2.0, -1.0, -0.5], [3.0, -1.0, 0.0]])
    np.testing.assert_array_equal(can.outgoing, [[-1.5], [-0.25]])
    # sigmoid(−z) = 1 − sigmoid(z): the flipped neuron's a moves into the bias row of the affine term
    expected_bias = 1.5 if REGISTRY[name].symmetry.constant_shift else 0.0
    np.testing.assert_array_equal(can.affine, [[0.0], [0.0], [expected_bias]])


@pytest.mark.parametrize("name", EVEN_NAMES)
def test_even_linear_outgoing_kept_and_linear_term_added(name):
    act = REGISTRY[name]
    V = np.array([[-2.0, 1.0, 0.5], [3.0, -1.0, 0.0]])
    A = np.array([[1.5], [-0.25]])
    can = _canon(name, V, A)
    np.testing.assert_array_equal(can.sign, [-1.0, 1.0])
    scale = np.linalg.norm(V[0]) if act.symmetry.scaling else 1.0
    np.testing.assert_allclose(can.outgoing[0], A[0] * scale, rtol=1e-15)
    # a·σ(vᵀx̃) = a·σ(−vᵀx̃) + 2c·a·vᵀx̃ (only the flipped first row contributes)
    np.testing.assert_allclose(can.affine[:, 0], 2 * act.linear_coef * A[0, 0] * V[0], rtol=1e-15)


@pytest.mark.parametrize("name", SCALING_NAMES)
@PROPS
@given(data=layers(), alpha=hnp.arrays(np.float64, 8, elements=st.floats(1e-3, 1e3)))
def test_positive_scaling_maps_to_one_unit_vector(name, data, alpha):
    V, A, _ = data
    nz = _nonzero_rows(V)
    assume(nz.any())
    V, A = V[nz], A[nz]
    al = alpha[: len(V), None]
    base, scaled = _canon(name, V, A), _canon(name, al * V, A / al)
    np.testing.assert_allclose(np.linalg.norm(base.vectors, axis=1), 1.0, rtol=0, atol=1e-15)
    np.testing.assert_allclose(scaled.vectors, base.vectors, rtol=0, atol=1e-15)
    norms = np.linalg.norm(V, axis=1)
    np.testing.assert_allclose(base.scale, norms, rtol=1e-15)
    np.testing.assert_allclose(base.outgoing, A * norms[:, None], rtol=1e-15)  # no sign flip: even class
    np.testing.assert_allclose(scaled.outgoing, A * norms[:, None], rtol=1e-13)


@pytest.mark.parametrize("name", SIGN_NAMES)
@PROPS
@given(data=layers())
def test_distance_is_zero_between_v_and_minus_v(name, data):
    V, _, _ = data
    V = V[_nonzero_rows(V)]
    assume(len(V) > 0)
    sym = REGISTRY[name].symmetry
    D = sym.distance(V, -V)
    assert D.shape == (len(V), len(V))
    np.testing.assert_allclose(np.diag(D), 0.0, rtol=0, atol=1e-14)
    # and between a neuron and its canonical form
    np.testing.assert_allclose(np.diag(sym.distance(V, _canon(name, V).vectors)), 0.0, rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", NONE_NAMES)
@PROPS
@given(data=layers(), more=st.data())
def test_distance_is_one_minus_cos_without_sign_symmetry(name, data, more):
    U = data[0]
    U = U[_nonzero_rows(U)]
    assume(len(U) > 0)
    W = more.draw(hnp.arrays(np.float64, (3, U.shape[1]), elements=ELEMENTS))
    W = W[_nonzero_rows(W)]
    assume(len(W) > 0)
    sym = REGISTRY[name].symmetry
    np.testing.assert_allclose(np.diag(sym.distance(U, -U)), 2.0, rtol=0, atol=1e-14)
    cos = np.array([[u @ w / np.linalg.norm(u) / np.linalg.norm(w) for w in W] for u in U])
    np.testing.assert_allclose(sym.distance(U, W), 1 - cos, rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", SIGN_NAMES)
def test_distance_is_one_minus_abs_cos_with_sign_symmetry(name):
    rng = np.random.default_rng(3)
    U, W = rng.standard_normal((4, 5)), rng.standard_normal((6, 5))
    cos = (U / np.linalg.norm(U, axis=1, keepdims=True)) @ (W / np.linalg.norm(W, axis=1, keepdims=True)).T
    np.testing.assert_allclose(REGISTRY[name].symmetry.distance(U, W), 1 - np.abs(cos), rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
@PROPS
@given(data=layers(), perm_seed=st.integers(0, 2**32 - 1))
def test_permuting_neurons_permutes_the_canonical_form(name, data, perm_seed):
    V, A, _ = data
    p = np.random.default_rng(perm_seed).permutation(len(V))
    base, perm = _canon(name, V, A), _canon(name, V[p], A[p])
    np.testing.assert_array_equal(perm.vectors, base.vectors[p])
    np.testing.assert_array_equal(perm.outgoing, base.outgoing[p])
    np.testing.assert_array_equal(perm.sign, base.sign[p])
    np.testing.assert_array_equal(perm.scale, base.scale[p])
    # the affine term is a sum over neurons: the same up to the order of summation
    size = np.abs(base.affine).max() if base.affine.size else 0.0
    np.testing.assert_allclose(perm.affine, base.affine, rtol=0, atol=1e-13 * (1 + size))


@pytest.mark.parametrize("name", NAMES)
def test_without_outgoing_weights(name):
    V = np.random.default_rng(0).standard_normal((5, 4))
    can = _canon(name, V)
    assert can.outgoing.shape == (5, 0) and can.affine.shape == (4, 0)
    np.testing.assert_array_equal(can.vectors, _canon(name, V, np.ones((5, 2))).vectors)


@pytest.mark.parametrize("name", NAMES)
def test_float32_input_keeps_float32(name):
    V = np.random.default_rng(1).standard_normal((6, 3)).astype(np.float32)
    can = _canon(name, V, np.ones((6, 1), np.float32))
    assert can.vectors.dtype == np.float32
    ref = _canon(name, V.astype(np.float64), np.ones((6, 1)))
    np.testing.assert_allclose(can.vectors, ref.vectors, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_empty_layer_without_outgoing(name):
    can = _canon(name, np.zeros((0, 4)))
    assert can.vectors.shape == (0, 4) and can.outgoing.shape == (0, 0) and can.affine.shape == (4, 0)


@pytest.mark.parametrize("name", ["tanh", "relu"])
def test_empty_layer_with_outgoing(name):
    can = _canon(name, np.zeros((0, 4)), np.zeros((0, 2)))
    assert can.vectors.shape == (0, 4) and can.outgoing.shape == (0, 2) and can.affine.shape == (4, 2)
    assert np.all(can.affine == 0)
