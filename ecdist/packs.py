"""A pack's life: start or resume, train, checkpoint, hand back its neurons as Arrow.

The same ``PackTrainer`` runs in-process (``backend="local"``) and inside a Ray actor
(``ecdist.distributed``), so both backends train every student along the same path. What
leaves a pack is a ``PackResult`` of Arrow record batches — a layer's canonical neuron
vectors and a row per student — small and cheap to ship from a worker node to the driver.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from . import activations, storage
from .config import Config
from .students import STATUS_NAMES, AdamOptions, LMOptions, StudentPack, fit_adam, fit_lm

log = logging.getLogger(__name__)
CHECKPOINT_EVERY = 10  # optimiser steps between pack checkpoints in a run folder
Report = Any  # Callable[[str, dict[str, Any]], None]


@dataclass
class PackResult:
    """What a trained pack hands back.

    neurons: a row per student neuron of layer 1 (student, neuron, contribution, sign, vector —
    canonicalised for the activation's symmetry); students: a row per student (student, pack,
    rel_loss, status, restarts, steps); history: (T, k) relative MSE at ``history_steps``;
    resumed_from: the optimiser step this run of the pack started at (> 0 after a restart
    from a checkpoint).
    """

    index: int
    neurons: pa.RecordBatch
    students: pa.RecordBatch
    history_steps: np.ndarray
    history: np.ndarray
    resumed_from: int
    node: str = ""  # the Ray node that trained the pack ("" in-process)


class PackTrainer:
    """Owns one ``StudentPack``: initialises it (or loads its checkpoint), trains it, reports.

    ``progress()`` may be called from another thread while ``train`` runs (a Ray actor with
    two concurrent calls): it reads a snapshot that ``train`` replaces after every step.
    """

    def __init__(
        self,
        index: int,
        ids: list[int],
        config: Config,
        plan: dict[str, Any],
        run_path: str | Path | None,
    ) -> None:
        self.index, self.ids, self.config, self.plan = index, list(ids), config, plan
        self.run = storage.RunFolder(Path(run_path)) if run_path is not None else None
        self.pack: StudentPack | None = None
        self.layer = 1  # the hidden layer whose neurons the pack's first layer holds (deep runs move up)
        self._snapshot: dict[str, Any] = {"pack": index, "phase": "waiting", "step": 0, "total": 0}
        self._lock = threading.Lock()

    def progress(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._snapshot)

    def train(self, X: torch.Tensor, Y: torch.Tensor, report: Report | None = None) -> PackResult:
        """Train the pack on standardised X, Y (or pick it up from its checkpoint); its neurons."""
        config, plan, dtype, device = self.config, self.plan, X.dtype, X.device

        def fresh() -> StudentPack:
            return StudentPack.init(plan["widths"], config.activation, self.ids, config.seed, dtype=dtype, device=device)

        return self._fit(fresh, plan["widths"], X, Y, report, plan["optimizer"], plan["finish_lm"])

    def current(self, X: torch.Tensor, state: dict[str, np.ndarray]) -> PackResult:
        """The pack as ``state`` (its first-stage checkpoint) holds it, training no further (``recover(train=False)``).

        Each student gets its best attempt so far (``keep_best``), as at the end of a run. The
        trainer lets go of the run folder, so that a deep run's fine-tunes stay in memory and a
        run still training there is left undisturbed.
        """
        self.pack = StudentPack.from_state(state, self.config.activation, dtype=X.dtype, device=X.device)
        self.pack.keep_best()
        self.run = None
        return self.result(X, resumed_from=self.pack.steps)

    def insert_layer(self, assign: np.ndarray, width: int) -> None:
        """Replace every student's first hidden layer by the ``width`` recovered neurons (see ``inserted``).

        assign: (k·h,) for each of the pack's first-layer neurons, in ``result`` row order, the
        recovered neuron its cluster became, or −1. The pack then takes the recovered layer's
        activations as its inputs: the recovered layers are shared and stay fixed. With
        ``Config.upper_widths`` the students above are fresh ones of those widths (``fresh_above``).
        """
        self.layer += 1
        upper = self.config.upper_widths
        if upper is None:
            self.pack = inserted(self.pack, np.asarray(assign), int(width))
        else:
            self.pack = fresh_above(self.pack, int(width), upper[self.layer - 2 :], stage_seed(self.config, self.layer))

    def finetune(self, H: torch.Tensor, Y: torch.Tensor, report: Report | None = None) -> PackResult:
        """Fine-tune the students above the recovered layers on their activations H (n, K); re-read.

        Every parameter above the recovered layers trains (LM when small enough, else Adam at a
        tenth of ``lr``, the authors' fine-tune rate, then LM if it fits); the result's neurons
        are read from the fine-tuned pack, never from the students before the insertion.
        """
        config, start = self.config, self.pack
        small = start.n_params <= config.lm_max_params
        optimizer = "lm" if small else "adam"
        return self._fit(lambda: start, start.widths, H, Y, report, optimizer, False, finetune=True)

    def _fit(
        self, make, widths: list[int], X: torch.Tensor, Y: torch.Tensor, report: Report | None,
        optimizer: str, finish_lm: bool, finetune: bool = False,
    ) -> PackResult:
        """Train the pack of this stage from ``make()`` or its checkpoint, checkpointing as it goes."""
        config, index, layer = self.config, self.index, self.layer
        dtype, device = X.dtype, X.device
        tag = {"pack": index} | ({"layer": layer} if layer > 1 else {})  # events of a deep run's later stages say so
        state = self.run.load_pack(index, layer) if self.run is not None else None
        if state is not None and state["ids"].tolist() != self.ids:
            log.warning("checkpoint of pack %d holds other students (the packs were split differently); retraining it", index)
            state = None
        if state is not None and state["widths"].tolist() != list(widths):
            log.warning("checkpoint of pack %d (layer %d) has widths %s, not %s; retraining it",
                        index, layer, state["widths"].tolist(), list(widths))
            state = None
        if state is not None and state.get("done", np.asarray(False)).item():
            self.pack = StudentPack.from_state(state, config.activation, dtype=dtype, device=device)
            self._emit(report, "train", tag | {"resumed": True, "done": True})
            return self.result(X, resumed_from=self.pack.steps)
        pack = StudentPack.from_state(state, config.activation, dtype=dtype, device=device) if state is not None else make()
        self.pack = pack
        resumed_from = pack.steps

        def step(phase: str, i: int, total: int, losses: np.ndarray) -> None:
            info = tag | {"phase": phase, "step": i, "total": total, "losses": losses.copy(),
                    "status": pack.status.copy()}
            self._emit(report, "train", info)
            if self.run is not None and i % CHECKPOINT_EVERY == 0:
                self.run.save_pack(index, pack.state() | {"phase": np.asarray(phase)}, layer)

        lm = lm_options(config, pack.n_layers, finetune)
        phase = str(state["phase"]) if state is not None and "phase" in state else "adam"
        if optimizer == "adam" and phase == "adam":
            adam = AdamOptions(
                lr=config.lr / 10 if finetune else config.lr, batch_size=config.batch_size,
                max_epochs=config.max_epochs, patience=config.patience, cooldown=config.cooldown,
                min_lr=config.min_lr, tol=config.student_tol,
            )
            # one minibatch order for every pack: a student's path does not depend on its pack
            fit_adam(pack, X, Y, adam, seed=stage_seed(config, layer), progress=step)
        if optimizer == "lm" or finish_lm or (finetune and pack.n_params <= config.lm_max_params):
            fit_lm(pack, X, Y, lm, progress=step)
        if self.run is not None:
            self.run.save_pack(index, pack.state() | {"phase": np.asarray("done"), "done": np.asarray(True)}, layer)
        self._emit(report, "train", tag | {"phase": "done", "losses": pack.rel_loss.copy(),
                                     "status": pack.status.copy()})
        return self.result(X, resumed_from)

    def result(self, X: torch.Tensor, resumed_from: int = 0) -> PackResult:
        """The pack's first hidden layer's neurons (canonical) and per-student rows.

        X: the pack's inputs — the queries, or in a deep run the recovered layers' activations.
        """
        pack = self.pack
        act = activations.get(self.config.activation)
        layer = pack.layer_neurons(X, 0)
        can = act.symmetry.canonicalize(layer["vectors"], layer["outgoing"], act.linear_coef)
        width = pack.widths[1]
        neurons = pa.record_batch(
            {
                "student": pa.array(layer["student_ids"], pa.int64()),
                "neuron": pa.array(np.tile(np.arange(width), pack.k), pa.int64()),
                "contribution": pa.array(layer["contribution"], pa.float64()),
                "sign": pa.array(can.sign),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(can.vectors.ravel()), can.vectors.shape[1]),
            }
        )
        students = pa.record_batch(
            {
                "student": pa.array(pack.ids, pa.int64()),
                "pack": pa.array(np.full(pack.k, self.index), pa.int64()),
                "rel_loss": pa.array(pack.rel_loss, pa.float64()),
                "status": pa.array([STATUS_NAMES[int(s)] for s in pack.status]),
                "restarts": pa.array(pack.restarts, pa.int64()),
                "steps": pa.array(np.full(pack.k, pack.steps), pa.int64()),
            }
        )
        hist = np.stack(pack.history) if pack.history else np.full((1, pack.k), np.nan)
        steps = np.asarray(pack.history_steps if pack.history else [0], dtype=np.int64)
        return PackResult(self.index, neurons, students, steps, hist, int(resumed_from))

    def _emit(self, report: Report | None, event: str, info: dict[str, Any]) -> None:
        if "losses" in info:
            with self._lock:
                self._snapshot = info
        if report is not None:
            report(event, info)


def stage_seed(config: Config, layer: int) -> int:
    """The seed of a run's stage ``layer`` (1: the students; l > 1: above the l−1 recovered layers),
    the same for every pack (config.MAX_SEED keeps it within torch's range)."""
    return config.seed * 101 + layer - 1


def lm_options(config: Config, n_layers: int, finetune: bool = False) -> LMOptions:
    """The LM rules for a pack of ``n_layers`` weight layers: geodesic acceleration per
    ``config.lm_geodesic`` ("deep": two or more hidden layers), no restarts in a fine-tune."""
    return LMOptions(
        max_iter=config.lm_max_iter, tol=config.student_tol, stall_window=config.stall_window,
        restarts=0 if finetune else config.restarts, restart_above=config.restart_above,
        geodesic=config.geodesic_for(n_layers),
    )


def fresh_above(pack: StudentPack, width: int, upper: list[int], seed: int) -> StudentPack:
    """Fresh students of hidden widths ``upper`` on ``width`` recovered neurons, in place of ``pack``'s upper layers.

    A deep g student stalled in a plateau (digits 64-16-16-10, relative MSE 1e-4) has found most of
    the teacher's first layer and few of its second; fine-tuned on the recovered first layer it stays
    in that plateau, while fresh students of 1.5 × its width find most of the second layer. Each
    student keeps its id (its numbers come from (seed, id)), its step count and its history.
    """
    out = StudentPack.init([width, *upper, pack.widths[-1]], pack.act.name, pack.ids, seed,
                           dtype=pack.theta.dtype, device=pack.theta.device)
    out.restarts, out.steps = pack.restarts.copy(), pack.steps
    out.history, out.history_steps = list(pack.history), list(pack.history_steps)
    return out


def inserted(pack: StudentPack, assign: np.ndarray, width: int) -> StudentPack:
    """The pack with its first hidden layer replaced by ``width`` recovered neurons, as a pack on their outputs.

    assign: (k·h,) recovered neuron of each first-layer neuron (−1: in no kept cluster, dropped).
    The weight from recovered neuron j into the next layer is the sum of the student's canonical
    outgoing weights over its members of j — sign and scale folded in by the symmetry class, so
    duplicates merge — and a sigmoid member's flip moves its weight into the next layer's bias
    (σ(−z) = 1 − σ(z)). The upper layers are kept as they are; the fine-tune repairs what the
    dropped members and each student's small deviation from the recovered vectors leave.
    """
    act = pack.act
    k, h, nxt = pack.k, pack.widths[1], pack.widths[2]
    vectors = pack.block(0).reshape(k * h, -1).detach().cpu().numpy()
    outgoing = pack.weight(1).transpose(1, 2).reshape(k * h, -1).detach().cpu().numpy()
    can = act.symmetry.canonicalize(vectors, outgoing, act.linear_coef)
    rows = np.flatnonzero(assign >= 0)
    student = rows // h
    W = np.zeros((k, width, nxt), dtype=can.outgoing.dtype)
    np.add.at(W, (student, assign[rows]), can.outgoing[rows])
    b = pack.bias(1).detach().cpu().numpy().copy()
    if act.symmetry.constant_shift:
        flipped = rows[can.sign[rows] < 0]
        np.add.at(b, flipped // h, outgoing[flipped])
    first = np.concatenate([W.transpose(0, 2, 1), b[:, :, None]], axis=2).reshape(k, -1)
    rest = pack.theta[:, pack._slices[1][1] :]
    theta = torch.cat([torch.as_tensor(first, dtype=pack.theta.dtype, device=pack.theta.device), rest], dim=1)
    out = StudentPack(theta.clone(), [width, *pack.widths[2:]], act.name, pack.ids)
    out.seed, out.restarts, out.steps = pack.seed, pack.restarts.copy(), pack.steps
    out.history, out.history_steps = list(pack.history), list(pack.history_steps)
    return out
