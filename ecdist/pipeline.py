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
import math
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from . import activations, storage, teachers
from .cluster import Clusters, cluster_layer
from .config import Config
from .errors import ConfigError, QueryError, RecoveryError, RunFolderError, TeacherError
from .network import MLP
from .packs import CHECKPOINT_EVERY, PackResult, PackTrainer
from .queries import Standardizer, physical_memory, validate
from .reconstruct import (
    EXACT_FIT,
    JOINT_STALL,
    REFERENCE_TOP,
    Collapsed,
    collapse,
    finetune,
    finetune_network,
    output_layer,
    prune,
    prune_network,
    refit_supported,
    to_original,
)
from .students import CHUNK_ELEMS, StudentPack, n_params
from .teachers import Teacher, query

log = logging.getLogger(__name__)
Progress = Callable[[str, dict[str, Any]], None]
# bytes per LM pack: 3 P×P float64 per student (JᵀJ, the damped copy, its Cholesky factor) and the query
# chunk's buffers, about two chunks of float64 (20 students of P = 705: 388 MB peak at CHUNK_ELEMS = 2²⁰
# against 76 MB of JᵀJ), which outweigh the matrices for small students
LM_MEMORY_BUDGET = 2 * 2**30


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
    rule: str = "stable"  # whose candidates made the layer: "stable", "reference", or "student" (one exact student, pruned)
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
    teacher: Teacher | None,
    X: np.ndarray | None,
    config: Config | None,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    progress: Progress | bool | None = None,
    address: str | None = None,
    train: bool = True,
    snapshot: str | Path | None = None,
) -> Recovery:
    """Recover the hidden layer sizes and weights of ``teacher`` from its outputs on ``X``.

    teacher: a torch module or a callable numpy (n, d_in) → (n,) or (n, d_out); X: (n, d_in)
    queries; out: a run folder that keeps the queries and answers, checkpoints and results;
    resume: continue the run already in ``out``, reusing everything it finished (packs, layers'
    clustering, fine-tuned students; a finished run returns its stored result) — teacher, X and
    config may then be None (taken from the folder), and any given must be the run's
    (RunFolderError otherwise); address: a Ray cluster to run the student packs on (default:
    the running Ray, ``RAY_ADDRESS``, or a local Ray started for this run — see ``Config.backend``);
    train=False (with out and resume): recover from the students as the run's pack checkpoints hold
    them now, training no further, in this process, and writing nothing into ``out`` — a look at a
    long run still training there, which goes on undisturbed (``Recovery.save`` keeps the answer
    elsewhere; the students table gives each student's steps so far); its config may differ from the
    run's in the clustering and reconstruction settings and ``upper_widths`` (``SNAPSHOT_FIELDS``);
    snapshot (with train=False): keep that look as a run of its own in this new or empty folder — the
    run's queries, answers and students as checkpointed now, their training marked finished — and
    recover there, so that a deep run's later stages (hours of fresh or fine-tuned students above
    each recovered layer) checkpoint and survive a killed process; the same call again resumes the
    look in that folder, and ``recover(out=snapshot, resume=True)`` does too. A look runs in this
    process unless ``address`` names a Ray cluster.

    Example:
        >>> import ecdist
        >>> t = ecdist.teachers.random_mlp([10, 2, 1], "tanh", seed=0)
        >>> X = ecdist.queries.gaussian(500, 10, seed=1)
        >>> cfg = ecdist.Config(activation="tanh", student_widths=[8], n_students=8, seed=0,
        ...                     backend="local")  # in-process: no Ray for a tiny run
        >>> ecdist.recover(t, X, cfg).layer_sizes
        [2]
    """
    if config is not None and not isinstance(config, Config):
        raise ConfigError(f"config: expected an ecdist.Config, got {type(config).__name__}")
    if not train and not (out is not None and resume):
        raise ConfigError("train=False recovers from a run's checkpoints: give out=RUN_DIR and resume=True")
    if snapshot is not None and train:
        raise ConfigError("snapshot keeps a look at a run's checkpoints: give it with train=False")
    with _progress(progress) as report:
        if snapshot is not None:
            config = _snapshot_run(Path(out), Path(snapshot), teacher, X, config)
            if address is None:  # a look runs in this process, beside the run's own training
                config = config.replace(backend="local")
            return _recover(None, None, config, snapshot, True, report, address, True)
        return _recover(teacher, X, config, out, resume, report, address, train)


