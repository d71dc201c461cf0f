"""The fully connected network that teachers and recovered networks share.

A plain module (hidden layers of one activation, a linear output layer, and optionally the
affine skip path x ↦ θᵀ[x; 1] that the even+linear symmetry classes need), whose layers are
easy to read out as [w; b] neuron vectors.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from . import activations
from .errors import TeacherError


class MLP(nn.Module):
    """``widths = [d_in, h_1, …, h_L, d_out]``; float64 by default, since precision decides recovery.

    Example:
        >>> net = MLP([3, 4, 1], "tanh")
        >>> net(torch.zeros(2, 3, dtype=torch.float64)).shape
        torch.Size([2, 1])
    """

    def __init__(
        self,
        widths: Sequence[int],
        activation: str,
        *,
        affine: bool = False,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 2 or min(widths[0], widths[-1]) < 1 or min(widths) < 0:
            raise TeacherError(f"widths {widths}: need [d_in, ..., d_out] with d_in, d_out >= 1 and hidden widths >= 0")
        self.widths = widths
        self.activation = activations.get(activation).name
        self._act = activations.get(activation)
        with warnings.catch_warnings():  # a recovered layer may be empty: nothing to initialise
            warnings.filterwarnings("ignore", "Initializing zero-element tensors", UserWarning)
            self.layers = nn.ModuleList(nn.Linear(i, o, dtype=dtype) for i, o in zip(widths[:-1], widths[1:]))
        self.skip = nn.Linear(widths[0], widths[-1], bias=False, dtype=dtype) if affine else None
        if self.skip is not None:
            nn.init.zeros_(self.skip.weight)

    @property
    def hidden_widths(self) -> list[int]:
        return self.widths[1:-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in self.layers[:-1]:
            h = self._act(layer(h))
        out = self.layers[-1](h)
        if self.skip is not None:
            out = out + self.skip(x)
        return out

    def neuron_vectors(self, layer: int) -> np.ndarray:
        """Incoming [w; b] of hidden layer ``layer`` (0-based): (h_l, h_{l-1}+1) float64."""
        lin = self.layers[layer]
        return np.hstack(
            [lin.weight.detach().cpu().double().numpy(), lin.bias.detach().cpu().double().numpy()[:, None]]
        )

    def outgoing(self, layer: int) -> np.ndarray:
        """Outgoing weights of hidden layer ``layer``: (h_l, h_{l+1})."""
        return self.layers[layer + 1].weight.detach().cpu().double().numpy().T.copy()

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        """numpy in, numpy out, in the module's dtype."""
        p = next(self.parameters())
        return self(torch.as_tensor(np.asarray(x), dtype=p.dtype, device=p.device)).cpu().numpy()


def from_layers(
    weights: Sequence[np.ndarray],
    biases: Sequence[np.ndarray],
    activation: str,
    skip: np.ndarray | None = None,
    dtype: torch.dtype = torch.float64,
) -> MLP:
    """Build an MLP from per-layer weights (out, in) and biases (out,); ``skip``: (d_out, d_in)."""
    widths = [weights[0].shape[1]] + [w.shape[0] for w in weights]
    net = MLP(widths, activation, affine=skip is not None, dtype=dtype)
    with torch.no_grad():
        for lin, w, b in zip(net.layers, weights, biases):
            lin.weight.copy_(torch.as_tensor(np.asarray(w)))
            lin.bias.copy_(torch.as_tensor(np.asarray(b)))
        if skip is not None:
            net.skip.weight.copy_(torch.as_tensor(np.asarray(skip)))
    return net
