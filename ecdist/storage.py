"""Run folders and result folders: JSON, Parquet, safetensors and .npz — never pickle.

A result folder (``Recovery.save``) holds::

    config.json                 the Config (schema-versioned)
    report.json                 layer sizes, final error, plan, timings, versions, comparison
    network.json + .safetensors the recovered network's architecture and weights
    students.parquet            one row per student: final relative MSE, status, steps
    history.parquet             (step, student, rel_loss): the students' loss curves
    layer_<l>_neurons.parquet   one row per student neuron: cluster (−1: none), vector, …
    layer_<l>_clusters.parquet  one row per recovered neuron: cluster statistics, vector

A run folder (``recover(..., out=DIR)``) is a result folder plus ``run.json`` (config and
query fingerprints) and ``checkpoints/pack_<i>.npz`` (deep runs add ``pack_<i>_layer_<l>.npz``:
the pack fine-tuned on top of the recovered layers 1…l−1). Every file is written to a temporary
name and renamed, so a killed process leaves the previous version, never half a file.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import SCHEMA_VERSION, Config
from .errors import ConfigError, RunFolderError

if TYPE_CHECKING:
    from .pipeline import Recovery

log = logging.getLogger(__name__)
REPORT_VERSION = 1


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _write_parquet(path: Path, table) -> None:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunFolderError(f"{path} is missing: this is not a complete ecdist result folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunFolderError(f"{path} is corrupt ({exc}); re-run the recovery to rewrite it") from None


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    if not path.is_file():
        raise RunFolderError(f"{path} is missing: this is not a complete ecdist result folder")
    try:
        return pq.read_table(path)
    except Exception as exc:
        raise RunFolderError(f"{path} is corrupt ({type(exc).__name__}: {exc}); re-run the recovery") from None


# ----- results -----------------------------------------------------------------------------
def save_recovery(result: "Recovery", path: str | Path) -> Path:
    import pyarrow as pa
    import torch
    from safetensors.torch import save_file

    from . import __version__

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / "config.json", (result.config.to_json() + "\n").encode())
    net = result.network
    _write_json(path / "network.json", {"widths": net.widths, "activation": net.activation, "affine": net.skip is not None})
    tmp = path / ".network.safetensors.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp))
    os.replace(tmp, path / "network.safetensors")
    _write_parquet(path / "students.parquet", result.students)
    T, N = result.history.shape
    ids = np.asarray(result.students.column("student"))
    _write_parquet(
        path / "history.parquet",
        pa.table(
            {
                "step": np.repeat(result.history_steps, N),
                "student": np.tile(ids, T),
                "rel_loss": result.history.ravel(),
            }
        ),
    )
    for layer in result.layers:
        _write_parquet(path / f"layer_{layer.index}_neurons.parquet", layer.neurons)
        _write_parquet(path / f"layer_{layer.index}_clusters.parquet", layer.clusters)
    report = {
        "schema": REPORT_VERSION,
        "ecdist_version": __version__,
        "layer_sizes": result.layer_sizes,
        "layer_rules": [layer.rule for layer in result.layers],
        "final_rel_mse": result.final_rel_mse,
        "plan": result.plan,
        "timings": result.timings,
        "comparison": result.comparison.to_dict() if result.comparison is not None else None,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
    }
    _write_json(path / "report.json", report)
    return path


def load_recovery(path: str | Path) -> "Recovery":
    """Read a folder written by ``Recovery.save``; RunFolderError names what is missing or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .metrics import Comparison
    from .network import MLP
    from .pipeline import LayerResult, Recovery

    path = Path(path)
    if not path.is_dir():
        raise RunFolderError(f"result folder {path} does not exist")
    try:
        config = Config.from_json((path / "config.json").read_text())
    except FileNotFoundError:
        raise RunFolderError(f"{path / 'config.json'} is missing: this is not an ecdist result folder") from None
    except (ConfigError, ValueError) as exc:
        raise RunFolderError(f"{path / 'config.json'} is corrupt or from another version: {exc}") from None
    report = _read_json(path / "report.json")
    if report.get("schema") != REPORT_VERSION:
        raise RunFolderError(f"{path / 'report.json'} has schema {report.get('schema')!r}, expected {REPORT_VERSION}")
    arch = _read_json(path / "network.json")
    try:
        net = MLP(arch["widths"], arch["activation"], affine=bool(arch["affine"]))
        state = load_file(str(path / "network.safetensors"))
        net.load_state_dict(state)
    except (KeyError, TypeError, FileNotFoundError, SafetensorError, RuntimeError) as exc:
        raise RunFolderError(
            f"{path / 'network.safetensors'} (with network.json) could not be read ({type(exc).__name__}: {exc}); "
            "the folder is damaged: re-run the recovery, or resume it from its checkpoints"
        ) from None
    students = _read_parquet(path / "students.parquet")
    hist = _read_parquet(path / "history.parquet")
    n = students.num_rows
    steps = np.asarray(hist.column("step"))[::n] if n else np.zeros(0, np.int64)
    history = np.asarray(hist.column("rel_loss")).reshape(-1, n) if n else np.zeros((0, 0))
    layers = []
    rules = report.get("layer_rules", ["stable"] * len(report["layer_sizes"]))
    for i, (width, rule) in enumerate(zip(report["layer_sizes"], rules), start=1):
        layers.append(
            LayerResult(
                i, int(width), _read_parquet(path / f"layer_{i}_neurons.parquet"),
                _read_parquet(path / f"layer_{i}_clusters.parquet"), rule,
            )
        )
    comparison = Comparison.from_dict(report["comparison"]) if report.get("comparison") else None
    return Recovery(
        config=config,
        layer_sizes=[int(w) for w in report["layer_sizes"]],
        network=net,
        layers=layers,
        students=students,
        history_steps=steps,
        history=history,
        plan=report["plan"],
        timings=report["timings"],
        final_rel_mse=float(report["final_rel_mse"]),
        comparison=comparison,
    )