def _snapshot_run(source: Path, dest: Path, teacher: Teacher | None, X: np.ndarray | None, config: Config | None) -> Config:
    """The look at ``source``'s checkpoints as a run in ``dest`` (created, or kept from a call before); its config.

    The look's config packs the students as the run's checkpoints do (``pack_size``), since its
    first-stage checkpoints are those, marked done; a look at a GPU run from a machine without
    one runs on the CPU.
    """
    if source.resolve() == dest.resolve() or source.resolve() in dest.resolve().parents:
        raise ConfigError(f"snapshot: give a folder outside the run's ({source}), which a look leaves as it is")
    run = storage.RunFolder.existing(source, tidy=False)
    if run is None:
        raise RunFolderError(f"{source}: there is no run in that folder to recover from (train=False trains nothing)")

    def on_this_machine(config: Config) -> Config:
        cpu = config.device == "cuda" and not torch.cuda.is_available()
        return config.replace(device="cpu") if cpu else config

    ident = run.identity()
    kept = storage.RunFolder.existing(dest)
    if kept is not None:  # resumed from its own folder, which checks config, queries and teacher: the run's data is not read
        origin = kept.identity().get("snapshot_of", {})
        if origin.get("data") != ident["data"] or origin.get("run") != str(source.resolve()):
            raise RunFolderError(
                f"{dest} holds a run that is not a look at {source} (its run.json's snapshot_of names "
                f"{origin.get('run', 'no run')}); give a new or empty folder, or resume that look alone "
                f"(recover(out={str(dest)!r}, resume=True))"
            )
        states = [kept.load_pack(i) for i in range(len(origin.get("steps", [])))]
        if not states or any(s is None or not s.get("done", np.asarray(False)).item() for s in states):
            raise RunFolderError(f"{dest}: the look was stopped while it copied the run's students; delete the folder "
                                 "and look again")
        own = kept.config()
        return own if config is None else on_this_machine(config).replace(pack_size=own.pack_size)
    storage.RunFolder.check_new(dest)
    config, X, Y = _resumed(run, teacher, X, config, repair=False, free=SNAPSHOT_FIELDS)
    config = on_this_machine(config)
    states = _checkpointed_packs(run, config)
    size = len(states[0]["ids"])
    if [s["ids"].tolist() for s in states] != _split(config.n_students, size):
        raise RunFolderError(f"{source}: its packs do not hold runs of {size} consecutive students, "
                             "which a look kept as a run needs (pack_size)")
    config = config.replace(pack_size=size)
    steps = [int(s["steps"]) for s in states]
    look = storage.RunFolder.create(dest, config, X, Y, ident["data"], ident.get("teacher") or {},
                                    snapshot_of={"run": str(source.resolve()), "data": ident["data"], "steps": steps})
    for index, state in enumerate(states):
        pack = StudentPack.from_state(state, config.activation)
        pack.keep_best()  # as ``PackTrainer.current`` reads a pack for a look
        look.save_pack(index, pack.state() | {"phase": np.asarray("done"), "done": np.asarray(True)})
    return config


def _recover(
    teacher: Teacher | None,
    X: np.ndarray | None,
    config: Config | None,
    out: str | Path | None,
    resume: bool,
    report: Progress,
    address: str | None,
    train: bool = True,
) -> Recovery:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    run = storage.RunFolder.existing(out, tidy=train) if out is not None and resume else None
    if run is not None:
        config, X, Y = _resumed(run, teacher, X, config, repair=train, free=() if train else SNAPSHOT_FIELDS)
        if run.finished() and config.identity_fields() == run.config().identity_fields():  # else new settings: redo
            result = run.result()
            report("resume", {"finished": True})
            report("done", {"layer_sizes": result.layer_sizes})
            return result
    elif not train:
        raise RunFolderError(f"{out}: there is no run in that folder to recover from (train=False trains nothing)")
    else:
        _require(teacher, X, config, out, resume)
        X = validate(X)
        _check_before_querying(teacher, X, config, out)
        if out is not None:
            storage.RunFolder.check_new(out)  # before the teacher is queried, which may take long
        Y = _query(teacher, X, config)
        if np.all(np.ptp(Y, axis=0) == 0):  # exact: a constant column's std is rounding noise, not 0
            raise TeacherError("the teacher's output is constant on these queries: there is nothing to recover")
    timings["query"] = time.perf_counter() - t0
    report("query", {"n": len(X), "d_in": X.shape[1], "d_out": Y.shape[1]})
    fingerprint = _fingerprint(X, Y)
    if out is not None and run is None:
        run = storage.RunFolder.create(out, config, X, Y, fingerprint, teachers.fingerprint(teacher))

    xs, ys = Standardizer.fit(X), Standardizer.fit(Y)
    Xs, Ys = xs(X), ys(Y)
    t1 = time.perf_counter()
    deep = len(config.student_widths) > 1
    run_path = run.path if run else None
    stages = run if train else None  # train=False reads the packs' checkpoints and writes nothing
    if train and _use_ray(config, address):
        from . import distributed

        with distributed.session(address) as started:
            total = distributed.resources()
            plan = _plan(config, X.shape[1], Y.shape[1], ray_resources=total)
            plan["ray_started_here"] = started
            if run is not None:  # a resumed run split into fewer packs: the extra checkpoints hold others' students
                run.remove_packs_from(len(plan["packs"]))
            report("plan", {"n_students": config.n_students, "packs": len(plan["packs"]), "backend": "Ray"})
            if deep:  # the actors live on: each recovered layer is inserted and fine-tuned where the students are
                with distributed.PackGroup(config, plan, Xs, Ys, run_path, report) as group:
                    results = list(group.train())
                    timings["train"] = time.perf_counter() - t1
                    built = _layers(config, results, group.advance, Xs, Ys, xs, ys, timings, report, run)
            else:
                results = list(distributed.train_packs(config, plan, Xs, Ys, run_path, report))
    else:
        # a look at a GPU run from a machine without one (its checkpoints are plain arrays) runs on the CPU
        cpu = not train and config.device == "cuda" and not torch.cuda.is_available()
        plan = _plan(config.replace(device="cpu") if cpu else config, X.shape[1], Y.shape[1])
        states = None if train else _checkpointed_packs(run, config)  # the students as the run split them
        if states is not None:
            plan["packs"] = [s["ids"].tolist() for s in states]
        elif run is not None:
            run.remove_packs_from(len(plan["packs"]))
        report("plan", {"n_students": config.n_students, "packs": len(plan["packs"]), "backend": "this process"})
        trainers = [PackTrainer(i, ids, config, plan, run_path) for i, ids in enumerate(plan["packs"])]
        results = _train_local(config, plan, trainers, Xs, Ys, report, states)
        if deep:
            timings["train"] = time.perf_counter() - t1
            advance = _LocalAdvance(config, plan, trainers, Ys, report)
            built = _layers(config, results, advance, Xs, Ys, xs, ys, timings, report, stages)
    if not deep:
        timings["train"] = time.perf_counter() - t1
        built = _layers(config, results, None, Xs, Ys, xs, ys, timings, report, stages)
    results.sort(key=lambda r: r.index)  # arrival order varies; the tables do not
    layer_results, network, final, layers_resumed = built
    students = pa.Table.from_batches([r.students for r in results])
    steps, hist = _history(results)
    result = Recovery(
        config=config,
        layer_sizes=[layer.width for layer in layer_results],
        network=network,
        layers=layer_results,
        students=students,
        history_steps=steps,
        history=hist,
        plan={k: v for k, v in plan.items() if k != "packs"}
        | {
            "pack_sizes": [len(p) for p in plan["packs"]],
            "packs_resumed_from": [r.resumed_from for r in results],
            "layers_resumed": layers_resumed,  # layers whose clustering (and fit) came from the run folder
            "pack_nodes": [r.node for r in results],
            "data_fingerprint": fingerprint,
            # the clustering backend each layer used (auto resolves by size)
            "cluster_backend": layer_results[0].clustering.backend if len(layer_results) == 1
            else [layer.clustering.backend for layer in layer_results],
        },
        timings=timings | {"total": time.perf_counter() - t0},
        final_rel_mse=final,
    )
    if stages is not None:
        run.finish(result)
    report("done", {"layer_sizes": result.layer_sizes})
    return result


