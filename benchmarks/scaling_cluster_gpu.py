"""Clustering at scale on one CUDA GPU with torch's kNN search (for GPUs that faiss-gpu cannot use).

The layers of ``scaling_cluster.py`` (its generator: perfect students, D = 65; W = 400 up to
5·10⁴ rows, 2,000 above; every row clustered, stable rule, γ = 0.5, β = π/3), M = 10⁴ … 10⁶,
clustered by ``NeuronIndex(knn="torch", device="cuda")``: the kNN graph is searched on the GPU
(exact, flat), the rest — spanning tree, exact linkage in the leaves, rules, certificates — runs
on the CPU as before. Per M: ``knn_s`` (the kNN graph: the GPU search and the neighbour tables),
``total_s`` (add + cluster) and the other steps' seconds, ``gpu_peak_mb`` (peak torch allocation:
the rows and the distance tiles), clusters found and certified against the teacher's neurons,
and a check of the search: the neighbours of ``CHECK_ROWS`` sampled rows against float64 distances
on the CPU — the largest distance error next to the bound δ that the backend's certificates
assume, and whether every neighbour list is a true one up to ties within δ.

Run:   PYTHONPATH=. python benchmarks/scaling_cluster_gpu.py              (M = 10⁴ … 10⁶; 1 min on an H200)
       PYTHONPATH=. python benchmarks/scaling_cluster_gpu.py --quick      (M = 10⁴ and 5·10⁴)
       ... --max-rows 200000 --out DIR/scaling_cluster_gpu.json
Needs: CUDA, torch, numpy, scipy, pyarrow, matplotlib; neither FAISS nor Ray.
Out:   benchmarks/results/scaling_cluster_gpu.json and .png (``_quick`` with --quick); the JSON is
       rewritten after every size, so a killed run keeps what it finished.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import _common
import numpy as np

from ecdist.bench.clustering import BETA, COPY_NOISE, DEBRIS_STD, GAMMA, shape, write_layer
from ecdist.bench.plots import loglog_vs_m

SIZES = (10_000, 20_000, 50_000, 200_000, 1_000_000)
QUICK_SIZES = (10_000, 50_000)
DIM = 65
CHECK_ROWS = 1000  # rows whose neighbours are checked against float64 (1000 × M distances on the CPU)


def measure(V: np.ndarray, sid: np.ndarray) -> dict:
    """Cluster one layer on the GPU; seconds per step and peak GPU memory."""
    import torch

    from ecdist.cluster.faiss_backend import NeuronIndex

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    index = NeuronIndex(V.shape[1], device="cuda", knn="torch").add(V, sid)
    res = index.cluster(GAMMA, BETA)
    total = time.perf_counter() - t0
    info = index.info_
    return {
        "total_s": total,
        **{k: info[k] for k in ("knn_s", "tree_s", "linkage_s", "upper_s", "rules_s") if k in info},
        "index": info.get("index"),
        "leaves": info.get("leaves"),
        "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20,
        "gpu_reserved_mb": torch.cuda.max_memory_reserved() / 2**20,
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "data_mb": V.nbytes / 2**20,
        "clusters": int(res.n_clusters),
        "exact_clusters": int(res.exact.sum()),
    }


def check_search(V: np.ndarray, k: int, seed: int = 0) -> dict:
    """The GPU's k nearest rows (self included) of sampled rows against float64 brute force on the CPU."""
    from ecdist.cluster import torch_knn
    from ecdist.cluster.faiss_backend import F32_ERR

    x64 = V.astype(np.float64) - V.mean(axis=0)  # centred, as the backend searches
    R = float(np.sqrt((x64**2).sum(axis=1).max()))
    delta = F32_ERR * math.sqrt(V.shape[1] + 8) * R
    rows = np.sort(np.random.default_rng(seed).choice(len(V), min(CHECK_ROWS, len(V)), replace=False))
    index = torch_knn.TorchFlatIndex(V.shape[1], "cuda")
    index.add(x64.astype(np.float32))
    D, I = index.search(x64[rows].astype(np.float32), k)
    norms = (x64**2).sum(axis=1)
    err, valid = 0.0, 0
    for s in range(0, len(rows), 100):  # 100 × M float64 distances at a time
        q = rows[s : s + 100]
        d2 = norms[None, :] - 2 * (x64[q] @ x64.T)  # squared distances less ‖q‖²: the same order
        kth = np.sort(np.partition(d2, k - 1, axis=1)[:, :k], axis=1)
        kth = np.sqrt(np.maximum(kth + norms[q, None], 0))
        got = np.sqrt(np.maximum(np.take_along_axis(d2, I[s : s + 100], axis=1) + norms[q, None], 0))
        err = max(err, float(np.abs(np.sqrt(D[s : s + 100]) - kth).max()))
        valid += int((got.max(axis=1) <= kth[:, -1] + 2 * delta).sum())
    return {"rows": len(rows), "k": k, "max_distance_error": err, "delta_bound": delta,
            "within_bound": err <= delta, "valid_neighbour_lists": valid / len(rows)}


