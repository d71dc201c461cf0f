"""StudentPack: closed-form Jacobian and normal equations against autograd, pack-split-independent
initialisation, Levenberg–Marquardt and Adam training, checkpoint state, and neuron read-out."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ecdist
from ecdist.queries import Standardizer
from ecdist.students import (
    ACTIVE,
    CONVERGED,
    STALLED,
    AdamOptions,
    LMOptions,
    StudentPack,
    fit_adam,
    fit_lm,
    n_params,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The test machine has two shared cores: one torch thread avoids oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_pack(widths, activation, k=3, seed=0, skip=False, scale=1.0):
    """A pack with arbitrary (not initialised-by-init) parameters, so every code path sees O(1) values."""
    gen = torch.Generator().manual_seed(seed)
    theta = scale * torch.randn(k, n_params(widths, skip), generator=gen, dtype=torch.float64)
    return StudentPack(theta, widths, activation, ids=list(range(10, 10 + k)), skip=skip)


def random_X(n, d, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64)


def autograd_jacobian(pack: StudentPack, X: torch.Tensor) -> torch.Tensor:
    """(k, n·d_out, P) from torch.autograd of ``forward``: each student's own diagonal block."""
    theta = pack.theta.clone()
    J = torch.autograd.functional.jacobian(lambda t: pack.forward(X, t), theta)  # (k, n, o, k, P)
    k, n, o = J.shape[:3]
    diag = torch.stack([J[s, :, :, s, :] for s in range(k)])  # (k, n, o, P)
    return diag.reshape(k, n * o, -1)


# ----- n_params ---------------------------------------------------------------------------------
def test_n_params_counts_weights_biases_and_skip():
    # [3, 4, 2]: hidden 4·(3+1) = 16, output 2·(4+1) = 10; skip adds 2·3
    assert n_params([3, 4, 2]) == 26
    assert n_params([3, 4, 2], skip=True) == 32
    # two hidden layers [2, 3, 5, 1]: 3·3 + 5·4 + 1·6
    assert n_params([2, 3, 5, 1]) == 9 + 20 + 6


def test_pack_rejects_theta_of_wrong_shape():
    with pytest.raises(ValueError, match="theta has shape"):
        StudentPack(torch.zeros(2, 5, dtype=torch.float64), [3, 4, 1], "tanh", ids=[0, 1])


# ----- Jacobian -----------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "softplus", "gelu", "silu", "relu", "leaky_relu", "g"])
@pytest.mark.parametrize("widths", [[3, 4, 1], [3, 4, 3], [2, 3, 4, 1], [2, 3, 4, 3]], ids=str)
def test_jacobian_matches_autograd(activation, widths):
    pack = random_pack(widths, activation, k=3)
    X = random_X(7, widths[0])
    J, out = pack.jacobian(X)
    assert J.shape == (3, 7 * widths[-1], pack.n_params)
    torch.testing.assert_close(out, pack.forward(X), rtol=0, atol=0)
    torch.testing.assert_close(J, autograd_jacobian(pack, X), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ["softplus", "relu", "tanh"])
@pytest.mark.parametrize("widths", [[3, 4, 1], [3, 4, 2], [2, 3, 4, 2]], ids=str)
def test_jacobian_with_skip_path_matches_autograd(activation, widths):
    pack = random_pack(widths, activation, k=2, skip=True)
    X = random_X(6, widths[0])
    # the skip path really contributes to the output (so its Jacobian columns are exercised)
    no_skip = StudentPack(pack.theta[:, : n_params(widths)].clone(), widths, activation, ids=pack.ids)
    assert not torch.allclose(pack.forward(X), no_skip.forward(X))
    J, _ = pack.jacobian(X)
    torch.testing.assert_close(J, autograd_jacobian(pack, X), rtol=1e-12, atol=1e-12)


# ----- Adam's gradient --------------------------------------------------------------------------
def autograd_loss_grad(pack: StudentPack, X: torch.Tensor, Y: torch.Tensor):
    theta = pack.theta.detach().clone().requires_grad_(True)
    r = pack.forward(X, theta) - Y
    losses = (r * r).mean(dim=(1, 2))
    losses.sum().backward()
    return losses.detach(), theta.grad


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "softplus", "relu", "g"])
@pytest.mark.parametrize("widths", [[3, 4, 1], [3, 4, 3], [2, 3, 4, 1], [2, 3, 4, 5, 2]], ids=str)
@pytest.mark.parametrize("skip", [False, True])
def test_loss_grad_matches_autograd(activation, widths, skip):
    pack = random_pack(widths, activation, k=3, skip=skip)
    X, Y = random_X(9, widths[0]), random_X(9, widths[-1], seed=2)
    grad = torch.full_like(pack.theta, float("nan"))  # every entry must be written
    losses = pack.loss_grad(X, Y, pack.theta, grad)
    want_losses, want_grad = autograd_loss_grad(pack, X, Y)
    torch.testing.assert_close(losses, want_losses, rtol=1e-13, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-14)


