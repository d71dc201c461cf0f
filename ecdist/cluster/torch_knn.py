"""Exact k-nearest-neighbour search with torch: FAISS's flat L2 search on any torch device.

Why: faiss-gpu's wheels need the CUDA 12 runtime, so a machine with a newer CUDA (or with no
FAISS at all) would search on its CPU; torch is there on every machine ecdist runs on.
``TorchFlatIndex`` has the part of ``faiss.IndexFlatL2`` that ``faiss_backend`` uses (``add``,
``ntotal``, ``search``) and ``knn`` that of ``faiss.knn``, with the same output: float32 squared
distances and int64 positions, nearest first, −1 (distance inf) where there are fewer than k rows.

How: FAISS's expansion ‖q − x‖² = ‖q‖² − 2 q·x + ‖x‖², in float32. The queries × rows distances
are computed in tiles sized to the free memory (never an M × M matrix); each tile keeps its k
smallest (``torch.topk``) and the tiles' bests are merged. Rows are ranked by ‖x‖² − 2 q·x (one
``addmm``), and ‖q‖², the same for a whole row of the tile, is added to the k kept only.

Rounding (u = 2⁻²⁴; every row within R of the origin — ``faiss_backend`` centres the rows): the
dot product errs by at most D·u·‖q‖‖x‖ (any summation order), each squared norm by D·u·R², the
two additions by 3u·R² and 4u·R²: (4D + 7)·u·R² in all, as for FAISS's flat L2, which adds the
norms first. That is under half of the (8D + 64)·u·R² that ``faiss_backend.F32_ERR`` allows, and
the rest covers rounding the rows to float32 (≤ 2u·R in the distance). It holds only for true
float32 products: TF32 (10-bit mantissa) or bf16 would break it, so searches switch them off
(``_ieee_fp32``) whatever the process set.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

QUERY_TILE = 4096  # query rows per tile: a (4096 × 65) by (65 × cols) product keeps a GPU busy
TILE_BYTES_GPU = 1 << 30  # one distance tile on a GPU: 1 GiB, or an eighth of the free memory if less
TILE_BYTES_CPU = 1 << 26  # 64 MiB on a CPU: larger tiles gain nothing there and crowd other work


class TorchFlatIndex:
    """Rows (n, dim) kept on ``device`` as float32 and searched exactly; like ``faiss.IndexFlatL2``.

    Example:
        >>> import numpy as np
        >>> index = TorchFlatIndex(2)
        >>> index.add(np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]]))
        >>> D, I = index.search(np.array([[0.0, 0.0]]), 2)
        >>> I.tolist(), D.tolist()
        ([[0, 2]], [[0.0, 1.0]])
    """

    def __init__(self, dim: int, device: str | torch.device = "cpu") -> None:
        self.dim = dim
        self.device = torch.device(device)
        self._parts: list[torch.Tensor] = []  # rows as added, joined at the next search
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, squared norms)

    @property
    def ntotal(self) -> int:
        return sum(len(p) for p in self._parts)

    def add(self, x: np.ndarray) -> None:
        """Append rows (n, dim); positions run on from ``ntotal``."""
        self._parts.append(_tensor(x, self.device))
        self._rows = None

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest rows of each query row: (nq, k) float32 squared distances, (nq, k) int64 positions."""
        nq = len(xq)
        D = np.full((nq, k), np.inf, dtype=np.float32)
        I = np.full((nq, k), -1, dtype=np.int64)
        kk = min(k, self.ntotal)
        if kk == 0 or nq == 0:
            return D, I
        x, xn = self._database()
        q = _tensor(xq, self.device)
        qb = min(nq, QUERY_TILE)
        cols = max(kk, min(len(x), self._tile_bytes() // (4 * qb)))
        with _ieee_fp32():
            for s in range(0, nq, qb):
                d, i = _search_block(q[s : s + qb], x, xn, kk, cols)
                D[s : s + qb, :kk] = d.cpu().numpy()
                I[s : s + qb, :kk] = i.cpu().numpy()
        return D, I

    def _database(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rows is None:
            x = self._parts[0] if len(self._parts) == 1 else torch.cat(self._parts)
            self._parts = [x]
            self._rows = x, (x * x).sum(dim=1)  # not einsum: that may run as a (TF32) matmul
        return self._rows

    def _tile_bytes(self) -> int:
        if self.device.type != "cuda":
            return TILE_BYTES_CPU
        free, _ = torch.cuda.mem_get_info(self.device)
        return min(TILE_BYTES_GPU, free // 8)


def knn(xq: np.ndarray, xb: np.ndarray, k: int, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of xb (n, D) for each row of xq (nq, D); ``faiss.knn``'s output."""
    index = TorchFlatIndex(xb.shape[1], device)
    index.add(xb)
    return index.search(xq, k)


def _search_block(q: torch.Tensor, x: torch.Tensor, xn: torch.Tensor, k: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest rows of x for each query of q, ``cols`` rows of x at a time, nearest first."""
    q2 = -2 * q  # exact: a power of two
    best_v = best_i = None
    for c in range(0, len(x), cols):
        part = torch.addmm(xn[c : c + cols], q2, x[c : c + cols].T)  # ‖x‖² − 2 q·x
        v, i = part.topk(min(k, part.shape[1]), dim=1, largest=False, sorted=False)
        i += c
        if best_v is not None:
            v, j = torch.cat([best_v, v], dim=1).topk(k, dim=1, largest=False, sorted=False)
            i = torch.cat([best_i, i], dim=1).gather(1, j)
        best_v, best_i = v, i
    v, j = best_v.sort(dim=1)
    d = (v + (q * q).sum(dim=1, keepdim=True)).clamp_min_(0)  # rounding can dip below 0, as in FAISS
    return d, best_i.gather(1, j)


def _tensor(x: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)


@contextmanager
def _ieee_fp32() -> Iterator[None]:
    """Plain float32 matrix products (no TF32, no bf16) for the duration; the caller's setting is restored.

    torch ≥ 2.9 has one setting per backend, and refuses to mix it with the legacy global one, so
    the per-backend settings are used where they exist.
    """
    knobs = [torch.backends.cuda.matmul, torch.backends.mkldnn.matmul]
    if not all(hasattr(k, "fp32_precision") for k in knobs):  # torch < 2.9
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(before)
        return
    before = [k.fp32_precision for k in knobs]
    for k in knobs:
        k.fp32_precision = "ieee"
    try:
        yield
    finally:
        for k, p in zip(knobs, before):
            k.fp32_precision = p