# ----- run folders -------------------------------------------------------------------------
class RunFolder:
    """A run in progress: its identity (``run.json``) and its packs' checkpoints."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def open(cls, path: str | Path, config: Config, data_fingerprint: str, resume: bool) -> "RunFolder":
        """Start a run in ``path`` or, with ``resume``, check that ``path`` holds this same run."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"{path} is a file, not a folder; give a new or empty folder for the run")
        ident = {"schema": SCHEMA_VERSION, "config": config.fingerprint(), "data": data_fingerprint}
        marker = path / "run.json"
        if marker.exists():
            if not resume:
                raise RunFolderError(
                    f"{path} already holds an ecdist run; pass resume=True (CLI: --resume) to continue it, "
                    "or choose another folder"
                )
            found = _read_json(marker)
            if found != ident:
                what = "config" if found.get("config") != ident["config"] else "queries or teacher outputs"
                raise RunFolderError(
                    f"{path} holds a different run (its {what} differ from this one); resume it with the "
                    "same config and queries, or choose another folder"
                )
        else:
            if path.exists() and any(path.iterdir()):
                raise RunFolderError(f"{path} exists and is not an ecdist run folder; choose an empty or new folder")
            try:
                _write_json(marker, ident)
            except OSError as exc:
                raise RunFolderError(f"cannot write to the run folder {path}: {exc}") from None
            atomic_write(path / "config.json", (config.to_json() + "\n").encode())
        return cls(path)

    def _pack_path(self, index: int, layer: int = 1) -> Path:
        stage = "" if layer == 1 else f"_layer_{layer}"
        return self.path / "checkpoints" / f"pack_{index:04d}{stage}.npz"

    def save_pack(self, index: int, state: dict[str, np.ndarray], layer: int = 1) -> None:
        """Checkpoint a pack; ``layer`` l ≥ 2: after layers 1…l−1 were recovered and inserted."""
        import io

        buf = io.BytesIO()
        np.savez(buf, **state)
        atomic_write(self._pack_path(index, layer), buf.getvalue())

    def load_pack(self, index: int, layer: int = 1) -> dict[str, np.ndarray] | None:
        """A pack's last checkpoint, or None (absent, or unreadable: then it is retrained)."""
        p = self._pack_path(index, layer)
        if not p.exists():
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception as exc:
            log.warning("checkpoint %s is unreadable (%s); retraining that pack", p, exc)
            return None

    def finish(self, result: "Recovery") -> None:
        save_recovery(result, self.path)
