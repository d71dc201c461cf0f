"""Students per second on one GPU: stacked packs for N = 16…512, a per-student loop, shared-GPU packs.

(a) Adam (the reference's: lr 1e-3, batch 512) on one ``StudentPack`` of N stacked students of
    width 256 on MNIST-sized inputs (d_in 784, 10 outputs, n = 8,192 Gaussian queries of a
    784-64-10 tanh teacher), float32 and float64: students·epochs per second, N = 16…512.
(b) the same N = 16 students as 16 separate ``nn.Sequential`` models, each with its own Adam.
(c) sharing one GPU: N = 256 students as 4 processes of 64 stacked students each running at
    once (what four packs with ``gpus_per_pack=0.25`` do) vs one process with one pack of 256.
(d) Levenberg–Marquardt, ecdist's default for small students, on CUDA: iterations per second
    for N = 512 students of a 10-16-1 architecture (P = 193).

Ray and faiss-gpu are not installed on the lent GPU machine and their wheels exceed what can
be carried to it, so (c) runs the packs as plain processes rather than Ray actors. (a), (b) and
(d) use ``ecdist.bench.students``, the functions ``ecdist bench --device cuda`` runs.

Run:  python benchmarks/scaling_students_gpu.py --out DIR     (needs CUDA; ~4 min on an H100/H200)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from ecdist.bench.students import lm_rate, loop_adam, problem, stacked_adam
from ecdist.students import AdamOptions, StudentPack, fit_adam

D_IN, D_OUT, WIDTH, N_QUERIES = 784, 10, 256, 8192
STUDENT = [D_IN, WIDTH, D_OUT]


def data(dtype: torch.dtype):
    """Queries of a 784-64-10 tanh teacher and its outputs, standardised, on the GPU."""
    return problem([D_IN, 64, D_OUT], N_QUERIES, dtype=dtype, device="cuda")


def worker(N: int, epochs: int, start_at: float) -> None:
    """One process of (c): a pack of N float32 students; starts training at ``start_at`` (so that
    the packs of several processes train at the same time) and prints when it started and ended."""
    X, Y = data(torch.float32)
    pack = StudentPack.init(STUDENT, "tanh", list(range(N)), seed=0, dtype=torch.float32, device="cuda")
    fit_adam(pack, X, Y, AdamOptions(max_epochs=1, log_every=10**9), seed=0)  # warm-up
    torch.cuda.synchronize()
    time.sleep(max(0.0, start_at - time.time()))
    start = time.time()
    fit_adam(pack, X, Y, AdamOptions(max_epochs=epochs, log_every=10**9), seed=0)
    torch.cuda.synchronize()
    print(json.dumps({"start": start, "end": time.time()}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--only-shared", action="store_true", help="run part (c) only")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.epochs, args.start_at)
        return 0
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    out = {"benchmark": "scaling_students_gpu", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "width": WIDTH, "d_in": D_IN, "d_out": D_OUT, "queries": N_QUERIES, "epochs": args.epochs, "stacked": []}
    for name, dtype in () if args.only_shared else (("float32", torch.float32), ("float64", torch.float64)):
        X, Y = data(dtype)
        for N in (16, 32, 64, 128, 256, 512):
            dt = stacked_adam(STUDENT, N, X, Y, args.epochs)
            row = {"dtype": name, "N": N, "seconds": dt, "students_epochs_per_s": N * args.epochs / dt}
            out["stacked"].append(row)
            print(row, flush=True)
        dt = loop_adam(STUDENT, 16, X, Y, args.epochs)
        out.setdefault("loop", []).append({"dtype": name, "N": 16, "seconds": dt, "students_epochs_per_s": 16 * args.epochs / dt})
        print(out["loop"][-1], flush=True)
        del X, Y
        torch.cuda.empty_cache()
    if not args.only_shared:
        X, Y = problem([10, 4, 1], 4000, device="cuda")
        lm = lm_rate([10, 16, 1], 512, X, Y, 30)
        out["lm"] = {"N": lm["N"], "arch": lm["widths"], "queries": lm["queries"], "iterations": lm["iterations"],
                     "seconds": lm["seconds"], "student_iterations_per_s": lm["student_iterations_per_s"]}
        print(out["lm"], flush=True)
    # (c) four processes sharing the GPU vs one; the span from the first start to the last end
    # of training (CUDA start-up excluded), 10× the epochs so that the four overlap
    cmd = [sys.executable, __file__, "--out", str(args.out), "--epochs", str(10 * args.epochs)]
    one = json.loads(subprocess.run(cmd + ["--worker", "256"], capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    at = ["--start-at", str(time.time() + 40)]  # after every process has started CUDA and warmed up
    procs = [subprocess.Popen(cmd + ["--worker", "64", *at], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    fours = [json.loads(p.communicate()[0].splitlines()[-1]) for p in procs]
    t_one = one["end"] - one["start"]
    t_four = max(f["end"] for f in fours) - min(f["start"] for f in fours)
    overlap = min(f["end"] for f in fours) - max(f["start"] for f in fours)
    out["shared_gpu"] = {"N": 256, "epochs": 10 * args.epochs, "one_pack_s": t_one, "four_packs_span_s": t_four,
                         "four_packs_overlap_s": overlap, "speedup": t_one / t_four}
    print(out["shared_gpu"], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling_students_gpu.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
