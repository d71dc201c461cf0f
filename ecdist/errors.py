"""Errors a user can cause. Each says what was wrong and what to do; the CLI prints it and exits 2."""
from __future__ import annotations


class EcdistError(Exception):
    """Base of every error that bad input or a bad environment can cause."""


class ConfigError(EcdistError, ValueError):
    """A configuration value is out of its allowed range (the message names the field)."""


class TeacherError(EcdistError):
    """The teacher could not be loaded or queried, or it answered with bad outputs."""


class QueryError(EcdistError, ValueError):
    """The query inputs are empty, of the wrong shape, or not finite."""


class RunFolderError(EcdistError):
    """A run folder is missing, corrupt, or belongs to another run."""


class RecoveryError(EcdistError):
    """The students gave nothing to recover from (no cluster in a layer that later layers need)."""
