"""Errors a user can fix. The CLI prints their message (no traceback) and exits with status 2."""


class TimError(Exception):
    """Base class: bad input or data, described well enough to act on."""


class ParamsError(TimError, ValueError):
    """params.yaml is missing, malformed, or a key/value does not fit the stage's schema."""


class DataError(TimError):
    """Source images or the manifest are unusable (corrupt file, empty class, failed validation...)."""


class ShardError(TimError):
    """Shards are missing, tampered with, or cannot be split across the requested readers."""


class ModelError(TimError):
    """A model folder or URI is missing or unusable, or sampling arguments are invalid."""
