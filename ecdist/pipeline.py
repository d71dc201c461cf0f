"""``recover``: Expand-and-Cluster end to end, and ``Recovery``, its result.

query the teacher → standardise → train N students in packs → canonicalise and cluster their
neurons → collapse, least-squares outgoing weights, fine-tune → a network in the teacher's
units. Checks that need the data run here, once, before any expensive work; ``Config``
has already checked itself.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from . import activations, storage
from .cluster import Clusters, cluster_layer
from .config import Config
from .errors import ConfigError, QueryError, TeacherError
from .network import MLP
from .queries import Standardizer, validate
from .reconstruct import EXACT_FIT, REFERENCE_TOP, Collapsed, collapse, finetune, output_layer, prune, to_original
from .students import (
    STATUS_NAMES,
    AdamOptions,
    LMOptions,
    StudentPack,
    fit_adam,
    fit_lm,
    n_params,
)
from .teachers import Teacher, query

log = logging.getLogger(__name__)
Progress = Callable[[str, dict[str, Any]], None]
LM_MEMORY_BUDGET = 2 * 2**30  # bytes of normal matrices per pack (3 P×P float64 per student)
CHECKPOINT_EVERY = 10  # LM iterations between pack checkpoints in a run folder


@dataclass
class LayerResult:
    """One recovered hidden layer.

    neurons: a row per student neuron (student, neuron, cluster or −1, dropped, contribution,
    canonical vector); clusters: a row per recovered neuron (cluster statistics, the student it
    came from, its vector in the teacher's units); clustering: the raw ``Clusters``.
    """

    index: int
    width: int
    neurons: pa.Table
    clusters: pa.Table
    rule: str = "stable"  # the clustering rule whose candidates made the layer
    clustering: Clusters | None = None


@dataclass
class Recovery:
    """What ``recover`` found. ``layer_sizes`` and ``network`` are the headline results."""

    config: Config
    layer_sizes: list[int]
    network: MLP
    layers: list[LayerResult]
    students: pa.Table  # student, rel_loss, status, steps
    history_steps: np.ndarray  # (T,) optimiser step of each logged row
    history: np.ndarray  # (T, N) relative MSE of every student
    plan: dict[str, Any]
    timings: dict[str, float]
    final_rel_mse: float
    comparison: Any = None  # an ecdist.metrics.Comparison, when one was computed

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON, Parquet and safetensors (no pickle); ``ecdist.load`` reads it."""
        return storage.save_recovery(self, path)

    def summary(self) -> str:
        lines = [f"recovered hidden widths: {self.layer_sizes}  (students: {self.config.student_widths} × {self.config.n_students})"]
        losses = np.asarray(self.students.column("rel_loss"))
        lines.append(
            f"students' relative MSE: best {losses.min():.1e}, median {np.median(losses):.1e}; "
            f"recovered network: {self.final_rel_mse:.1e}"
        )
        return "\n".join(lines)


def recover(
    teacher: Teacher,
    X: np.ndarray,
    config: Config,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    progress: Progress | bool | None = None,
) -> Recovery:
    """Recover the hidden layer sizes and weights of ``teacher`` from its outputs on ``X``.

    teacher: a torch module or a callable numpy (n, d_in) → (n,) or (n, d_out); X: (n, d_in)
    queries; out: a run folder that keeps checkpoints and results; resume: continue the run
    already in ``out`` (same config and queries), reusing its finished students.

    Example:
        >>> import ecdist
        >>> t = ecdist.teachers.random_mlp([10, 2, 1], "tanh", seed=0)
        >>> X = ecdist.queries.gaussian(500, 10, seed=1)
        >>> cfg = ecdist.Config(activation="tanh", student_widths=[8], n_students=8, seed=0)
        >>> ecdist.recover(t, X, cfg).layer_sizes
        [2]
    """
    if not isinstance(config, Config):
        raise ConfigError(f"config: expected an ecdist.Config, got {type(config).__name__}")
    with _progress(progress) as report:
        return _recover(teacher, X, config, out, resume, report)


def _recover(
    teacher: Teacher, X: np.ndarray, config: Config, out: str | Path | None, resume: bool, report: Progress
) -> Recovery:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    X = validate(X)
    Y = query(teacher, X)
    if np.all(Y.std(axis=0) == 0):
        raise TeacherError("the teacher's output is constant on these queries: there is nothing to recover")
    timings["query"] = time.perf_counter() - t0
    report("query", {"n": len(X), "d_in": X.shape[1], "d_out": Y.shape[1]})
    fingerprint = _fingerprint(X, Y)
    run = storage.RunFolder.open(out, config, fingerprint, resume) if out is not None else None

    act = activations.get(config.activation)
    plan = _plan(config, X.shape[1], Y.shape[1])
    xs, ys = Standardizer.fit(X), Standardizer.fit(Y)
    dtype = torch.float64 if config.dtype == "float64" else torch.float32
    with _threads(config.threads):
        Xt = torch.as_tensor(xs(X), dtype=dtype, device=plan["device"])
        Yt = torch.as_tensor(ys(Y), dtype=dtype, device=plan["device"])

        t1 = time.perf_counter()
        packs = [
            _train_pack(i, ids, config, plan, Xt, Yt, run, report)
            for i, ids in enumerate(plan["packs"])
        ]
        timings["train"] = time.perf_counter() - t1

        neurons, students = _neuron_table(packs, Xt, act), _student_table(packs)
        layer_result, network, final = _reconstruct(config, neurons, students, Xt, Yt, xs, ys, timings, report)
    steps, hist = _history(packs)
    result = Recovery(
        config=config,
        layer_sizes=[layer_result.width],
        network=network,
        layers=[layer_result],
        students=students,
        history_steps=steps,
        history=hist,
        plan={k: v for k, v in plan.items() if k != "packs"}
        | {"pack_sizes": [len(p) for p in plan["packs"]], "data_fingerprint": fingerprint, "cluster_backend": layer_result.clustering.backend},
        timings=timings | {"total": time.perf_counter() - t0},
        final_rel_mse=final,
    )
    if run is not None:
        run.finish(result)
    report("done", {"layer_sizes": result.layer_sizes})
    return result


RECLUSTER_FIELDS = (
    "gamma", "beta", "cluster_backend", "cluster_rule", "min_separation", "drop", "prune", "fallback", "finetune_iter",
)


def recluster(result: Recovery, teacher: Teacher, X: np.ndarray, **changes: Any) -> Recovery:
    """Cluster and reconstruct again from a result's trained students, with new settings.

    Training is the expensive part; the clustering and reconstruction settings
    (``RECLUSTER_FIELDS``) can be revised without it. ``teacher`` and ``X`` must be the ones
    the students were trained on (checked by fingerprint).

    Example:
        >>> import ecdist
        >>> t = ecdist.teachers.random_mlp([10, 2, 1], "tanh", seed=0)
        >>> X = ecdist.queries.gaussian(500, 10, seed=1)
        >>> r = ecdist.recover(t, X, ecdist.Config(activation="tanh", student_widths=[8], n_students=8))
        >>> ecdist.recluster(r, t, X, cluster_rule="reference").config.cluster_rule
        'reference'
    """
    unknown = sorted(set(changes) - set(RECLUSTER_FIELDS))
    if unknown:
        raise ConfigError(
            f"recluster: {unknown} change the students and need a new run; recluster can change {list(RECLUSTER_FIELDS)}"
        )
    config = result.config.replace(**changes)
    t0 = time.perf_counter()
    X = validate(X)
    Y = query(teacher, X)
    if result.plan.get("data_fingerprint") not in (None, _fingerprint(X, Y)):
        raise QueryError("recluster: these queries or teacher outputs are not the ones the students were trained on")
    xs, ys = Standardizer.fit(X), Standardizer.fit(Y)
    dtype = torch.float64 if config.dtype == "float64" else torch.float32
    timings: dict[str, float] = {}
    with _threads(config.threads):
        Xt = torch.as_tensor(xs(X), dtype=dtype)
        Yt = torch.as_tensor(ys(Y), dtype=dtype)
        base = result.layers[0].neurons.select(["student", "neuron", "contribution", "sign", "vector"])
        layer_result, network, final = _reconstruct(config, base, result.students, Xt, Yt, xs, ys, timings, _quiet)
    return dataclasses.replace(
        result,
        config=config,
        layer_sizes=[layer_result.width],
        network=network,
        layers=[layer_result],
        timings=timings | {"total": time.perf_counter() - t0},
        final_rel_mse=final,
        comparison=None,
    )


@dataclass(frozen=True)
class _Attempt:
    """One clustering rule's candidates and the network the fit made of them."""

    clusters: Clusters
    collapsed: Collapsed
    final: float
    weights: tuple  # V, A, c, S in standardised units
    kept: np.ndarray


def _reconstruct(
    config: Config,
    neurons: pa.Table,
    students: pa.Table,
    Xt: torch.Tensor,
    Yt: torch.Tensor,
    xs: Standardizer,
    ys: Standardizer,
    timings: dict[str, float],
    report: Progress,
) -> tuple[LayerResult, MLP, float]:
    """Cluster one layer's canonical neurons, collapse, fit, prune; the network in original units.

    With ``fallback``, a stable-rule result that does not fit exactly is retried with the
    authors' cut, which keeps more candidates (often every teacher neuron among them); the
    exact-fit pruning then removes its extras. The retry replaces the first answer only if its
    fit is exact: otherwise its extra neurons would win merely by fitting more.
    """
    act = activations.get(config.activation)
    vectors = np.asarray(neurons.column("vector").combine_chunks().flatten()).reshape(neurons.num_rows, -1)
    sids = np.asarray(neurons.column("student"))
    losses = dict(zip(np.asarray(students.column("student")).tolist(), np.asarray(students.column("rel_loss")).tolist()))

    def attempt(rule: str, top: int | None) -> _Attempt:
        t0 = time.perf_counter()
        clusters = cluster_layer(
            vectors, sids, config.gamma, config.beta,
            backend=config.cluster_backend, rule=rule, weights=np.asarray(neurons.column("contribution")),
            drop=config.drop, n_students=config.n_students, min_separation=config.min_separation,
        )
        timings["cluster"] = timings.get("cluster", 0.0) + time.perf_counter() - t0
        report("cluster", {"layer": 1, "rule": rule, "kept": clusters.n_clusters, "rows": len(vectors)})
        t1 = time.perf_counter()
        col = collapse(vectors, sids, clusters.labels, losses, top)
        if config.prune:
            final, V, A, c, S, kept = prune(col.vectors, Xt, Yt, act.name, config.finetune_iter)
        else:
            Xn, Yn = Xt.cpu().double().numpy(), Yt.cpu().double().numpy()
            A, c, S = output_layer(col.vectors, Xn, Yn, act.name, act.symmetry.needs_affine)
            final, V, A, c, S = finetune(col.vectors, A, c, S, Xt, Yt, act.name, config.finetune_iter)
            kept = np.arange(len(V))
        timings["reconstruct"] = timings.get("reconstruct", 0.0) + time.perf_counter() - t1
        return _Attempt(clusters, col, final, (V, A, c, S), kept)

    best = attempt(config.cluster_rule, REFERENCE_TOP if config.cluster_rule == "reference" else None)
    if config.fallback and config.prune and config.cluster_rule == "stable" and best.final > EXACT_FIT:
        other = attempt("reference", None)
        log.info("layer 1: stable rule fit %.1e, authors' cut with pruning %.1e", best.final, other.final)
        if other.final <= EXACT_FIT:  # more neurons always fit better: only an exact fit earns the switch
            best = other
    if best.clusters.n_clusters == 0:
        log.warning(
            "layer 1: no cluster spans %d students; the students may not have converged "
            "(see the students table) — try more students, wider students or more queries",
            best.clusters.min_students,
        )
    V = best.weights[0]
    network = to_original(*best.weights, xs, ys, act.name)
    report("reconstruct", {"widths": [len(V)], "rel_mse": best.final, "pruned": len(best.collapsed.vectors) - len(V)})
    table = neurons.append_column("cluster", pa.array(best.clusters.labels)).append_column(
        "dropped", pa.array(best.clusters.dropped)
    )
    return _layer_result(0, table, best.clusters, best.collapsed, network, best.kept), network, best.final


def _plan(config: Config, d_in: int, d_out: int) -> dict[str, Any]:
    """Resolve every ``auto`` choice once; the result is stored beside (not in) the config."""
    widths = [d_in, *config.student_widths, d_out]
    P = n_params(widths)
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but torch sees no CUDA device; use device='auto' or 'cpu'")
    optimizer = config.optimizer
    if optimizer == "auto":
        optimizer = "lm" if P <= config.lm_max_params else "adam"
    finish = optimizer == "adam" and config.finish_lm and P <= config.lm_max_params
    size = config.pack_size
    if size == 0:
        size = config.n_students
        if optimizer == "lm" or finish:
            size = max(1, min(size, LM_MEMORY_BUDGET // (24 * P * P)))
    ids = list(range(config.n_students))
    return {
        "widths": widths,
        "params_per_student": P,
        "optimizer": optimizer,
        "finish_lm": finish,
        "device": device,
        "backend": "local",
        "cluster_backend": config.cluster_backend,  # resolved after clustering (Clusters.backend)
        "packs": [ids[i : i + size] for i in range(0, len(ids), size)],
    }


def _train_pack(
    index: int,
    ids: list[int],
    config: Config,
    plan: dict[str, Any],
    X: torch.Tensor,
    Y: torch.Tensor,
    run: storage.RunFolder | None,
    report: Progress,
) -> StudentPack:
    """Train one pack (or pick it up from the run folder); the pack checkpoints as it goes."""
    dtype, device = X.dtype, X.device
    state = run.load_pack(index) if run is not None else None
    if state is not None and state.get("done", np.asarray(False)).item():
        report("train", {"pack": index, "resumed": True, "done": True})
        return StudentPack.from_state(state, config.activation, dtype=dtype, device=device)
    if state is not None:
        pack = StudentPack.from_state(state, config.activation, dtype=dtype, device=device)
    else:
        pack = StudentPack.init(plan["widths"], config.activation, ids, config.seed, dtype=dtype, device=device)

    def step(phase: str, i: int, total: int, losses: np.ndarray) -> None:
        report("train", {"pack": index, "phase": phase, "step": i, "total": total, "losses": losses, "status": pack.status})
        if run is not None and i % CHECKPOINT_EVERY == 0:
            run.save_pack(index, pack.state() | {"phase": np.asarray(phase)})

    lm = LMOptions(
        max_iter=config.lm_max_iter, tol=config.student_tol, stall_window=config.stall_window,
        restarts=config.restarts, restart_above=config.restart_above,
    )
    phase = str(state["phase"]) if state is not None and "phase" in state else "adam"
    if plan["optimizer"] == "adam" and phase == "adam":
        adam = AdamOptions(
            lr=config.lr, batch_size=config.batch_size, max_epochs=config.max_epochs, patience=config.patience,
            cooldown=config.cooldown, min_lr=config.min_lr, tol=config.student_tol,
        )
        fit_adam(pack, X, Y, adam, seed=config.seed * 1_000_003 + index, progress=step)
        phase = "lm"
    if plan["optimizer"] == "lm" or plan["finish_lm"]:
        fit_lm(pack, X, Y, lm, progress=step)
    if run is not None:
        run.save_pack(index, pack.state() | {"phase": np.asarray("done"), "done": np.asarray(True)})
    return pack


def _neuron_table(packs: list[StudentPack], X: torch.Tensor, act: activations.Activation) -> pa.Table:
    """Every student's first-layer neurons, canonicalised: what clustering reads (and ``recluster`` reuses)."""
    rows = [p.layer_neurons(X, 0) for p in packs]
    layer = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    can = act.symmetry.canonicalize(layer["vectors"], layer["outgoing"], act.linear_coef)
    return pa.table(
        {
            "student": layer["student_ids"],
            "neuron": np.concatenate([np.arange(p.widths[1]) for p in packs for _ in p.ids]),
            "contribution": layer["contribution"],
            "sign": can.sign,
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(can.vectors.ravel()), can.vectors.shape[1]),
        }
    )


def _student_table(packs: list[StudentPack]) -> pa.Table:
    return pa.table(
        {
            "student": pa.array([int(s) for p in packs for s in p.ids], pa.int64()),
            "pack": pa.array([i for i, p in enumerate(packs) for _ in p.ids], pa.int64()),
            "rel_loss": pa.array([float(l) for p in packs for l in p.rel_loss], pa.float64()),
            "status": pa.array([STATUS_NAMES[int(s)] for p in packs for s in p.status]),
            "restarts": pa.array([int(r) for p in packs for r in p.restarts], pa.int64()),
            "steps": pa.array([p.steps for p in packs for _ in p.ids], pa.int64()),
        }
    )


def _layer_result(index: int, neurons: pa.Table, clusters: Clusters, col, network: MLP, kept: np.ndarray) -> LayerResult:
    """Tables of one layer: every student neuron, and every candidate cluster with its fate."""
    sel = col.cluster
    neuron = np.full(len(sel), -1, dtype=np.int64)
    neuron[kept] = np.arange(len(kept))
    vec = network.neuron_vectors(index)
    tbl = pa.table(
        {
            "cluster": sel,
            "neuron": neuron,  # row of the recovered layer, −1 when the fine-tune pruned it
            "size": clusters.size[sel],
            "n_students": clusters.n_students[sel],
            "height": clusters.height[sel],
            "lifetime": clusters.separation[sel],
            "median_cos_dist": clusters.median_cos_dist[sel],
            "source_student": col.student,
            "vector": pa.array([vec[n].tolist() if n >= 0 else None for n in neuron], pa.list_(pa.float64(), vec.shape[1])),
        }
    )
    return LayerResult(index + 1, len(kept), neurons, tbl, clusters.rule, clusters)


def _history(packs: list[StudentPack]) -> tuple[np.ndarray, np.ndarray]:
    """Every student's logged losses on one step axis (a pack's last value carries forward)."""
    steps = np.unique(np.concatenate([np.asarray(p.history_steps, dtype=np.int64) for p in packs]))
    cols = []
    for p in packs:
        h = np.stack(p.history) if p.history else np.full((1, p.k), np.nan)
        at = np.searchsorted(np.asarray(p.history_steps), steps, side="right") - 1
        cols.append(h[np.clip(at, 0, len(h) - 1)])
    return steps, np.hstack(cols)


def _fingerprint(X: np.ndarray, Y: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in (X, Y):
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


@contextmanager
def _threads(n: int):
    """Pin torch's intra-op threads for the run (calibration: oversubscription collapses throughput)."""
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(n or cores)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _quiet(event: str, info: dict[str, Any]) -> None:
    """A progress callback that shows nothing."""


@contextmanager
def _progress(progress: Progress | bool | None):
    """The progress callback for a run; a live view (``True``) is stopped however the run ends."""
    if progress is True:
        from .progress import RichProgress

        view = RichProgress()
        try:
            yield view
        finally:
            view.close()
    else:
        yield progress if callable(progress) else _quiet
