"""Clustering at scale: time and peak memory of the scipy and FAISS backends, and whether they agree.

Layers are "perfect students" (as in cluster_rules.py, larger): N students of width W, each holding
the r = W/4 teacher neurons of a tanh teacher ([w; b] ~ N(0, 1) in D dimensions; random order and
signs, one neuron split into two copies, copies perturbed by N(0, 1e-9²) as students at machine
precision would be) and W − r − 1 debris neurons ~ N(0, 0.1²), canonicalised with ecdist's tanh
symmetry, stored as float32. W = 400 up to M = 5·10⁴ rows (N = M/400), W = 2,000 above (N = M/2000):
500 students × 2,000 neurons is the million. Every row is clustered (no contribution weights: the
debris stays in), stable rule, γ = 0.5, β = π/3.

Each (backend, M, D) runs in its own subprocess (``ecdist.bench.clustering.measure``: the
measuring code is ``ecdist.bench.clustering``, which ``ecdist bench`` runs too), which loads the
layer, warms the backend up on its first 2,000 rows and clusters it: ``time_s`` is the
cluster_layer call, ``peak_rss_mb`` the process's peak resident memory minus what it held
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
import sys
import time
from pathlib import Path

import _common

from ecdist.bench import clustering, plots

SIZES = (10_000, 20_000, 50_000, 200_000, 1_000_000)
DIMS = (65, 785)
SCIPY_MAX = 50_000  # the comparison range; above it only FAISS runs
QUICK_SIZES, QUICK_DIMS = (5_000, 10_000), (65,)
TIMEOUT_S = 3600


def _describe(r: dict) -> str:
    if r.get("status") != "ok":
        return f"{r.get('status')}: {r.get('reason') or r.get('stderr', '')[-300:] or r.get('timeout_s', '')}"
    return (f"{r['time_s']:8.2f} s  peak +{r['peak_rss_mb']:7.0f} MB (process {r['process_peak_rss_mb']:.0f} MB, "
            f"data {r['data_mb']:.0f} MB)  {r['clusters']} clusters, {r['exact_clusters']} certified")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="M = 5,000 and 10⁴ at D = 65 only")
    p.add_argument("--sizes", type=int, nargs="+", help="row counts (default: 10⁴ … 10⁶)")
    p.add_argument("--dims", type=int, nargs="+", help="vector dimensions (default: 65 and 785)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where FAISS searches")
    p.add_argument("--timeout", type=int, default=TIMEOUT_S, help="seconds per measurement")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    dims = args.dims or (QUICK_DIMS if args.quick else DIMS)
    out = args.out or _common.RESULTS / ("scaling_cluster_quick.json" if args.quick else "scaling_cluster.json")
    t0 = time.perf_counter()

    def progress(rows: list[dict]) -> None:
        row = rows[-1]
        for b in ("faiss", "scipy"):
            if b in row:
                print(f"D={row['dim']:4d} M={row['rows']:>9,d} {b:5s} {_describe(row[b])}", flush=True)
        if "ratio" in row:
            print(f"    scipy/faiss = {row['ratio']:.1f}x, identical partitions: {row['identical']}", flush=True)
        _common.write_json(out, {"rows": rows, "partial": True})  # a killed run keeps what it finished

    rows = clustering.run(sizes, dims, SCIPY_MAX, args.device, args.timeout, on_row=progress)
    result = {
        "benchmark": "scaling_cluster",
        "description": __doc__.split("\n\n")[0],
        "setup": {"gamma": clustering.GAMMA, "beta": clustering.BETA, "rule": "stable",
                  "debris_std": clustering.DEBRIS_STD, "copy_noise": clustering.COPY_NOISE,
                  "scipy_max_rows": SCIPY_MAX, "device": args.device, "sizes": list(sizes), "dims": list(dims),
                  "targets": {"ratio_at_2e4": 20, "faiss_1e6_d65_s": 180, "faiss_1e6_d65_peak_mb": 4096}},
        "rows": rows,
        "fits": clustering.fits(rows),
        "wall_s": time.perf_counter() - t0,
        "machine": _common.machine_info(),
    }
    _common.write_json(out, result)
    plots.cluster(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
