"""The errors a user or an orchestrator acts on. The CLI prints their message (no traceback) and exits with the
class's ``exit_code``: 2 for input that must be fixed (retrying cannot help), 75 (EX_TEMPFAIL) for a service
that did not answer or a race that was lost, where running the same command again may succeed."""


class TimError(Exception):
    """Base class: described well enough to act on."""

    exit_code = 1


class UserError(TimError):
    """Bad input: params, data, a model folder, a registry entry. Fix it, then run again."""

    exit_code = 2


class RetryableError(TimError):
    """A server did not answer or another process won a race; the same command may succeed later."""

    exit_code = 75


class ParamsError(UserError, ValueError):
    """params.yaml is missing or malformed, or a key/value (from the file, a profile or --set) does not fit."""


class DataError(UserError):
    """Source images or the manifest are unusable (corrupt file, empty class, failed validation...)."""


class ShardError(UserError):
    """Shards are missing, tampered with, or cannot be split across the requested readers."""


class ModelError(UserError):
    """A model folder or URI is missing or unusable, or sampling arguments are invalid."""


class RegistryError(UserError):
    """The registry, a registered model, a version, an alias or a version's evaluation is missing or unusable."""


class Unreachable(RetryableError):
    """A server the stage needs (MLflow tracking, a database, a Ray cluster) does not answer."""


class Contended(RetryableError):
    """Another promotion holds the registry lease, or moved the champion while this one was judging."""