def _checkpointed_packs(run: storage.RunFolder, config: Config) -> list[dict[str, np.ndarray]]:
    """The first-stage checkpoint of every pack of ``run`` (``recover(train=False)``), which together must
    hold each of its students once."""
    found = run.pack_indices()
    states = [run.read_pack(i) for i in found]
    ids = sorted(i for s in states for i in s["ids"].tolist())
    if found != list(range(len(found))) or ids != list(range(config.n_students)):
        raise RunFolderError(
            f"{run.path}: the pack checkpoints hold {len(ids)} student rows ({len(set(ids))} of the run's "
            f"{config.n_students} students); a pack that has not written its first checkpoint (every "
            f"{CHECKPOINT_EVERY} steps) has nothing to recover from yet"
        )
    return states


def _require(teacher: Teacher | None, X: np.ndarray | None, config: Config | None, out: Any, resume: bool) -> None:
    """A new run needs a teacher, queries and a config (a resumed one takes them from its folder)."""
    why = f" (there is no run in {out} to resume, so a new one starts)" if resume else ""
    if config is None:
        raise ConfigError(f"config: give an ecdist.Config{why}")
    if X is None:
        raise QueryError(f"queries: give the queries X{why}")
    if teacher is None:
        raise TeacherError(f"no teacher was given{why}; give a torch module or a callable numpy -> numpy")


SPOT_CHECK = 64  # stored queries on which a teacher given again must answer as the stored answers say


def _resumed(
    run: storage.RunFolder, teacher: Teacher | None, X: np.ndarray | None, config: Config | None, repair: bool = True,
    free: tuple[str, ...] = (),
) -> tuple[Config, np.ndarray, np.ndarray]:
    """The run's config, queries and answers from its folder; any given again must be the run's.

    The config may differ in where the run executes (``EXECUTION_FIELDS``: backend, threads, …)
    and in the ``free`` fields; the given one is then used. Stored data that fails its checksum is
    queried again when the teacher and queries are given (and ``repair``: not for a reader that
    writes nothing), else RunFolderError.
    """
    path = run.path
    stored = run.config()
    if config is None:
        config = stored
    elif config.fingerprint() != stored.fingerprint():
        given, kept = config.identity_fields(), stored.identity_fields()
        differ = ", ".join(f"{k}={kept[k]!r} there, {given[k]!r} here" for k in sorted(kept)
                           if kept[k] != given[k] and k not in free)
        if differ:  # else only free fields differ, which shape nothing the folder holds
            may = f" (a look at its checkpoints may change {', '.join(free)})" if free else ""
            raise RunFolderError(
                f"{path} holds a different run (its config differs from this one: {differ}); resume it with the same "
                f"config{may} (or none: the folder keeps its own), or choose another folder"
            )
    ident = run.identity()
    try:
        Xr, Yr = run.data()
    except RunFolderError as exc:
        if not repair:
            raise RunFolderError(f"{exc}; resume the run (training) with the teacher and the queries to repair it") from None
        if teacher is None or X is None:
            raise RunFolderError(f"{exc}; give the teacher and the queries again to re-query them") from None
        log.warning("%s; querying the teacher again", exc)
        Xr = validate(X)
        Yr = _query(teacher, Xr, config)
        if _fingerprint(Xr, Yr) != ident["data"]:
            raise RunFolderError(
                f"{exc}; the teacher and queries given again do not give the run's data (its fingerprint in "
                "run.json), so the run cannot be resumed: start a new run in another folder"
            ) from None
        run.save_data(Xr, Yr)
    else:
        if _fingerprint(Xr, Yr) != ident["data"]:
            raise RunFolderError(
                f"{path}: queries.npy and answers.npy do not match the run's fingerprint in run.json (the folder was "
                "edited); start a new run in another folder"
            )
    if X is not None:
        X = validate(X)
        if X.shape != Xr.shape or not np.array_equal(X, Xr):
            raise RunFolderError(
                f"{path} holds a different run (its queries differ from these); resume it with the same queries "
                "(or none: the folder keeps its own), or choose another folder"
            )
    if teacher is not None:
        _check_teacher(teacher, ident.get("teacher") or {}, Xr, Yr, path)
    return config, Xr, Yr


