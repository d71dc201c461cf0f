"""Helpers shared by the benchmark scripts: machine description and atomic JSON writes.

Each benchmark stays runnable alone (``python benchmarks/<name>.py``): Python puts the script's
folder first on ``sys.path``, so ``import _common`` finds this file.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info(argv: list[str] | None = None) -> dict[str, Any]:
    """Where and how a benchmark ran: enough to tell whether two result files are comparable."""
    import numpy
    import torch

    try:
        import ecdist

        ecdist_version = getattr(ecdist, "__version__", None)
    except ImportError:  # pragma: no cover - benchmarks need ecdist anyway
        ecdist_version = None
    root = Path(__file__).resolve().parent.parent
    commit = _git(root, "rev-parse", "HEAD")
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *(sys.argv if argv is None else argv)]),
        "platform": platform.platform(),
        "processor": _cpu_model() or platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "numpy": numpy.__version__,
        "ecdist": ecdist_version,
        "git_commit": commit,
        "git_dirty": bool(dirty) if dirty is not None else None,
        "ecdist_source_sha256": source_hash(root / "ecdist"),  # identifies uncommitted code too
    }


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
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
