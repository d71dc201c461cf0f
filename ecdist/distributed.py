"""Ray: student packs as actors across a cluster (the only module that imports ray).

The driver puts the standardised queries in the object store once, starts one
``StudentPack`` actor per pack with its share of CPUs (and GPUs), and yields each pack's
``PackResult`` — Arrow record batches of neuron vectors — as soon as that pack finishes, so
clustering input arrives as a stream. An actor that dies (node lost, OOM, killed) is
restarted by Ray and its call retried; it resumes from its checkpoint in the run folder
(or from its deterministic start without one) and ends with the students it would have had.

Every actor runs with ``MKL_CBWR=AVX2``: MKL's reproducible mode makes a student's
arithmetic independent of its pack, node and memory alignment, so the recovered network is
the same on every backend and however the students are split.
"""
from __future__ import annotations

import logging
import math
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from .config import Config
from .errors import ConfigError, EcdistError
from .packs import PackResult, PackTrainer

log = logging.getLogger(__name__)
REPRODUCIBLE_ENV = {"MKL_CBWR": "AVX2"}
PROGRESS_EVERY = 1.0  # seconds between progress polls while no pack finishes (a UI refresh)
NAMESPACE = "ecdist"


class PackFailed(EcdistError):
    """A student pack failed for good: its actor died more often than ``actor_restarts`` allows."""


@ray.remote
class StudentPack:
    """A Ray actor that owns k students stacked in one tensor per layer (see ``ecdist.packs``).

    Threads: torch uses the actor's CPU share; device: CUDA when Ray gave it a GPU.
    """

    def __init__(self, index: int, ids: list[int], config_json: str, plan: dict[str, Any], run_path: str | None):
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        torch.set_num_threads(max(1, int(cpus)))
        self.config = Config.from_json(config_json)
        gpu = bool(ray.get_gpu_ids()) and self.config.device != "cpu" and torch.cuda.is_available()
        self.device = "cuda" if gpu else "cpu"
        self.trainer = PackTrainer(index, ids, self.config, plan, run_path)

    def where(self) -> dict[str, Any]:
        """Node, process and device of this actor (the dashboard shows the same)."""
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "pid": os.getpid(), "device": self.device}

    def train(self, X: np.ndarray, Y: np.ndarray) -> PackResult:
        dtype = torch.float64 if self.config.dtype == "float64" else torch.float32
        Xt = torch.as_tensor(np.array(X), dtype=dtype, device=self.device)  # object-store arrays are read-only
        Yt = torch.as_tensor(np.array(Y), dtype=dtype, device=self.device)
        result = self.trainer.train(Xt, Yt)
        result.node = ray.get_runtime_context().get_node_id()
        return result

    def advance(self, X: np.ndarray, Y: np.ndarray, assigns: list[np.ndarray], widths: list[int], *H: np.ndarray) -> PackResult:
        """Insert the recovered layers 1…l into the pack, fine-tune, and hand back layer l+1's neurons.

        assigns, widths, H: one per recovered layer so far (H: its activations on the queries). A
        live actor has done all but the last stage; one Ray restarted after a crash replays them
        from its checkpoints (or its deterministic start), so it ends with the same students.
        """
        dtype = torch.float64 if self.config.dtype == "float64" else torch.float32
        Yt = torch.as_tensor(np.array(Y), dtype=dtype, device=self.device)
        if self.trainer.pack is None:
            self.trainer.train(torch.as_tensor(np.array(X), dtype=dtype, device=self.device), Yt)
        while True:
            stage = self.trainer.layer - 1  # layers already inserted
            self.trainer.insert_layer(assigns[stage], widths[stage])
            result = self.trainer.finetune(torch.as_tensor(np.array(H[stage]), dtype=dtype, device=self.device), Yt)
            if stage == len(assigns) - 1:
                result.node = ray.get_runtime_context().get_node_id()
                return result

    def progress(self) -> dict[str, Any]:
        """The pack's latest step, with the actor's name, process and node (as the dashboard shows them)."""
        ctx = ray.get_runtime_context()
        return self.trainer.progress() | {"actor": ctx.get_actor_name(), "pid": os.getpid(), "node": ctx.get_node_id()}


