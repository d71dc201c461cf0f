"""``Config``: every setting of a recovery, validated once when it is built.

One constraint table (as scikit-learn's ``_parameter_constraints``) names what each field may
be; a bad value raises ``ConfigError`` naming the field, the value and what is allowed. The
config is frozen, round-trips through JSON, and hashes canonical JSON with a schema version
(run folders are matched by that hash). Choices left to ``"auto"`` are resolved by ``recover``
into its ``plan``, never written back here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import activations
from .errors import ConfigError

SCHEMA_VERSION = 1
# where and how parallel a run executes; a student's arithmetic does not depend on them
EXECUTION_FIELDS = frozenset({"backend", "threads", "pack_size", "cpus_per_pack", "gpus_per_pack", "actor_restarts",
                              "teacher_batch", "teacher_timeout", "teacher_retries", "teacher_backoff"})
# Fields added after runs were stored, with the value that the version before them used: a stored
# config.json without one reads as that value, and the fingerprint leaves it out at that value, so
# older run folders keep resuming exactly as they were trained.
LEGACY_VALUES = {"lm_geodesic": "never", "upper_widths": None}
MAX_SEED = 2**32 - 1  # derived seeds (seed·1,000,003 + pack)·101 + layer must stay below torch's 2**64
MAX_THREADS = 1024  # far above any machine; a larger count is a typo that would make torch fail


def _doc(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass(frozen=True)
class Config:
    """Settings of one Expand-and-Cluster recovery.

    Example:
        >>> cfg = Config(activation="tanh", student_widths=[32], n_students=20, seed=0)
        >>> cfg.gamma, round(cfg.beta, 4)
        (0.5, 1.0472)
    """

    activation: str = _doc("hidden activation of the teacher (and the students)")
    student_widths: list[int] = _doc("hidden widths of the students, one per hidden layer (ρ × the guess)")
    n_students: int = _doc("number of students N", default=20)
    gamma: float = _doc("a kept cluster spans at least ⌊γN⌋ students", default=0.5)
    beta: float = _doc(
        "a kept cluster's median pairwise angle is below β (radians; the authors' MNIST runs: π/3)",
        default=math.pi / 3,
    )
    seed: int = _doc("seed of every random choice (students' initialisation, minibatch order)", default=0)
    dtype: str = _doc("float64 (precision decides recovery) or float32", default="float64")
    backend: str = _doc(
        "where students train: auto (the running Ray or RAY_ADDRESS, else a local Ray started for the run), "
        "ray (the same, Ray required), local (in-process, no Ray)",
        default="auto",
    )
    device: str = _doc("auto (CUDA when available), cpu or cuda", default="auto")
    cluster_backend: str = _doc(
        "auto (scipy up to 5,000 neuron vectors, faiss above), scipy (exact average linkage, O(M²) memory) or "
        "faiss (kNN graph + exact linkage of its pieces, memory linear in M; GPU when FAISS has one)",
        default="auto",
    )
    cluster_rule: str = _doc(
        "stable (ours: long-lived clusters of distinct students) or reference (the authors' cut)",
        default="stable",
    )
    min_separation: float = _doc(
        "stable rule: a kept cluster lives over at least this ratio of dendrogram heights (generous: the "
        "exact fine-tune prunes what the fit does not need)",
        default=3.0,
    )
    drop: float = _doc(
        "neurons whose output contribution is below this fraction of the largest are debris", default=1e-3
    )
    optimizer: str = _doc(
        "auto (lm when a student has at most lm_max_params parameters, else adam), lm or adam", default="auto"
    )
    lm_max_params: int = _doc(
        "largest student trained by Levenberg–Marquardt (its P×P normal matrix per student)", default=2500
    )
    lm_max_iter: int = _doc("Levenberg–Marquardt iterations at most", default=300)
    lm_geodesic: str = _doc(
        "geodesic acceleration of Levenberg–Marquardt: deep (students with two or more hidden layers, whose "
        "loss creeps along curved valleys), always or never",
        default="deep",
    )
    student_tol: float = _doc(
        "relative MSE at which a student is done; the final fine-tune supplies the last digits", default=1e-16
    )
    stall_window: int = _doc(
        "a student that gains less than 10× in this many LM iterations is marked stalled", default=50
    )
    restarts: int = _doc(
        "fresh starts for a student that stalls in a local minimum (above restart_above); 0 to disable", default=2
    )
    restart_above: float = _doc("a stall above this relative MSE is a local minimum worth a restart", default=1e-6)
    lr: float = _doc("Adam learning rate (the reference: 1e-3)", default=1e-3)
    batch_size: int = _doc("Adam minibatch size (the reference: 512)", default=512)
    max_epochs: int = _doc("Adam epoch cap (the reference: 25,000)", default=25_000)
    patience: int = _doc("Adam: epochs without improvement before the learning rate drops", default=200)
    cooldown: int = _doc("Adam: epochs to wait after a drop", default=100)
    min_lr: float = _doc("Adam stops when the learning rate falls below this", default=1e-7)
    finish_lm: bool = _doc(
        "finish Adam-trained students with Levenberg–Marquardt when they are small enough", default=True
    )
    finetune_iter: int = _doc("Levenberg–Marquardt iterations on the recovered network", default=100)
    prune: bool = _doc(
        "after the fine-tune, remove recovered neurons the exact fit does not need (zero weight, duplicates)",
        default=True,
    )
    fallback: bool = _doc(
        "when the stable rule's neurons do not fit exactly, retry with the authors' generous cut and use it "
        "if its fit is exact (pruning removes its extras); failing that (with either rule), prune the best exact "
        "students alone and keep the smallest exact result; in a deep float64 run whose joint fit is not exact, "
        "refit it without the candidates of the fewest students, a support level at a time (at most 3), and prune "
        "the first exact fit (all of this needs prune=True)",
        default=True,
    )
    pack_size: int = _doc(
        "students stacked in one pack (0: local — as many as memory allows; Ray — spread over the actors the "
        "cluster runs at once)",
        default=0,
    )
    cpus_per_pack: int = _doc("Ray: CPUs of each pack actor (its torch threads)", default=1)
    gpus_per_pack: float = _doc(
        "Ray: GPU share of each pack actor (0.25 packs four to a GPU; 0: one per GPU when the cluster has GPUs)",
        default=0.0,
    )
    actor_restarts: int = _doc(
        "Ray: times a pack actor that dies (node lost, OOM) is restarted; it resumes from its checkpoint",
        default=3,
    )
    threads: int = _doc("torch threads for in-process training (0: all cores)", default=0)
    teacher_batch: int = _doc("queries per teacher call: the teacher never sees more rows at once", default=65536)
    teacher_timeout: float | None = _doc(
        "seconds a black-box teacher call may take before it is retried (None: wait for ever); the late call is "
        "abandoned in its thread, not killed (Python cannot stop a thread)",
        default=None,
    )
    teacher_retries: int = _doc("times a black-box teacher call that raises or times out is tried again", default=2)
    teacher_backoff: float = _doc(
        "seconds before the first retry of a teacher call; each further retry waits twice as long", default=1.0
    )
    upper_widths: list[int] | None = _doc(
        "deep runs: hidden widths of fresh students trained above each inserted layer, one per hidden layer "
        "above the first (None: fine-tune the students' own upper layers). Students stalled in a plateau often "
        "miss teacher neurons of the upper layers, which a fine-tune of their own weights keeps missing",
        default=None,
    )

    def __post_init__(self) -> None:
        for name in ("student_widths", "upper_widths"):
            if isinstance(getattr(self, name), tuple):
                object.__setattr__(self, name, list(getattr(self, name)))
        for name, (check, allowed) in _CONSTRAINTS.items():
            value = getattr(self, name)
            try:
                ok = check(value)
            except Exception:
                ok = False
            if not ok:
                raise ConfigError(f"{name}: got {value!r}; expected {allowed}")
            object.__setattr__(self, name, _plain(value))  # numpy scalars → int/float, so JSON can hold them
        activations.get(self.activation)  # names the known activations on failure
        if math.floor(self.gamma * self.n_students + 1e-9) < 2:
            raise ConfigError(
                f"gamma: ⌊gamma·n_students⌋ = ⌊{self.gamma}·{self.n_students}⌋ < 2, so a cluster could be a "
                "single student's neurons; raise n_students or gamma"
            )
        if self.upper_widths is not None and len(self.upper_widths) != len(self.student_widths) - 1:
            raise ConfigError(
                f"upper_widths: got {self.upper_widths!r} for student_widths {self.student_widths!r}; give one width "
                "per hidden layer above the first (the students trained above each inserted layer), or None"
            )
        if len(self.student_widths) > 1 and activations.get(self.activation).symmetry.linear_shift:
            raise ConfigError(
                f"student_widths: {len(self.student_widths)} hidden layers with activation {self.activation!r}; "
                "deep recovery supports the classes without a covert linear symmetry (g, tanh, sigmoid, "
                "identity) — a sign flip of a softplus/GELU/SiLU/ReLU neuron leaves a linear term in the layer "
                "below, which no MLP layer can absorb; give one hidden width or one of those activations"
            )

    # ----- serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        return cls(**data)  # __init__ names unknown and missing fields

    def to_json(self) -> str:
        return json.dumps({"schema": SCHEMA_VERSION, **self.to_dict()}, sort_keys=True, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"config JSON is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or data.pop("schema", None) != SCHEMA_VERSION:
            raise ConfigError(f"config JSON is not of schema version {SCHEMA_VERSION}")
        return cls.from_dict({**LEGACY_VALUES, **data})

    def geodesic_for(self, n_layers: int) -> bool:
        """Whether LM students of ``n_layers`` weight layers take geodesic steps (``lm_geodesic``)."""
        return self.lm_geodesic == "always" or (self.lm_geodesic == "deep" and n_layers > 2)

    def identity_fields(self) -> dict[str, Any]:
        """What makes two runs the same run: the fields without those that only say where the run
        executes (a run started in-process can be resumed on a Ray cluster), with values that
        train identically written alike."""
        fields = {k: v for k, v in self.to_dict().items() if k not in EXECUTION_FIELDS}
        if len(self.student_widths) == 1:  # one hidden layer: only the students' own depth matters
            fields["lm_geodesic"] = "always" if self.geodesic_for(2) else "never"
        return fields

    def fingerprint(self) -> str:
        """Hash of the canonical JSON of ``identity_fields`` (schema version included), with
        ``LEGACY_VALUES`` at their legacy value left out as the versions before them had no such field."""
        data = {k: v for k, v in self.identity_fields().items() if LEGACY_VALUES.get(k, self) != v}
        return hashlib.sha256(json.dumps({"schema": SCHEMA_VERSION, **data}, sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> "Config":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(_CONSTRAINTS)}")
        return dataclasses.replace(self, **changes)


def _plain(value: Any) -> Any:
    """A checked value with numpy (or other numbers-ABC) scalars turned into int / float."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def _int(lo: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= lo


