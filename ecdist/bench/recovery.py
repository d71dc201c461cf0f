"""End-to-end recovery: its time against the teacher's width and depth, and its quality against ρ and N.

Every run is ``ecdist.recover`` on a random teacher (``teachers.random_mlp(arch, activation, seed)``)
from ``queries.gaussian(n, d_in, seed + 1000)`` with n = max(1000, 5·P) (P: parameters of one
student, so every student sees at least five queries per parameter, as in
benchmarks/recovery_suite.py), in-process on the CPU (``backend="local"``, ``device="cpu"``, one torch
thread: the time does not depend on Ray's start or the core count), ``Config`` defaults otherwise. Quality is measured by
``ecdist.compare`` on 2,000 fresh Gaussian inputs: layer-size overhead (K − r)/r and the worst
1 − |cos| between a teacher neuron and its nearest recovered neuron, per layer. A run that fails
(``RecoveryError``: no cluster spans ⌊γN⌋ students) is recorded with its message and time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import queries, teachers
from ..config import Config
from ..errors import RecoveryError
from ..metrics import compare
from ..pipeline import recover
from ..students import n_params

SUCCESS_DW = 1e-4  # worst 1 − |cos| below which a layer's neurons count as recovered (recovery_suite's bar)
N_TEST = 2000


@dataclass(frozen=True)
class RecoverySizes:
    """Teachers (activation, arch, seed) timed at students ρ× as wide, with N students."""

    width_teachers: tuple[tuple[int, ...], ...]
    depth_teachers: tuple[tuple[int, ...], ...]
    rho: int
    n_students: int
    activation: str = "tanh"
    seed: int = 0


@dataclass(frozen=True)
class QualitySizes:
    """A teacher per (activation, arch, seed); ρ swept at ``n_students``, N swept at ``rho``."""

    teachers: tuple[tuple[str, tuple[int, ...], int], ...]
    rhos: tuple[int, ...]
    n_students: int
    n_sweep: tuple[int, ...]
    rho: int


def one(activation: str, arch: list[int], seed: int, rho: int, n_students: int) -> dict[str, Any]:
    """Recover one teacher; time, its split, and the quality of what came out."""
    teacher = teachers.random_mlp(arch, activation, seed=seed)
    widths = [rho * w for w in arch[1:-1]]
    P = n_params([arch[0], *widths, arch[-1]])
    n = max(1000, 5 * P)
    X = queries.gaussian(n, arch[0], seed=seed + 1000)
    cfg = Config(activation=activation, student_widths=widths, n_students=n_students, seed=seed, threads=1,
                 backend="local", device="cpu")
    row: dict[str, Any] = {"activation": activation, "arch": arch, "seed": seed, "rho": rho, "student_widths": widths,
                           "n_students": n_students, "params_per_student": P, "queries": n,
                           "teacher_sizes": list(arch[1:-1]), "depth": len(arch) - 2}
    t0 = time.perf_counter()
    try:
        res = recover(teacher, X, cfg)
    except RecoveryError as exc:
        return row | {"status": "failed", "error": str(exc), "seconds": time.perf_counter() - t0}
    row["seconds"] = time.perf_counter() - t0
    row["timings"] = {k: float(v) for k, v in res.timings.items()}
    rep = compare(res.network, teacher, activation, X=queries.gaussian(N_TEST, arch[0], seed=seed + 2000))
    worst = [float(x) for x in rep.max_weight_distance]
    return row | {
        "status": "ok",
        "layer_sizes": list(rep.layer_sizes),
        "overhead": [float(o) for o in rep.overhead],
        "worst_1_minus_cos": worst,
        "median_1_minus_cos": [float(np.median(d)) for d in rep.weight_distance],
        "functional_mse": float(rep.functional_mse),
        "students_median_rel_mse": float(np.median(np.asarray(res.students.column("rel_loss")))),
        "success": bool(rep.layer_sizes == rep.teacher_sizes and max(worst) < SUCCESS_DW),
    }


def run_time(sizes: RecoverySizes) -> dict[str, Any]:
    """Recovery time against the teacher's width (one hidden layer) and depth (equal widths)."""
    def rows(archs: tuple[tuple[int, ...], ...]) -> list[dict[str, Any]]:
        return [one(sizes.activation, list(a), sizes.seed, sizes.rho, sizes.n_students) for a in archs]

    return {"rho": sizes.rho, "n_students": sizes.n_students, "activation": sizes.activation,
            "width": rows(sizes.width_teachers), "depth": rows(sizes.depth_teachers)}


def run_quality(sizes: QualitySizes) -> dict[str, Any]:
    """Overhead and worst 1 − |cos| against ρ (at fixed N) and against N (at fixed ρ), per teacher."""
    out: dict[str, Any] = {"rho_sweep": [], "n_sweep": [], "rho_sweep_n_students": sizes.n_students,
                           "n_sweep_rho": sizes.rho}
    done: dict[tuple[Any, ...], dict[str, Any]] = {}  # a (ρ, N) in both sweeps runs once

    def get(activation: str, arch: tuple[int, ...], seed: int, rho: int, N: int) -> dict[str, Any]:
        key = (activation, arch, seed, rho, N)
        if key not in done:
            done[key] = one(activation, list(arch), seed, rho, N)
        return done[key]

    for activation, arch, seed in sizes.teachers:
        out["rho_sweep"] += [get(activation, arch, seed, rho, sizes.n_students) for rho in sizes.rhos]
        out["n_sweep"] += [get(activation, arch, seed, sizes.rho, N) for N in sizes.n_sweep]
    return out
