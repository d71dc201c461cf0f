"""Clustering at scale: time and peak memory of the scipy and FAISS backends, and whether they agree.

Layers are "perfect students" (as in cluster_rules.py, larger): N students of width W, each holding
the r = W/4 teacher neurons of a tanh teacher ([w; b] ~ N(0, 1) in D dimensions; random order and
signs, one neuron split into two copies, copies perturbed by N(0, 1e-9²) as students at machine
precision would be) and W − r − 1 debris neurons ~ N(0, 0.1²), canonicalised with ecdist's tanh
symmetry, stored as float32. W = 400 up to M = 5·10⁴ rows (N = M/400), W = 2,000 above (N = M/2000):
500 students × 2,000 neurons is the million. Every row is clustered (no contribution weights: the
debris stays in), stable rule, γ = 0.5, β = π/3.

Each (backend, M, D) runs in its own subprocess, which loads the layer and clusters it: ``time_s``
is the cluster_layer call, ``peak_rss_mb`` the process's peak resident memory minus what it held
after loading the layer (so: the clustering step's own memory, FAISS's C++ side included),
``data_mb`` the float32 layer. ``traced_peak_mb`` is the peak of the Python-side (numpy)
allocations that tracemalloc sees, from a second, traced call (tracemalloc slows the FAISS
backend's Python loops several-fold, so the timed call is not traced; not run above 2·10⁵ rows).
scipy runs up to 5·10⁴ rows where it fits in memory; at each M where both ran, ``ratio`` is scipy
time / FAISS time and ``identical`` says whether the two partitions of the kept clusters are equal.

Run:  python benchmarks/scaling_cluster.py            (hours on 2 shared cores; 10⁶ × 785 is large)
      python benchmarks/scaling_cluster.py --quick    (M = 5,000 and 10⁴, D = 65: about a minute)
      python benchmarks/scaling_cluster.py --device cuda   (FAISS on the GPU; scipy as before)
Out:  benchmarks/results/scaling_cluster.json and .png (scaling_cluster_quick.* with --quick)
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
import time
from pathlib import Path

import _common
import numpy as np

SIZES = (10_000, 20_000, 50_000, 200_000, 1_000_000)
DIMS = (65, 785)
SCIPY_MAX = 50_000  # the comparison range; above it only FAISS runs
QUICK_SIZES, QUICK_DIMS = (5_000, 10_000), (65,)
GAMMA, BETA = 0.5, math.pi / 3
DEBRIS_STD, COPY_NOISE = 0.1, 1e-9
TIMEOUT_S = 3600
TRACE_MAX = 200_000  # rows up to which a second, traced call measures the Python-side peak


def shape(m: int) -> tuple[int, int, int]:
    """(students, width, teacher neurons) of a layer of m rows."""
    width = 400 if m <= 50_000 else 2000
    return m // width, width, width // 4


def write_layer(path: Path, m: int, dim: int, seed: int = 0) -> None:
    """Perfect-student rows (float32 .npy, written student by student) and their student ids."""
    from ecdist.activations import REGISTRY

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


def worker(backend: str, path: Path, labels_out: Path, device: str) -> dict:
    """One measurement, in a fresh process (see the module docstring)."""
    import tracemalloc

    import faiss
    import faiss.contrib.ivf_tools  # noqa: F401
    import scipy.cluster.hierarchy
    import scipy.sparse.csgraph  # noqa: F401

    from ecdist.cluster import cluster_layer

    V = np.load(path)
    n, width, _ = shape(len(V))
    sid = np.repeat(np.arange(n), width)
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    res = cluster_layer(V, sid, GAMMA, BETA, backend=backend, device=device)
    elapsed = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    np.save(labels_out, res.labels.astype(np.int32))
    traced = None
    if len(V) <= TRACE_MAX:
        tracemalloc.start()
        cluster_layer(V, sid, GAMMA, BETA, backend=backend, device=device)
        traced = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return {
        "time_s": elapsed,
        "peak_rss_mb": (peak_kb - base_kb) / 1024,
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


def measure(backend: str, path: Path, tmp: Path, device: str, timeout: int) -> dict:
    labels = tmp / f"labels_{backend}.npy"
    cmd = [sys.executable, __file__, "--worker", backend, str(path), str(labels), "--device", device]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "timeout_s": timeout}
    if proc.returncode != 0:
        return {"status": "failed", "returncode": proc.returncode, "stderr": proc.stderr[-2000:]}
    return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1]), "labels": str(labels)}


def run(sizes, dims, device: str, timeout: int, out: Path) -> dict:
    rows = []
    result = {"rows": rows}
    with tempfile.TemporaryDirectory(prefix="ecdist-scaling-") as tmpdir:
        tmp = Path(tmpdir)
        for dim in dims:
            for m in sizes:
                path = tmp / f"layer_{m}_{dim}.npy"
                t0 = time.perf_counter()
                write_layer(path, m, dim)
                n, width, r = shape(m)
                row = {"rows": m, "dim": dim, "students": n, "width": width, "teacher_neurons": r,
                       "generate_s": time.perf_counter() - t0}
                for backend in ("faiss", "scipy"):
                    if backend == "scipy" and m > SCIPY_MAX:
                        continue
                    fits, why = scipy_fits(m) if backend == "scipy" else (True, "")
                    row[backend] = measure(backend, path, tmp, device, timeout) if fits else {"status": "skipped", "reason": why}
                    print(f"D={dim:4d} M={m:>9,d} {backend:5s} {_describe(row[backend])}", flush=True)
                f, s = row.get("faiss", {}), row.get("scipy", {})
                if f.get("status") == "ok" and s.get("status") == "ok":
                    row["ratio"] = s["time_s"] / f["time_s"]
                    row["identical"] = bool(np.array_equal(canonical(np.load(f["labels"])), canonical(np.load(s["labels"]))))
                    print(f"    scipy/faiss = {row['ratio']:.1f}x, identical partitions: {row['identical']}", flush=True)
                for b in ("faiss", "scipy"):
                    row.get(b, {}).pop("labels", None)
                path.unlink()
                rows.append(row)
                _common.write_json(out, {**result, "partial": True})  # a killed run keeps what it finished
    return result


def _describe(r: dict) -> str:
    if r.get("status") != "ok":
        return f"{r.get('status')}: {r.get('reason') or r.get('stderr', '')[-300:] or r.get('timeout_s', '')}"
    return (f"{r['time_s']:8.2f} s  peak +{r['peak_rss_mb']:7.0f} MB (process {r['process_peak_rss_mb']:.0f} MB, "
            f"data {r['data_mb']:.0f} MB)  {r['clusters']} clusters, {r['exact_clusters']} certified")


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for dim, ls in zip(sorted({r["dim"] for r in data["rows"]}), ("-", "--", ":")):
        for backend, color in (("scipy", "C3"), ("faiss", "C0")):
            pts = [(r["rows"], r[backend]) for r in data["rows"] if r["dim"] == dim and r.get(backend, {}).get("status") == "ok"]
            if not pts:
                continue
            ms = [p[0] for p in pts]
            ax_t.plot(ms, [p[1]["time_s"] for p in pts], ls, marker="o", color=color, label=f"{backend}, D = {dim}")
            ax_m.plot(ms, [p[1]["peak_rss_mb"] for p in pts], ls, marker="o", color=color, label=f"{backend}, D = {dim}")
            if backend == "faiss":
                ax_m.plot(ms, [p[1]["data_mb"] for p in pts], ls, color="grey", lw=0.8, label=f"the vectors, D = {dim}")
    ax_t.axhline(180, color="grey", lw=0.6, ls=":")
    ax_m.axhline(4096, color="grey", lw=0.6, ls=":")
    for ax, title, unit in ((ax_t, "time of one clustering", "seconds"), (ax_m, "peak memory of the step", "MB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("neuron vectors M")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="M = 5,000 and 10⁴ at D = 65 only")
    p.add_argument("--sizes", type=int, nargs="+", help="row counts (default: 10⁴ … 10⁶)")
    p.add_argument("--dims", type=int, nargs="+", help="vector dimensions (default: 65 and 785)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where FAISS searches")
    p.add_argument("--timeout", type=int, default=TIMEOUT_S, help="seconds per measurement")
    p.add_argument("--out", type=Path)
    p.add_argument("--worker", nargs=3, metavar=("BACKEND", "LAYER", "LABELS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        backend, layer, labels = args.worker
        print(json.dumps(worker(backend, Path(layer), Path(labels), args.device)))
        return 0
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    dims = args.dims or (QUICK_DIMS if args.quick else DIMS)
    out = args.out or _common.RESULTS / ("scaling_cluster_quick.json" if args.quick else "scaling_cluster.json")
    t0 = time.perf_counter()
    data = run(sizes, dims, args.device, args.timeout, out)
    result = {
        "benchmark": "scaling_cluster",
        "description": __doc__.split("\n\n")[0],
        "setup": {"gamma": GAMMA, "beta": BETA, "rule": "stable", "debris_std": DEBRIS_STD, "copy_noise": COPY_NOISE,
                  "scipy_max_rows": SCIPY_MAX, "device": args.device, "sizes": list(sizes), "dims": list(dims),
                  "targets": {"ratio_at_2e4": 20, "faiss_1e6_d65_s": 180, "faiss_1e6_d65_peak_mb": 4096}},
        **data,
        "wall_s": time.perf_counter() - t0,
        "machine": _common.machine_info(),
    }
    _common.write_json(out, result)
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