def _check_teacher(teacher: Teacher, recorded: dict[str, str], X: np.ndarray, Y: np.ndarray, path: Path) -> None:
    """RunFolderError unless ``teacher`` is the run's: same weights, or the stored answers on a few queries."""
    now = teachers.fingerprint(teacher)
    if "weights_sha256" in now and "weights_sha256" in recorded:
        same, what = now["weights_sha256"] == recorded["weights_sha256"], "weights"
    else:
        rows = min(len(X), SPOT_CHECK)
        y = query(teacher, X[:rows])
        scale = float(np.abs(Y).max())
        same = y.shape == Y[:rows].shape and bool(np.allclose(y, Y[:rows], rtol=1e-7, atol=1e-7 * scale))
        what = f"answers on the first {rows} stored queries"
    if not same:
        raise RunFolderError(
            f"{path} holds a run of another teacher (this teacher's {what} differ from the run's, "
            f"{recorded.get('name', 'unnamed')}); resume with the run's teacher, or with none: the run folder "
            "keeps the teacher's answers"
        )


def _query(teacher: Teacher, X: np.ndarray, config: Config) -> np.ndarray:
    """The teacher's answers, batched, timed out and retried as the config says."""
    return query(
        teacher, X, config.teacher_batch,
        timeout=config.teacher_timeout, retries=config.teacher_retries, backoff=config.teacher_backoff,
    )


def _check_before_querying(teacher: Teacher, X: np.ndarray, config: Config, out: str | Path | None) -> None:
    """What can be known wrong before the teacher is asked and the students train: a teacher
    whose architecture the students cannot hold, students too large for this machine, and an
    output folder that cannot be written (found now, not after hours of training)."""
    if isinstance(teacher, MLP):
        hidden = teacher.widths[1:-1]
        if len(hidden) != len(config.student_widths):
            raise ConfigError(
                f"student_widths: {len(config.student_widths)} hidden layer(s), but the teacher has {len(hidden)} "
                f"({hidden}); give one student width per teacher hidden layer, e.g. {[4 * h for h in hidden]}"
            )
        narrow = [(s, h) for s, h in zip(config.student_widths, hidden) if s < h]
        if narrow:
            raise ConfigError(
                f"student_widths: {config.student_widths} is narrower than the teacher's hidden widths {hidden}, so "
                f"no student can fit it; students are ρ ≈ 3–4 times wider than the teacher, e.g. "
                f"{[4 * h for h in hidden]}"
            )
    d_out = teacher.widths[-1] if isinstance(teacher, MLP) else 1
    need = 8 * config.n_students * n_params([X.shape[1], *config.student_widths, d_out])
    if need > physical_memory():  # every student's weights come back to this process for clustering
        raise ConfigError(
            f"student_widths: {config.n_students} students of widths {config.student_widths} on {X.shape[1]} inputs "
            f"hold {need / 2**30:.3g} GiB of weights, more than this machine's {physical_memory() / 2**30:.3g} GiB; "
            "use fewer or narrower students"
        )
    if out is not None:
        _check_writable(Path(out))


def _check_writable(out: Path) -> None:
    """RunFolderError unless ``out`` is, or can be made, a folder this process can write in.

    Nothing is left behind: the nearest existing ancestor is tested with a temporary file, so
    a run refused later (bad teacher) leaves no empty folder either.
    """
    base = out
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise RunFolderError(f"output folder {out}: {base} is a file, not a folder; choose another out / --out")
    try:
        fd, tmp = tempfile.mkstemp(dir=base, prefix=".ecdist-write-test.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise RunFolderError(
            f"output folder {out} cannot be written ({exc.strerror} in {base}); choose another out / --out"
        ) from None


def _use_ray(config: Config, address: str | None) -> bool:
    """``auto``: Ray unless it is not installed (then in-process, with a note in the log)."""
    if config.backend == "local":
        if address:
            raise ConfigError("backend: an address of a Ray cluster was given with backend='local'; use 'auto' or 'ray'")
        return False
    try:
        import ray  # noqa: F401
    except ImportError:
        if config.backend == "ray":
            raise ConfigError("backend: 'ray' needs Ray installed (pip install 'ray[default]')") from None
        log.info("Ray is not installed; training in-process")
        return False
    return True


def _train_local(
    config: Config, plan: dict[str, Any], trainers: list[PackTrainer], X: np.ndarray, Y: np.ndarray, report: Progress,
    states: list[dict[str, np.ndarray]] | None = None,
) -> list[PackResult]:
    """Every pack in this process, one after another, on all of its threads (``states``: as checkpointed)."""
    dtype = torch.float64 if config.dtype == "float64" else torch.float32
    with _threads(config.threads):
        Xt = torch.as_tensor(X, dtype=dtype, device=plan["device"])
        if states is not None:
            return [trainer.current(Xt, state) for trainer, state in zip(trainers, states)]
        Yt = torch.as_tensor(Y, dtype=dtype, device=plan["device"])
        return [trainer.train(Xt, Yt, report) for trainer in trainers]


