"""The project's own error types: every failure a user can cause is one of these.

The CLI prints ``str(error)`` on one line and exits with code 2, so each message must say
what went wrong and what to do about it.
"""

#: Characters str.splitlines() breaks on; messages quote user input (keys, file contents), which may hold them.
_LINE_BREAKS = {c: c.encode("unicode_escape").decode() for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


class KVLightError(Exception):
    """Base class for every error kvlight raises on bad input. Its message is always one line."""

    def __str__(self) -> str:
        message = super().__str__()
        if any(c in message for c in _LINE_BREAKS):
            message = "".join(_LINE_BREAKS.get(c, c) for c in message)
        return message


class ConfigError(KVLightError):
    """A compression config (JSON) is malformed or does not fit the model."""


class ModelLoadError(KVLightError):
    """A model could not be loaded, or its architecture is not supported."""


class DataLoadError(KVLightError):
    """Calibration or evaluation text could not be loaded."""


class GeometryMismatchError(KVLightError):
    """A compressor fitted to one model geometry was loaded onto another."""


class ModelMismatchError(KVLightError):
    """A compressor is served on a model other than the one it was fitted to (same geometry, other weights)."""


class OutputError(KVLightError):
    """An output location cannot be written."""


class CaptureError(KVLightError):
    """Captured K/V are unusable (NaN/inf) or a shard failed its checksum."""


class MetricsError(KVLightError):
    """Imported sensitivity metrics (CSV, JSON, W&B) are malformed or do not fit the model."""


class CheckpointError(KVLightError):
    """A Lightning checkpoint cannot be read safely: unreadable, truncated, or holding more than plain data."""


class CacheError(KVLightError, ValueError):
    """A compressed cache cannot be built or used as asked (e.g. built by hand for a RoPE model without positions)."""


class HubError(KVLightError):
    """A compressor cannot be downloaded from or uploaded to the Hugging Face Hub (offline, no such repo, no token)."""


class AlreadyWrappedError(KVLightError, ValueError):
    """A model is wrapped a second time while an earlier wrapper is still open on it."""