def test_loss_grad_of_one_student_is_its_row_in_any_pack():
    pack = random_pack([4, 5, 3, 2], "tanh", k=5)
    X, Y = random_X(11, 4), random_X(11, 2, seed=2)
    grad = torch.empty_like(pack.theta)
    losses = pack.loss_grad(X, Y, pack.theta, grad)
    for rows in ([2], [4, 0], [1, 3, 2]):
        g = torch.empty_like(pack.theta[rows])
        part = pack.loss_grad(X, Y, pack.theta[rows], g)
        assert torch.equal(part, losses[rows]) and torch.equal(g, grad[rows]), rows


@pytest.mark.parametrize("widths", [[3, 4, 1], [3, 4, 3], [2, 3, 4, 1], [2, 3, 4, 5, 2]], ids=str)
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_curvature_pull_is_Jt_times_the_second_derivative_along_the_step(widths, skip, k):
    """Jᵀr″ against autograd: r″ = d²f(θ + t·step)/dt² at t = 0, per student."""
    from torch.func import jacfwd

    pack = random_pack(widths, "tanh", k=k, skip=skip)
    X = random_X(13, widths[0])
    step = 0.005 * random_X(k, pack.n_params, seed=3)
    pull = pack.curvature_pull(X, pack.theta, step)
    J = autograd_jacobian(pack, X)
    for i in range(k):
        along = lambda t: pack.forward(X, (pack.theta[i] + t * step[i])[None])[0].reshape(-1)  # noqa: E731
        rpp = jacfwd(jacfwd(along))(torch.zeros((), dtype=torch.float64))
        want = J[i].T @ rpp
        assert float((pull[i] - want).norm() / want.norm()) < 1e-3  # central difference: O(s²), s = ‖step‖/10


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-3), (torch.float32, 1e-2)])
def test_curvature_pull_of_a_tiny_step_is_not_rounding_noise(dtype, tol):
    """Near a minimum LM steps are ~1e-10; the difference is taken at s ≥ ε^¼ of the dtype, not at
    the step (measured in float32: relative error 1.3e-3; with float64's floor of 1e-4, 20)."""
    from torch.func import jacfwd

    pack = random_pack([3, 5, 4, 2], "tanh", k=2)
    X = random_X(17, 3)
    step = 1e-10 * random_X(2, pack.n_params, seed=4)
    low = StudentPack(pack.theta.to(dtype), pack.widths, "tanh", pack.ids)
    pull = low.curvature_pull(X.to(dtype), low.theta, step.to(dtype)).double()
    J = autograd_jacobian(pack, X)
    along = lambda t: pack.forward(X, (pack.theta[0] + t * step[0])[None])[0].reshape(-1)  # noqa: E731
    want = J[0].T @ jacfwd(jacfwd(along))(torch.zeros((), dtype=torch.float64))
    assert float((pull[0] - want).norm() / want.norm()) < tol


def test_jacobian_of_a_subset_theta():
    pack = random_pack([3, 4, 2], "tanh", k=4)
    X = random_X(5, 3)
    sub = pack.theta[[1, 3]]
    J_sub, out_sub = pack.jacobian(X, sub)
    J_all, out_all = pack.jacobian(X)
    torch.testing.assert_close(J_sub, J_all[[1, 3]], rtol=0, atol=0)
    torch.testing.assert_close(out_sub, out_all[[1, 3]], rtol=0, atol=0)


# ----- normal equations ---------------------------------------------------------------------------
def reference_normal_equations(pack, X, Y, theta=None):
    J, out = pack.jacobian(X, theta)
    r = (out - Y).reshape(J.shape[0], -1, 1)
    return J.transpose(1, 2) @ J, (J.transpose(1, 2) @ r).squeeze(-1)


def assert_rel_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-12) -> None:
    err = (a - b).abs().max().item()
    assert err <= rel * b.abs().max().item(), f"max abs error {err:.3e} vs scale {b.abs().max().item():.3e}"


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "softplus", "gelu", "relu", "leaky_relu", "g"])
@pytest.mark.parametrize("d_out", [1, 3])
@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
def test_normal_equations_fast_path_equals_JtJ(activation, d_out, skip):
    """The structured one-hidden-layer path, with and without the affine skip path (which
    reconstruction fine-tunes for the even+linear classes), against JᵀJ of the Jacobian."""
    widths = [3, 4, d_out]
    pack = random_pack(widths, activation, k=3, seed=2, skip=skip)
    X = random_X(50, 3, seed=3)
    Y = random_X(50, d_out, seed=4)
    JtJ, g = pack.normal_equations(X, Y)
    ref_JtJ, ref_g = reference_normal_equations(pack, X, Y)
    assert JtJ.shape == (3, pack.n_params, pack.n_params) and g.shape == (3, pack.n_params)
    assert_rel_close(JtJ, ref_JtJ)
    assert_rel_close(g, ref_g)
    single, g1 = pack.normal_equations(X, Y, pack.theta[2:3])  # a lone student, as reconstruction has
    assert_rel_close(single[0], ref_JtJ[2])
    assert_rel_close(g1[0], ref_g[2])


