"""The project's own error types: every failure a user can cause is one of these.

The CLI prints ``str(error)`` on one line and exits with code 2, so each message must say
what went wrong and what to do about it.
"""


class KVLightError(Exception):
    """Base class for every error kvlight raises on bad input."""


class ConfigError(KVLightError):
    """A compression config (JSON) is malformed or does not fit the model."""


class ModelLoadError(KVLightError):
    """A model could not be loaded, or its architecture is not supported."""


class DataLoadError(KVLightError):
    """Calibration or evaluation text could not be loaded."""


class GeometryMismatchError(KVLightError):
    """A compressor fitted to one model geometry was loaded onto another."""


class OutputError(KVLightError):
    """An output location cannot be written."""


class CaptureError(KVLightError):
    """Captured K/V are unusable (NaN/inf) or a shard failed its checksum."""


class MetricsError(KVLightError):
    """Imported sensitivity metrics (CSV, JSON, W&B) are malformed or do not fit the model."""