@contextmanager
def session(address: str | None = None, num_cpus: int | None = None) -> Iterator[bool]:
    """Use the Ray that is running (or at ``address`` / ``RAY_ADDRESS``), else start a local one.

    Yields True when this call started a local Ray, which is shut down on exit; a cluster
    reached by address is disconnected from, and a Ray the caller initialised is left as is.
    """
    if ray.is_initialized():
        yield False
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        else:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            ray.init(num_cpus=num_cpus or cores, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
    except ConnectionError as exc:
        raise ConfigError(f"backend: cannot connect to the Ray cluster at {address!r}: {exc}") from None
    try:
        yield not address
    finally:
        ray.shutdown()


@contextmanager
def node_cluster(workers: int, cpus_per_worker: int = 1) -> Iterator[list[str]]:
    """A Ray cluster of several nodes on this machine (``ray.cluster_utils.Cluster``), connected.

    The head has no CPUs, so every pack actor lands on a worker node: 1 + ``workers`` nodes, as
    a real cluster with a driver node. Yields the worker nodes' ids; shuts everything down on exit.
    Used by tests and by ``ecdist bench`` to measure scaling across nodes without a cluster.
    """
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        nodes = [cluster.add_node(num_cpus=cpus_per_worker) for _ in range(workers)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
        yield [n.node_id for n in nodes]
    finally:
        ray.shutdown()
        cluster.shutdown()


def resources() -> dict[str, float]:
    """CPUs and GPUs of the cluster Ray is connected to: in all, and on its largest node
    (``node_CPU``, ``node_GPU``) — an actor lives on one node, so a share larger than any
    node's would wait for ever, however many the cluster has in all."""
    total = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    return {
        "CPU": float(total.get("CPU", 0.0)),
        "GPU": float(total.get("GPU", 0.0)),
        "node_CPU": float(max((n.get("CPU", 0.0) for n in nodes), default=0.0)),
        "node_GPU": float(max((n.get("GPU", 0.0) for n in nodes), default=0.0)),
    }


def actor_shares(config: Config, total: dict[str, float]) -> tuple[float, float, int]:
    """(CPUs, GPUs) of each pack actor and how many actors the cluster runs at once.

    ``gpus_per_pack`` 0 means one pack per GPU when the cluster has GPUs (and device allows).
    A share the cluster cannot provide at all fails now, not as an actor pending forever.
    """
    cpus, gpus = float(config.cpus_per_pack), float(config.gpus_per_pack)
    if gpus == 0 and total["GPU"] >= 1 and config.device != "cpu":
        gpus = 1.0
    if cpus > total["CPU"]:
        raise ConfigError(
            f"cpus_per_pack: {cpus:g} CPUs per pack, but the Ray cluster has {total['CPU']:g} CPUs in all "
            f"(ray.cluster_resources() = {total}); lower cpus_per_pack"
        )
    if gpus > total["GPU"]:
        raise ConfigError(
            f"gpus_per_pack: {gpus:g} GPUs per pack, but the Ray cluster has {total['GPU']:g} GPUs "
            f"(ray.cluster_resources() = {total}); set gpus_per_pack=0 or device='cpu'"
        )
    for kind, share, field in (("CPU", cpus, "cpus_per_pack"), ("GPU", gpus, "gpus_per_pack")):
        largest = total.get(f"node_{kind}", share)  # absent: a resource view without nodes (tests, plans)
        if share > largest:
            raise ConfigError(
                f"{field}: {share:g} {kind}s per pack, but the largest node of the Ray cluster has {largest:g} "
                f"(an actor runs on one node; {total}); lower {field} or add larger nodes"
            )
    slots = int(total["CPU"] // cpus) if cpus > 0 else 1
    if gpus > 0:
        slots = min(slots, int(total["GPU"] // gpus + 1e-9))
    return cpus, gpus, max(1, slots)


def pack_sizes(n_students: int, slots: int, max_size: int) -> int:
    """Students per pack: spread over the actors the cluster runs at once, within ``max_size``.

    >>> pack_sizes(20, 2, 1000), pack_sizes(20, 2, 4), pack_sizes(3, 8, 1000)
    (10, 4, 1)
    """
    return max(1, min(max_size, math.ceil(n_students / slots)))


def train_packs(
    config: Config,
    plan: dict[str, Any],
    X: np.ndarray,
    Y: np.ndarray,
    run_path: Path | None,
    report: Any,
) -> Iterator[PackResult]:
    """Train every pack of ``plan`` on Ray actors; yield each pack's result as it finishes.

    X, Y: standardised queries and outputs, put in the object store once. ``report`` gets
    the same ``train`` events as in-process training, from the actors' progress. Each actor
    ends when its pack does (one hidden layer: nothing more to do there).
    """
    with PackGroup(config, plan, X, Y, run_path, report) as group:
        for result in group.train():
            group.release(result.index)
            yield result


class PackGroup:
    """The pack actors of one recovery, alive from training until the last layer is recovered.

    Deep runs insert each recovered layer into every pack and fine-tune there, so the
    students' state stays in its actor; ``advance`` broadcasts a stage and gathers the packs'
    next-layer neurons. Closing the group (or leaving its ``with``) ends every actor.
    """

    def __init__(
        self, config: Config, plan: dict[str, Any], X: np.ndarray, Y: np.ndarray, run_path: Path | None, report: Any
    ) -> None:
        self.config, self.plan, self.report = config, plan, report
        self.X_ref, self.Y_ref = ray.put(X), ray.put(Y)
        run = uuid.uuid4().hex[:8]
        opts = {
            "num_cpus": plan["cpus_per_pack"],
            "num_gpus": plan["gpus_per_pack"],
            "max_restarts": config.actor_restarts,
            "max_task_retries": config.actor_restarts,
            "max_concurrency": 2,  # train, and progress() while it trains
            "runtime_env": {"env_vars": dict(REPRODUCIBLE_ENV)},
            "namespace": NAMESPACE,  # one place to find them: ray.get_actor(name, namespace="ecdist")
        }
        self.actors = {
            i: StudentPack.options(name=f"ecdist-{run}-pack-{i}", **opts).remote(
                i, ids, config.to_json(), _plain(plan), str(run_path) if run_path is not None else None
            )
            for i, ids in enumerate(plan["packs"])
        }
        self.assigns: dict[int, list[np.ndarray]] = {i: [] for i in self.actors}
        self.widths: list[int] = []
        self.H_refs: list[Any] = []
        report("ray", {"actors": len(self.actors), "cpus_per_pack": plan["cpus_per_pack"],
                       "gpus_per_pack": plan["gpus_per_pack"]})

    def __enter__(self) -> "PackGroup":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def train(self) -> Iterator[PackResult]:
        """Train every pack; yield each result as its pack finishes."""
        yield from self._gather({a.train.remote(self.X_ref, self.Y_ref): i for i, a in self.actors.items()})

    def advance(self, assigns: list[np.ndarray], width: int, H: np.ndarray) -> list[PackResult]:
        """Insert a recovered layer of ``width`` neurons into every pack (``assigns[i]``: pack i's
        rows → recovered neuron or −1), fine-tune on its activations H; the packs' next-layer results."""
        self.widths.append(int(width))
        self.H_refs.append(ray.put(H))
        pending = {}
        for i, actor in self.actors.items():
            self.assigns[i].append(np.asarray(assigns[i]))
            pending[actor.advance.remote(self.X_ref, self.Y_ref, self.assigns[i], self.widths, *self.H_refs)] = i
        return list(self._gather(pending))

    def release(self, index: int) -> None:
        """End one pack's actor (its pack is not needed any more)."""
        actor = self.actors.pop(index, None)
        if actor is not None:
            ray.kill(actor)

    def close(self) -> None:
        for i in list(self.actors):
            self.release(i)

    def _gather(self, pending: dict[Any, int]) -> Iterator[PackResult]:
        config, plan = self.config, self.plan
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=PROGRESS_EVERY)
            for ref in ready:
                i = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except (RayActorError, RayTaskError) as exc:
                    raise PackFailed(
                        f"pack {i} (students {plan['packs'][i][0]}–{plan['packs'][i][-1]}) failed after "
                        f"{config.actor_restarts} actor restarts: {_first_line(exc)}; its last checkpoint is kept "
                        "in the run folder — resume the run, or raise actor_restarts"
                    ) from None
                yield result
            if not ready:
                _poll(self.actors, pending, self.report)


def actor_locations(actors: list[Any]) -> list[dict[str, Any]]:
    """Where each actor runs (node, pid, device)."""
    return ray.get([a.where.remote() for a in actors])


def _poll(actors: dict[int, Any], pending: dict[Any, int], report: Any) -> None:
    """Forward the running packs' latest progress; a pack being restarted is skipped."""
    running = {actors[i].progress.remote(): i for i in pending.values() if i in actors}
    done, _ = ray.wait(list(running), num_returns=len(running), timeout=PROGRESS_EVERY / 2)
    for ref in done:
        try:
            info = ray.get(ref, timeout=0)
        except (RayActorError, RayTaskError, GetTimeoutError):
            continue
        if "losses" in info:
            report("train", info)


def _plain(plan: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in plan.items() if k != "packs"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