@pytest.mark.parametrize("step", [1, 7, 13, 49, 50, 1000])
@pytest.mark.parametrize("skip", [False, True], ids=["plain", "skip"])
def test_normal_equations_fast_path_chunking(step, skip):
    """Chunks that split the 50 queries unevenly (7, 13, 49) give the same sums as one chunk."""
    widths = [3, 4, 2]
    k, h, d1 = 3, 4, 4
    per_query = k * (h * (h + 1) // 2 + h * d1)  # the fast path's elements per query
    pack = random_pack(widths, "tanh", k=k, seed=5, skip=skip)
    X, Y = random_X(50, 3, seed=6), random_X(50, 2, seed=7)
    JtJ, g = pack.normal_equations(X, Y, chunk_elems=step * per_query)
    ref_JtJ, ref_g = reference_normal_equations(pack, X, Y)
    assert_rel_close(JtJ, ref_JtJ)
    assert_rel_close(g, ref_g)


@pytest.mark.parametrize(
    "skip,widths", [(False, [2, 3, 4, 2]), (True, [3, 4, 2]), (True, [2, 3, 4, 2])], ids=["deep", "skip", "deep-skip"]
)
@pytest.mark.parametrize("chunk_elems", [1, 500, 2**22])
def test_normal_equations_general_path(skip, widths, chunk_elems):
    pack = random_pack(widths, "softplus", k=2, seed=8, skip=skip)
    X, Y = random_X(23, widths[0], seed=9), random_X(23, widths[-1], seed=10)
    JtJ, g = pack.normal_equations(X, Y, chunk_elems=chunk_elems)
    ref_JtJ, ref_g = reference_normal_equations(pack, X, Y)
    assert_rel_close(JtJ, ref_JtJ)
    assert_rel_close(g, ref_g)


@pytest.mark.parametrize("activation", ["tanh", "relu", "g"])
@pytest.mark.parametrize("widths", [[3, 5, 2, 1], [4, 3, 6, 2, 3]], ids=["2-hidden-1-out", "3-hidden"])
@pytest.mark.parametrize("chunk_elems", [1, 300, 2**22])
def test_normal_equations_deep_path_equals_JtJ(activation, widths, chunk_elems):
    """The structured deep path (no J formed) against JᵀJ of the closed-form Jacobian, which
    test_jacobian_matches_autograd checks; chunks of one query, a few and all of them."""
    pack = random_pack(widths, activation, k=3, seed=17)
    X, Y = random_X(29, widths[0], seed=18), random_X(29, widths[-1], seed=19)
    JtJ, g = pack.normal_equations(X, Y, chunk_elems=chunk_elems)
    ref_JtJ, ref_g = reference_normal_equations(pack, X, Y)
    assert JtJ.shape == (3, pack.n_params, pack.n_params)
    assert_rel_close(JtJ, ref_JtJ)
    assert_rel_close(g, ref_g)
    single, _ = pack.normal_equations(X, Y, pack.theta[1:2], chunk_elems=chunk_elems)  # a lone student
    assert_rel_close(single[0], ref_JtJ[1])


def test_normal_equations_for_a_subset_of_students():
    pack = random_pack([3, 5, 2], "gelu", k=4, seed=11)
    X, Y = random_X(30, 3, seed=12), random_X(30, 2, seed=13)
    sub = pack.theta[[0, 2]]
    JtJ, g = pack.normal_equations(X, Y, sub)
    ref_JtJ, ref_g = reference_normal_equations(pack, X, Y, sub)
    assert JtJ.shape[0] == 2
    assert_rel_close(JtJ, ref_JtJ)
    assert_rel_close(g, ref_g)


def test_gradient_is_half_the_gradient_of_the_summed_squared_error():
    """Jᵀr is ½ ∇_θ Σ r² — checked against autograd of the loss, independently of ``jacobian``."""
    pack = random_pack([3, 4, 2], "tanh", k=2, seed=14)
    X, Y = random_X(20, 3, seed=15), random_X(20, 2, seed=16)
    theta = pack.theta.clone().requires_grad_(True)
    ((pack.forward(X, theta) - Y) ** 2).sum().backward()
    _, g = pack.normal_equations(X, Y)
    assert_rel_close(g, theta.grad / 2)


# ----- initialisation -----------------------------------------------------------------------------
def test_init_does_not_depend_on_the_pack_split():
    widths = [4, 6, 2]
    whole = StudentPack.init(widths, "tanh", list(range(6)), seed=3)
    first = StudentPack.init(widths, "tanh", [0, 1, 2], seed=3)
    second = StudentPack.init(widths, "tanh", [3, 4, 5], seed=3)
    assert torch.equal(whole.theta, torch.cat([first.theta, second.theta]))
    alone = StudentPack.init(widths, "tanh", [4], seed=3)
    assert torch.equal(alone.theta[0], whole.theta[4])
    # students differ from one another, and the seed matters
    assert not torch.equal(whole.theta[0], whole.theta[1])
    assert not torch.equal(StudentPack.init(widths, "tanh", [0], seed=4).theta[0], whole.theta[0])


def test_init_layout_and_scales():
    widths = [50, 40, 2]
    pack = StudentPack.init(widths, "tanh", list(range(20)), seed=0)
    assert pack.theta.dtype == torch.float64 and pack.theta.shape == (20, n_params(widths))
    assert torch.all(pack.bias(1) == 0)  # output bias starts at 0
    # hidden weights N(0, 1/fan_in): variance near 1/50 over 20·40·50 entries
    var_w = pack.weight(0).var().item()
    assert 0.9 / 50 < var_w < 1.1 / 50
    var_b = pack.bias(0).var().item()  # N(0, 1) hidden biases over 800 entries
    assert 0.8 < var_b < 1.2
    assert pack.status.tolist() == [ACTIVE] * 20 and np.all(np.isinf(pack.rel_loss))


def test_init_float32_dtype():
    pack = StudentPack.init([3, 4, 1], "tanh", [0, 1], seed=0, dtype=torch.float32)
    ref = StudentPack.init([3, 4, 1], "tanh", [0, 1], seed=0)
    assert pack.theta.dtype == torch.float32
    torch.testing.assert_close(pack.theta.double(), ref.theta, rtol=1e-6, atol=1e-7)


def test_layer_views_share_storage_with_theta():
    pack = StudentPack.init([3, 4, 2], "tanh", [0, 1], seed=0)
    assert pack.weight(0).shape == (2, 4, 3) and pack.bias(0).shape == (2, 4)
    assert pack.weight(1).shape == (2, 2, 4) and pack.bias(1).shape == (2, 2)
    with torch.no_grad():
        pack.weight(0)[1, 2, 0] = 123.0
    # the first layer is stored neuron by neuron as [w | b]: neuron 2, input 0 is column 2·4 + 0
    assert pack.theta[1, 8].item() == 123.0


def test_forward_matches_a_hand_written_network():
    pack = random_pack([3, 4, 2], "tanh", k=2)
    X = random_X(5, 3)
    for s in range(2):
        W1, b1 = pack.weight(0)[s], pack.bias(0)[s]
        W2, b2 = pack.weight(1)[s], pack.bias(1)[s]
        expected = torch.tanh(X @ W1.T + b1) @ W2.T + b2
        torch.testing.assert_close(pack.forward(X)[s], expected, rtol=1e-14, atol=1e-14)


# ----- training -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_problem():
    """A teacher 5-2-1 (tanh) that students of width 4 represent exactly; standardised data."""
    teacher = ecdist.teachers.random_mlp([5, 2, 1], "tanh", seed=0)
    X = ecdist.queries.gaussian(500, 5, seed=1)
    Y = ecdist.teachers.query(teacher, X)
    Xs, Ys = Standardizer.fit(X)(X), Standardizer.fit(Y)(Y)
    return torch.as_tensor(Xs), torch.as_tensor(Ys)


def test_fit_lm_reaches_machine_precision(tiny_problem):
    X, Y = tiny_problem
    pack = StudentPack.init([5, 4, 1], "tanh", list(range(8)), seed=0)
    start = pack.mse(X, Y).numpy()
    events = []
    fit_lm(pack, X, Y, LMOptions(max_iter=300), progress=lambda *a: events.append(a))
    rel = pack.mse(X, Y).numpy()
    np.testing.assert_allclose(pack.rel_loss, rel, rtol=1e-6, atol=1e-300)  # rel_loss is the true MSE
    assert np.all(rel <= start)  # LM only accepts steps that lower the loss
    assert (rel < 1e-20).sum() >= 5, rel  # most of the 8 students are exact
    assert np.all(pack.status[rel <= 1e-24] == CONVERGED)
    assert (pack.status == CONVERGED).sum() >= 5, pack.status
    assert np.all(rel[pack.status == CONVERGED] < 1e-14)  # converged means precise
    assert not np.any(pack.status == ACTIVE) or pack.steps == 300
    # one progress event and one history row per iteration (plus the starting row)
    assert len(events) == pack.steps and events[-1][0] == "lm"
    assert len(pack.history) == pack.steps + 1 and pack.history_steps == list(range(pack.steps + 1))


def test_fit_lm_keeps_g_students_bounded_and_precise():
    """g = σ(4z) + softplus(z), teacher 10-4-1, 8 students of width 16, 300 plain LM iterations.

    Under Marquardt's diag(JᵀJ) damping, neurons with tiny outgoing weights (near-zero Jacobian
    columns) took huge steps and ran off to ‖[w; b]‖ of 26–168, where g is a ReLU plus a step;
    their students crawled (best 1.7e-7, median 8.6e-6). Levenberg's damping keeps every neuron
    below norm 10 and the students converge (best ~1e-31, median ~1e-8)."""
    teacher = ecdist.teachers.random_mlp([10, 4, 1], "g", seed=0)
    X = ecdist.queries.gaussian(1000, 10, seed=10)
    Y = ecdist.teachers.query(teacher, X)
    X, Y = torch.as_tensor(Standardizer.fit(X)(X)), torch.as_tensor(Standardizer.fit(Y)(Y))
    pack = StudentPack.init([10, 16, 1], "g", list(range(8)), seed=0)
    fit_lm(pack, X, Y, LMOptions(max_iter=300, stall_window=10**6, restarts=0))
    rel = pack.mse(X, Y).numpy()
    assert rel.min() < 1e-20, rel
    assert np.median(rel) < 1e-6, rel
    assert pack.block(0).norm(dim=2).max() < 20


@pytest.fixture(scope="module")
def deep_problem():
    """A deep tanh teacher 6-4-3-1 and students 6-12-9-1 on 600 Gaussian queries: plain LM crawls
    along curved valleys here (measured: 4 students, 300 iterations, worst 3e-5; geodesic 1e-15)."""
    teacher = ecdist.teachers.random_mlp([6, 4, 3, 1], "tanh", seed=22)
    X = ecdist.queries.gaussian(600, 6, seed=1)
    Y = ecdist.teachers.query(teacher, X)
    return torch.as_tensor(Standardizer.fit(X)(X)), torch.as_tensor(Standardizer.fit(Y)(Y))


def test_fit_lm_geodesic_acceleration_follows_deep_valleys(deep_problem):
    """Same students, same 300 iterations: with geodesic acceleration every one gets below 1e-14, and
    the worst does better than plain LM's worst."""
    X, Y = deep_problem
    opts = LMOptions(max_iter=300, tol=1e-28, stall_window=10**6, restarts=0)
    plain = fit_lm(StudentPack.init([6, 12, 9, 1], "tanh", list(range(4)), seed=0), X, Y, opts)
    geo = fit_lm(StudentPack.init([6, 12, 9, 1], "tanh", list(range(4)), seed=0), X, Y,
                 dataclasses.replace(opts, geodesic=True))
    assert geo.rel_loss.max() < 1e-14, geo.rel_loss  # the stall level: precise
    assert geo.rel_loss.max() < plain.rel_loss.max(), (geo.rel_loss, plain.rel_loss)
    np.testing.assert_allclose(geo.rel_loss, geo.mse(X, Y).numpy(), rtol=1e-6, atol=1e-300)


def test_fit_lm_geodesic_rejects_steps_whose_path_bends_too_much(deep_problem):
    """geodesic_alpha bounds ‖a‖/‖δ‖: at 0 every step is refused and the damping runs up to its cap."""
    X, Y = deep_problem
    pack = StudentPack.init([6, 12, 9, 1], "tanh", [0, 1], seed=0)
    start = pack.mse(X, Y).numpy()
    fit_lm(pack, X, Y, LMOptions(max_iter=5, restarts=0, geodesic=True, geodesic_alpha=0.0))
    np.testing.assert_array_equal(pack.rel_loss, start)
    assert np.all(pack.status == STALLED) and np.all(pack.lam >= LMOptions().lam_max)


def test_fit_lm_damping_options(tiny_problem):
    X, Y = tiny_problem
    for damping in ("levenberg", "marquardt"):
        pack = fit_lm(StudentPack.init([5, 4, 1], "tanh", [0, 1], seed=0), X, Y, LMOptions(max_iter=5, damping=damping))
        assert np.all(pack.rel_loss < 0.9 * StudentPack.init([5, 4, 1], "tanh", [0, 1], seed=0).mse(X, Y).numpy())
    with pytest.raises(ValueError, match="damping"):
        fit_lm(StudentPack.init([5, 4, 1], "tanh", [0], seed=0), X, Y, LMOptions(max_iter=1, damping="other"))


def test_fit_lm_is_deterministic_and_split_independent(tiny_problem):
    X, Y = tiny_problem
    opts = LMOptions(max_iter=5)
    whole = fit_lm(StudentPack.init([5, 4, 1], "tanh", [0, 1, 2, 3], seed=0), X, Y, opts)
    again = fit_lm(StudentPack.init([5, 4, 1], "tanh", [0, 1, 2, 3], seed=0), X, Y, opts)
    assert torch.equal(whole.theta, again.theta)
    assert np.all(whole.rel_loss < 0.9 * StudentPack.init([5, 4, 1], "tanh", [0, 1, 2, 3], seed=0).mse(X, Y).numpy())


@pytest.mark.parametrize("threads", [1, 2])
def test_a_students_training_is_bitwise_the_same_in_any_pack(tiny_problem, threads):
    """With MKL_CBWR (set by ``import ecdist``) and lone students computed as pairs, a student's
    whole LM path — rounding included — does not depend on its pack, its row in the pack, the
    active set shrinking to one student, or the thread count: every backend recovers the same."""
    X, Y = tiny_problem
    opts = LMOptions(max_iter=60)
    whole = fit_lm(StudentPack.init([5, 6, 1], "tanh", list(range(6)), seed=0), X, Y, opts)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        parts = [fit_lm(StudentPack.init([5, 6, 1], "tanh", ids, seed=0), X, Y, opts) for ids in ([3, 1], [5], [0, 2, 4])]
    finally:
        torch.set_num_threads(before)
    for part in parts:
        for row, sid in enumerate(part.ids):
            assert torch.equal(part.theta[row], whole.theta[sid]), sid
            assert part.rel_loss[row] == whole.rel_loss[sid]


def test_fit_lm_skips_finished_students(tiny_problem):
    X, Y = tiny_problem
    pack = StudentPack.init([5, 4, 1], "tanh", [0, 1, 2], seed=0)
    pack.status[1] = CONVERGED
    before = pack.theta[1].clone()
    fit_lm(pack, X, Y, LMOptions(max_iter=5))
    assert torch.equal(pack.theta[1], before)
    assert not torch.equal(pack.theta[0], StudentPack.init([5, 4, 1], "tanh", [0], seed=0).theta[0])


def test_fit_adam_reduces_the_loss_and_records_history(tiny_problem):
    X, Y = tiny_problem
    pack = StudentPack.init([5, 4, 1], "tanh", [0, 1, 2], seed=0)
    start = pack.mse(X, Y).numpy()
    events, seen = [], []
    opts = AdamOptions(lr=1e-2, batch_size=64, max_epochs=45, log_every=10)
    fit_adam(pack, X, Y, opts, seed=0, progress=lambda *a: (events.append(a), seen.append(pack.theta.clone())))
    end = pack.mse(X, Y).numpy()
    assert np.all(end < 0.5 * start), (start, end)
    np.testing.assert_allclose(pack.rel_loss, end, rtol=1e-12)
    assert pack.steps == 45
    # logged after every 10th epoch — the steps at which a run folder checkpoints — and after the last
    assert pack.history_steps == [10, 20, 30, 40, 45]
    assert len(pack.history) == 5 and all(h.shape == (3,) for h in pack.history)
    assert [e[1] for e in events] == [10, 20, 30, 40, 45] and all(e[0] == "adam" for e in events)
    assert np.all(pack.status == ACTIVE)  # far from the tolerance
    # what a checkpoint taken in the callback holds: the weights of that epoch, each time new
    assert torch.equal(seen[-1], pack.theta) and all(not torch.equal(a, b) for a, b in zip(seen, seen[1:]))
    assert not torch.equal(seen[0], StudentPack.init([5, 4, 1], "tanh", [0, 1, 2], seed=0).theta)


def test_a_students_adam_path_is_bitwise_the_same_in_any_pack(tiny_problem):
    """Adam shares one minibatch order per seed, so, as for LM, a student's path does not depend
    on which pack (or actor) trains it."""
    X, Y = tiny_problem
    opts = AdamOptions(lr=1e-2, batch_size=64, max_epochs=6, log_every=2)
    whole = fit_adam(StudentPack.init([5, 6, 1], "tanh", list(range(5)), seed=0), X, Y, opts, seed=3)
    for ids in ([3, 1], [4], [0, 2]):
        part = fit_adam(StudentPack.init([5, 6, 1], "tanh", ids, seed=0), X, Y, opts, seed=3)
        for row, sid in enumerate(part.ids):
            assert torch.equal(part.theta[row], whole.theta[sid]), sid
            assert part.rel_loss[row] == whole.rel_loss[sid]


def test_fit_adam_same_seed_same_result(tiny_problem):
    X, Y = tiny_problem
    opts = AdamOptions(lr=1e-2, batch_size=64, max_epochs=5)
    a = fit_adam(StudentPack.init([5, 4, 1], "tanh", [0, 1], seed=0), X, Y, opts, seed=7)
    b = fit_adam(StudentPack.init([5, 4, 1], "tanh", [0, 1], seed=0), X, Y, opts, seed=7)
    c = fit_adam(StudentPack.init([5, 4, 1], "tanh", [0, 1], seed=0), X, Y, opts, seed=8)
    assert torch.equal(a.theta, b.theta)
    assert not torch.equal(a.theta, c.theta)  # the seed drives the minibatch order


# ----- state ----------------------------------------------------------------------------------------
def test_state_round_trips_exactly_through_npz(tiny_problem, tmp_path):
    X, Y = tiny_problem
    pack = fit_lm(StudentPack.init([5, 4, 1], "tanh", [3, 7, 9], seed=2), X, Y, LMOptions(max_iter=8))
    path = tmp_path / "pack.npz"
    np.savez(path, **pack.state())
    with np.load(path, allow_pickle=False) as z:
        state = {k: z[k] for k in z.files}
    back = StudentPack.from_state(state, "tanh")
    assert torch.equal(back.theta, pack.theta)
    assert back.widths == pack.widths and back.ids.tolist() == [3, 7, 9]
    assert back.skip_path is False
    np.testing.assert_array_equal(back.status, pack.status)
    np.testing.assert_array_equal(back.rel_loss, pack.rel_loss)
    np.testing.assert_array_equal(back.lam, pack.lam)
    np.testing.assert_array_equal(np.stack(back.history), np.stack(pack.history))
    assert back.history_steps == pack.history_steps and back.steps == pack.steps == 8
    torch.testing.assert_close(back.forward(X), pack.forward(X), rtol=0, atol=0)
    # continuing from the restored state is the same as continuing the original
    fit_lm(back, X, Y, LMOptions(max_iter=3))
    fit_lm(pack, X, Y, LMOptions(max_iter=3))
    assert torch.equal(back.theta, pack.theta)


def test_a_state_stays_the_step_it_was_taken_at(tiny_problem):
    """state() hands out copies: training on in place leaves a state already taken unchanged."""
    X, Y = tiny_problem
    pack = StudentPack.init([5, 4, 1], "tanh", [0, 1], seed=2)
    states = []
    fit_lm(pack, X, Y, LMOptions(max_iter=4), progress=lambda *_: states.append(pack.state()))
    first = StudentPack.from_state(states[0], "tanh")
    assert int(states[0]["steps"]) == 1 and first.steps == 1
    assert not np.array_equal(states[0]["theta"], pack.theta.numpy())
    assert not np.array_equal(states[0]["rel_loss"], pack.rel_loss)
    np.testing.assert_allclose(first.mse(X, Y).numpy(), states[0]["rel_loss"], rtol=1e-12)


def test_state_round_trip_with_skip_path():
    pack = random_pack([3, 4, 2], "softplus", k=2, skip=True)
    back = StudentPack.from_state(pack.state(), "softplus")
    assert back.skip_path is True
    assert torch.equal(back.skip(), pack.skip())
    X = random_X(4, 3)
    assert torch.equal(back.forward(X), pack.forward(X))


# ----- neurons ---------------------------------------------------------------------------------------
def test_layer_neurons_shapes_ids_and_contributions():
    widths = [3, 4, 2]
    pack = StudentPack.init(widths, "tanh", [5, 8, 9], seed=1)
    with torch.no_grad():
        pack.weight(1)[1, :, 2] = 0.0  # student 8's neuron 2 has no outgoing weight: pure debris
    X = random_X(40, 3)
    rows = pack.layer_neurons(X, 0)
    k, h, d = 3, 4, 3
    assert rows["vectors"].shape == (k * h, d + 1)
    assert rows["outgoing"].shape == (k * h, 2)
    assert rows["student_ids"].tolist() == [5] * 4 + [8] * 4 + [9] * 4
    assert rows["contribution"].shape == (k * h,) and np.all(rows["contribution"] >= 0)
    assert rows["contribution"][4 + 2] == 0.0
    for s in range(k):
        W, b = pack.weight(0)[s].numpy(), pack.bias(0)[s].numpy()
        A = pack.weight(1)[s].numpy()  # (out, h)
        np.testing.assert_array_equal(rows["vectors"][s * h : (s + 1) * h], np.hstack([W, b[:, None]]))
        np.testing.assert_array_equal(rows["outgoing"][s * h : (s + 1) * h], A.T)
        act = np.tanh(X.numpy() @ W.T + b)  # (n, h)
        expected = act.std(axis=0, ddof=1) * np.linalg.norm(A, axis=0)
        np.testing.assert_allclose(rows["contribution"][s * h : (s + 1) * h], expected, rtol=1e-12)


KEEP_HEAP_PROBE = """
import resource, torch
from ecdist.students import keep_heap
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):  # a stacked step's pattern: 13 MB activations alive across forward and backward
        z = torch.empty(200, 512, 16, dtype=torch.float64).fill_(1.0)
        h = torch.tanh(z)
        g = torch.empty(200, 512, 16, dtype=torch.float64).fill_(2.0)
        del z
        gz = g * h
        del h, g, gz
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
plain = faults()
kept = keep_heap()
print(plain, faults(), kept)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc heap tuning")
def test_keep_heap_stops_page_faults_on_step_sized_buffers():
    """Freed 13 MB activations come back from the heap, not as fresh pages (half a step's time)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", KEEP_HEAP_PROBE], capture_output=True, text=True, env=env, check=True)
    plain, kept, ok = out.stdout.split()
    assert ok == "True"
    assert int(plain) > 4 * 3200  # buffers of 3,200 pages each faulted in anew, again and again
    assert int(kept) < int(plain) / 10


def test_keep_heap_respects_user_malloc_settings():
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    code = "from ecdist.students import keep_heap; print(keep_heap())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"


def test_a_restart_that_ends_worse_gives_the_student_its_earlier_attempt_back():
    """A restart judges a stall, not a loss: with a short stall window students are restarted
    (up to 3 times) while still improving, and a fresh start with a few iterations left can end
    worse than an attempt it replaced. The student gets its best attempt back (weights and loss),
    marked stalled; a run resumed from any step's checkpoint ends the same, bit for bit."""
    teacher = ecdist.teachers.random_mlp([10, 4, 1], "tanh", seed=0)
    X = ecdist.queries.gaussian(300, 10, seed=1)
    Y = ecdist.teachers.query(teacher, X)
    X, Y = torch.as_tensor(Standardizer.fit(X)(X)), torch.as_tensor(Standardizer.fit(Y)(Y))
    opts = LMOptions(max_iter=14, stall_window=3, restarts=3, restart_above=0.0)
    pack = StudentPack.init([10, 8, 1], "tanh", list(range(4)), seed=0)
    states = []
    fit_lm(pack, X, Y, opts, progress=lambda *_: states.append(pack.state()))
    last = states[-1]  # the last step, before the best attempts were given back
    restored = np.flatnonzero(last["stash_loss"] < last["rel_loss"])
    assert restored.size and (pack.restarts[restored] >= 1).all()
    assert (pack.restarts >= 2).any()  # a second restart compared against an earlier stash
    np.testing.assert_array_equal(pack.rel_loss[restored], last["stash_loss"][restored])
    assert (pack.status[restored] == STALLED).all()
    np.testing.assert_allclose(pack.mse(X, Y).numpy(), pack.rel_loss, rtol=1e-9)  # the weights are that attempt's
    np.testing.assert_array_equal(pack.history[-1], pack.rel_loss)
    assert pack.stash_theta is None and np.isinf(pack.stash_loss).all()  # nothing stale for a later fit

    for state in (states[4], states[len(states) // 2], states[-2]):  # checkpoints keep the stash
        again = StudentPack.from_state(state, "tanh")
        fit_lm(again, X, Y, opts)
        assert torch.equal(again.theta, pack.theta) and np.array_equal(again.rel_loss, pack.rel_loss)


@pytest.mark.parametrize("widths", [[5, 4, 1], [40, 64, 10], [62, 32, 32, 10]])
def test_lm_packs_hold_as_many_students_as_the_memory_budget_allows(widths):
    """In-process LM packs are the largest whose normal matrices (3 P² floats per student) and query-chunk
    buffers (about 2 CHUNK_ELEMS floats per student) fit LM_MEMORY_BUDGET: small students are bounded by
    the chunk buffers, large ones by P²."""
    from ecdist import pipeline
    from ecdist.students import CHUNK_ELEMS

    config = ecdist.Config(activation="tanh", student_widths=widths[1:-1], n_students=5000, seed=0, optimizer="lm",
                           lm_max_params=10**6, backend="local")
    plan = pipeline._plan(config, widths[0], widths[-1])
    per_student = 24 * plan["params_per_student"] ** 2 + 16 * CHUNK_ELEMS
    size = max(len(p) for p in plan["packs"])
    assert size * per_student <= pipeline.LM_MEMORY_BUDGET < (size + 1) * per_student
