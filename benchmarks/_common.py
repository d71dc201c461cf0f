"""Helpers shared by the benchmark scripts: where their results go, and (from ``ecdist.bench.common``)
the machine description and the atomic JSON writer that ``ecdist bench`` uses too.

Each benchmark stays runnable alone (``python benchmarks/<name>.py``): Python puts the script's
folder first on ``sys.path``, so ``import _common`` finds this file.
"""
from __future__ import annotations

from pathlib import Path

from ecdist.bench.common import machine_info, source_hash, write_json
from ecdist.plots import pyplot

RESULTS = Path(__file__).resolve().parent / "results"

__all__ = ["RESULTS", "machine_info", "pyplot", "source_hash", "write_json"]