class _LocalAdvance:
    """In-process twin of ``distributed.PackGroup.advance``: insert a layer into every pack, fine-tune."""

    def __init__(
        self, config: Config, plan: dict[str, Any], trainers: list[PackTrainer], Y: np.ndarray, report: Progress
    ) -> None:
        dtype = torch.float64 if config.dtype == "float64" else torch.float32
        self.trainers, self.report, self.dtype, self.device = trainers, report, dtype, plan["device"]
        self.Y = torch.as_tensor(Y, dtype=dtype, device=plan["device"])

    def __call__(self, assigns: list[np.ndarray], width: int, H: np.ndarray) -> list[PackResult]:
        Ht = torch.as_tensor(H, dtype=self.dtype, device=self.device)
        out = []
        for trainer, assign in zip(self.trainers, assigns):
            trainer.insert_layer(assign, width)
            out.append(trainer.finetune(Ht, self.Y, self.report))
        return out


RECLUSTER_FIELDS = (
    "gamma", "beta", "cluster_backend", "cluster_rule", "min_separation", "drop", "prune", "fallback", "finetune_iter",
)
# what a look at a run's checkpoints (train=False) may change: the students above an inserted layer
# are trained in memory there, so their widths are free too
SNAPSHOT_FIELDS = (*RECLUSTER_FIELDS, "upper_widths")


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
    if len(result.layer_sizes) > 1:
        raise ConfigError(
            "recluster: supports one hidden layer; a deep result's later layers were trained on its earlier "
            "clusters, so new clustering settings need a new recover run"
        )
    unknown = sorted(set(changes) - set(RECLUSTER_FIELDS))
    if unknown:
        raise ConfigError(
            f"recluster: {unknown} change the students and need a new run; recluster can change {list(RECLUSTER_FIELDS)}"
        )
    config = result.config.replace(**changes)
    t0 = time.perf_counter()
    X = validate(X)
    Y = _query(teacher, X, config)
    if result.plan.get("data_fingerprint") not in (None, _fingerprint(X, Y)):
        raise QueryError("recluster: these queries or teacher outputs are not the ones the students were trained on")
    xs, ys = Standardizer.fit(X), Standardizer.fit(Y)
    dtype = torch.float64 if config.dtype == "float64" else torch.float32
    timings: dict[str, float] = {}
    with _threads(config.threads):
        Xt = torch.as_tensor(xs(X), dtype=dtype)
        Yt = torch.as_tensor(ys(Y), dtype=dtype)
        base = result.layers[0].neurons.select(["student", "neuron", "contribution", "sign", "vector"])
        table, best = _reconstruct(config, base, result.students, Xt, Yt, timings, _quiet, 0)
        network = to_original([best.weights[0]], *best.weights[1:], xs, ys, config.activation)
        layer_result = _layer_result(0, table, best.clusters, best.collapsed, network, best.kept)
    final = best.final
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


def _layers(
    config: Config,
    results: list[PackResult],
    advance: Callable[[list[np.ndarray], int, np.ndarray], list[PackResult]] | None,
    Xs: np.ndarray,
    Ys: np.ndarray,
    xs: Standardizer,
    ys: Standardizer,
    timings: dict[str, float],
    report: Progress,
    run: storage.RunFolder | None = None,
) -> tuple[list[LayerResult], MLP, float, list[int]]:
    """Recover every hidden layer from the trained packs; the network in the teacher's units,
    and the layers whose clustering came from ``run`` (saved there as each finishes).

    Layers 1…L−1 (deep runs, §3.10 of the method): cluster the packs' first-layer neurons,
    collapse, ``advance`` (insert the recovered layer into every pack and fine-tune the students
    above it on its activations), then read the next layer from the fine-tuned packs — never
    from the students as trained. The last hidden layer is fitted, fine-tuned and pruned on the
    recovered layers' activations; then the whole recovered network is fine-tuned (``_joint_fit``;
    not exact, it is refitted without the least-supported candidates) and, once exact, every hidden
    layer pruned again (``prune_network``).
    """
    act = activations.get(config.activation)
    dtype = torch.float64 if config.dtype == "float64" else torch.float32
    results = sorted(results, key=lambda r: r.index)
    resumed: list[int] = []
    with _threads(config.threads):
        Xt, Yt = torch.as_tensor(Xs, dtype=dtype), torch.as_tensor(Ys, dtype=dtype)
        H = Xt.double()
        lower: list[tuple[pa.Table, Clusters, Collapsed]] = []
        for l in range(len(config.student_widths) - 1):
            neurons = pa.Table.from_batches([r.neurons for r in results])
            students = pa.Table.from_batches([r.students for r in results])
            stage = _stage(run, l + 1)
            if stage is not None:
                clusters, col, _ = stage
                table = _labelled(neurons, clusters)
                resumed.append(l + 1)
                report("resume", {"layer": l + 1})
            else:
                table, clusters, col = _hidden_layer(config, neurons, students, l, timings, report)
                if run is not None:
                    run.save_stage(l + 1, _to_stage(clusters, col))
            lower.append((table, clusters, col))
            assign = np.full(neurons.num_rows, -1, dtype=np.int64)
            rows = np.flatnonzero(clusters.labels >= 0)
            where = {int(c): j for j, c in enumerate(col.cluster)}
            assign[rows] = [where.get(int(c), -1) for c in clusters.labels[rows]]
            ones = torch.ones(len(H), 1, dtype=H.dtype)
            H = act.fn(torch.cat([H, ones], 1) @ torch.as_tensor(col.vectors).T)
            bounds = np.cumsum([0] + [r.neurons.num_rows for r in results])
            t0 = time.perf_counter()
            results = sorted(
                advance([assign[a:b] for a, b in zip(bounds[:-1], bounds[1:])], len(col.vectors), H.to(dtype).numpy()),
                key=lambda r: r.index,
            )
            timings["finetune_students"] = timings.get("finetune_students", 0.0) + time.perf_counter() - t0
        L = len(config.student_widths) - 1
        neurons = pa.Table.from_batches([r.neurons for r in results])
        students = pa.Table.from_batches([r.students for r in results])
        stage = _stage(run, L + 1, last=True)
        if stage is not None:
            clusters, col, fit = stage
            best = _Attempt(clusters, col, float(fit["final"]), (fit["V"], fit["A"], fit["c"], fit.get("S")), fit["kept"])
            table = _labelled(neurons, clusters)
            resumed.append(L + 1)
            report("resume", {"layer": L + 1})
        else:
            table, best = _reconstruct(config, neurons, students, H.to(dtype), Yt, timings, report, L)
            if run is not None:
                run.save_stage(L + 1, _to_stage(best.clusters, best.collapsed, best))
        V, A, c, S = best.weights
        blocks, final = [col.vectors for _, _, col in lower] + [V], best.final
        kept = [np.arange(len(col.vectors)) for _, _, col in lower] + [np.arange(len(V))]
        if lower and len(V):
            t0 = time.perf_counter()
            final, blocks, A, c, kept = _joint_fit(config, lower, best, blocks, A, c, Xt, Yt, report)
            timings["reconstruct"] = timings.get("reconstruct", 0.0) + time.perf_counter() - t0
        network = to_original(blocks, A, c, S, xs, ys, act.name)
    out = [_layer_result(l, t, cl, col, network, k) for l, ((t, cl, col), k) in enumerate(zip(lower, kept))]
    out.append(_layer_result(L, table, best.clusters, best.collapsed, network, best.kept[kept[-1]]))
    pruned = sum(len(col.vectors) for _, _, col in lower) + len(best.collapsed.vectors) - sum(map(len, kept))
    report("reconstruct", {"widths": network.hidden_widths, "rel_mse": final, "pruned": pruned})
    return out, network, final, resumed


