"""A live view of a recovery on the terminal (rich), fed by ``recover``'s progress events."""
from __future__ import annotations

from typing import Any

import numpy as np


class RichProgress:
    """One live line for the whole run, however many packs and actors train: students finished
    (converged or stalled), best and median relative MSE, and the phases the packs are in."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} students"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            transient=False,
        )
        self._task = None
        self._packs: dict[int, dict[str, Any]] = {}
        self._bar.start()

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event == "plan":
            where = f"{info['packs']} packs on {info['backend']}"
            self._task = self._bar.add_task(f"training ({where})", total=info["n_students"], info="")
        elif event == "ray":
            self._bar.console.print(
                f"Ray: {info['actors']} pack actors, {info['cpus_per_pack']:g} CPU / {info['gpus_per_pack']:g} GPU each"
            )
        elif event == "train" and "losses" in info and self._task is not None:
            self._packs[info["pack"]] = info
            losses = np.concatenate([np.asarray(p["losses"]) for p in self._packs.values()])
            status = np.concatenate([np.asarray(p["status"]) for p in self._packs.values()])
            phases = sorted({p["phase"] for p in self._packs.values()})
            text = (
                f"best {np.nanmin(losses):.1e}  median {np.nanmedian(losses):.1e}  "
                f"stalled {(status == 2).sum()}  phase {'/'.join(phases)}"
            )
            self._bar.update(self._task, completed=int((status != 0).sum()), info=text)
        elif event == "cluster":
            self._bar.console.print(f"layer {info['layer']}: {info['kept']} clusters kept from {info['rows']} neurons")
        elif event == "student":
            self._bar.console.print(
                f"layer {info['layer']}: no rule fits exactly; student {info['student']} alone, pruned: "
                f"{info['kept']} of {info['rows']} neurons, relative MSE {info['rel_mse']:.1e}"
            )
        elif event == "refit":
            self._bar.console.print(
                f"joint fit {info['was']:.1e}; the best-supported candidates, {info['widths']}, fit to {info['rel_mse']:.1e}"
            )
        elif event == "resume":
            what = "the finished run's result" if info.get("finished") else f"layer {info['layer']}'s clustering"
            self._bar.console.print(f"resumed: {what} read from the run folder")
        elif event == "reconstruct":
            self._bar.console.print(f"recovered widths {info['widths']}, relative MSE {info['rel_mse']:.1e}")

    def close(self) -> None:
        self._bar.stop()