def _num(lo: float, hi: float, lo_open: bool = True, hi_open: bool = False) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            return False
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return check


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _one_of(*opts: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in opts), "one of " + ", ".join(repr(o) for o in opts)


_CONSTRAINTS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "activation": (lambda v: isinstance(v, str), "an activation name such as 'tanh'"),
    "student_widths": (
        lambda v: isinstance(v, list) and len(v) >= 1 and all(_int(1)(w) for w in v),
        "a non-empty list of positive ints, one per hidden layer",
    ),
    "n_students": (_int(2), "an int >= 2"),
    "gamma": (_num(0, 1), "a number in (0, 1]"),
    "beta": (_num(0, math.pi / 2), "an angle in radians in (0, π/2]"),
    "seed": (lambda v: _int(0)(v) and v <= MAX_SEED, f"an int in [0, {MAX_SEED}]"),
    "dtype": _one_of("float64", "float32"),
    "backend": _one_of("auto", "local", "ray"),
    "device": _one_of("auto", "cpu", "cuda"),
    "cluster_backend": _one_of("auto", "scipy", "faiss"),
    "cluster_rule": _one_of("stable", "reference"),
    "min_separation": (_num(1, math.inf, lo_open=False, hi_open=True), "a number >= 1"),
    "drop": (_num(0, 1, lo_open=False, hi_open=True), "a number in [0, 1)"),
    "optimizer": _one_of("auto", "lm", "adam"),
    "lm_max_params": (_int(1), "an int >= 1"),
    "lm_max_iter": (_int(0), "an int >= 0"),
    "lm_geodesic": _one_of("deep", "always", "never"),
    "student_tol": (_num(0, 1, lo_open=False), "a number in [0, 1]"),
    "stall_window": (_int(1), "an int >= 1"),
    "restarts": (_int(0), "an int >= 0"),
    "restart_above": (_num(0, 1, lo_open=False), "a number in [0, 1]"),
    "lr": (_num(0, math.inf, hi_open=True), "a positive number"),
    "batch_size": (_int(1), "an int >= 1"),
    "max_epochs": (_int(0), "an int >= 0"),
    "patience": (_int(0), "an int >= 0"),
    "cooldown": (_int(0), "an int >= 0"),
    "min_lr": (_num(0, math.inf, hi_open=True), "a positive number"),
    "finish_lm": (lambda v: isinstance(v, bool), "True or False"),
    "finetune_iter": (_int(0), "an int >= 0"),
    "prune": (lambda v: isinstance(v, bool), "True or False"),
    "fallback": (lambda v: isinstance(v, bool), "True or False"),
    "pack_size": (_int(0), "an int >= 0"),
    "threads": (lambda v: _int(0)(v) and v <= MAX_THREADS, f"an int in [0, {MAX_THREADS}]"),
    "cpus_per_pack": (_int(1), "an int >= 1"),
    "gpus_per_pack": (_num(0, math.inf, lo_open=False, hi_open=True), "a number >= 0"),
    "actor_restarts": (_int(0), "an int >= 0"),
    "teacher_batch": (_int(1), "an int >= 1"),
    "teacher_timeout": (_optional(_num(0, math.inf, hi_open=True)), "None or a positive number of seconds"),
    "teacher_retries": (_int(0), "an int >= 0"),
    "teacher_backoff": (_num(0, math.inf, lo_open=False, hi_open=True), "a number of seconds >= 0"),
    "upper_widths": (
        _optional(lambda v: isinstance(v, list) and len(v) >= 1 and all(_int(1)(w) for w in v)),
        "None or a non-empty list of positive ints",
    ),
}


def _checked_init(init: Callable[..., None]) -> Callable[..., None]:
    """Config(...) with an unknown, repeated or missing field raises ConfigError naming it, not a TypeError."""
    names = [f.name for f in dataclasses.fields(Config)]

    def __init__(self: Config, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(names):
            raise ConfigError(f"Config takes at most {len(names)} fields, got {len(args)} positional values")
        twice = sorted(set(names[: len(args)]) & set(kwargs))
        if twice:
            raise ConfigError(f"config field(s) {twice} given twice (by position and by name)")
        _check_names(dict(zip(names, args)) | kwargs)
        init(self, *args, **kwargs)

    return __init__


def _check_names(data: dict[str, Any]) -> None:
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(names)}")
    missing = [f.name for f in dataclasses.fields(Config) if f.default is dataclasses.MISSING and f.name not in data]
    if missing:
        raise ConfigError(f"config is missing the required field(s) {missing}")


Config.__init__ = _checked_init(Config.__init__)  # type: ignore[method-assign]