def _joint_fit(
    config: Config,
    lower: list[tuple[pa.Table, Clusters, Collapsed]],
    best: _Attempt,
    blocks: list[np.ndarray],
    A: np.ndarray,
    c: np.ndarray,
    Xt: torch.Tensor,
    Yt: torch.Tensor,
    report: Progress,
) -> tuple[float, list[np.ndarray], np.ndarray, np.ndarray, list[np.ndarray]]:
    """The recovered deep network fine-tuned as a whole, then (``prune``) pruned once exact.

    blocks: each lower layer's candidates (``lower``'s collapsed rows) and the last layer's fitted
    neurons (``best``'s, rows ``best.kept`` of its candidates). With ``fallback`` (float64), a joint
    fit that is not exact is refitted from the candidates without the least-supported ones
    (``refit_supported``: a candidate's support is its cluster's number of students; the stalled
    fit's weights are left behind) and the first exact set is pruned instead; a last layer kept
    from one student alone (the ``student`` rule) has no support to rank by and is kept whole.
    Returns the relative MSE, blocks, A, c and, per hidden layer, the rows of ``blocks`` kept.
    """
    act = activations.get(config.activation).name
    candidates = blocks
    final, blocks, A, c = finetune_network(blocks, A, c, Xt, Yt, act, config.finetune_iter, JOINT_STALL)
    kept = [np.arange(len(b)) for b in blocks]
    if config.fallback and config.prune and config.dtype == "float64" and final > EXACT_FIT:
        support = [cl.n_students[col.cluster] for _, cl, col in lower]
        if best.clusters.rule == "student":
            support.append(np.full(len(blocks[-1]), np.iinfo(np.int64).max))
        else:
            support.append(best.clusters.n_students[best.collapsed.cluster[best.kept]])
        fit = refit_supported(candidates, support, Xt, Yt, act, config.finetune_iter)  # not the stalled fit's
        if fit is None:
            log.info("joint fit %.1e, and no set of the best-supported candidates fits exactly", final)
        else:
            widths = [len(r) for r in fit[4]]
            log.info("joint fit %.1e; the best-supported candidates, %s, fit to %.1e", final, widths, fit[0])
            report("refit", {"widths": widths, "rel_mse": fit[0], "was": final})
            final, blocks, A, c, kept = fit
    if config.prune:
        final, blocks, A, c, left = prune_network(blocks, A, c, final, Xt, Yt, act, config.finetune_iter)
        kept = [k[j] for k, j in zip(kept, left)]
    return final, blocks, A, c, kept


def _labelled(neurons: pa.Table, clusters: Clusters) -> pa.Table:
    """A layer's neuron table with each row's cluster (−1: none) and whether it was dropped as negligible."""
    return neurons.append_column("cluster", pa.array(clusters.labels)).append_column("dropped", pa.array(clusters.dropped))


def _to_stage(clusters: Clusters, col: Collapsed, fit: _Attempt | None = None) -> dict[str, np.ndarray]:
    """A finished layer as plain arrays for its run-folder checkpoint (``_stage`` reads it back)."""
    arrays = {f"clusters.{f.name}": np.asarray(getattr(clusters, f.name)) for f in dataclasses.fields(clusters)
              if getattr(clusters, f.name) is not None}
    arrays |= {f"collapsed.{f.name}": np.asarray(getattr(col, f.name)) for f in dataclasses.fields(col)}
    if fit is not None:
        arrays |= {f"fit.{k}": np.asarray(v) for k, v in zip("VAcS", fit.weights) if v is not None}
        arrays |= {"fit.final": np.asarray(fit.final), "fit.kept": np.asarray(fit.kept)}
    return arrays


