"""Students per second against the number of Ray actors: local Ray, and a cluster of nodes.

``ecdist.distributed.PackGroup`` trains the same N students by Levenberg–Marquardt for a fixed
number of iterations (no early stop, so every run does the same work) as one actor of one CPU,
then as two actors of one CPU each: on a local Ray, and on a ``ray.cluster_utils.Cluster`` of a
head without CPUs and two worker nodes of one CPU each (three nodes; each actor on its own
node). Each run is timed in two parts: the actors' start (a new worker process that imports
torch, ~2–4 s, paid once per recovery) and their training, from all actors up to the last pack
back. The headline ratio is the training throughput t(1 actor) / t(2 actors); the end-to-end
ratio, start included, is reported beside it. Ray's own start is excluded; a warm-up run starts
the worker processes first. Both sides come from the same Ray session, each the fastest of
``repeats`` alternated runs. The driver, Ray's own processes and the actors share the machine's
cores, so on 2 cores the ratio stays below 2.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import Config
from .common import alternated
from .students import TEACHER, problem


@dataclass(frozen=True)
class ActorSizes:
    """N students of ``width`` for ``iterations`` LM iterations on ``queries`` queries; ``modes``: local, cluster.

    repeats: the machine's speed drifts from minute to minute, so the fastest of a few alternated runs
    is each side's figure (all runs are kept).
    warmup: start the worker processes first, so that the one-actor run does not pay for a cold start
    that the two-actor run then skips (off only for the tests' smoke run, where the ratio means nothing).
    """

    students: int
    width: int
    queries: int
    iterations: int
    modes: tuple[str, ...] = ("local", "cluster")
    warmup: bool = True
    repeats: int = 2  # one and two actors alternate this many times; each keeps its fastest run


def train_time(N: int, width: int, X: np.ndarray, Y: np.ndarray, iterations: int, n_actors: int) -> dict[str, Any]:
    """Seconds to start ``n_actors`` pack actors for N students on the connected Ray and to train them.

    start_s: from creating the actors to all of them constructed; train_s: from then to the
    last pack's result; seconds: both. students_per_s: N / train_s, the throughput of running actors.
    """
    from .. import distributed
    from ..pipeline import _plan

    cfg = Config(activation="tanh", student_widths=[width], n_students=N, seed=0, student_tol=0.0, gamma=1.0,
                 stall_window=10**6, restarts=0, lm_max_iter=iterations, pack_size=math.ceil(N / n_actors))
    plan = _plan(cfg, X.shape[1], Y.shape[1], ray_resources=distributed.resources())
    t0 = time.perf_counter()
    with distributed.PackGroup(cfg, plan, X, Y, None, lambda event, info: None) as group:
        distributed.actor_locations(list(group.actors.values()))  # returns once every actor is up
        t1 = time.perf_counter()
        results = list(group.train())
        t2 = time.perf_counter()
    return {"actors": len(plan["packs"]), "start_s": t1 - t0, "train_s": t2 - t1, "seconds": t2 - t0,
            "students_per_s": N / (t2 - t1), "students_per_s_end_to_end": N / (t2 - t0),
            "nodes": sorted({r.node for r in results})}


def compare(sizes: ActorSizes, X: np.ndarray, Y: np.ndarray) -> dict[str, Any]:
    """One actor against two on the Ray the driver is connected to (after a warm-up run).

    ratio: training throughput, t_train(1) / t_train(2) of each side's fastest training; ratio_end_to_end:
    the same with the actors' start included, each side's fastest run start to end.
    """
    if sizes.warmup:
        train_time(4, sizes.width, X, Y, 2, 2)  # worker processes and imports
    ones, twos = alternated(sizes.repeats, *(
        lambda a=a: train_time(sizes.students, sizes.width, X, Y, sizes.iterations, a) for a in (1, 2)))
    one, two = (min(runs, key=lambda r: r["train_s"]) for runs in (ones, twos))
    return {"one": one, "two": two, "ratio": one["train_s"] / two["train_s"],
            "ratio_end_to_end": min(r["seconds"] for r in ones) / min(r["seconds"] for r in twos),
            "one_runs_s": [r["train_s"] for r in ones], "two_runs_s": [r["train_s"] for r in twos],
            "one_runs_end_to_end_s": [r["seconds"] for r in ones], "two_runs_end_to_end_s": [r["seconds"] for r in twos],
            "two_actors_on_distinct_nodes": all(len(r["nodes"]) == 2 for r in twos)}


def run(sizes: ActorSizes) -> dict[str, Any]:
    """The comparison on each of ``sizes.modes`` (Ray is imported here only: ``ecdist.bench`` works without it)."""
    from .. import distributed

    Xt, Yt = problem(TEACHER, sizes.queries)
    X, Y = Xt.numpy(), Yt.numpy()
    out: dict[str, Any] = {"teacher": TEACHER, "students": sizes.students, "width": sizes.width,
                           "queries": sizes.queries, "lm_iterations": sizes.iterations, "cpus_per_actor": 1}
    for mode in sizes.modes:
        t0 = time.perf_counter()
        if mode == "local":
            ctx, nodes = distributed.session(num_cpus=2), "local Ray, 2 CPUs, one node"
        else:
            ctx, nodes = distributed.node_cluster(workers=2), "Cluster: head (0 CPUs) + 2 worker nodes of 1 CPU"
        with ctx:
            start = time.perf_counter() - t0
            out[mode] = compare(sizes, X, Y) | {"setup": nodes, "ray_resources": distributed.resources(),
                                                "ray_start_s": start}
    return out
