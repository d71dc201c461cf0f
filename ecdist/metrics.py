"""``compare``: how close a recovered network is to the teacher, in weights and in function.

Per teacher neuron, d_w = 1 − |cos| between its [w; b] and the nearest recovered neuron's
(1 − cos for the activation without sign symmetry) — the paper's alignment metric; per layer,
the worst of those; the layer-size overhead (K − r)/r; the excess neurons (nearest to no
teacher neuron); and the functional error on fresh inputs relative to the teacher's variance.
Deeper layers are compared in the basis of the matched neurons of the layer below.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from . import activations
from .errors import TeacherError
from .queries import gaussian, validate
from .teachers import Teacher, query

SOLID_OUTPUT = 0.1  # an excess neuron with outgoing-weight norm above this matters (the authors' label)


@dataclass
class Comparison:
    """Outcome of ``compare``. Per-layer lists have one entry per hidden layer."""

    layer_sizes: list[int]
    teacher_sizes: list[int] | None
    max_weight_distance: list[float] | None
    functional_mse: float
    overhead: list[float] | None = None
    excess: list[int] | None = None
    solid_excess: list[int] | None = None
    weight_distance: list[list[float]] = field(default_factory=list)  # per teacher neuron
    matched: list[list[int]] = field(default_factory=list)  # nearest recovered neuron
    output_distance: list[list[float]] = field(default_factory=list)  # 1 − |cos| of outgoing weights
    n_test: int = 0

    @property
    def exact(self) -> bool:
        """Right sizes and every teacher neuron within 1e-6 (the demo's bar)."""
        return (
            self.teacher_sizes is not None
            and self.layer_sizes == self.teacher_sizes
            and max(self.max_weight_distance or [1.0]) < 1e-6
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Comparison":
        return cls(**d)

    def summary(self) -> str:
        rows = [f"{'layer':>5} {'teacher':>8} {'recovered':>9} {'overhead':>9} {'worst 1-|cos|':>14} {'median':>9}"]
        for l, k in enumerate(self.layer_sizes):
            r = self.teacher_sizes[l] if self.teacher_sizes and l < len(self.teacher_sizes) else None
            if r is None:
                rows.append(f"{l + 1:>5} {'?':>8} {k:>9} {'':>9} {'':>14} {'':>9}")
                continue
            dw = np.asarray(self.weight_distance[l]) if l < len(self.weight_distance) else np.array([np.nan])
            rows.append(
                f"{l + 1:>5} {r:>8} {k:>9} {self.overhead[l]:>+9.0%} {dw.max():>14.1e} {np.median(dw):>9.1e}"
            )
        rows.append(f"functional relative MSE on {self.n_test} fresh inputs: {self.functional_mse:.2e}")
        return "\n".join(rows)


def compare(
    network: nn.Module,
    teacher: Teacher,
    activation: str,
    X: np.ndarray | None = None,
    *,
    seed: int = 12345,
) -> Comparison:
    """Compare a recovered network with its teacher.

    network: the recovered torch module; teacher: a torch module (weights compared) or a
    callable (function only); X: fresh test inputs (n, d_in); default 2,000 standard Gaussian
    inputs drawn with ``seed``.

    Example:
        >>> import ecdist
        >>> t = ecdist.teachers.random_mlp([5, 3, 1], "tanh", seed=0)
        >>> rep = ecdist.compare(t, t, "tanh")
        >>> rep.layer_sizes, rep.max_weight_distance[0] < 1e-15, rep.functional_mse
        ([3], True, 0.0)
    """
    act = activations.get(activation)
    if not isinstance(network, nn.Module):
        raise TeacherError(f"network: expected the recovered torch module (result.network), got {type(network).__name__}")
    rec_layers = _layers(network)
    d_in = rec_layers[0][0].shape[1]
    X = gaussian(2000, d_in, seed=seed) if X is None else validate(X)
    if X.shape[1] != d_in:
        raise TeacherError(f"X has {X.shape[1]} inputs but the network takes {d_in}")
    y_t = query(teacher, X)
    y_r = query(network, X)
    if y_t.shape != y_r.shape:
        raise TeacherError(f"the teacher gives outputs of shape {y_t.shape[1:]}, the network {y_r.shape[1:]}")
    var = y_t.var(axis=0).mean()
    fmse = float(((y_r - y_t) ** 2).mean() / (var if var > 0 else 1.0))
    sizes = [w.shape[0] for w, _ in rec_layers[:-1]]
    if not isinstance(teacher, nn.Module):
        return Comparison(sizes, None, None, fmse, n_test=len(X))
    t_layers = _layers(teacher)
    t_sizes = [w.shape[0] for w, _ in t_layers[:-1]]
    sym = act.symmetry
    dists, matches, outs, worst, excess, solid = [], [], [], [], [], []
    sign = np.ones(d_in)  # per teacher unit of the layer below: map into the recovered basis
    col = np.arange(d_in)
    k_prev = d_in
    for l in range(min(len(sizes), len(t_sizes))):
        Wt, bt = t_layers[l]
        Wr, br = rec_layers[l]
        mapped = np.zeros((Wt.shape[0], k_prev))
        np.add.at(mapped.T, col, (Wt * sign).T)
        T = np.hstack([mapped, bt[:, None]])
        R = np.hstack([Wr, br[:, None]])
        if R.shape[0] == 0:
            dists.append([1.0] * T.shape[0])
            matches.append([-1] * T.shape[0])
            outs.append([1.0] * T.shape[0])
            worst.append(1.0)
            excess.append(0)
            solid.append(0)
            break
        D = sym.distance(T, R)
        m = D.argmin(axis=1)
        dw = np.clip(D[np.arange(len(m)), m], 0.0, None)
        Tn = T / np.maximum(np.linalg.norm(T, axis=1, keepdims=True), 1e-300)
        Rn = R[m] / np.maximum(np.linalg.norm(R[m], axis=1, keepdims=True), 1e-300)
        s = np.sign((Tn * Rn).sum(axis=1)) if sym.sign else np.ones(len(m))
        s[s == 0] = 1
        scale = np.linalg.norm(R[m], axis=1) / np.maximum(np.linalg.norm(T, axis=1), 1e-300) if sym.scaling else np.ones(len(m))
        a_t = t_layers[l + 1][0][:, :]  # (next, r)
        a_r = rec_layers[l + 1][0][:, m]  # (next', r) — outgoing of the matched neurons
        flip = s if sym.flips_outgoing else np.ones(len(m))
        if a_t.shape[0] == a_r.shape[0]:
            od = sym.distance((a_t * flip / scale).T, a_r.T).diagonal() if len(m) else np.zeros(0)
        else:
            od = np.full(len(m), np.nan)
        dists.append(dw.tolist())
        matches.append(m.tolist())
        outs.append(np.asarray(od, dtype=float).tolist())
        worst.append(float(dw.max()) if len(dw) else 0.0)
        unmatched = np.setdiff1d(np.arange(R.shape[0]), m)
        excess.append(int(unmatched.size))
        solid.append(int((np.linalg.norm(rec_layers[l + 1][0][:, unmatched], axis=0) > SOLID_OUTPUT).sum()))
        sign = (flip / scale)[None, :]  # σ_teacher = factor · σ_recovered for odd and scaling classes
        col = m
        k_prev = R.shape[0]
    overhead = [(k - r) / r for k, r in zip(sizes, t_sizes)]
    return Comparison(
        layer_sizes=sizes,
        teacher_sizes=t_sizes,
        max_weight_distance=worst,
        functional_mse=fmse,
        overhead=overhead,
        excess=excess,
        solid_excess=solid,
        weight_distance=dists,
        matched=matches,
        output_distance=outs,
        n_test=len(X),
    )


def identifiable(teacher: nn.Module, activation: str, X: np.ndarray, *, weights: bool = False) -> list[np.ndarray]:
    """Per hidden layer of the teacher, which neurons the inputs X can reveal at all (bool mask).

    A ReLU-like neuron (piecewise linear with its kink at 0) whose pre-activation keeps one
    sign on every row of X is, on X, either zero (dead: it adds nothing) or linear (absorbed
    by the next layer's bias and weights, or the affine path). No method can read its weights
    from queries like X, so a recovery that leaves it out is right, and its 1 − |cos| means
    nothing. For smooth activations every neuron counts.

    ``weights=True`` also leaves out the neurons that X shows to exist but whose weights it
    provably does not determine: those whose rows on one side of the kink (z ≥ 0 or z ≤ 0) do
    not span the affine hull of the layer's inputs (fewer than d + 1 in general position).
    If the *active* rows of a ReLU neuron fall short, a hyperplane tilted along [u; c] with
    u·h + c = 0 on them gives the same activation on every row, in any layer — digits ReLU
    64-16-10 has a neuron active on 49 of 5,752 queries in 61 dimensions, recovered exactly as
    a function but 4% off in angle. If the inactive rows fall short (or either side, for leaky
    ReLU), the tilt changes a linear piece and only an affine path from the layer's inputs to
    the outputs undoes it: the one-hidden-layer reconstruction has one, deeper layers do not,
    so there only the first case counts. Count widths with the default mask and compare angles
    with this one.

        >>> import numpy as np, torch, ecdist
        >>> t = ecdist.teachers.random_mlp([3, 2, 1], "relu", seed=0)
        >>> with torch.no_grad():
        ...     _ = t.layers[0].bias.copy_(torch.tensor([0.0, -100.0]))  # neuron 1 never fires
        >>> [m.tolist() for m in ecdist.metrics.identifiable(t, "relu", np.random.default_rng(0).standard_normal((500, 3)))]
        [[True, False]]
    """
    act = activations.get(activation)
    X = validate(X)
    layers = _layers(teacher)
    if X.shape[1] != layers[0][0].shape[1]:
        raise TeacherError(f"X has {X.shape[1]} inputs but the teacher takes {layers[0][0].shape[1]}")
    masks, h = [], X
    affine_path = len(layers) == 2  # one hidden layer: the reconstruction's x → output path
    zero_below = float(act.fn(torch.tensor(-1.0))) == 0.0  # ReLU (not leaky): the tilt below the kink is free
    for W, b in layers[:-1]:
        z = h @ W.T + b
        if not act.symmetry.scaling:
            mask = np.ones(z.shape[1], dtype=bool)
        else:  # piecewise linear: the kink at 0 is all that is not linear
            mask = (z > 0).any(axis=0) & (z < 0).any(axis=0)
            if weights:  # the rows on a side of the kink must pin it down
                full = _affine_rank(h)
                for j in np.flatnonzero(mask):
                    short_on, short_off = _affine_rank(h[z[:, j] >= 0]) < full, _affine_rank(h[z[:, j] <= 0]) < full
                    if (short_on and zero_below) or (affine_path and (short_on or short_off)):
                        mask[j] = False
        masks.append(mask)
        h = act.fn(torch.from_numpy(z)).numpy()
    return masks


def _affine_rank(rows: np.ndarray) -> int:
    """Dimension of the affine hull of ``rows`` plus one (0 for no rows): rank of [rows | 1]."""
    return int(np.linalg.matrix_rank(np.hstack([rows, np.ones((len(rows), 1))]))) if len(rows) else 0


def _layers(net: nn.Module) -> list[tuple[np.ndarray, np.ndarray]]:
    """(W, b) of every Linear layer in order (hidden layers, then the output layer)."""
    lins = [m for m in net.modules() if isinstance(m, nn.Linear) and m is not getattr(net, "skip", None)]
    if len(lins) < 2:
        raise TeacherError(f"{type(net).__name__} has fewer than two Linear layers: no hidden layer to compare")
    out = []
    for lin in lins:
        b = lin.bias.detach().cpu().double().numpy() if lin.bias is not None else np.zeros(lin.out_features)
        out.append((lin.weight.detach().cpu().double().numpy(), b))
    return out
