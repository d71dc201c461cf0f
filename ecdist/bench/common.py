"""What every benchmark records beside its figures: machine, versions, git commit, load; atomic JSON.

A figure is only worth what its context says: two results are comparable when their source hash
matches and the machine was not busy (``os.getloadavg`` before and after each benchmark).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..storage import atomic_write, json_default

PACKAGE = Path(__file__).resolve().parent.parent  # the ecdist/ folder whose code runs
ROOT = PACKAGE.parent  # the checkout (git commit, benchmarks/results) when ecdist runs from one
T = TypeVar("T")


def machine_info(argv: list[str] | None = None) -> dict[str, Any]:
    """Where and how a benchmark ran: enough to tell whether two result files are comparable.

    argv: the command as the user typed it (default: this interpreter and ``sys.argv``).
    """
    import numpy
    import torch

    from .. import __version__

    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv] if argv is None else argv),
        "platform": platform.platform(),
        "processor": _cpu_model() or platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "numpy": numpy.__version__,
        "ecdist": __version__,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(dirty) if dirty is not None else None,
        "ecdist_source_sha256": source_hash(PACKAGE),  # identifies uncommitted code too
    }


def alternated(repeats: int, *measures: Callable[[], T]) -> list[list[T]]:
    """Each of ``measures`` run ``repeats`` times, interleaved (a, b, a, b, …), so that the machine's
    drifting speed hits every side alike; one list of results per measure."""
    runs: list[list[T]] = [[] for _ in measures]
    for _ in range(repeats):
        for out, measure in zip(runs, measures):
            out.append(measure())
    return runs


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages: how busy the cores were (timings on shared cores are noisy)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def source_hash(folder: Path) -> str:
    """sha256 over the package's .py files (path and content), 16 hex digits."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.py")):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename), so a killed run never leaves half a file."""
    atomic_write(path, (json.dumps(data, indent=1, default=json_default) + "\n").encode())


def _git(*args: str) -> str | None:
    """git in the checkout ecdist runs from; None outside one (an installed wheel)."""
    if not (ROOT / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None
