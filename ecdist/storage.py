"""Run folders and result folders: JSON, Parquet, safetensors and .npz — never pickle.

A result folder (``Recovery.save``) holds::

    config.json                 the Config (schema-versioned)
    report.json                 layer sizes, final error, plan, timings, versions, comparison
    network.json + .safetensors the recovered network's architecture and weights
    students.parquet            one row per student: final relative MSE, status, steps
    history.parquet             (step, student, rel_loss): the students' loss curves
    layer_<l>_neurons.parquet   one row per student neuron: cluster (−1: none), vector, …
    layer_<l>_clusters.parquet  one row per recovered neuron: cluster statistics, vector
    manifest.json               every file above with its sha256 and size

A run folder (``recover(..., out=DIR)``) is a result folder plus ``run.json`` (config, data and
teacher fingerprints), ``queries.npy`` and ``answers.npy`` (X and the teacher's Y: a resume
needs no teacher), ``checkpoints/pack_<i>.npz`` (deep runs add ``pack_<i>_layer_<l>.npz``: the
pack fine-tuned on top of the recovered layers 1…l−1) and ``checkpoints/layer_<l>.npz`` (layer
l's clustering, collapse and — for the last layer — fit). ``report.json`` is written last: a run
folder holding it (and listing it in the manifest) is finished.

Durability: every file is written to a temporary name and renamed, then its sha256 and size are
recorded in ``manifest.json`` (itself replaced atomically, under a lock, since pack actors write
their checkpoints concurrently), so a killed process leaves the previous version, never half a
file. Every read is checked against the manifest: a damaged checkpoint is reported and
recomputed, a damaged result or identity raises ``RunFolderError``. Paths recorded in a folder
must stay inside it (no absolute paths, no ``..``, no symbolic link leading out).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import platform
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import SCHEMA_VERSION, Config
from .errors import ConfigError, RunFolderError

if TYPE_CHECKING:
    import pyarrow as pa

    from .pipeline import Recovery

log = logging.getLogger(__name__)
REPORT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
LOCK = ".manifest.lock"  # a lock file, not the manifest itself: the manifest is replaced by a rename
_TEMPORARY = re.compile(r"^\..+\.tmp$")  # atomic_write's temporaries, left behind by a killed process
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PACK_CHECKPOINT = re.compile(r"checkpoints/pack_(\d{4,})(_layer_\d+)?\.npz")  # what RunFolder._pack_rel names
_IN_PROCESS = threading.Lock()  # POSIX record locks do not exclude threads of one process


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


def safe_path(root: Path, rel: str) -> Path:
    """``root / rel`` for a path recorded in a folder, refused (RunFolderError) if it could lead out.

    A folder from someone else must not make ecdist read or write elsewhere: ``rel`` must be
    relative, free of ``..``, and must not pass through a symbolic link that leaves ``root``.
    """
    bad = not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel
    parts = () if bad else PurePosixPath(rel).parts
    if bad or PurePosixPath(rel).is_absolute() or ".." in parts or not parts:
        raise RunFolderError(
            f"{root} records the path {rel!r}, which is not a plain path inside the folder (absolute, '..' or "
            "empty): the folder was edited or crafted; do not use it — start a new run in another folder"
        )
    path = root.joinpath(*parts)
    try:
        target, inside = path.resolve(), root.resolve()
    except (OSError, RuntimeError) as exc:  # a loop of symbolic links
        raise RunFolderError(f"{root}: the path {rel!r} cannot be resolved ({exc}); start a new run in another folder") from None
    if not target.is_relative_to(inside):
        raise RunFolderError(
            f"{root} records the path {rel!r}, which leads outside the folder through a symbolic link "
            f"(to {target}); remove the link or start a new run in another folder"
        )
    return path


class Files:
    """The files of one folder: written atomically and listed in ``manifest.json`` (sha256, size).

    The manifest is read afresh on every call (other processes — pack actors — update it) and
    changed only under an exclusive lock on ``.manifest.lock`` (a POSIX record lock, which NFS
    supports, so the folder can be shared by the nodes of a cluster).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def entries(self) -> dict[str, dict[str, Any]] | None:
        """{path: {"sha256", "size"}} from the manifest; None without one. RunFolderError if it is damaged."""
        where = self.root / MANIFEST
        try:
            data = json.loads(where.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise RunFolderError(
                f"{where} is corrupt ({exc}): the folder's files cannot be verified; start a new run in "
                "another folder (the damaged one is left as it is)"
            ) from None
        files = data.get("files") if isinstance(data, dict) else None
        if not isinstance(data, dict) or data.get("schema") != MANIFEST_VERSION or not isinstance(files, dict):
            raise RunFolderError(
                f"{where} is not an ecdist manifest of schema {MANIFEST_VERSION}: the folder's files cannot be "
                "verified; start a new run in another folder"
            )
        for rel, entry in files.items():
            safe_path(self.root, rel)
            pending = entry.get("pending", entry) if isinstance(entry, dict) else None
            if not (_entry_ok(entry) and _entry_ok(pending)):
                raise RunFolderError(
                    f"{where} has a malformed entry for {rel!r}: the folder's files cannot be verified; start a "
                    "new run in another folder"
                )
        return files

    def write(self, rel: str, data: bytes) -> None:
        """Write one file atomically and record it in the manifest, so that a kill at any moment
        leaves a file the manifest vouches for.

        The new checksum is recorded first as ``pending`` beside the current one, then the file
        is renamed into place, then the pending checksum becomes the current one: a process
        killed in between leaves the old or the new file, and the manifest accepts either (a
        checkpoint rewritten every few steps is never lost to that window).
        """
        path = safe_path(self.root, rel)
        new = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        with self._locked():
            files = self.entries() or {}
            files[rel] = (files[rel] | {"pending": new}) if rel in files else new
            self._write_manifest(files)
        atomic_write(path, data)
        with self._locked():
            files = self.entries() or {}
            files[rel] = new
            self._write_manifest(files)

    def remove(self, rel: str) -> None:
        """Take a file out of the manifest, then off the disk (a kill in between leaves it unlisted)."""
        path = safe_path(self.root, rel)
        if (self.root / MANIFEST).exists():
            with self._locked():
                files = self.entries() or {}
                if files.pop(rel, None) is not None:
                    self._write_manifest(files)
        path.unlink(missing_ok=True)

    def listed(self, rel: str) -> bool:
        """Whether the manifest lists ``rel`` and the file is there."""
        return rel in (self.entries() or {}) and (self.root / rel).is_file()

    def read(self, rel: str) -> bytes:
        """A file's bytes, checked against the manifest (unchecked in a folder without one).

        Raises RunFolderError naming the file when it is missing, unlisted or fails its checksum.
        """
        path = safe_path(self.root, rel)
        files = self.entries()
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise RunFolderError(f"{path} is missing: this is not a complete ecdist folder") from None
        except OSError as exc:
            raise RunFolderError(f"{path} cannot be read: {exc}") from None
        if files is None:
            return data
        entry = files.get(rel)
        if entry is None:
            raise RunFolderError(
                f"{path} is not listed in {MANIFEST} (a process was killed before it could record the file, or "
                "the file is not ecdist's), so it cannot be trusted"
            )
        digest = hashlib.sha256(data).hexdigest()
        vouched = [entry, *([entry["pending"]] if "pending" in entry else [])]
        if not any(len(data) == e["size"] and digest == e["sha256"] for e in vouched):
            raise RunFolderError(
                f"{path} fails its checksum ({len(data)} bytes, sha256 {digest[:12]}…; {MANIFEST} lists "
                f"{entry['size']} bytes, sha256 {entry['sha256'][:12]}…): it is truncated or corrupted"
            )
        return data

    def remove_temporaries(self) -> None:
        """Delete the temporaries of writes a killed process left behind (never anything else)."""
        for folder in (self.root, self.root / "checkpoints"):
            if folder.is_dir() and not folder.is_symlink():
                for p in folder.iterdir():
                    if _TEMPORARY.match(p.name) and p.is_file() and not p.is_symlink():
                        p.unlink(missing_ok=True)

    def _write_manifest(self, files: dict[str, dict[str, Any]]) -> None:
        body = {"schema": MANIFEST_VERSION, "files": dict(sorted(files.items()))}
        atomic_write(self.root / MANIFEST, (json.dumps(body, indent=1) + "\n").encode())

    @contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        with _IN_PROCESS:
            fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the lock


def _entry_ok(entry: Any) -> bool:
    """A manifest entry is {"sha256": 64 hex digits, "size": int >= 0, …}."""
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]):
        return False
    size = entry.get("size")
    return isinstance(size, int) and not isinstance(size, bool) and size >= 0


