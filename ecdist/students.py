"""Students: many overparameterised networks stacked in one tensor per layer, trained together.

A ``StudentPack`` owns k students of one architecture as a single parameter matrix ``theta`` of
shape (k, P); every layer tensor is a view into it, so one forward pass, one optimiser step and
one checkpoint serve all k. Two ways to train (calibration.md measured both on 2 cores):

* ``fit_lm`` — full-batch Levenberg–Marquardt with a damping λ per student and a closed-form
  Jacobian. It reaches machine precision (relative MSE ~1e-20 and below) in minutes where Adam
  stalls near 1e-6, and precision is what makes the students' neurons line up.
* ``fit_adam`` — minibatch Adam with the reference's reduce-on-plateau schedule, for students
  whose P×P normal matrix would not fit (MNIST-sized, GPU); it can hand over to ``fit_lm``.

Students converge or stall one by one; finished students leave the active set, so later
iterations cost less. Initialisation depends only on (seed, student id): the same student comes
out however the N students are split into packs or machines.
"""
from __future__ import annotations

import ctypes
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import activations

log = logging.getLogger(__name__)

ACTIVE, CONVERGED, STALLED = 0, 1, 2
STATUS_NAMES = {ACTIVE: "active", CONVERGED: "converged", STALLED: "stalled"}
ProgressFn = Callable[[str, int, int, np.ndarray], None]
HEAP_KEEP_BYTES = 512 << 20  # buffers below this come from (and return to) the heap, not fresh mmaps
_heap_kept = False

# Work elements per student in one query chunk of the normal equations (8 MB in float64). Each chunk
# adds a GEMM with the queries inner to a block of JᵀJ that is read and written once per chunk, so
# small chunks leave it memory-bound: 2²⁰ builds 1.1–1.4× faster than 2¹⁸ at the trained teachers'
# sizes (benchmarks/normal_equations.py --chunks), with the chunk's buffers still far below JᵀJ's P².
CHUNK_ELEMS = 2**20


def keep_heap() -> bool:
    """Let glibc reuse freed training buffers instead of returning them to the kernel.

    A stacked step allocates activations of k·batch·width floats (13 MB for 200 students of
    width 16 at batch 512). glibc hands such blocks out with mmap and unmaps them on free, so
    every step page-faults its buffers in again: measured here, 336k minor faults in 5 epochs
    and half of the step's time (benchmarks/scaling_students.py). Raising the mmap and trim
    thresholds keeps them in the heap (a 32 MB threshold is not enough: the loss over all
    queries, a Jacobian chunk, are larger); the price is up to 1 GB of freed memory that the
    process keeps for its next step. Process-wide, so only set while ecdist trains, and not
    when the user tuned glibc through MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_. Returns
    whether the thresholds are (now) raised.
    """
    global _heap_kept
    if _heap_kept:
        return True
    tuned = any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
    if not sys.platform.startswith("linux") or tuned:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, …): nothing to tune
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    _heap_kept = bool(libc.mallopt(M_MMAP_THRESHOLD, HEAP_KEEP_BYTES)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, 2 * HEAP_KEEP_BYTES)
    )
    return _heap_kept


def n_params(widths: Sequence[int], skip: bool = False) -> int:
    """Parameters of one student with ``widths = [d_in, h_1, …, d_out]`` (+ affine skip)."""
    p = sum(o * (i + 1) for i, o in zip(widths[:-1], widths[1:]))
    return p + (widths[0] * widths[-1] if skip else 0)