def _stage(
    run: storage.RunFolder | None, layer: int, last: bool = False
) -> tuple[Clusters, Collapsed, dict[str, Any]] | None:
    """A finished layer's Clusters, Collapsed and fit arrays (empty below the last layer) from
    ``run``; None when there is none or it does not hold them (then the layer is redone)."""
    arrays = run.load_stage(layer) if run is not None else None
    if arrays is None:
        return None

    def part(prefix: str) -> dict[str, Any]:
        return {k[len(prefix):]: v.item() if v.ndim == 0 else v for k, v in arrays.items() if k.startswith(prefix)}

    try:
        fit = part("fit.")
        if last and not {"V", "A", "c", "final", "kept"} <= fit.keys():
            raise KeyError("fit")
        return Clusters(**part("clusters.")), Collapsed(**part("collapsed.")), fit
    except (KeyError, TypeError) as exc:
        log.warning("checkpoint of layer %d in %s lacks %s; clustering it again", layer, run.path, exc)
        return None


def _hidden_layer(
    config: Config, neurons: pa.Table, students: pa.Table, l: int, timings: dict[str, float], report: Progress
) -> tuple[pa.Table, Clusters, Collapsed]:
    """Cluster and collapse a layer below the last (no exact fit to decide on pruning there)."""
    vectors = np.asarray(neurons.column("vector").combine_chunks().flatten()).reshape(neurons.num_rows, -1)
    sids = np.asarray(neurons.column("student"))
    losses = dict(zip(np.asarray(students.column("student")).tolist(), np.asarray(students.column("rel_loss")).tolist()))
    t0 = time.perf_counter()
    clusters = cluster_layer(
        vectors, sids, config.gamma, config.beta,
        backend=config.cluster_backend, rule=config.cluster_rule, weights=np.asarray(neurons.column("contribution")),
        drop=config.drop, n_students=config.n_students, min_separation=config.min_separation,
    )
    timings["cluster"] = timings.get("cluster", 0.0) + time.perf_counter() - t0
    report("cluster", {"layer": l + 1, "rule": config.cluster_rule, "kept": clusters.n_clusters, "rows": len(vectors)})
    col = collapse(vectors, sids, clusters.labels, losses, REFERENCE_TOP if config.cluster_rule == "reference" else None)
    if len(col.vectors) == 0:
        raise RecoveryError(
            f"layer {l + 1}: no cluster spans {clusters.min_students} students, so the layers above cannot be "
            "recovered; the students may not have converged (see the students table) — try more students, "
            "wider students or more queries"
        )
    return _labelled(neurons, clusters), clusters, col


def _reconstruct(
    config: Config,
    neurons: pa.Table,
    students: pa.Table,
    Xt: torch.Tensor,
    Yt: torch.Tensor,
    timings: dict[str, float],
    report: Progress,
    layer: int,
) -> tuple[pa.Table, _Attempt]:
    """Cluster the last hidden layer's canonical neurons, collapse, fit, prune (standardised units).

    Xt: the layer's inputs — the queries, or the recovered layers' activations in a deep run.

    With ``fallback``, a stable-rule result that does not fit exactly is retried with the
    authors' cut, which keeps more candidates (often every teacher neuron among them); the
    exact-fit pruning then removes its extras. The retry replaces the first answer only if its
    fit is exact: otherwise its extra neurons would win merely by fitting more. If neither rule
    fits exactly, the best exact students (up to ``EXACT_STUDENTS_TRIED``) are each pruned alone
    and the smallest exact result is kept (``_student_candidates``).
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
        report("cluster", {"layer": layer + 1, "rule": rule, "kept": clusters.n_clusters, "rows": len(vectors)})
        return fitted(clusters, collapse(vectors, sids, clusters.labels, losses, top))

    def one_student(s: int, clustered: Clusters) -> _Attempt:
        out = fitted(*_student_candidates(vectors, sids, s, clustered))
        report("student", {"layer": layer + 1, "student": s, "kept": len(out.kept), "rows": len(out.collapsed.vectors),
                           "rel_mse": out.final})
        return out

    def fitted(clusters: Clusters, col: Collapsed) -> _Attempt:
        """The candidates' network: output layer, fine-tune and (with ``prune``) pruning."""
        t1 = time.perf_counter()
        if config.prune:
            final, V, A, c, S, kept = prune(col.vectors, Xt, Yt, act.name, config.finetune_iter)
        else:
            Xn, Yn = Xt.cpu().double().numpy(), Yt.cpu().double().numpy()
            A, c, S = output_layer(col.vectors, Xn, Yn, act.name, act.symmetry.needs_affine)
            final, V, A, c, S = finetune(col.vectors, A, c, S, Xt, Yt, act.name, config.finetune_iter)
            kept = np.arange(len(V))
        timings["reconstruct"] = timings.get("reconstruct", 0.0) + time.perf_counter() - t1
        return _Attempt(clusters, col, final, (V, A, c, S), kept)

    best = first = attempt(config.cluster_rule, REFERENCE_TOP if config.cluster_rule == "reference" else None)
    if config.fallback and config.prune and config.cluster_rule == "stable" and best.final > EXACT_FIT:
        other = attempt("reference", None)
        log.info("layer %d: stable rule fit %.1e, authors' cut with pruning %.1e", layer + 1, best.final, other.final)
        if other.final <= EXACT_FIT:  # more neurons always fit better: only an exact fit earns the switch
            best = other
    if config.fallback and config.prune and best.final > EXACT_FIT:
        exact = sorted((loss, s) for s, loss in losses.items() if loss <= EXACT_FIT)
        for _, s in exact[:EXACT_STUDENTS_TRIED]:
            other = one_student(s, first.clusters)
            log.info("layer %d: student %d alone, pruned: %d neurons, fit %.1e", layer + 1, s, len(other.kept), other.final)
            if other.final <= EXACT_FIT and (best.final > EXACT_FIT or len(other.kept) < len(best.kept)):
                best = other
    if best.clusters.n_clusters == 0:
        log.warning(
            "layer %d: no cluster spans %d students; the students may not have converged "
            "(see the students table) — try more students, wider students or more queries",
            layer + 1, best.clusters.min_students,
        )
    return _labelled(neurons, best.clusters), best


