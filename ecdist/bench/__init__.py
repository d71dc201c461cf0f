"""``ecdist bench``: the scaling and quality benchmarks, one JSON each, and a report with plots.

Users run it to decide what hardware to rent, so every figure that compares two things is a ratio
measured in the same run, and every JSON says where, when and on what code it ran (machine,
versions, git commit, source hash, load average before and after). Benchmarks: ``students``
(stacked packs vs a per-student loop; cost per student vs width and queries), ``actors`` (1 vs 2
Ray actors, locally and across the nodes of a ``ray.cluster_utils.Cluster``), ``cluster`` (scipy vs
FAISS time and memory vs M, with log-log slopes), ``recovery`` (end-to-end time vs teacher width and
depth), ``quality`` (overhead and worst 1 − |cos| vs ρ and N). ``report.md`` adds the scaling model
(``ecdist.bench.model``) and the larger figures measured earlier (benchmarks/results/).

Sizes come from ``SCALES``: ``small`` takes about 10 minutes on 2 cores, ``medium`` about an hour,
``large`` hours (clustering up to 10⁶ vectors); ``tiny`` (not offered by the CLI's help) is the
tests' smoke run. ``benchmarks/run_all.py`` and ``ecdist bench`` both call ``run``.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .actors import ActorSizes
from .clustering import ClusterSizes
from .common import load_average, machine_info, write_json
from .recovery import QualitySizes, RecoverySizes
from .students import StudentSizes

log = logging.getLogger(__name__)
BENCHMARKS = ("students", "actors", "cluster", "recovery", "quality")


@dataclass(frozen=True)
class Scale:
    """The sizes of every benchmark at one scale; ``students_gpu`` replaces ``students`` with ``device="cuda"``."""

    students: StudentSizes
    actors: ActorSizes
    cluster: ClusterSizes
    recovery: RecoverySizes
    quality: QualitySizes
    students_gpu: StudentSizes | None = None


# One GPU needs packs of hundreds of MNIST-shaped students before it saturates (the H200 did near N = 256
# at width 256), so its cost rows go up to N = 256; about a minute on an H100/H200.
GPU_STUDENTS = StudentSizes(
    stack_cases=((1, 16), (5, 16), (20, 16), (50, 16), (200, 16), (20, 64), (20, 256)), stack_queries=2000, epochs=3,
    cost_cases=tuple((256, 8192, N) for N in (1, 4, 16, 64, 256)) + tuple((1024, 8192, N) for N in (1, 4, 16, 64)),
    cost_epochs=2, lm_students=512, lm_width=16, lm_iterations=20,
)


SCALES: dict[str, Scale] = {
    "tiny": Scale(
        StudentSizes(stack_cases=((2, 8), (8, 8), (8, 16)), stack_queries=512, epochs=1,
                     cost_cases=((16, 256, 1), (16, 256, 2), (32, 512, 2)), cost_epochs=1,
                     lm_students=4, lm_width=8, lm_iterations=3, repeats=1),
        ActorSizes(students=4, width=8, queries=500, iterations=3, modes=("cluster",), warmup=False, repeats=1),
        ClusterSizes(sizes=(2000, 4000), scipy_max=2000, timeout_s=300),
        RecoverySizes(width_teachers=((10, 2, 1),), depth_teachers=((10, 2, 2, 1),), rho=2, n_students=4),
        QualitySizes(teachers=(("tanh", (10, 2, 1), 0),), rhos=(2,), n_students=4, n_sweep=(4,), rho=2),
    ),
    "small": Scale(
        StudentSizes(stack_cases=((1, 16), (5, 16), (20, 16), (50, 16), (200, 16), (20, 64), (20, 256)),
                     stack_queries=2000, epochs=3,
                     cost_cases=((64, 512, 4), (64, 2048, 1), (64, 2048, 4), (256, 2048, 1), (256, 2048, 4)),
                     cost_epochs=1, lm_students=20, lm_width=16, lm_iterations=20),
        # 32 students: a pack of 16 costs half a pack of 32 (at 8, a pack of 4 cost 65% of 8: fixed costs per step)
        ActorSizes(students=32, width=16, queries=4000, iterations=100),
        ClusterSizes(sizes=(2000, 5000, 10_000, 20_000, 50_000), scipy_max=10_000, timeout_s=600),
        RecoverySizes(width_teachers=((10, 2, 1), (10, 4, 1), (10, 8, 1), (10, 16, 1)),
                      depth_teachers=((10, 4, 1), (10, 4, 4, 1), (10, 4, 4, 4, 1)), rho=2, n_students=10),
        QualitySizes(teachers=(("tanh", (10, 4, 1), 0), ("sigmoid", (6, 3, 1), 301)), rhos=(1, 2, 4),
                     n_students=10, n_sweep=(4, 10, 20), rho=2),
        GPU_STUDENTS,
    ),
    "medium": Scale(
        StudentSizes(stack_cases=((1, 16), (5, 16), (20, 16), (50, 16), (100, 16), (200, 16), (500, 16),
                                  (20, 64), (100, 64), (20, 256)),
                     stack_queries=2000, epochs=5,
                     cost_cases=tuple((w, n, N) for w in (64, 256, 1024) for n in (2048, 8192) for N in (1, 4)),
                     cost_epochs=1, lm_students=50, lm_width=16, lm_iterations=50),
        ActorSizes(students=32, width=16, queries=4000, iterations=200),
        ClusterSizes(sizes=(2000, 5000, 10_000, 20_000, 50_000, 200_000), scipy_max=20_000, dims=(65, 785)),
        RecoverySizes(width_teachers=((10, 2, 1), (10, 4, 1), (10, 8, 1), (10, 16, 1), (20, 16, 1)),
                      depth_teachers=((10, 4, 1), (10, 4, 4, 1), (10, 4, 4, 4, 1), (10, 4, 4, 4, 4, 1)),
                      rho=2, n_students=10),
        QualitySizes(teachers=(("tanh", (10, 4, 1), 0), ("sigmoid", (6, 3, 1), 301), ("gelu", (12, 3, 1), 501),
                               ("relu", (12, 6, 1), 702)),
                     rhos=(1, 2, 3, 4), n_students=10, n_sweep=(4, 10, 20, 40), rho=2),
        GPU_STUDENTS,
    ),
    "large": Scale(
        StudentSizes(stack_cases=((1, 16), (5, 16), (20, 16), (50, 16), (100, 16), (200, 16), (500, 16),
                                  (1000, 16), (20, 64), (100, 64), (20, 256), (100, 256)),
                     stack_queries=2000, epochs=5,
                     cost_cases=tuple((w, n, N) for w in (64, 256, 1024) for n in (2048, 8192) for N in (1, 4, 16)),
                     cost_epochs=1, lm_students=100, lm_width=16, lm_iterations=50),
        ActorSizes(students=64, width=16, queries=4000, iterations=200),
        ClusterSizes(sizes=(2000, 5000, 10_000, 20_000, 50_000, 200_000, 1_000_000), scipy_max=40_000,
                     dims=(65, 785)),
        RecoverySizes(width_teachers=((10, 2, 1), (10, 4, 1), (10, 8, 1), (10, 16, 1), (20, 16, 1), (20, 24, 1)),
                      depth_teachers=((10, 4, 1), (10, 4, 4, 1), (10, 4, 4, 4, 1), (10, 4, 4, 4, 4, 1)),
                      rho=2, n_students=20),
        QualitySizes(teachers=(("tanh", (10, 4, 1), 0), ("tanh", (8, 16, 1), 204), ("sigmoid", (6, 3, 1), 301),
                               ("gelu", (12, 3, 1), 501), ("silu", (16, 2, 1), 602), ("relu", (12, 6, 1), 702)),
                     rhos=(1, 2, 3, 4), n_students=10, n_sweep=(4, 10, 20, 40), rho=2),
        GPU_STUDENTS,
    ),
}


def _measure(name: str, scale: Scale, device: str) -> tuple[dict[str, Any], Any]:
    """Run one benchmark; its results and the sizes it used."""
    if name == "students":
        from . import students

        sizes = scale.students_gpu if device == "cuda" and scale.students_gpu else scale.students
        return students.run(sizes, "cpu" if device == "auto" else device), sizes
    if name == "actors":
        from . import actors

        return actors.run(scale.actors), scale.actors
    if name == "cluster":
        from . import clustering

        c = scale.cluster
        rows = clustering.run(c.sizes, c.dims, c.scipy_max, device=device, timeout=c.timeout_s)
        return {"rows": rows, "fits": clustering.fits(rows)}, c
    if name == "recovery":
        from . import recovery

        return recovery.run_time(scale.recovery), scale.recovery
    from . import recovery

    return recovery.run_quality(scale.quality), scale.quality


def run(
    scale: str,
    out: Path,
    only: Sequence[str] = BENCHMARKS,
    device: str = "auto",
    argv: list[str] | None = None,
    echo: Callable[[str], None] = log.info,
) -> Path:
    """Run the benchmarks ``only`` at ``scale``, one JSON each in ``out``, then write ``out/report.md``.

    device: where students train ("auto": this run's CPU; "cuda" for the GPU figures) and FAISS
    searches; the other benchmarks stay on the CPU. The report covers every benchmark JSON in
    ``out`` (so a GPU run and a CPU run can share a folder). Returns the report's path.
    """
    from . import report

    sizes = SCALES[scale]
    out.mkdir(parents=True, exist_ok=True)
    for name in only:
        echo(f"{name}: running ({scale})")
        machine, before, t0 = machine_info(argv), load_average(), time.perf_counter()
        results, config = _measure(name, sizes, device)
        wall, after = time.perf_counter() - t0, load_average()
        file = "students_gpu" if name == "students" and device == "cuda" else name
        write_json(out / f"{file}.json", {
            "benchmark": name,
            "scale": scale,
            "description": report.describe(name),
            "config": asdict(config),
            "results": results,
            "wall_s": wall,
            "load_before": before,
            "load_after": after,
            "machine": machine,
        })
        echo(f"{name}: {wall:.0f} s (load average {before[:1]} before, {after[:1]} after)")
    return report.write(out)
