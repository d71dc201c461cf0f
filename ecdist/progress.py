"""A live view of a recovery on the terminal (rich), fed by ``recover``'s progress events."""
from __future__ import annotations

from typing import Any

import numpy as np


class RichProgress:
    """One bar per training pack with best/median relative MSE and converged/stalled counts."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            transient=False,
        )
        self._tasks: dict[Any, Any] = {}
        self._bar.start()

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event == "train" and "losses" in info:
            key = (info["pack"], info["phase"])
            if key not in self._tasks:
                self._tasks[key] = self._bar.add_task(f"pack {info['pack']} {info['phase']}", total=info["total"], info="")
            losses, status = np.asarray(info["losses"]), np.asarray(info["status"])
            text = (
                f"best {losses.min():.1e}  median {np.median(losses):.1e}  "
                f"done {(status == 1).sum()}  stalled {(status == 2).sum()}  of {len(status)}"
            )
            self._bar.update(self._tasks[key], completed=info["step"], info=text)
        elif event == "cluster":
            self._bar.console.print(f"layer {info['layer']}: {info['kept']} clusters kept from {info['rows']} neurons")
        elif event == "reconstruct":
            self._bar.console.print(f"recovered widths {info['widths']}, relative MSE {info['rel_mse']:.1e}")


    def close(self) -> None:
        self._bar.stop()
