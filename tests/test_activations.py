"""Activations: closed-form derivatives, the registry's error message, and the symmetry identities
(odd, odd + constant, even + linear) that the symmetry classes rely on."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ecdist
from ecdist import activations
from ecdist.activations import REGISTRY

NAMES = sorted(REGISTRY)
KINKED = {"relu", "leaky_relu"}  # not differentiable at exactly 0
EVEN_LINEAR_NAMES = {"softplus", "gelu", "silu", "relu", "leaky_relu"}


def _points(name: str) -> torch.Tensor:
    """Many float64 points: a dense grid over [-10, 10], and a cloud close to 0 on both sides."""
    rng = np.random.default_rng(0)
    grid = np.linspace(-10.0, 10.0, 2001)
    near0 = np.concatenate([rng.uniform(-1e-3, 1e-3, 500), np.logspace(-12, -1, 100), -np.logspace(-12, -1, 100)])
    z = np.concatenate([grid, near0])
    if name in KINKED:
        z = z[z != 0.0]
    else:
        z = np.concatenate([z, [0.0]])
    return torch.as_tensor(z, dtype=torch.float64)


@pytest.mark.parametrize("name", NAMES)
def test_grad_matches_autograd(name):
    act = REGISTRY[name]
    z = _points(name).requires_grad_(True)
    (expected,) = torch.autograd.grad(act.fn(z).sum(), z)
    got = act.grad(z.detach())
    assert got.dtype == torch.float64
    assert got.shape == z.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_registry_entry_is_consistent(name):
    act = REGISTRY[name]
    assert act.name == name
    assert activations.get(name) is act
    assert activations.get(act) is act  # an Activation passes through
    z = torch.linspace(-3, 3, 7, dtype=torch.float64)
    torch.testing.assert_close(act(z), act.fn(z), rtol=0, atol=0)


@pytest.mark.parametrize("bad", ["nope", "Tanh", "", None, 3, ["tanh"]])
def test_unknown_activation_raises_config_error_listing_known_names(bad):
    with pytest.raises(ecdist.ConfigError) as info:
        activations.get(bad)
    msg = str(info.value)
    assert "activation" in msg
    for known in REGISTRY:
        assert known in msg


def test_unknown_activation_error_is_an_ecdist_error():
    with pytest.raises(ecdist.EcdistError):
        activations.get("swish-ish")


def test_even_linear_classes_are_the_expected_ones():
    linear = {n for n, a in REGISTRY.items() if a.symmetry.linear_shift}
    assert linear == EVEN_LINEAR_NAMES
    for n, a in REGISTRY.items():
        if n not in EVEN_LINEAR_NAMES:
            assert a.linear_coef == 0.0


@pytest.mark.parametrize("name", sorted(EVEN_LINEAR_NAMES))
@settings(max_examples=60, deadline=None)
@given(z=st.floats(min_value=-15.0, max_value=15.0, allow_nan=False, allow_infinity=False))
def test_even_linear_identity(name, z):
    """σ(z) − σ(−z) = 2c·z: the covert linear symmetry the affine term absorbs."""
    act = REGISTRY[name]
    zt = torch.tensor([z, -z], dtype=torch.float64)
    f = act.fn(zt)
    lhs = float(f[0] - f[1])
    rhs = 2 * act.linear_coef * z
    assert abs(lhs - rhs) <= 1e-13 * (1 + abs(float(f[0])) + abs(float(f[1])))


@pytest.mark.parametrize("name", sorted(EVEN_LINEAR_NAMES))
def test_even_linear_coef_dense_grid(name):
    act = REGISTRY[name]
    z = torch.linspace(-12, 12, 4001, dtype=torch.float64)
    torch.testing.assert_close(act.fn(z) - act.fn(-z), 2 * act.linear_coef * z, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", [n for n in NAMES if REGISTRY[n].symmetry.flips_outgoing])
def test_odd_classes_are_odd_up_to_their_constant(name):
    """tanh, identity: σ(−z) = −σ(z); sigmoid: σ(−z) = 1 − σ(z) (the constant shift)."""
    act = REGISTRY[name]
    z = torch.linspace(-12, 12, 2001, dtype=torch.float64)
    const = 1.0 if act.symmetry.constant_shift else 0.0
    torch.testing.assert_close(act.fn(-z), const - act.fn(z), rtol=1e-12, atol=1e-14)


def test_g_has_no_sign_symmetry():
    """g is the symmetry-free control: neither odd, odd+constant nor even+linear."""
    act = REGISTRY["g"]
    assert not act.symmetry.sign
    z = torch.linspace(-3, 3, 61, dtype=torch.float64)
    f, fm = act.fn(z), act.fn(-z)
    d = f - fm
    assert not torch.allclose(fm, -f)
    assert not torch.allclose(fm, 1 - f)
    # not of the form 2c·z for any c: the ratio (σ(z) − σ(−z)) / z is not constant
    ratio = d[z != 0] / z[z != 0]
    assert float(ratio.max() - ratio.min()) > 0.1


@pytest.mark.parametrize("name", sorted(KINKED))
def test_positive_homogeneity_of_scaling_classes(name):
    act = REGISTRY[name]
    assert act.symmetry.scaling
    z = torch.linspace(-5, 5, 101, dtype=torch.float64)
    for alpha in (0.25, 3.0, 17.5):
        torch.testing.assert_close(act.fn(alpha * z), alpha * act.fn(z), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("name", ["softplus", "g"])
def test_grad_matches_autograd_beyond_softplus_threshold(name):
    act = REGISTRY[name]
    z = torch.linspace(20.5, 30.0, 200, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(act.fn(z).sum(), z)
    torch.testing.assert_close(act.grad(z.detach()), expected, rtol=1e-12, atol=1e-14)