# ----- encodings (bytes in, bytes out: each file is hashed as it is written) -----------------------
def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n").encode()


def json_default(o: Any) -> Any:
    """numpy scalars and arrays as plain JSON values (``json.dumps(..., default=json_default)``)."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _parquet_bytes(table: "pa.Table") -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _read_json(files: Files, rel: str) -> Any:
    data = files.read(rel)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunFolderError(f"{files.root / rel} is corrupt ({exc}); re-run the recovery to rewrite it") from None


def _read_parquet(files: Files, rel: str) -> "pa.Table":
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = files.read(rel)
    try:
        return pq.read_table(pa.BufferReader(data))
    except Exception as exc:
        raise RunFolderError(f"{files.root / rel} is corrupt ({type(exc).__name__}: {exc}); re-run the recovery") from None


def _read_arrays(files: Files, rel: str) -> dict[str, np.ndarray]:
    """An .npz (or .npy: key "") of plain arrays; object arrays (pickles) are refused by numpy."""
    data = files.read(rel)
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return {"": loaded}
        with loaded as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:
        raise RunFolderError(f"{files.root / rel} cannot be read ({type(exc).__name__}: {exc})") from None


# ----- results -----------------------------------------------------------------------------
def save_recovery(result: "Recovery", path: str | Path) -> Path:
    """Write a result folder (see the module docstring); ``report.json`` last, as the mark of a whole one."""
    import pyarrow as pa
    import torch
    from safetensors.torch import save

    from . import __version__

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    files = Files(path)
    files.remove("report.json")  # until every other file is rewritten, the folder is not a finished result
    files.write("config.json", (result.config.to_json() + "\n").encode())
    net = result.network
    files.write("network.json", _json_bytes({"widths": net.widths, "activation": net.activation, "affine": net.skip is not None}))
    files.write("network.safetensors", save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}))
    files.write("students.parquet", _parquet_bytes(result.students))
    T, N = result.history.shape
    ids = np.asarray(result.students.column("student"))
    hist = pa.table({"step": np.repeat(result.history_steps, N), "student": np.tile(ids, T), "rel_loss": result.history.ravel()})
    files.write("history.parquet", _parquet_bytes(hist))
    for layer in result.layers:
        files.write(f"layer_{layer.index}_neurons.parquet", _parquet_bytes(layer.neurons))
        files.write(f"layer_{layer.index}_clusters.parquet", _parquet_bytes(layer.clusters))
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
    files.write("report.json", _json_bytes(report))
    return path


def load_recovery(path: str | Path) -> "Recovery":
    """Read a folder written by ``Recovery.save``, every file checked against its manifest.

    RunFolderError names what is missing, corrupt or fails its checksum. (A folder written before
    manifests existed is read unchecked, with a warning.)
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    from .metrics import Comparison
    from .network import MLP
    from .pipeline import LayerResult, Recovery

    path = Path(path)
    if not path.is_dir():
        raise RunFolderError(f"result folder {path} does not exist")
    files = Files(path)
    if files.entries() is None:
        log.warning("%s has no %s (written by an older ecdist): its files are read unchecked", path, MANIFEST)
    try:
        config = Config.from_json(files.read("config.json").decode())
    except (ConfigError, ValueError) as exc:
        raise RunFolderError(f"{path / 'config.json'} is corrupt or from another version: {exc}") from None
    report = _read_json(files, "report.json")
    if not isinstance(report, dict) or report.get("schema") != REPORT_VERSION:
        got = report.get("schema") if isinstance(report, dict) else None
        raise RunFolderError(f"{path / 'report.json'} has schema {got!r}, expected {REPORT_VERSION}")
    arch = _read_json(files, "network.json")
    try:
        net = MLP(arch["widths"], arch["activation"], affine=bool(arch["affine"]))
        net.load_state_dict(load(files.read("network.safetensors")))
    except (KeyError, TypeError, SafetensorError, RuntimeError) as exc:
        raise RunFolderError(
            f"{path / 'network.safetensors'} (with network.json) could not be read ({type(exc).__name__}: {exc}); "
            "the folder is damaged: re-run the recovery, or resume it from its checkpoints"
        ) from None
    students = _read_parquet(files, "students.parquet")
    hist = _read_parquet(files, "history.parquet")
    try:
        n = students.num_rows
        steps = np.asarray(hist.column("step"))[::n] if n else np.zeros(0, np.int64)
        history = np.asarray(hist.column("rel_loss")).reshape(-1, n) if n else np.zeros((0, 0))
        rules = report.get("layer_rules", ["stable"] * len(report["layer_sizes"]))
        layers = [
            LayerResult(
                i, int(width), _read_parquet(files, f"layer_{i}_neurons.parquet"),
                _read_parquet(files, f"layer_{i}_clusters.parquet"), rule,
            )
            for i, (width, rule) in enumerate(zip(report["layer_sizes"], rules), start=1)
        ]
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
    except (KeyError, TypeError, ValueError) as exc:
        raise RunFolderError(
            f"{path / 'report.json'} lacks or garbles a field, or history.parquet does not fit students.parquet "
            f"({type(exc).__name__}: {exc}); re-run the recovery, or resume it from its checkpoints"
        ) from None