EXACT_STUDENTS_TRIED = 3  # the fallback prunes up to this many exact students and keeps the smallest result


def _student_candidates(
    vectors: np.ndarray, sids: np.ndarray, s: int, clustered: Clusters
) -> tuple[Clusters, Collapsed]:
    """Every neuron of student ``s`` as its own one-member cluster: the last fallback's candidates.

    An exact student already computes the teacher's function; pruning it to the neurons its
    exact fit needs leaves the teacher's (up to symmetry) when clustering cannot, e.g. when
    only two or three of the students reached the teacher's basin and a teacher neuron's
    copies never span ⌊γN⌋ of them (digits ReLU 64-16-10). ``clustered``: the layer's first
    clustering, whose negligible-row marks and backend the tables keep.
    """
    rows = np.flatnonzero(sids == s)
    labels = np.full(len(sids), -1, dtype=np.int64)
    labels[rows] = np.arange(len(rows))
    k = len(rows)
    clusters = Clusters(
        labels=labels, dropped=clustered.dropped, size=np.ones(k, dtype=np.int64),
        n_students=np.ones(k, dtype=np.int64), height=np.zeros(k), separation=np.full(k, np.nan),
        median_cos_dist=np.zeros(k), cut_height=float("nan"), min_students=1, rule="student",
        backend=clustered.backend,
    )
    return clusters, Collapsed(vectors[rows], np.full(k, s, dtype=np.int64), rows, np.arange(k, dtype=np.int64))


def _split(n_students: int, size: int) -> list[list[int]]:
    """The students' ids in packs of ``size`` consecutive ones (the last may be smaller)."""
    ids = list(range(n_students))
    return [ids[i : i + size] for i in range(0, n_students, size)]


def _plan(config: Config, d_in: int, d_out: int, ray_resources: dict[str, float] | None = None) -> dict[str, Any]:
    """Resolve every ``auto`` choice once; the result is stored beside (not in) the config.

    ray_resources: the cluster's CPUs and GPUs when the packs run on Ray (they size the packs
    and the actors' shares); None for in-process training.
    """
    widths = [d_in, *config.student_widths, d_out]
    P = n_params(widths)
    device = config.device
    if ray_resources is None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device: 'cuda' was asked for but torch sees no CUDA device; use device='auto' or 'cpu'")
    optimizer = config.optimizer
    if optimizer == "auto":
        optimizer = "lm" if P <= config.lm_max_params else "adam"
    finish = optimizer == "adam" and config.finish_lm and P <= config.lm_max_params
    max_size = config.n_students
    if optimizer == "lm" or finish:
        max_size = max(1, min(max_size, LM_MEMORY_BUDGET // (24 * P * P + 16 * CHUNK_ELEMS)))
    plan: dict[str, Any] = {
        "widths": widths,
        "params_per_student": P,
        "optimizer": optimizer,
        "finish_lm": finish,
        "device": device,
        "backend": "local" if ray_resources is None else "ray",
        "cluster_backend": config.cluster_backend,  # resolved after clustering (Clusters.backend)
    }
    if ray_resources is None:
        size = config.pack_size or max_size
    else:
        from .distributed import actor_shares, pack_sizes

        cpus, gpus, slots = actor_shares(config, ray_resources)
        size = config.pack_size or pack_sizes(config.n_students, slots, max_size)
        plan |= {"cpus_per_pack": cpus, "gpus_per_pack": gpus, "ray_resources": ray_resources, "actor_slots": slots}
    plan["packs"] = _split(config.n_students, size)
    n_packs = len(plan["packs"])
    if ray_resources is not None and len(config.student_widths) > 1 and n_packs > plan["actor_slots"]:
        # deep runs keep every pack's actor until the last layer: they must all fit at once
        plan["cpus_per_pack"] = math.floor(1e4 * ray_resources["CPU"] / n_packs) / 1e4
        if plan["gpus_per_pack"]:
            plan["gpus_per_pack"] = math.floor(1e4 * ray_resources["GPU"] / n_packs) / 1e4
        plan["actor_slots"] = n_packs
    return plan


def _layer_result(index: int, neurons: pa.Table, clusters: Clusters, col, network: MLP, kept: np.ndarray) -> LayerResult:
    """Tables of one layer: every student neuron, and every candidate cluster with its fate."""
    sel = col.cluster
    neuron = np.full(len(sel), -1, dtype=np.int64)
    neuron[kept] = np.arange(len(kept))
    vec = network.neuron_vectors(index)
    tbl = pa.table(
        {
            "cluster": sel,
            "neuron": neuron,  # row of the recovered layer, −1 when pruned (or dropped by the deep refit)
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


def _history(results: list[PackResult]) -> tuple[np.ndarray, np.ndarray]:
    """Every student's logged losses on one step axis (a pack's last value carries forward)."""
    steps = np.unique(np.concatenate([r.history_steps for r in results]))
    cols = []
    for r in results:
        at = np.searchsorted(r.history_steps, steps, side="right") - 1
        cols.append(r.history[np.clip(at, 0, len(r.history) - 1)])
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
