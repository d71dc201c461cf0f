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
        self._snapshot: dict[str, Any] = {"pack": index, "phase": "waiting", "step": 0, "total": 0}
        self._lock = threading.Lock()

    def progress(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._snapshot)

    def train(self, X: torch.Tensor, Y: torch.Tensor, report: Report | None = None) -> PackResult:
        """Train the pack on standardised X, Y (or pick it up from its checkpoint); its neurons."""
        config, plan, index = self.config, self.plan, self.index
        dtype, device = X.dtype, X.device
        state = self.run.load_pack(index) if self.run is not None else None
        if state is not None and state["ids"].tolist() != self.ids:
            log.warning("checkpoint of pack %d holds other students (the packs were split differently); retraining it", index)
            state = None
        if state is not None and state.get("done", np.asarray(False)).item():
            self.pack = StudentPack.from_state(state, config.activation, dtype=dtype, device=device)
            self._emit(report, "train", {"pack": index, "resumed": True, "done": True})
            return self.result(X, resumed_from=self.pack.steps)
        if state is not None:
            pack = StudentPack.from_state(state, config.activation, dtype=dtype, device=device)
        else:
            pack = StudentPack.init(plan["widths"], config.activation, self.ids, config.seed, dtype=dtype, device=device)
        self.pack = pack
        resumed_from = pack.steps

        def step(phase: str, i: int, total: int, losses: np.ndarray) -> None:
            info = {"pack": index, "phase": phase, "step": i, "total": total, "losses": losses.copy(),
                    "status": pack.status.copy()}
            self._emit(report, "train", info)
            if self.run is not None and i % CHECKPOINT_EVERY == 0:
                self.run.save_pack(index, pack.state() | {"phase": np.asarray(phase)})

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
        if plan["optimizer"] == "lm" or plan["finish_lm"]:
            fit_lm(pack, X, Y, lm, progress=step)
        if self.run is not None:
            self.run.save_pack(index, pack.state() | {"phase": np.asarray("done"), "done": np.asarray(True)})
        self._emit(report, "train", {"pack": index, "phase": "done", "losses": pack.rel_loss.copy(),
                                     "status": pack.status.copy()})
        return self.result(X, resumed_from)

    def result(self, X: torch.Tensor, resumed_from: int = 0) -> PackResult:
        """The trained pack's layer-1 neurons (canonical) and per-student rows."""
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