def run(sizes, out: Path, header: dict) -> list[dict]:
    import torch

    from ecdist.cluster import torch_knn
    from ecdist.cluster.faiss_backend import K

    torch_knn.knn(np.zeros((8, DIM), np.float32), np.zeros((8, DIM), np.float32), 4, "cuda")  # CUDA and cuBLAS start-up
    rows = []
    with tempfile.TemporaryDirectory(prefix="ecdist-scaling-gpu-") as tmpdir:
        for m in sizes:
            path = Path(tmpdir) / f"layer_{m}.npy"
            t0 = time.perf_counter()
            write_layer(path, m, DIM)
            V = np.load(path)
            n, width, r = shape(m)
            row = {"rows": m, "dim": DIM, "students": n, "width": width, "teacher_neurons": r,
                   "generate_s": time.perf_counter() - t0}
            try:
                row["gpu"] = {"status": "ok", **measure(V, np.repeat(np.arange(n), width))}
                row["search_check"] = check_search(V, K + 1)
            except torch.cuda.OutOfMemoryError as e:
                row["gpu"] = {"status": "out of memory", "error": str(e)[:500]}
            path.unlink()
            rows.append(row)
            print(_describe(row), flush=True)
            _common.write_json(out, {**header, "rows": rows, "partial": True})
    return rows


def _describe(row: dict) -> str:
    g = row["gpu"]
    if g["status"] != "ok":
        return f"M={row['rows']:>9,d}: {g['status']}"
    c = row["search_check"]
    return (f"M={row['rows']:>9,d}: total {g['total_s']:7.2f} s, kNN {g['knn_s']:6.2f} s, GPU peak {g['gpu_peak_mb']:6.0f} MB, "
            f"{g['clusters']} clusters ({g['exact_clusters']} certified) of {row['teacher_neurons']}; "
            f"search error {c['max_distance_error']:.1e} (bound {c['delta_bound']:.1e}), valid lists {c['valid_neighbour_lists']:.3f}")


def plot(data: dict, path: Path) -> None:
    """Seconds (kNN, total; FAISS on the CPU from scaling_cluster.json where it exists) and GPU memory against M."""
    plt = _common.pyplot()

    ok = [r for r in data["rows"] if r["gpu"]["status"] == "ok"]
    ms = [r["rows"] for r in ok]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax_t.plot(ms, [r["gpu"]["total_s"] for r in ok], "-o", color="C2", label="total, torch kNN on the GPU")
    ax_t.plot(ms, [r["gpu"]["knn_s"] for r in ok], "--o", color="C2", label="kNN graph, torch on the GPU")
    cpu = _common.RESULTS / "scaling_cluster.json"
    if cpu.exists():
        ref = [r for r in json.loads(cpu.read_text())["rows"] if r["dim"] == DIM and r.get("faiss", {}).get("status") == "ok"]
        ax_t.plot([r["rows"] for r in ref], [r["faiss"]["time_s"] for r in ref], ":o", color="C0",
                  label="total, FAISS on a 2-core CPU (scaling_cluster.json)")
    ax_m.plot(ms, [r["gpu"]["gpu_peak_mb"] for r in ok], "-o", color="C2", label="peak GPU memory (torch)")
    ax_m.plot(ms, [r["gpu"]["data_mb"] for r in ok], color="grey", lw=0.8, label="the vectors (float32)")
    loglog_vs_m(ax_t, f"clustering one layer, D = {DIM}", "seconds")
    loglog_vs_m(ax_m, "GPU memory", "MB")
    fig.suptitle(data["machine"].get("cuda") or "", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="M = 10⁴ and 5·10⁴ only")
    p.add_argument("--sizes", type=int, nargs="+", help="row counts (default: 10⁴ … 10⁶)")
    p.add_argument("--max-rows", type=int, help="skip sizes above this")
    p.add_argument("--out", type=Path, help="JSON path (the plot goes beside it)")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("scaling_cluster_gpu: this benchmark measures the torch kNN search on a CUDA GPU, and torch sees "
              "none here; benchmarks/scaling_cluster.py measures the CPU backends.", file=sys.stderr)
        return 2
    sizes = [m for m in (args.sizes or (QUICK_SIZES if args.quick else SIZES)) if args.max_rows is None or m <= args.max_rows]
    out = args.out or _common.RESULTS / ("scaling_cluster_gpu_quick.json" if args.quick else "scaling_cluster_gpu.json")
    t0 = time.perf_counter()
    machine = _common.machine_info()
    header = {
        "benchmark": "scaling_cluster_gpu",
        "description": __doc__.split("\n\n")[0],
        "setup": {"gamma": GAMMA, "beta": BETA, "rule": "stable", "debris_std": DEBRIS_STD, "copy_noise": COPY_NOISE,
                  "dim": DIM, "sizes": sizes, "knn": "torch", "device": "cuda", "check_rows": CHECK_ROWS},
        "machine": machine,
    }
    rows = run(sizes, out, header)
    result = {**header, "rows": rows, "wall_s": time.perf_counter() - t0}
    _common.write_json(out, result)
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
