"""Activation functions, their derivatives, and the symmetry class each one belongs to.

The registry is the one place that maps an activation name to its function and its symmetry
(the authors' ``symmetry_registry``); add a new activation here and everything else follows.
Derivatives are written out because the Levenberg–Marquardt students use closed-form Jacobians.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .symmetry import (
    EVEN_LINEAR,
    EVEN_LINEAR_SCALING,
    NONE,
    ODD,
    ODD_CONSTANT,
    Symmetry,
)

Fn = Callable[[torch.Tensor], torch.Tensor]
LEAKY_SLOPE = 0.01  # torch's default negative slope


@dataclass(frozen=True)
class Activation:
    """An activation: value, derivative, and the symmetry that limits what can be identified."""

    name: str
    fn: Fn
    grad: Fn
    symmetry: Symmetry
    linear_coef: float = 0.0  # c in σ(z) = even(z) + c·z, for the even+linear classes
    # the derivative from the value σ(z), where that is cheaper than from z (it saves a second tanh)
    grad_of_value: Fn | None = None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.fn(z)


def _softplus(z: torch.Tensor) -> torch.Tensor:
    # log(1 + e^z) without torch's switch to z above 20, so that its derivative is sigmoid everywhere
    return torch.logaddexp(z, torch.zeros_like(z))


def _g(z: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(4 * z) + _softplus(z)


def _g_grad(z: torch.Tensor) -> torch.Tensor:
    s4 = torch.sigmoid(4 * z)
    return 4 * s4 * (1 - s4) + torch.sigmoid(z)


def _tanh_grad(z: torch.Tensor) -> torch.Tensor:
    return 1 - torch.tanh(z) ** 2


def _tanh_grad_of_value(h: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(torch.ones((), dtype=h.dtype, device=h.device), h, h, value=-1)  # 1 − h², one pass


def _sigmoid_grad(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 - s)


def _gelu(z: torch.Tensor) -> torch.Tensor:
    return F.gelu(z)


def _gelu_grad(z: torch.Tensor) -> torch.Tensor:
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return cdf + z * pdf


def _silu_grad(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _leaky(z: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(z, LEAKY_SLOPE)


def _leaky_grad(z: torch.Tensor) -> torch.Tensor:
    return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, LEAKY_SLOPE))


REGISTRY: dict[str, Activation] = {
    a.name: a
    for a in (
        # g has no sign symmetry: the authors' symmetry-free control activation.
        Activation("g", _g, _g_grad, NONE),
        Activation("tanh", torch.tanh, _tanh_grad, ODD, grad_of_value=_tanh_grad_of_value),
        Activation("identity", lambda z: z, torch.ones_like, ODD),
        # sigmoid(-z) = 1 - sigmoid(z): a sign flip moves a constant into the next bias.
        Activation("sigmoid", torch.sigmoid, _sigmoid_grad, ODD_CONSTANT, grad_of_value=lambda h: h * (1 - h)),
        # softplus(z) - softplus(-z) = z, likewise GELU and SiLU: the covert linear symmetry.
        Activation("softplus", _softplus, torch.sigmoid, EVEN_LINEAR, 0.5),
        Activation("gelu", _gelu, _gelu_grad, EVEN_LINEAR, 0.5),
        Activation("silu", F.silu, _silu_grad, EVEN_LINEAR, 0.5),
        Activation("relu", torch.relu, lambda z: (z > 0).to(z.dtype), EVEN_LINEAR_SCALING, 0.5),
        Activation("leaky_relu", _leaky, _leaky_grad, EVEN_LINEAR_SCALING, (1 + LEAKY_SLOPE) / 2),
    )
}


def get(name: str | Activation) -> Activation:
    """Look an activation up by name; raises ConfigError listing the known names."""
    if isinstance(name, Activation):
        return name
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(REGISTRY))
        raise ConfigError(f"activation: unknown activation {name!r}; choose one of {known}") from None
