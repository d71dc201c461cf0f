"""A scaling model on paper: time and cost of a recovery beyond this machine, from measured rates.

Two measured ingredients, each with where it came from:
  * ``TrainingProfile``: Adam throughput of one device (one GPU, or one CPU core) in sample·parameters
    per second, measured on stacked packs at several sizes of the work of one optimiser step,
    w = k·P (k stacked students of P parameters each). A small pack leaves the device idle, so the
    rate grows with w until the device saturates;
  * ``ClusterProfile``: a log-log fit of FAISS clustering time against the number of neuron vectors M,
    t = a·M^slope at dimension D.
``estimate`` combines them for a ``Target``; its docstring lists the assumptions.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..students import n_params

USD_PER_GPU_HOUR = 3.50  # assumed rental price of one H100/H200-class GPU; scale the cost column to yours
REFERENCE_EPOCHS = 25_000  # the authors' Adam epoch cap: an upper bound on the epochs a student runs
MNIST_QUERIES = 60_000  # the MNIST training images, queried once each


@dataclass(frozen=True)
class Target:
    """A recovery to estimate: students ``widths`` = [d_in, h_1, …, d_out], N of them, on ``devices`` devices."""

    name: str
    widths: tuple[int, ...]
    n_students: int
    devices: int
    queries: int = MNIST_QUERIES
    epochs: int = REFERENCE_EPOCHS


@dataclass(frozen=True)
class TrainingProfile:
    """Adam rate of one device: ``rate[i]`` sample·parameters/s with steps of ``work[i]`` = k·P (ascending)."""

    device: str
    work: tuple[float, ...]
    rate: tuple[float, ...]
    source: str

    @classmethod
    def from_rows(cls, device: str, rows: list[dict[str, Any]], source: str) -> "TrainingProfile":
        """From rows with ``N``, ``params_per_student`` and ``sample_params_per_s``; the best rate per work."""
        best: dict[float, float] = {}
        for r in rows:
            w = float(r["N"] * r["params_per_student"])
            best[w] = max(best.get(w, 0.0), float(r["sample_params_per_s"]))
        work = tuple(sorted(best))
        return cls(device, work, tuple(best[w] for w in work), source)


@dataclass(frozen=True)
class ClusterProfile:
    """FAISS clustering time t = a·M^slope, fitted at dimension ``dim`` on ``machine``."""

    a: float
    slope: float
    dim: int
    machine: str
    source: str


def training_rate(profile: TrainingProfile, work: float) -> float:
    """Sample·parameters/s of one device for steps of ``work`` = k·P.

    Log-log interpolation between measured points; below the smallest measured work the step time
    is taken as constant (rate ∝ work: the device is latency-bound, as it is at the smallest
    measured pack, so extra students would be free); above the largest the device is saturated
    (constant rate).

    >>> p = TrainingProfile("gpu", (1e6, 1e8), (1e10, 1e12), "example")
    >>> [f"{training_rate(p, w):.0e}" for w in (1e7, 5e5, 1e9)]  # between, below, above the measured steps
    ['1e+11', '5e+09', '1e+12']
    """
    w, r = np.asarray(profile.work, dtype=float), np.asarray(profile.rate, dtype=float)
    if work <= w[0]:
        return float(r[0] * work / w[0])
    if work >= w[-1]:
        return float(r[-1])
    return float(np.exp(np.interp(math.log(work), np.log(w), np.log(r))))


def estimate(
    target: Target,
    training: TrainingProfile,
    clustering: ClusterProfile,
    usd_per_device_hour: float = USD_PER_GPU_HOUR,
) -> dict[str, Any]:
    """Hours and cost of recovering ``target``, and which part dominates.

    Assumptions (each one a reason the real figure may differ):
      * training: the N students are split evenly, one pack of k = ⌈N/devices⌉ per device, all
        devices busy at once; an Adam epoch of one student costs n·P sample·parameters (forward and
        backward over n queries, P parameters), done at ``training_rate(k·P)``; every student runs
        ``target.epochs`` epochs (default: the reference's cap of 25,000, an upper bound — the
        plateau schedule often stops earlier; time is linear in epochs); float64 as ecdist's
        default (float32 was ~1.5× faster on the H200); the rate measured at one n holds at another
        (batches of 512 keep the step the same; only the number of steps changes);
      * clustering: one FAISS clustering per hidden layer l of M_l = N·h_l vectors of dimension
        D_l = h_{l−1} + 1, at t = a·M^slope scaled linearly by D_l / D of the fit (search cost
        ∝ D), on the machine the fit comes from (a 2-core CPU: faiss-gpu or more cores only make
        it faster); the fit is extrapolated beyond its largest M;
      * not counted: querying the teacher (one pass over n inputs), collapsing clusters and the
        final fine-tune (seconds to minutes), Ray's start and the transfer of the students' weights;
      * cost: every device is held for the whole run (training and clustering) at
        ``usd_per_device_hour``.
    """
    widths = list(target.widths)
    P = n_params(widths)
    k = math.ceil(target.n_students / target.devices)
    rate = training_rate(training, k * P)
    train_s = target.epochs * k * target.queries * P / rate
    layers = []
    for d_prev, h in zip(widths[:-2], widths[1:-1]):
        M = target.n_students * h
        dim = d_prev + 1
        layers.append({"vectors": M, "dim": dim,
                       "seconds": clustering.a * M**clustering.slope * dim / clustering.dim})
    cluster_s = sum(layer["seconds"] for layer in layers)
    total_s = train_s + cluster_s
    device_hours = target.devices * total_s / 3600
    return {
        "target": asdict(target),
        "params_per_student": P,
        "students_per_device": k,
        "work_per_step": k * P,
        "rate_sample_params_per_s": rate,
        "saturated": k * P >= training.work[-1],
        "pack_epoch_s": k * target.queries * P / rate,  # one epoch of a device's pack
        "train_s": train_s,
        "cluster_layers": layers,
        "cluster_s": cluster_s,
        "total_s": total_s,
        "device_hours": device_hours,
        "usd_per_device_hour": usd_per_device_hour,
        "usd": device_hours * usd_per_device_hour,
        "dominant": "training" if train_s >= cluster_s else "clustering",
        "training_profile": training.source,
        "cluster_profile": clustering.source,
    }
