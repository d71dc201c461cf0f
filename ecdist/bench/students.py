"""Students per second: one stacked pack against a per-student loop, and the cost of one student.

(a) One ``StudentPack`` of N stacked students trained together (one batched forward and one Adam
    step for all N) against N separate ``torch.nn.Sequential`` models with their own Adam, trained
    one after another on the same minibatches — how most code trains an ensemble. The reference's
    Adam (lr 1e-3, batch 512), float64, one warm-up epoch then a fixed number of timed epochs.
    Figure: students·epochs per second, each side the fastest of ``repeats`` alternated runs, and
    the ratio stacked/loop from the same run.
(b) Cost of one student as a function of its width and of the number of queries n, on MNIST-shaped
    students (784-w-10): students·epochs/s and sample·parameters/s (= students·epochs/s · n · P),
    the unit in which ``ecdist.bench.model`` extrapolates to other widths, n and machines.
(c) Levenberg–Marquardt, ecdist's optimiser for small students: student-iterations per second.
On the CPU everything runs on one torch thread (cores are measured by ``ecdist.bench.actors``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import queries, teachers
from ..queries import Standardizer
from ..students import AdamOptions, LMOptions, StudentPack, fit_adam, fit_lm, n_params
from .common import alternated

TEACHER = [10, 4, 1]  # a small tanh teacher; the students' speed does not depend on what they learn
MNIST_TEACHER_WIDTH = 16  # teacher of the MNIST-shaped cost rows (only its outputs are used)


@dataclass(frozen=True)
class StudentSizes:
    """What ``run`` measures. ``stack_cases``: (N, width) of (a); ``cost_cases``: (width, n, N) of (b)."""

    stack_cases: tuple[tuple[int, int], ...]
    stack_queries: int
    epochs: int
    cost_cases: tuple[tuple[int, int, int], ...]
    cost_epochs: int
    lm_students: int
    lm_width: int
    lm_iterations: int
    repeats: int = 3  # (a) alternates the two sides this many times and keeps each side's fastest


def problem(arch: list[int], n: int, dtype: torch.dtype = torch.float64, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised Gaussian queries of a random tanh teacher ``arch`` and its outputs, as tensors."""
    t = teachers.random_mlp(arch, "tanh", seed=0)
    X = queries.gaussian(n, arch[0], seed=1)
    Y = teachers.query(t, X)
    Xs, Ys = Standardizer.fit(X)(X), Standardizer.fit(Y)(Y)
    return torch.as_tensor(Xs, dtype=dtype, device=device), torch.as_tensor(Ys, dtype=dtype, device=device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def stacked_adam(widths: list[int], N: int, X: torch.Tensor, Y: torch.Tensor, epochs: int) -> float:
    """Seconds for ``epochs`` Adam epochs of one pack of N students ``widths`` (after one warm-up epoch)."""
    pack = StudentPack.init(widths, "tanh", list(range(N)), seed=0, dtype=X.dtype, device=X.device)
    fit_adam(pack, X, Y, AdamOptions(max_epochs=1, log_every=10**9), seed=0)  # first-call costs
    _sync(X.device)
    t0 = time.perf_counter()
    fit_adam(pack, X, Y, AdamOptions(max_epochs=epochs, log_every=10**9), seed=0)
    _sync(X.device)
    return time.perf_counter() - t0


def loop_adam(widths: list[int], N: int, X: torch.Tensor, Y: torch.Tensor, epochs: int) -> float:
    """The same as N independent ``nn.Sequential`` models, each with its own Adam, on one minibatch order."""
    models = []
    for i in range(N):
        torch.manual_seed(i)
        layers: list[torch.nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
        m = torch.nn.Sequential(*layers[:-1]).to(device=X.device, dtype=X.dtype)
        models.append((m, torch.optim.Adam(m.parameters(), lr=1e-3)))
    gen = torch.Generator().manual_seed(0)
    n = X.shape[0]

    def epoch() -> None:
        perm = torch.randperm(n, generator=gen).to(X.device)
        for m, opt in models:
            for s in range(0, n, 512):
                b = perm[s : s + 512]
                loss = ((m(X[b]) - Y[b]) ** 2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    epoch()  # warm-up, as for the stack
    _sync(X.device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        epoch()
    _sync(X.device)
    return time.perf_counter() - t0


def compare_adam(widths: list[int], N: int, X: torch.Tensor, Y: torch.Tensor, epochs: int, repeats: int = 3) -> dict[str, Any]:
    """(a) for one (N, widths): the two sides alternated ``repeats`` times; each side's fastest run
    is its figure (the least disturbed on a shared machine), all runs are kept."""
    stacked, loop = alternated(repeats, lambda: stacked_adam(widths, N, X, Y, epochs),
                               lambda: loop_adam(widths, N, X, Y, epochs))
    ts, tl = min(stacked), min(loop)
    return {"N": N, "width": widths[1], "epochs": epochs, "queries": int(X.shape[0]), "repeats": repeats,
            "stacked_s": ts, "loop_s": tl, "stacked_runs_s": stacked, "loop_runs_s": loop,
            "stacked_students_epochs_per_s": N * epochs / ts, "loop_students_epochs_per_s": N * epochs / tl,
            "ratio": tl / ts}


def lm_rate(widths: list[int], N: int, X: torch.Tensor, Y: torch.Tensor, iterations: int) -> dict[str, Any]:
    """Student-iterations per second of Levenberg–Marquardt (no early stop: every student does every iteration)."""
    opts = LMOptions(max_iter=iterations, tol=0.0, restarts=0, stall_window=10**6)
    fit_lm(StudentPack.init(widths, "tanh", list(range(N)), seed=0, dtype=X.dtype, device=X.device), X, Y,
           LMOptions(max_iter=2, tol=0.0, restarts=0, stall_window=10**6))  # warm-up
    pack = StudentPack.init(widths, "tanh", list(range(N)), seed=0, dtype=X.dtype, device=X.device)
    _sync(X.device)
    t0 = time.perf_counter()
    fit_lm(pack, X, Y, opts)
    _sync(X.device)
    dt = time.perf_counter() - t0
    P = n_params(widths)
    return {"widths": widths, "N": N, "queries": int(X.shape[0]), "params_per_student": P, "iterations": iterations,
            "seconds": dt, "student_iterations_per_s": N * iterations / dt,
            "median_rel_mse": float(np.median(pack.rel_loss))}


def run(sizes: StudentSizes, device: str = "cpu") -> dict[str, Any]:
    """(a), (b) and (c) of the module docstring; every ratio comes from this one run."""
    dev = torch.device(device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        X, Y = problem(TEACHER, sizes.stack_queries, device=device)
        stack = []
        for N, w in sizes.stack_cases:
            stack.append(compare_adam([TEACHER[0], w, TEACHER[-1]], N, X, Y, sizes.epochs, sizes.repeats))
        cost = []
        for w, n, N in sizes.cost_cases:
            Xc, Yc = problem([784, MNIST_TEACHER_WIDTH, 10], n, device=device)
            widths = [784, w, 10]
            dt = stacked_adam(widths, N, Xc, Yc, sizes.cost_epochs)
            rate = N * sizes.cost_epochs / dt
            P = n_params(widths)
            cost.append({"widths": widths, "width": w, "queries": n, "N": N, "epochs": sizes.cost_epochs,
                         "params_per_student": P, "seconds": dt, "students_epochs_per_s": rate,
                         "sample_params_per_s": rate * n * P})
        lm = lm_rate([TEACHER[0], sizes.lm_width, TEACHER[-1]], sizes.lm_students, X, Y, sizes.lm_iterations)
    finally:
        torch.set_num_threads(threads)
    return {
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "torch_threads": 1 if dev.type == "cpu" else None,
        "dtype": "float64",
        "teacher": TEACHER,
        "stacked_vs_loop": stack,
        "cost": cost,
        "lm": lm,
    }
