"""Clustering at scale: time and peak memory of the scipy and FAISS backends against M, and whether they agree.

Layers are "perfect students": N students of width W, each holding the r = W/4 teacher neurons of a
tanh teacher ([w; b] ~ N(0, 1) in D dimensions; random order and signs, one neuron split into two
copies, copies perturbed by N(0, 1e-9²) as students at machine precision would be) and W − r − 1
debris neurons ~ N(0, 0.1²), canonicalised with ecdist's tanh symmetry, stored as float32. W = 400
up to M = 5·10⁴ rows (N = M/400), W = 2,000 above (N = M/2000): 500 students × 2,000 neurons is the
million. Every row is clustered (no contribution weights: the debris stays in), stable rule,
γ = 0.5, β = π/3.

Each (backend, M, D) runs in its own process (``main`` of this module), which loads
the layer, warms the backend up on a small layer (imports, thread pools) and clusters it:
``time_s`` is the ``cluster_layer`` call, ``peak_rss_mb`` the process's peak resident memory during
the call minus what it held before (the step's own memory, FAISS's C++ side included; sampled, see
``PeakRSS``), ``data_mb`` the float32 layer. ``traced_peak_mb`` is the peak of the Python-side (numpy) allocations that
tracemalloc sees, from a second, traced call (tracemalloc slows the FAISS backend's Python loops,
so the timed call is not traced; not run above 2·10⁵ rows). Where both backends ran, ``ratio`` is
scipy time / FAISS time and ``identical`` says whether their partitions of the kept clusters are
equal. ``fits`` are least-squares log-log slopes: time ∝ M^slope (M log M reads as a slope a
little above 1, M² as 2).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .common import ROOT

GAMMA, BETA = 0.5, math.pi / 3
DEBRIS_STD, COPY_NOISE = 0.1, 1e-9
TRACE_MAX = 200_000  # rows up to which a second, traced call measures the Python-side peak


@dataclass(frozen=True)
class ClusterSizes:
    """Row counts M for FAISS, the largest M for scipy (O(M²) memory), dimensions D, seconds per measurement."""

    sizes: tuple[int, ...]
    scipy_max: int
    dims: tuple[int, ...] = (65,)
    timeout_s: int = 3600


def shape(m: int) -> tuple[int, int, int]:
    """(students, width, teacher neurons) of a layer of m rows."""
    width = 400 if m <= 50_000 else 2000
    return m // width, width, width // 4


def write_layer(path: Path, m: int, dim: int, seed: int = 0) -> None:
    """Perfect-student rows (float32 .npy, written student by student, so 10⁶ rows fit in memory)."""
    from ..activations import REGISTRY

    tanh = REGISTRY["tanh"]
    n, width, r = shape(m)
    rng = np.random.default_rng([m, dim, seed])
    T = rng.standard_normal((r, dim))
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n * width, dim))
    for s in range(n):
        dup = rng.integers(r)
        v = np.vstack([T, T[dup : dup + 1], DEBRIS_STD * rng.standard_normal((width - r - 1, dim))])
        v[: r + 1] += COPY_NOISE * rng.standard_normal((r + 1, dim))
        v *= rng.choice([-1.0, 1.0], width)[:, None]
        out[s * width : (s + 1) * width] = tanh.symmetry.canonicalize(v[rng.permutation(width)], np.ones((width, 1))).vectors
    out.flush()
    del out


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled from /proc/self/statm.

    A sampler, not ``ru_maxrss``: the process's high-water mark is often set by its imports, and a
    step that stays below it would read as 0 MB. Every 10 ms (negligible cost; the allocations
    that matter live far longer). ``delta_mb``: the peak minus the memory held on entry; None where
    /proc is missing (not Linux).
    """

    STATM = Path("/proc/self/statm")

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = self._max(self._rss())

    @property
    def delta_mb(self) -> float | None:
        return None if self.base is None else (self.peak - self.base) / 2**20

    def _poll(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = self._max(self._rss())

    def _max(self, rss: int | None) -> int | None:
        return None if rss is None or self.peak is None else max(self.peak, rss)

    def _rss(self) -> int | None:
        try:
            return int(self.STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None


def worker(backend: str, path: Path, labels_out: Path, device: str) -> dict[str, Any]:
    """One measurement, in a fresh process (see the module docstring)."""
    import tracemalloc

    from ..cluster import cluster_layer

    V = np.load(path)
    n, width, _ = shape(len(V))
    sid = np.repeat(np.arange(n), width)
    warm = min(len(V), 2000)  # five students of width 400: clusters of ⌊γN⌋ = 2 can form
    cluster_layer(V[:warm], sid[:warm], GAMMA, BETA, backend=backend, device=device)
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        res = cluster_layer(V, sid, GAMMA, BETA, backend=backend, device=device)
        elapsed = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sampled = rss.delta_mb
    np.save(labels_out, res.labels.astype(np.int32))
    traced = None
    if len(V) <= TRACE_MAX:
        tracemalloc.start()
        cluster_layer(V, sid, GAMMA, BETA, backend=backend, device=device)
        traced = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return {
        "time_s": elapsed,
        "peak_rss_mb": sampled if sampled is not None else (peak_kb - base_kb) / 1024,
        "memory_method": "sampled /proc/self/statm" if sampled is not None else "ru_maxrss increase",
        "process_peak_rss_mb": peak_kb / 1024,
        "traced_peak_mb": traced,
        "data_mb": V.nbytes / 2**20,
        "clusters": int(res.n_clusters),
        "exact_clusters": int(res.exact.sum()),
        "backend": res.backend,
    }


def canonical(labels: np.ndarray) -> np.ndarray:
    """Labels renamed by each cluster's smallest row: equal arrays ⇔ equal partitions."""
    out = np.full(labels.shape, -1, dtype=np.int64)
    kept = labels >= 0
    if kept.any():
        first = np.full(labels.max() + 1, len(labels), dtype=np.int64)
        np.minimum.at(first, labels[kept], np.flatnonzero(kept))
        out[kept] = first[labels[kept]]
    return out


def scipy_fits(m: int) -> tuple[bool, str]:
    """pdist (8·M²/2 bytes) plus the copy scipy's linkage makes must fit in the free memory."""
    need = 2 * 8 * m * (m - 1) / 2
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > 0.8 * avail:
        return False, f"needs {need / 2**30:.1f} GiB (condensed distances and linkage's copy); {avail / 2**30:.1f} GiB free"
    return True, ""


def measure(backend: str, path: Path, tmp: Path, device: str, timeout: int) -> dict[str, Any]:
    """Run ``worker`` in a fresh interpreter on the ecdist that runs here; its result or why it failed."""
    labels = tmp / f"labels_{backend}.npy"
    boot = "import sys; from ecdist.bench.clustering import main; sys.exit(main())"  # -m would import it twice
    cmd = [sys.executable, "-c", boot, backend, str(path), str(labels), "--device", device]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "timeout_s": timeout}
    if proc.returncode != 0:
        return {"status": "failed", "returncode": proc.returncode, "stderr": proc.stderr[-2000:]}
    return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1]), "labels": str(labels)}