# ----- run folders -------------------------------------------------------------------------
class RunFolder:
    """A run in progress: its identity, queries and answers, checkpoints and, once finished, its result."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.files = Files(self.path)

    @staticmethod
    def check_new(path: str | Path) -> None:
        """Refuse, before any work, a folder where a new run cannot start (it creates nothing)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"{path} is a file, not a folder; give a new or empty folder for the run")
        if (path / "run.json").exists():
            raise RunFolderError(
                f"{path} already holds an ecdist run; pass resume=True (CLI: --resume) to continue it, "
                "or choose another folder"
            )
        if path.exists() and any(path.iterdir()):
            raise RunFolderError(f"{path} exists and is not an ecdist run folder; choose an empty or new folder")

    @classmethod
    def create(
        cls, path: str | Path, config: Config, X: np.ndarray, Y: np.ndarray, data_fingerprint: str, teacher: dict[str, str],
        snapshot_of: dict[str, Any] | None = None,
    ) -> "RunFolder":
        """Start a run in a new or empty folder: identity first (so the folder is known as a run), then the data.

        snapshot_of: the run whose checkpoints this one starts from (``recover(..., snapshot=)``), recorded.
        """
        cls.check_new(path)
        run = cls(path)
        ident = {"schema": SCHEMA_VERSION, "config": config.fingerprint(), "data": data_fingerprint, "teacher": teacher}
        if snapshot_of is not None:
            ident["snapshot_of"] = snapshot_of
        try:
            run.path.mkdir(parents=True, exist_ok=True)
            run.files.write("run.json", _json_bytes(ident))
        except OSError as exc:
            raise RunFolderError(f"cannot write to the run folder {run.path}: {exc}") from None
        run.files.write("config.json", (config.to_json() + "\n").encode())
        run.save_data(X, Y)
        return run

    @classmethod
    def existing(cls, path: str | Path, tidy: bool = True) -> "RunFolder | None":
        """The run in ``path``, checked, to resume; None where there is none (no folder, or an empty one).

        RunFolderError for a file, a foreign folder, a damaged manifest or identity: each says what to do.
        ``tidy``: delete the temporaries of writes a killed process left behind — not when only reading
        a run that may still be training (its writers' temporaries are in flight).
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"{path} is a file, not a run folder; give the folder of the run to resume")
        if not path.exists() or not any(path.iterdir()):
            return None
        if not (path / "run.json").is_file():
            raise RunFolderError(
                f"{path} is not an ecdist run folder (it has no run.json), so there is nothing to resume; give the "
                "folder of the run to resume, or an empty or new folder to start one"
            )
        run = cls(path)
        if run.files.entries() is None:
            raise RunFolderError(
                f"{path} has no {MANIFEST} (deleted, or the folder was written by an older ecdist), so its files "
                "cannot be verified; start a new run in another folder"
            )
        run.identity()
        if tidy:
            run.files.remove_temporaries()
        return run

    def identity(self) -> dict[str, Any]:
        """``run.json``: schema, config and data fingerprints, the teacher's description."""
        ident = _read_json(self.files, "run.json")
        ok = isinstance(ident, dict) and ident.get("schema") == SCHEMA_VERSION
        if not ok or not all(isinstance(ident.get(k), str) for k in ("config", "data")):
            raise RunFolderError(
                f"{self.path / 'run.json'} is not the identity of an ecdist run of schema {SCHEMA_VERSION}; "
                "start a new run in another folder"
            )
        return ident

    def config(self) -> Config:
        """The run's ``Config`` (checked against its fingerprint in ``run.json``)."""
        try:
            config = Config.from_json(self.files.read("config.json").decode())
        except (ConfigError, ValueError) as exc:
            raise RunFolderError(f"{self.path / 'config.json'} is corrupt or from another version: {exc}") from None
        if config.fingerprint() != self.identity()["config"]:
            raise RunFolderError(
                f"{self.path / 'config.json'} does not match the run's fingerprint in run.json: the folder was edited; "
                "start a new run in another folder"
            )
        return config

    def save_data(self, X: np.ndarray, Y: np.ndarray) -> None:
        """The queries and the teacher's answers: a resume needs neither the teacher nor the queries again."""
        self.files.write("queries.npy", _npy_bytes(np.ascontiguousarray(X)))
        self.files.write("answers.npy", _npy_bytes(np.ascontiguousarray(Y)))

    def data(self) -> tuple[np.ndarray, np.ndarray]:
        """(X, Y) as stored, checked against the manifest (the caller checks the data fingerprint)."""
        X = _read_arrays(self.files, "queries.npy")[""]
        Y = _read_arrays(self.files, "answers.npy")[""]
        if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y) or X.dtype != np.float64 or Y.dtype != np.float64:
            raise RunFolderError(f"{self.path}: queries.npy and answers.npy are not a run's (n, d) float64 arrays")
        return X, Y

    @staticmethod
    def _pack_rel(index: int, layer: int = 1) -> str:
        stage = "" if layer == 1 else f"_layer_{layer}"
        return f"checkpoints/pack_{index:04d}{stage}.npz"

    def pack_indices(self) -> list[int]:
        """The packs of the first stage that have a checkpoint listed in the manifest, in order."""
        names = (_PACK_CHECKPOINT.fullmatch(rel) for rel in self.files.entries() or {})
        return sorted(int(m.group(1)) for m in names if m and m.group(2) is None)

    def read_pack(self, index: int, tries: int = 3) -> dict[str, np.ndarray]:
        """A first-stage pack checkpoint, read by a process that does not train it (``recover(train=False)``)
        while the run may be replacing it: a read that fails its checksum is tried again a moment later
        (the window between the manifest's update and the rename), ``tries`` times in all; RunFolderError then."""
        for _ in range(tries - 1):
            try:
                return _read_arrays(self.files, self._pack_rel(index))
            except RunFolderError:
                time.sleep(0.2)
        return _read_arrays(self.files, self._pack_rel(index))

    def remove_packs_from(self, count: int) -> None:
        """Drop the checkpoints of packs ``count`` and above, every stage: a resumed run split into fewer
        packs would leave them listed, holding students that other packs now train."""
        for rel in list(self.files.entries() or {}):
            m = _PACK_CHECKPOINT.fullmatch(rel)
            if m and int(m.group(1)) >= count:
                self.files.remove(rel)

    def save_pack(self, index: int, state: dict[str, np.ndarray], layer: int = 1) -> None:
        """Checkpoint a pack; ``layer`` l ≥ 2: after layers 1…l−1 were recovered and inserted."""
        self.files.write(self._pack_rel(index, layer), _npz_bytes(state))

    def load_pack(self, index: int, layer: int = 1) -> dict[str, np.ndarray] | None:
        """A pack's last checkpoint, or None (absent, or damaged: then it is retrained)."""
        return self._checkpoint(self._pack_rel(index, layer), "retraining that pack")

    def save_stage(self, layer: int, arrays: dict[str, np.ndarray]) -> None:
        """Layer ``layer``'s clustering and collapse (and fit, for the last layer), as plain arrays."""
        self.files.write(f"checkpoints/layer_{layer}.npz", _npz_bytes(arrays))

    def load_stage(self, layer: int) -> dict[str, np.ndarray] | None:
        """A finished layer's stage, or None (absent, or damaged: then the layer is clustered again)."""
        return self._checkpoint(f"checkpoints/layer_{layer}.npz", f"clustering layer {layer} again")

    def _checkpoint(self, rel: str, redo: str) -> dict[str, np.ndarray] | None:
        """Checkpoints can be recomputed: a damaged one is reported (a warning naming it) and skipped."""
        if rel not in (self.files.entries() or {}) and not (self.path / rel).exists():
            return None
        try:
            return _read_arrays(self.files, rel)
        except RunFolderError as exc:
            log.warning("checkpoint damaged: %s; %s", exc, redo)
            return None

    def finished(self) -> bool:
        """Whether the run wrote its result (``report.json``, listed in the manifest, comes last)."""
        return self.files.listed("report.json")

    def result(self) -> "Recovery":
        """The finished run's result, every file verified; RunFolderError says how to rebuild a damaged one."""
        try:
            return load_recovery(self.path)
        except RunFolderError as exc:
            raise RunFolderError(
                f"the run in {self.path} finished, but its result is damaged: {exc}. Its checkpoints are kept: delete "
                f"{self.path / 'report.json'} and resume to rebuild the result from them"
            ) from None

    def finish(self, result: "Recovery") -> None:
        save_recovery(result, self.path)
