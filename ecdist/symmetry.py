"""Symmetry classes: what a hidden neuron's incoming vector is identifiable up to, and how to
bring every copy of a neuron to one canonical form before clustering.

A neuron is its incoming vector v = [w; b] (shape ``(d_in+1,)``) and its outgoing weights
a (shape ``(d_out,)``); it adds a·σ(w·x + b) to the next layer. Five classes (paper, Table 1;
the authors' ``symmetry_registry``):

==========================  =====================================  ===========================
class                       transformation that keeps f             what canonicalisation does
==========================  =====================================  ===========================
none (g)                    —                                      nothing
odd (tanh, identity)        (v, a) → (−v, −a)                      sign, outgoing flips too
odd_constant (sigmoid)      (v, a) → (−v, −a), next bias + a       sign, outgoing flips, shift
even_linear (softplus,      (v, a) → (−v, a) + linear term 2c·a·vᵀ  sign; outgoing unchanged;
GELU, SiLU)                 [x;1] (the covert linear symmetry)      affine correction
even_linear_scaling (ReLU)  as even_linear, and (v, a) → (αv, a/α)  unit norm, then as above
==========================  =====================================  ===========================

The canonical sign makes the largest-magnitude coordinate positive: v and −v pick the same
coordinate, and unlike the authors' fixed coordinate 0 it cannot be a coordinate that is
always near zero (a masked pixel).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Canonical:
    """Canonicalised neurons; ``affine`` restores the exact function (see ``Symmetry``).

    vectors: (M, d_in+1); outgoing: (M, d_out); sign, scale: (M,) with v_canon = sign·v/scale;
    affine: (d_in+1, d_out) so that Σ a σ(vᵀx̃) = Σ a' σ(v'ᵀx̃) + x̃ᵀ·affine, x̃ = [x; 1].
    """

    vectors: np.ndarray
    outgoing: np.ndarray
    sign: np.ndarray
    scale: np.ndarray
    affine: np.ndarray


@dataclass(frozen=True)
class Symmetry:
    """One symmetry class. Flags say which transformations leave the network function unchanged."""

    name: str
    sign: bool  # a sign flip of v is a symmetry (possibly with a correction)
    flips_outgoing: bool  # the outgoing weights change sign with v (odd classes)
    constant_shift: bool  # a flip moves a·1 into the next bias (sigmoid)
    linear_shift: bool  # a flip moves 2c·a·vᵀx̃ into a linear term (even+linear classes)
    scaling: bool  # positive scaling (v, a) → (αv, a/α) (ReLU, leaky ReLU)

    @property
    def needs_affine(self) -> bool:
        """Only the sum of the linear parts is identifiable: reconstruct an affine path x ↦ θᵀx̃."""
        return self.linear_shift

    def canonicalize(
        self, vectors: np.ndarray, outgoing: np.ndarray | None = None, linear_coef: float = 0.0
    ) -> Canonical:
        """Map every neuron to its canonical form.

        vectors: (M, d_in+1) incoming [w; b]; outgoing: (M, d_out) or None;
        linear_coef: c of the activation (σ(z) − σ(−z) = 2c·z), used by the even+linear classes.
        """
        v = np.array(vectors, dtype=np.result_type(np.asarray(vectors).dtype, np.float32))
        m = v.shape[0]
        a = np.zeros((m, 0), v.dtype) if outgoing is None else np.array(outgoing, dtype=v.dtype)
        if a.ndim == 1:
            a = a[:, None]
        scale = np.ones(m, v.dtype)
        if self.scaling:
            norms = np.linalg.norm(v, axis=1)
            scale = np.where(norms > 0, norms, 1.0).astype(v.dtype)
            v = v / scale[:, None]
            a = a * scale[:, None]
        sign = np.ones(m, v.dtype)
        affine = np.zeros((v.shape[1], a.shape[1]), v.dtype)
        if self.sign and m:
            pivot = np.abs(v).argmax(axis=1)
            sign = np.where(v[np.arange(m), pivot] < 0, -1.0, 1.0).astype(v.dtype)
            flipped = sign < 0
            if self.constant_shift:
                affine[-1] += a[flipped].sum(axis=0)
            if self.linear_shift:
                affine += 2 * linear_coef * v[flipped].T @ a[flipped]
            v = v * sign[:, None]
            if self.flips_outgoing:
                a = a * sign[:, None]
        return Canonical(v, a, sign, scale, affine)

    def distance(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """1 − |cos| between rows of u and v (1 − cos for the class without sign symmetry).

        The teacher-match metric d_w of the paper; u: (P, D), v: (Q, D) → (P, Q).
        """
        un = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), np.finfo(float).tiny)
        vn = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), np.finfo(float).tiny)
        cos = np.clip(un @ vn.T, -1.0, 1.0)
        return 1 - (np.abs(cos) if self.sign else cos)


NONE = Symmetry("none", sign=False, flips_outgoing=False, constant_shift=False, linear_shift=False, scaling=False)
ODD = Symmetry("odd", sign=True, flips_outgoing=True, constant_shift=False, linear_shift=False, scaling=False)
ODD_CONSTANT = Symmetry(
    "odd_constant", sign=True, flips_outgoing=True, constant_shift=True, linear_shift=False, scaling=False
)
EVEN_LINEAR = Symmetry(
    "even_linear", sign=True, flips_outgoing=False, constant_shift=False, linear_shift=True, scaling=False
)
EVEN_LINEAR_SCALING = Symmetry(
    "even_linear_scaling", sign=True, flips_outgoing=False, constant_shift=False, linear_shift=True, scaling=True
)