def run(
    sizes: Sequence[int],
    dims: Sequence[int],
    scipy_max: int,
    device: str = "auto",
    timeout: int = 3600,
    on_row: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per (D, M): FAISS always, scipy up to ``scipy_max`` rows where it fits in memory.

    on_row: called with the rows so far after each one (a long run saves what it finished).
    """
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ecdist-bench-cluster-") as tmpdir:
        tmp = Path(tmpdir)
        for dim in dims:
            for m in sizes:
                path = tmp / f"layer_{m}_{dim}.npy"
                t0 = time.perf_counter()
                write_layer(path, m, dim)
                n, width, r = shape(m)
                row: dict[str, Any] = {"rows": m, "dim": dim, "students": n, "width": width, "teacher_neurons": r,
                                       "generate_s": time.perf_counter() - t0}
                for backend in ("faiss", "scipy"):
                    if backend == "scipy" and m > scipy_max:
                        continue
                    fits, why = scipy_fits(m) if backend == "scipy" else (True, "")
                    row[backend] = measure(backend, path, tmp, device, timeout) if fits else {"status": "skipped", "reason": why}
                f, s = row.get("faiss", {}), row.get("scipy", {})
                if f.get("status") == "ok" and s.get("status") == "ok":
                    row["ratio"] = s["time_s"] / f["time_s"]
                    row["identical"] = bool(np.array_equal(canonical(np.load(f["labels"])), canonical(np.load(s["labels"]))))
                for b in ("faiss", "scipy"):
                    row.get(b, {}).pop("labels", None)
                path.unlink()
                rows.append(row)
                if on_row is not None:
                    on_row(rows)
    return rows


def loglog_fit(x: Sequence[float], y: Sequence[float]) -> dict[str, float] | None:
    """Least-squares y ≈ a·x^slope on the positive points; None with fewer than two distinct x."""
    pts = [(a, b) for a, b in zip(x, y) if a > 0 and b is not None and b > 0]
    if len({a for a, _ in pts}) < 2:
        return None
    lx, ly = np.log([a for a, _ in pts]), np.log([b for _, b in pts])
    slope, intercept = np.polyfit(lx, ly, 1)
    return {"slope": float(slope), "a": float(np.exp(intercept)), "points": len(pts),
            "m_min": float(min(a for a, _ in pts)), "m_max": float(max(a for a, _ in pts))}


def m_log_m_slope(m_min: float, m_max: float) -> float:
    """The log-log slope of t ∝ M·log M between m_min and m_max: what a FAISS slope is read against.

    >>> round(m_log_m_slope(1e4, 1e6), 3)
    1.088
    """
    return 1 + math.log(math.log(m_max) / math.log(m_min)) / math.log(m_max / m_min)


def fits(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per D and backend: log-log slopes of time and of memory (process peak and Python-side) against M."""
    out: dict[str, Any] = {}
    for dim in sorted({r["dim"] for r in rows}):
        for backend in ("faiss", "scipy"):
            ok = sorted((r for r in rows if r["dim"] == dim and r.get(backend, {}).get("status") == "ok"),
                        key=lambda r: r["rows"])
            if ok:
                ms = [r["rows"] for r in ok]
                ts = [r[backend]["time_s"] for r in ok]
                time_fit = loglog_fit(ms, ts)
                out[f"{backend}_d{dim}"] = {
                    "time": time_fit,
                    "time_two_largest": loglog_fit(ms[-2:], ts[-2:]),  # fixed costs weigh least there
                    "m_log_m_slope": m_log_m_slope(min(ms), max(ms)) if time_fit else None,
                    "peak_rss_mb": loglog_fit(ms, [r[backend]["peak_rss_mb"] for r in ok]),
                    "traced_peak_mb": loglog_fit(ms, [r[backend]["traced_peak_mb"] for r in ok]),
                }
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of the measuring subprocess: prints the worker's JSON as its last line."""
    p = argparse.ArgumentParser(description="one clustering measurement (run by ecdist.bench.clustering.measure)")
    p.add_argument("backend", choices=["faiss", "scipy"])
    p.add_argument("layer", type=Path)
    p.add_argument("labels", type=Path)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    print(json.dumps(worker(args.backend, args.layer, args.labels, args.device)))
    return 0