class StudentPack:
    """k students with ``widths = [d_in, h_1, …, h_L, d_out]`` stacked in ``theta`` (k, P).

    Layer l is ``weight(l)``: (k, out, in) and ``bias(l)``: (k, out), views into ``theta``; an
    optional affine skip path ``skip()``: (k, d_out, d_in) serves the even+linear classes.
    ``ids`` are the students' global numbers; ``rel_loss`` their last relative MSE.
    """

    def __init__(
        self,
        theta: torch.Tensor,
        widths: Sequence[int],
        activation: str,
        ids: Sequence[int],
        *,
        skip: bool = False,
    ) -> None:
        self.widths = [int(w) for w in widths]
        self.act = activations.get(activation)
        self.skip_path = skip
        self.ids = np.asarray(ids, dtype=np.int64)
        if theta.shape != (len(self.ids), n_params(self.widths, skip)):
            raise ValueError(f"theta has shape {tuple(theta.shape)}, expected {(len(self.ids), n_params(self.widths, skip))}")
        self.theta = theta
        self.status = np.full(len(self.ids), ACTIVE, dtype=np.int8)
        self.rel_loss = np.full(len(self.ids), np.inf)
        self.lam = np.full(len(self.ids), 1e-2)
        self.seed = 0  # students' initialisation seed (restarts draw from it too)
        self.restarts = np.zeros(len(self.ids), dtype=np.int64)
        # each student's best attempt so far that a restart replaced (loss inf: none yet); restored by
        # ``keep_best`` when the later attempts end worse
        self.stash_loss = np.full(len(self.ids), np.inf)
        self.stash_theta: torch.Tensor | None = None
        self.history: list[np.ndarray] = []  # one row of rel_loss per logged step
        self.history_steps: list[int] = []
        self.steps = 0
        # an LM run in progress: its first step, the recent losses and each student's start,
        # kept with the pack so that a checkpoint resumes it exactly (None: no run started)
        self.lm_run: dict[str, np.ndarray] | None = None
        self._slices = self._layout()

    # ----- construction and layout -------------------------------------------------------
    @classmethod
    def init(
        cls,
        widths: Sequence[int],
        activation: str,
        ids: Sequence[int],
        seed: int,
        *,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
        bias_std: float = 1.0,
    ) -> "StudentPack":
        """Fresh students: weights N(0, 1/fan_in), hidden biases N(0, bias_std²), output bias 0.

        Inputs are standardised by the caller, so pre-activations start O(1); each student's
        numbers come from its own generator seeded by (seed, id).
        """
        widths = [int(w) for w in widths]
        rows = [_init_row(widths, seed, sid, 0, bias_std) for sid in ids]
        theta = torch.as_tensor(np.stack(rows), dtype=dtype, device=device)
        pack = cls(theta, widths, activation, ids)
        pack.seed = int(seed)
        return pack

    def restart(self, rows: np.ndarray) -> None:
        """Re-initialise the students at ``rows`` with their next attempt's seed (seed, id, attempt),
        stashing the attempt it replaces when it is the student's best so far."""
        better = [int(r) for r in rows if self.rel_loss[r] < self.stash_loss[r]]
        if better:
            if self.stash_theta is None:
                self.stash_theta = self.theta.detach().clone()
            self.stash_theta[better] = self.theta[better].detach()
            self.stash_loss[better] = self.rel_loss[better]
        for r in rows:
            self.restarts[r] += 1
            fresh = _init_row(self.widths, self.seed, int(self.ids[r]), int(self.restarts[r]), 1.0)
            self.theta[r] = torch.as_tensor(fresh, dtype=self.theta.dtype, device=self.theta.device)
        self.status[rows] = ACTIVE
        self.lam[rows] = 1e-2

    def keep_best(self) -> None:
        """Give each student back its stashed attempt where that one fit better than the last
        (marked stalled, as the stashed attempt was; the last history row shows its loss).

        A restart judges a stall, not a loss: a deep g student (digits 64-8-8-10) creeping at 4.8e-6
        was restarted at LM step 650, and 150 steps later its fresh start was at 3.0e-5.
        """
        rows = np.flatnonzero(self.stash_loss < self.rel_loss)
        if rows.size:
            self.theta[torch.as_tensor(rows, device=self.theta.device)] = self.stash_theta[
                torch.as_tensor(rows, device=self.stash_theta.device)
            ]
            self.rel_loss[rows] = self.stash_loss[rows]
            self.status[rows] = STALLED
            if self.history:
                self.history[-1] = self.rel_loss.copy()
        # the best attempts are in theta now; a stash kept past this run would compare losses
        # measured on other data if the pack were fitted again
        self.stash_loss = np.full(self.k, np.inf)
        self.stash_theta = None

    def _layout(self) -> list[tuple[int, int, int, int]]:
        out, start = [], 0
        for i, o in zip(self.widths[:-1], self.widths[1:]):
            out.append((start, start + o * (i + 1), o, i))
            start += o * (i + 1)
        return out

    @property
    def k(self) -> int:
        return len(self.ids)

    @property
    def n_params(self) -> int:
        return self.theta.shape[1]

    @property
    def n_layers(self) -> int:
        return len(self.widths) - 1

    def block(self, l: int, theta: torch.Tensor | None = None) -> torch.Tensor:
        """Layer l as neuron rows [w | b]: (k', out, in+1), a view into ``theta``."""
        t = self.theta if theta is None else theta
        s, e, o, i = self._slices[l]
        return t[:, s:e].view(-1, o, i + 1)

    def weight(self, l: int, theta: torch.Tensor | None = None) -> torch.Tensor:
        return self.block(l, theta)[..., :-1]

    def bias(self, l: int, theta: torch.Tensor | None = None) -> torch.Tensor:
        return self.block(l, theta)[..., -1]

    def skip(self, theta: torch.Tensor | None = None) -> torch.Tensor:
        t = self.theta if theta is None else theta
        d_in, d_out = self.widths[0], self.widths[-1]
        return t[:, t.shape[1] - d_in * d_out :].reshape(-1, d_out, d_in)

    # ----- evaluation --------------------------------------------------------------------
    def forward(self, X: torch.Tensor, theta: torch.Tensor | None = None, keep: bool = False):
        """Outputs (k', n, d_out) for X (n, d_in) shared by all students of ``theta`` (k', P).

        With ``keep`` also returns the pre-activations of every hidden layer (for Jacobians).
        """
        t = self.theta if theta is None else theta
        if t.shape[0] == 1:  # see _two: a lone student is computed as a pair
            out, zs = self.forward(X, _two(t), keep=True)
            return (out[:1], [z[:1] for z in zs]) if keep else out[:1]
        h: torch.Tensor = X
        zs = []
        for l in range(self.n_layers - 1):
            z = torch.matmul(h, self.weight(l, t).transpose(1, 2)) + self.bias(l, t)[:, None, :]
            zs.append(z)
            h = self.act.fn(z)
        L = self.n_layers - 1
        out = torch.matmul(h, self.weight(L, t).transpose(1, 2)) + self.bias(L, t)[:, None, :]
        if self.skip_path:
            out = out + torch.matmul(X, self.skip(t).transpose(1, 2))
        return (out, zs) if keep else out

    def mse(self, X: torch.Tensor, Y: torch.Tensor, theta: torch.Tensor | None = None, chunk: int = 65536) -> torch.Tensor:
        """Per-student mean squared error over queries and outputs: (k',)."""
        total = None
        for s in range(0, X.shape[0], chunk):
            r = self.forward(X[s : s + chunk], theta) - Y[s : s + chunk]
            part = (r * r).reshape(r.shape[0], -1).sum(dim=1)
            total = part if total is None else total + part
        return total / (X.shape[0] * Y.shape[1])

    def loss_grad(self, X: torch.Tensor, Y: torch.Tensor, theta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Per-student MSE (k',) on (X, Y); writes its gradient w.r.t. ``theta`` into ``grad``.

        Backpropagation written out, as ``jacobian`` is, with no autograd graph: one batched
        product per layer and direction, activations held as (k', width, n) — neurons by queries,
        the layout in which the small products run fastest here — and the activation's
        derivative taken from its value where that is cheaper. Together about a fifth faster
        than autograd on the stacked Adam step (benchmarks/scaling_students.py).
        """
        if theta.shape[0] == 1:  # see _two
            pair = torch.empty_like(_two(grad))
            loss = self.loss_grad(X, Y, _two(theta), pair)
            grad.copy_(pair[:1])
            return loss[:1]
        n, o = X.shape[0], Y.shape[1]
        hs, zs, r = self._columns(X, theta)
        r = r.sub_(Y.T)
        loss = (r * r).sum(dim=(1, 2)) / (n * o)
        self._backprop(theta, hs, zs, r.mul_(2.0 / (n * o)), grad)
        return loss

    def _columns(self, X: torch.Tensor, theta: torch.Tensor):
        """Forward pass in the (k', width, n) layout: inputs and activations per layer, the
        pre-activations, and the outputs (k', d_out, n)."""
        k, n = theta.shape[0], X.shape[0]
        hs, zs = [X.T.expand(k, X.shape[1], n)], []
        for l in range(self.n_layers - 1):
            z = torch.baddbmm(self.bias(l, theta)[:, :, None], self.weight(l, theta), hs[-1])
            zs.append(z)
            hs.append(self.act.fn(z))
        L = self.n_layers - 1
        out = torch.baddbmm(self.bias(L, theta)[:, :, None], self.weight(L, theta), hs[-1])
        if self.skip_path:
            out = out + torch.bmm(self.skip(theta), hs[0])
        return hs, zs, out

    def _backprop(self, theta: torch.Tensor, hs: list, zs: list, d: torch.Tensor, grad: torch.Tensor) -> None:
        """Jᵀd into ``grad`` (k', P) for d (k', d_out, n) at the outputs; ``d`` is overwritten."""
        k, o = theta.shape[0], d.shape[1]
        if self.skip_path:
            grad[:, grad.shape[1] - o * hs[0].shape[1] :] = torch.bmm(d, hs[0].transpose(1, 2)).reshape(k, -1)
        for l in range(self.n_layers - 1, -1, -1):
            block = self.block(l, grad)
            block[..., :-1] = torch.bmm(d, hs[l].transpose(1, 2))
            block[..., -1] = d.sum(dim=2)
            if l:
                wt = self.weight(l, theta).transpose(1, 2)
                d = wt * d if d.shape[1] == 1 else torch.bmm(wt, d)  # an outer product is cheaper as a product
                by_value = self.act.grad_of_value
                d = d.mul_(by_value(hs[l]) if by_value is not None else self.act.grad(zs[l - 1]))

    def curvature_pull(
        self, X: torch.Tensor, theta: torch.Tensor, step: torch.Tensor, chunk: int = 65536
    ) -> torch.Tensor:
        """Jᵀr″ (k', P): r″ the second derivative of the outputs along ``step`` (k', P), per student.

        The geodesic acceleration of ``fit_lm`` needs it. r″ comes from a central difference
        (f(θ+su) − 2f(θ) + f(θ−su))/s² · ‖step‖² along the unit direction u, with s a tenth of
        ‖step‖ but at least ε^¼ (1.2e-4 in float64, 1.9e-2 in float32: where rounding and the
        O(s²) truncation balance): near a minimum the steps are tiny and a difference that small
        would be rounding noise. The teacher's answers cancel, so none are needed.
        """
        if theta.shape[0] == 1:  # see _two
            return self.curvature_pull(X, _two(theta), _two(step), chunk)[:1]
        norm = step.norm(dim=1, keepdim=True).clamp(min=torch.finfo(step.dtype).tiny)
        u = step / norm
        s = torch.clamp(0.1 * norm, min=torch.finfo(theta.dtype).eps ** 0.25)
        out = torch.zeros_like(theta)
        part = torch.empty_like(theta)
        for c in range(0, X.shape[0], chunk):
            Xc = X[c : c + chunk]
            hs, zs, f0 = self._columns(Xc, theta)
            fp = self._columns(Xc, theta + s * u)[2]
            fm = self._columns(Xc, theta - s * u)[2]
            rpp = (fp - 2 * f0 + fm).mul_((norm / s).square()[:, :, None])
            self._backprop(theta, hs, zs, rpp, part)
            out += part
        return out

    def hidden(self, X: torch.Tensor, layer: int) -> torch.Tensor:
        """Activations of hidden layer ``layer`` (0-based): (k, n, h)."""
        h: torch.Tensor = X
        for l in range(layer + 1):
            h = self.act.fn(torch.matmul(h, self.weight(l).transpose(1, 2)) + self.bias(l)[:, None, :])
        return h

    def jacobian(self, X: torch.Tensor, theta: torch.Tensor | None = None):
        """Jacobian of every output w.r.t. every parameter, closed form: (k', n·d_out, P).

        Also returns the outputs (k', n, d_out). For an MLP, ∂f/∂[W_l | b_l] = δ_l ⊗ [a_{l−1}; 1]
        with δ_l backpropagated per output, so no autograd is needed.
        """
        t = self.theta if theta is None else theta
        out, zs = self.forward(X, t, keep=True)
        k, n, o = out.shape
        one = torch.ones(k, n, 1, dtype=X.dtype, device=X.device)
        acts = [torch.cat([X.expand(k, *X.shape), one], -1)]
        acts += [torch.cat([self.act.fn(z), one], -1) for z in zs]
        eye = torch.eye(o, dtype=X.dtype, device=X.device)
        # output layer: ∂f_o/∂[W | b][o', q] = [o = o'] ã_L[q]
        blocks = [(eye[None, None, :, :, None] * acts[-1][:, :, None, None, :]).reshape(k, n, o, -1)]
        delta = self.weight(self.n_layers - 1, t)[:, None, :, :].expand(k, n, o, -1)  # ∂f/∂a_L
        for l in range(self.n_layers - 2, -1, -1):
            delta = delta * self.act.grad(zs[l])[:, :, None, :]  # ∂f/∂z_l: (k, n, o, h_l)
            blocks.insert(0, (delta[..., :, None] * acts[l][:, :, None, None, :]).reshape(k, n, o, -1))
            if l:
                delta = torch.matmul(delta, self.weight(l, t)[:, None])  # ∂f/∂a_{l-1}
        if self.skip_path:
            x = X[None, :, None, None, :].expand(k, n, o, o, X.shape[1])
            blocks.append((eye[None, None, :, :, None] * x).reshape(k, n, o, -1))
        return torch.cat(blocks, dim=-1).reshape(k, n * o, -1), out

    def normal_equations(
        self, X: torch.Tensor, Y: torch.Tensor, theta: torch.Tensor | None = None, chunk_elems: int = CHUNK_ELEMS
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """JᵀJ (k', P, P) and Jᵀr (k', P) over all queries, r = f(X) − Y.

        One hidden layer takes a structured path that never forms J: the weight block of JᵀJ is
        Σ_n (σ'_j σ'_l)(AᵀA)_jl · x̃_m x̃_m', so symmetric pair products of σ' (k, h(h+1)/2, n)
        times those of x̃ (n, (d+1)(d+2)/2) give it in one GEMM shared by all students — about
        a quarter of the flops of JᵀJ. The affine skip path S adds the input x beside ũ = [σ; 1]
        in the same sums (its columns are [o = o'] x_m, like the output layer's). Deeper
        networks take ``_normal_equations_deep``; deep networks have no skip path.
        Queries are summed in chunks of ``chunk_elems`` work elements *per student*, so the
        rounding — and the training path — of a student does not depend on its pack's size.
        """
        t = self.theta if theta is None else theta
        if t.shape[0] == 1:
            JtJ, g = self.normal_equations(X, Y, _two(t), chunk_elems)
            return JtJ[:1], g[:1]
        if self.n_layers > 2:
            if self.skip_path:
                return self.normal_equations_from_jacobian(X, Y, t, chunk_elems)
            return self._normal_equations_deep(X, Y, t, chunk_elems)
        k, P = t.shape
        o = Y.shape[1]
        JtJ = torch.zeros(k, P, P, dtype=t.dtype, device=t.device)
        g = torch.zeros(k, P, dtype=t.dtype, device=t.device)
        d1, h = self.widths[0] + 1, self.widths[1]
        pw = h * d1  # hidden block columns, laid out (j, m)
        ds = d1 - 1 if self.skip_path else 0  # skip columns per output
        e = h + 1 + ds  # the output layer's inputs v = [ũ; x]
        # each output's columns [A_o | c_o | S_o]: the output layer's, laid out (o, q), then the skip path's, (o, m)
        pa = pw + o * (h + 1)
        cols = torch.cat([pw + torch.arange(o * (h + 1), device=t.device).view(o, h + 1),
                          pa + torch.arange(o * ds, device=t.device).view(o, ds)], 1)  # (o, e)
        A = self.weight(1, t)  # (k, o, h)
        H2 = h * (h + 1) // 2
        R = torch.zeros(k, H2, d1 * (d1 + 1) // 2, dtype=t.dtype, device=t.device)  # Σ pair(σ') ⊗ pair(x̃)
        T = torch.zeros(k, pw, e, dtype=t.dtype, device=t.device)  # Σ σ'_j x̃_m v_q
        U = torch.zeros(k, e, e, dtype=t.dtype, device=t.device)  # Σ v vᵀ
        gW = torch.zeros(k, h, d1, dtype=t.dtype, device=t.device)
        gA = torch.zeros(k, o, e, dtype=t.dtype, device=t.device)
        out_w = torch.cat([self.block(1, t), self.skip(t)], 2) if self.skip_path else self.block(1, t)
        step = max(1, chunk_elems // (H2 + pw))
        for s in range(0, X.shape[0], step):
            xt = torch.cat([X[s : s + step], torch.ones(min(step, X.shape[0] - s), 1, dtype=t.dtype, device=t.device)], 1)
            nc = xt.shape[0]
            z = torch.matmul(xt, self.block(0, t).transpose(1, 2))  # (k, nc, h)
            dz = self.act.grad(z).transpose(1, 2).contiguous()  # (k, h, nc)
            parts = [self.act.fn(z), torch.ones(k, nc, 1, dtype=t.dtype, device=t.device)]
            if self.skip_path:
                parts.append(X[s : s + step].expand(k, nc, -1))
            v = torch.cat(parts, 2)
            r = torch.matmul(v, out_w.transpose(1, 2)) - Y[s : s + step]  # (k, nc, o)
            R.baddbmm_(_pair_products(dz, 1), _pair_products(xt, 1).expand(k, nc, -1))
            DX = (dz[:, :, None, :] * xt.T.contiguous()[None, None]).view(k, pw, nc)  # rows of J_W
            T.baddbmm_(DX, v)
            U.baddbmm_(v.transpose(1, 2), v)
            gW.baddbmm_(torch.bmm(r, A).transpose(1, 2) * dz, xt.expand(k, nc, -1))  # Σ_n (Σ_o r_o A_oj) σ'_j x̃_m
            gA.baddbmm_(r.transpose(1, 2), v)
        # unpack the symmetric pair sums into the (j, m) × (l, m') weight block
        M = torch.matmul(A.transpose(1, 2), A)  # (k, h, h): Σ_o A_oj A_ol
        JtJ[:, :pw, :pw] = (_unpack_pairs(R, h, d1) * M[:, :, None, :, None]).reshape(k, pw, pw)
        # weight × output (and skip) blocks: A_o'j · Σ_n σ'_j x̃_m v_q, laid out (j, m) × (o', q)
        WA = A.transpose(1, 2)[:, :, None, :, None] * T.view(k, h, d1, 1, e)  # (k, h, d1, o, e)
        JtJ[:, :pw, cols.flatten()] = WA.reshape(k, pw, -1)
        JtJ[:, pw:, :pw] = JtJ[:, :pw, pw:].transpose(1, 2)
        for c in cols:  # output rows do not interact: one v-Gram block per output
            JtJ[:, c[:, None], c] = U
        g[:, :pw] = gW.reshape(k, pw)
        g[:, cols.flatten()] = gA.reshape(k, -1)
        return JtJ, g

    def normal_equations_from_jacobian(
        self, X: torch.Tensor, Y: torch.Tensor, theta: torch.Tensor | None = None, chunk_elems: int = CHUNK_ELEMS
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """JᵀJ and Jᵀr from J itself (``jacobian``), query chunk by chunk: what the structured paths
        are measured against (benchmarks/normal_equations.py), and the way of a deep network with
        a skip path, which ecdist never builds."""
        t = self.theta if theta is None else theta
        k, P = t.shape
        o = Y.shape[1]
        JtJ = torch.zeros(k, P, P, dtype=t.dtype, device=t.device)
        g = torch.zeros(k, P, dtype=t.dtype, device=t.device)
        step = max(1, chunk_elems // (P * o))
        for s in range(0, X.shape[0], step):
            J, out = self.jacobian(X[s : s + step], t)
            r = (out - Y[s : s + step]).reshape(k, -1, 1)
            JtJ.baddbmm_(J.transpose(1, 2), J)
            g.add_(torch.bmm(J.transpose(1, 2), r).squeeze(-1))
        return JtJ, g

    def _normal_equations_deep(
        self, X: torch.Tensor, Y: torch.Tensor, t: torch.Tensor, chunk_elems: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """JᵀJ and Jᵀr for two or more hidden layers without forming J.

        Column (l, j, m) of J is δˡ_{noj}·ãˡ_{nm} (δˡ = ∂f_o/∂z_l, ã = [a; 1]), so the block of
        layers l, l' is Σ_n Cₙ[j, j'] ãˡ_{nm} ãˡ'_{nm'} with Cₙ = Σ_o δˡ_{no}ᵀ δˡ'_{no}: one GEMM
        over queries of C (n, h·h') by ãˡ ⊗ ãˡ' (n, d·d'), d_out times fewer flops than JᵀJ.
        Diagonal blocks take symmetric pairs of both factors (a quarter of those), blocks
        below the diagonal are mirrored, and the output layer's own block is one Gram of ã_L
        per output, as in the one-hidden-layer path.
        """
        k, P = t.shape
        o, L = Y.shape[1], self.n_layers - 1  # L: the output layer
        dev, dt = t.device, t.dtype
        d = [w + 1 for w in self.widths[:-1]]  # inputs of layer l, with the bias's 1
        h = self.widths[1:]  # neurons of layer l (h[L] = d_out)
        D2 = [n * (n + 1) // 2 for n in d]
        H2 = [n * (n + 1) // 2 for n in h]
        blocks = [(l, m) for l in range(L) for m in range(l, L + 1)]
        R = {(l, m): torch.zeros(k, *((H2[l], D2[l]) if l == m else (h[l] * h[m], d[l] * d[m])), dtype=dt, device=dev)
             for l, m in blocks}
        U = torch.zeros(k, d[L], d[L], dtype=dt, device=dev)  # Σ ã_L ã_Lᵀ
        gs = [torch.zeros(k, h[l], d[l], dtype=dt, device=dev) for l in range(L + 1)]
        # work elements per query and student: the largest block's two factors, the δs and activations
        per_query = max((H2[l] + D2[l]) if l == m else h[l] * h[m] + d[l] * d[m] for l, m in blocks)
        step = max(1, chunk_elems // (per_query + o * sum(h[:L]) + sum(d)))
        for s in range(0, X.shape[0], step):
            xt = torch.cat([X[s : s + step], torch.ones(min(step, X.shape[0] - s), 1, dtype=dt, device=dev)], 1)
            nc = xt.shape[0]
            acts, dz = [xt.expand(k, nc, -1)], []
            for l in range(L):
                z = torch.matmul(acts[-1], self.block(l, t).transpose(1, 2))  # (k, nc, h_l)
                dz.append(self.act.grad(z))
                acts.append(torch.cat([self.act.fn(z), torch.ones(k, nc, 1, dtype=dt, device=dev)], 2))
            r = torch.matmul(acts[L], self.block(L, t).transpose(1, 2)) - Y[s : s + step]  # (k, nc, o)
            delta = [self.weight(L, t)[:, None] * dz[L - 1][:, :, None, :]]  # δˡ (k, nc, o, h_l), top down
            for l in range(L - 2, -1, -1):
                delta.insert(0, torch.matmul(delta[0], self.weight(l + 1, t)[:, None]) * dz[l][:, :, None, :])
            for l, m in blocks:
                if l == m:  # pairs j ≤ j' of C = δᵀδ and m ≤ m' of ã ⊗ ã
                    C = torch.matmul(delta[l].transpose(2, 3), delta[l])  # (k, nc, h, h)
                    Cp = torch.cat([C[:, :, j, j:] for j in range(h[l])], 2)
                    Kp = _pair_products(xt, 1).expand(k, nc, -1) if l == 0 else _pair_products(acts[l], 2)
                    R[l, m].baddbmm_(Cp.transpose(1, 2), Kp)
                    continue
                C = delta[l].transpose(2, 3) if m == L else torch.matmul(delta[l].transpose(2, 3), delta[m])
                K = (acts[l][:, :, :, None] * acts[m][:, :, None, :]).reshape(k, nc, -1)
                R[l, m].baddbmm_(C.reshape(k, nc, -1).transpose(1, 2), K)
            U.baddbmm_(acts[L].transpose(1, 2), acts[L])
            for l in range(L):  # Σ_n (Σ_o r_o δˡ_oj) ã_m
                gs[l].baddbmm_(torch.matmul(r[:, :, None, :], delta[l]).squeeze(2).transpose(1, 2), acts[l])
            gs[L].baddbmm_(r.transpose(1, 2), acts[L])
        JtJ = torch.zeros(k, P, P, dtype=dt, device=dev)
        at = [slice(s, e) for s, e, *_ in self._slices]
        for l, m in blocks:  # each sum freed once placed: at most about 2 P² per student at a time
            Rb = R.pop((l, m))
            if l == m:
                B = _unpack_pairs(Rb, h[l], d[l])  # (k, h, d, h, d)
            else:
                B = Rb.view(k, h[l], h[m], d[l], d[m]).permute(0, 1, 3, 2, 4)
            JtJ[:, at[l], at[m]] = B.reshape(k, h[l] * d[l], h[m] * d[m])
            if l != m:
                JtJ[:, at[m], at[l]] = JtJ[:, at[l], at[m]].transpose(1, 2)
        for oo in range(o):  # output rows do not interact: one ã_L-Gram block per output
            sl = slice(at[L].start + oo * d[L], at[L].start + (oo + 1) * d[L])
            JtJ[:, sl, sl] = U
        g = torch.cat([x.reshape(k, -1) for x in gs], 1)
        return JtJ, g

    def layer_neurons(self, X: torch.Tensor, layer: int = 0) -> dict[str, np.ndarray]:
        """Every student's neurons of hidden layer ``layer``, as rows.

        vectors: (k·h, in+1) [w | b]; outgoing: (k·h, out) weights into the next layer;
        student_ids: (k·h,); contribution: (k·h,) ‖outgoing‖ × std of the neuron's activation
        over X — what the neuron adds to the next layer; near zero for debris.
        """
        h = self.widths[layer + 1]
        act = self.hidden(X, layer)  # (k, n, h)
        out = self.weight(layer + 1).transpose(1, 2)  # (k, h, out)
        contrib = act.std(dim=1) * out.norm(dim=2)
        return {
            "vectors": self.block(layer).reshape(self.k * h, -1).detach().cpu().double().numpy(),
            "outgoing": out.reshape(self.k * h, -1).detach().cpu().double().numpy(),
            "student_ids": np.repeat(self.ids, h),
            "contribution": contrib.reshape(-1).detach().cpu().double().numpy(),
        }

    # ----- bookkeeping -------------------------------------------------------------------
    def record(self) -> None:
        self.history.append(self.rel_loss.copy())
        self.history_steps.append(self.steps)

    def state(self) -> dict[str, np.ndarray]:
        """Everything needed to resume, as plain arrays (saved as .npz, never pickled).

        Copies, not views: training goes on in place, and a state kept in memory (or written
        later) must stay the step it was taken at.
        """
        hist = np.stack(self.history) if self.history else np.zeros((0, self.k))
        out = {
            "theta": self.theta.detach().cpu().numpy(),
            "widths": np.asarray(self.widths),
            "ids": self.ids,
            "skip": np.asarray(self.skip_path),
            "status": self.status,
            "rel_loss": self.rel_loss,
            "lam": self.lam,
            "history": hist,
            "history_steps": np.asarray(self.history_steps, dtype=np.int64),
            "steps": np.asarray(self.steps),
            "seed": np.asarray(self.seed),
            "restarts": self.restarts,
        } | ({f"lm_{k}": v for k, v in self.lm_run.items()} if self.lm_run is not None else {}) | (
            {"stash_theta": self.stash_theta.detach().cpu().numpy(), "stash_loss": self.stash_loss}
            if self.stash_theta is not None else {}
        )
        return {k: np.array(v, copy=True) for k, v in out.items()}

    @classmethod
    def from_state(
        cls, state: dict[str, np.ndarray], activation: str, *, dtype: torch.dtype = torch.float64, device="cpu"
    ) -> "StudentPack":
        pack = cls(
            torch.as_tensor(state["theta"], dtype=dtype, device=device),
            state["widths"].tolist(),
            activation,
            state["ids"],
            skip=bool(state["skip"]),
        )
        pack.status = state["status"].astype(np.int8)
        pack.rel_loss = state["rel_loss"].astype(float)
        pack.lam = state["lam"].astype(float)
        pack.history = list(state["history"])
        pack.history_steps = state["history_steps"].tolist()
        pack.steps = int(state["steps"])
        pack.seed = int(state["seed"])
        pack.restarts = state["restarts"].astype(np.int64)
        if "lm_start" in state:
            pack.lm_run = {k: state[f"lm_{k}"] for k in ("start", "window", "since")}
        if "stash_theta" in state:  # checkpoints from before restarts kept the best attempt have none
            pack.stash_theta = torch.as_tensor(state["stash_theta"], dtype=dtype, device=device)
            pack.stash_loss = state["stash_loss"].astype(float)
        return pack


def _pair_products(a: torch.Tensor, dim: int) -> torch.Tensor:
    """a_i·a_j for i ≤ j along ``dim``, in ``triu_indices`` order.

    Written slice by slice into one buffer: gathers with index tensors are slow here.
    """
    n = a.shape[dim]
    shape = list(a.shape)
    shape[dim] = n * (n + 1) // 2
    out = torch.empty(shape, dtype=a.dtype, device=a.device)
    off = 0
    for i in range(n):
        torch.mul(a.narrow(dim, i, 1), a.narrow(dim, i, n - i), out=out.narrow(dim, off, n - i))
        off += n - i
    return out


def _unpack_pairs(R: torch.Tensor, h: int, d: int) -> torch.Tensor:
    """Sums over symmetric pairs (k, h(h+1)/2, d(d+1)/2) → the full block (k, h, d, h, d)."""

    def index(n: int) -> torch.Tensor:
        i, j = torch.triu_indices(n, n, device=R.device)
        idx = torch.zeros(n, n, dtype=torch.long, device=R.device)
        idx[i, j] = torch.arange(len(i), device=R.device)
        idx[j, i] = idx[i, j]
        return idx

    ph, pd = index(h), index(d)
    return R[:, ph[:, None, :, None], pd[None, :, None, :]]


def _two(theta: torch.Tensor) -> torch.Tensor:
    """One student's parameters twice: batched GEMMs round the same for every batch of ≥ 2, but
    a batch of one takes another kernel (gemv) — so a student's training path, and the recovered
    network, would depend on how the students were split into packs and actors. The pair also
    rounds the same for any torch thread count; a batch of one does not (1.6e-12 apart between 1
    and 2 threads, measured on reconstruction's single network, which therefore keeps the pair)."""
    return theta.expand(2, -1)


def _init_row(widths: list[int], seed: int, sid: int, attempt: int, bias_std: float) -> np.ndarray:
    """One student's parameters; its generator depends only on (seed, id, attempt)."""
    rng = np.random.default_rng([int(seed), int(sid)] + ([int(attempt)] if attempt else []))
    parts = []
    for li, (i, o) in enumerate(zip(widths[:-1], widths[1:])):
        w = rng.standard_normal((o, i)) / math.sqrt(i)
        b = np.zeros(o) if li == len(widths) - 2 else bias_std * rng.standard_normal(o)
        parts.append(np.hstack([w, b[:, None]]).ravel())
    return np.concatenate(parts)


# ----- Levenberg–Marquardt -----------------------------------------------------------------
@dataclass(frozen=True)
class LMOptions:
    """Stopping and damping rules of ``fit_lm``; defaults measured on the calibration problems."""

    max_iter: int = 400
    tol: float = 1e-24  # relative MSE at which a student is done (float64 floor is ~1e-32)
    stall_window: int = 60  # a student that has not improved 10× in this many iterations stalls…
    stall_level: float = 1e-14  # …unless it is already below this (slow but precise is fine)
    restarts: int = 2  # fresh starts for a student that stalls above restart_above
    restart_above: float = 1e-6  # a stall above this relative MSE is a local minimum, not slow precision
    max_tries: int = 12  # damping increases per iteration before giving up on a step
    # λ times what: "levenberg" — the identity, scaled by the mean of diag(JᵀJ) (one trust radius
    # for all parameters, which standardised inputs make comparable); "marquardt" — diag(JᵀJ).
    # Marquardt's scaling lets a parameter whose column is nearly zero (a neuron with a tiny outgoing
    # weight) take huge steps: such neurons ran off to ‖[w; b]‖ of 40–170, where g = σ(4z) +
    # softplus(z) is a ReLU plus a step, and their students crawled along that valley (g 10-4-1:
    # worst relative MSE ~1e-4 after 2,000 iterations; Levenberg: 7e-8 after 300, norms below 15).
    damping: str = "levenberg"
    lam_max: float = 1e12
    chunk_elems: int = CHUNK_ELEMS  # work elements per student per query chunk
    # Geodesic acceleration (Transtrum & Sethna 2012): add ½a to the step δ, a the second-order
    # correction that follows the curved valley of the residuals; a step whose ‖a‖/‖δ‖ exceeds
    # geodesic_alpha is rejected as if its loss had risen (GSL's form of the test; the paper writes
    # 2‖a‖/‖δ‖ ≤ α). Deep students crawl along such valleys.
    geodesic: bool = False
    geodesic_alpha: float = 0.75


def fit_lm(
    pack: StudentPack,
    X: torch.Tensor,
    Y: torch.Tensor,
    opts: LMOptions = LMOptions(),
    progress: ProgressFn | None = None,
) -> StudentPack:
    """Full-batch Levenberg–Marquardt for every active student of the pack, in place.

    X: (n, d_in), Y: (n, d_out), both standardised (so MSE is the relative MSE). Each
    iteration forms JᵀJ and Jᵀr for the active students in query chunks (one batched matmul
    each), then solves (JᵀJ + λ·D) δ = −Jᵀr by batched Cholesky — batched ``linalg.solve``
    hangs in MKL here (calibration.md) — and accepts δ per student when its loss drops.
    """
    keep_heap()
    if pack.lm_run is None:
        pack.rel_loss = pack.mse(X, Y).cpu().numpy()
        window = [pack.rel_loss.copy()]  # losses of the last stall_window + 1 iterations
        since = np.zeros(pack.k, dtype=np.int64)  # iteration at which each student's current start began
        _update_status(pack, opts, window, since, 0)
        pack.record()
        start = pack.steps
    else:  # resuming from a checkpoint: carry on exactly where the run was
        start, window, since = int(pack.lm_run["start"]), list(pack.lm_run["window"]), pack.lm_run["since"].copy()
    while pack.steps - start < opts.max_iter:
        active = np.flatnonzero(pack.status == ACTIVE)
        if active.size == 0:
            break
        idx = torch.as_tensor(active, device=pack.theta.device)
        theta = pack.theta[idx]
        JtJ, g = pack.normal_equations(X, Y, theta, opts.chunk_elems)
        D = _damping(JtJ, opts.damping)
        old = pack.rel_loss[active]
        lam = pack.lam[active].copy()
        todo = np.ones(len(active), dtype=bool)
        new_loss = old.copy()
        new_theta = theta.clone()
        for _ in range(opts.max_tries):
            rows = np.flatnonzero(todo)
            if rows.size == 0:
                break
            r_idx = torch.as_tensor(rows, device=theta.device)
            A = JtJ[r_idx]  # a copy; λ·D goes onto its diagonal in place (a dense diag_embed cost 3× the copy)
            A.diagonal(dim1=1, dim2=2).add_(torch.as_tensor(lam[rows], dtype=theta.dtype, device=theta.device)[:, None] * D[r_idx])
            L, info = torch.linalg.cholesky_ex(A)
            ok = (info == 0).cpu().numpy()
            step = -torch.cholesky_solve(g[r_idx].unsqueeze(-1), L).squeeze(-1)
            if opts.geodesic:
                pull = pack.curvature_pull(X, theta[r_idx], step, chunk=max(1, opts.chunk_elems // sum(pack.widths)))
                accel = -torch.cholesky_solve(pull.unsqueeze(-1), L).squeeze(-1)
                ratio = (accel.norm(dim=1) / step.norm(dim=1).clamp(min=torch.finfo(step.dtype).tiny)).cpu().numpy()
                ok = ok & (ratio <= opts.geodesic_alpha)
                step = step + 0.5 * accel
            cand = theta[r_idx] + step
            loss = pack.mse(X, Y, cand).cpu().numpy()
            better = ok & np.isfinite(loss) & (loss < old[rows])
            acc = rows[better]
            new_theta[torch.as_tensor(acc, device=theta.device)] = cand[torch.as_tensor(np.flatnonzero(better), device=theta.device)]
            new_loss[acc] = loss[better]
            lam[acc] = np.maximum(lam[acc] / 3, 1e-15)
            rej = rows[~better]
            lam[rej] *= 4
            todo[acc] = False
            todo[rej[lam[rej] > opts.lam_max]] = False
        pack.theta[idx] = new_theta
        pack.lam[active] = np.minimum(lam, opts.lam_max)
        pack.rel_loss[active] = new_loss
        pack.steps += 1
        it = pack.steps - start
        window = (window + [pack.rel_loss.copy()])[-opts.stall_window - 1 :]
        _update_status(pack, opts, window, since, it)
        stuck = np.flatnonzero(
            (pack.status == STALLED) & (pack.rel_loss > opts.restart_above) & (pack.restarts < opts.restarts)
        )
        if stuck.size and it < opts.max_iter:
            pack.restart(stuck)
            pack.rel_loss[stuck] = pack.mse(X, Y, pack.theta[torch.as_tensor(stuck, device=pack.theta.device)]).cpu().numpy()
            since[stuck] = it
        pack.record()
        pack.lm_run = {"start": np.asarray(start), "window": np.stack(window), "since": since.copy()}
        if progress is not None:
            progress("lm", it, opts.max_iter, pack.rel_loss)
    pack.keep_best()
    pack.lm_run = None  # finished: a later fit_lm call starts a run of its own
    return pack


def _damping(JtJ: torch.Tensor, kind: str) -> torch.Tensor:
    """The diagonal D of the damping term λ·D per student: (k', P). See ``LMOptions.damping``."""
    diag = torch.diagonal(JtJ, dim1=1, dim2=2)
    if kind == "levenberg":
        return diag.mean(dim=1, keepdim=True).clamp(min=1e-300).expand_as(diag)
    if kind == "marquardt":  # floored so that dead neurons (zero columns) stay solvable
        return torch.clamp(diag, min=1e-12 * diag.amax(dim=1, keepdim=True).clamp(min=1e-300))
    raise ValueError(f"damping must be 'levenberg' or 'marquardt', got {kind!r}")


def _update_status(pack: StudentPack, opts: LMOptions, window: list[np.ndarray], since: np.ndarray, it: int) -> None:
    """Converged: below tol, or no progress while already precise. Stalled: no 10× gain in a window.

    ``window`` holds the losses of the last iterations (oldest first); ``since`` the iteration
    at which each student's current start began, so a fresh restart is judged on its own.
    """
    act = pack.status == ACTIVE
    pack.status[act & (pack.rel_loss <= opts.tol)] = CONVERGED
    pack.status[act & (pack.lam >= opts.lam_max) & (pack.rel_loss <= opts.stall_level)] = CONVERGED
    if len(window) > opts.stall_window:
        slow = (pack.rel_loss > 0.1 * window[0]) & (it - since >= opts.stall_window)
        act = pack.status == ACTIVE
        pack.status[act & slow & (pack.rel_loss <= opts.stall_level)] = CONVERGED
        pack.status[act & slow & (pack.rel_loss > opts.stall_level)] = STALLED
    act = pack.status == ACTIVE
    pack.status[act & (pack.lam >= opts.lam_max)] = STALLED


# ----- Adam --------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdamOptions:
    """The reference schedule: Adam 1e-3, batch 512, ReduceLROnPlateau ×1/√10 down to 1e-7."""

    lr: float = 1e-3
    batch_size: int = 512
    max_epochs: int = 25_000
    patience: int = 200
    cooldown: int = 100
    factor: float = 1 / math.sqrt(10)
    min_lr: float = 1e-7
    tol: float = 1e-24
    log_every: int = 10


def fit_adam(
    pack: StudentPack,
    X: torch.Tensor,
    Y: torch.Tensor,
    opts: AdamOptions = AdamOptions(),
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> StudentPack:
    """Minibatch Adam on the sum of the students' MSEs (each student gets its own gradient).

    The learning rate drops by ``factor`` when the epoch-mean loss has not improved for
    ``patience`` epochs (then waits ``cooldown``); training stops at ``min_lr``, at the epoch
    cap, or when every student is below ``tol``. Logged losses are each student's epoch-mean
    minibatch loss, which costs nothing; the MSE on all queries is computed only to confirm
    the tolerance and at the end, so ``pack.rel_loss`` on return is exact.
    """
    keep_heap()
    theta = pack.theta.detach().clone()
    theta.grad = torch.zeros_like(theta)
    opt = torch.optim.Adam([theta], lr=opts.lr)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    n = X.shape[0]
    best, since, cool, lr = math.inf, 0, 0, opts.lr
    exact = False  # whether pack.rel_loss is the MSE of theta on all queries
    for epoch in range(opts.max_epochs):
        perm = torch.randperm(n, generator=gen).to(X.device)
        losses = torch.zeros(pack.k, dtype=theta.dtype, device=theta.device)
        for s in range(0, n, opts.batch_size):
            b = perm[s : s + opts.batch_size]
            losses += pack.loss_grad(X[b], Y[b], theta, theta.grad) * len(b)
            opt.step()
        losses /= n
        total = float(losses.sum())
        pack.steps += 1
        if total < best:
            best, since = total, 0
        else:
            since += 1
        if cool > 0:
            cool -= 1
            since = 0
        elif since > opts.patience:
            lr *= opts.factor
            for grp in opt.param_groups:
                grp["lr"] = lr
            cool, since = opts.cooldown, 0
        last = epoch == opts.max_epochs - 1 or lr < opts.min_lr * (1 + 1e-9)
        if (epoch + 1) % opts.log_every == 0 or last:
            pack.rel_loss, exact = losses.cpu().numpy(), False
            if (pack.rel_loss <= opts.tol).all():
                pack.rel_loss, exact = pack.mse(X, Y, theta).cpu().numpy(), True
            pack.record()
            pack.theta.copy_(theta)  # a checkpoint taken in ``progress`` holds these weights, not the start's
            if progress is not None:
                progress("adam", epoch + 1, opts.max_epochs, pack.rel_loss)
            if (pack.rel_loss <= opts.tol).all():
                break
        if last:
            break
    # pack.theta holds theta already: every way out of the loop passes the copy above (max_epochs = 0: theta is the start)
    if not exact:
        pack.rel_loss = pack.mse(X, Y).cpu().numpy()
    pack.status[:] = np.where(pack.rel_loss <= opts.tol, CONVERGED, ACTIVE)
    return pack
