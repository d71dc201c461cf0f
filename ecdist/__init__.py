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
from . import cluster, datasets, queries, teachers
from .config import Config
from .errors import ConfigError, EcdistError, QueryError, RunFolderError, TeacherError
from .metrics import Comparison, compare
from .pipeline import Recovery, recluster, recover
from .storage import load_recovery as load

__version__ = "0.1.0"

__all__ = [
    "Comparison",
    "Config",
    "ConfigError",
    "EcdistError",
    "QueryError",
    "Recovery",
    "RunFolderError",
    "TeacherError",
    "cluster",
    "compare",
    "datasets",
    "load",
    "queries",
    "recluster",
    "recover",
    "teachers",
]
