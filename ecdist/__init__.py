"""ecdist: recover a neural network's weights and layer sizes from its input–output behaviour.

Expand-and-Cluster (Martinelli, Şimşek, Gerstner, Brea, ICML 2024): train many overparameterised
students to imitate the teacher, then cluster their neurons; the neurons that recur across
students are the teacher's.

>>> import ecdist
>>> teacher = ecdist.teachers.random_mlp([20, 8, 1], activation="tanh", seed=0)
>>> X = ecdist.queries.gaussian(4000, 20, seed=1)
>>> config = ecdist.Config(activation="tanh", student_widths=[32], n_students=20, seed=0)
>>> result = ecdist.recover(teacher, X, config)          # doctest: +SKIP
>>> result.layer_sizes                                    # doctest: +SKIP
[8]
"""
import os

# MKL's reproducible mode (read once, when MKL starts): a student's arithmetic then does not
# depend on its pack, thread count or memory alignment, so every backend and every split of the
# students gives the same network. Set before torch runs its first matrix product; a value the
# user set is kept. Ray pack actors get it through their runtime_env (ecdist.distributed).
os.environ.setdefault("MKL_CBWR", "AVX2")

from . import cluster, datasets, queries, teachers  # noqa: E402
from .config import Config  # noqa: E402
from .errors import ConfigError, EcdistError, QueryError, RecoveryError, RunFolderError, TeacherError  # noqa: E402
from .metrics import Comparison, compare, identifiable  # noqa: E402
from .pipeline import Recovery, recluster, recover  # noqa: E402
from .storage import load_recovery as load  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Comparison",
    "Config",
    "ConfigError",
    "EcdistError",
    "QueryError",
    "RecoveryError",
    "Recovery",
    "RunFolderError",
    "TeacherError",
    "cluster",
    "compare",
    "identifiable",
    "datasets",
    "load",
    "queries",
    "recluster",
    "recover",
    "teachers",
]
