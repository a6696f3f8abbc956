"""The one list of compression backends.

A backend registers once, in its own file (``register_backend(...)`` at the bottom of ``pca.py``,
``kvsplice.py``): its name (what a compression config's ``algo`` says), its per-head projection class, the
dataclass of its options (the keyword arguments its projection takes besides ``head_dim`` and ``rank``) and what it
supports. Config validation, the command-line choices, ``kvlight analyze`` and the tests' backend matrix all read
this registry; a new backend is one file plus its import in ``kvlight/compressors/__init__.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from kvlight.errors import ConfigError


@dataclass(frozen=True)
class Backend:
    """What kvlight knows of one backend.

    Attributes:
        name: the ``algo`` a compression config names it by.
        projection: its :class:`~kvlight.compressors.base.HeadProjection` subclass, built as
            ``projection(head_dim, rank, **options)``.
        options: a dataclass of its settings (``options()`` gives the defaults).
        trainable: it has parameters fitted by gradient descent after the statistics pass.
        weighted_objectives: it can start from the query/output-weighted closed forms (separate encoder and decoder).
    """

    name: str
    projection: type
    options: type
    trainable: bool
    weighted_objectives: bool

    def make_options(self, given: Any = None) -> Any:
        """The options dataclass from ``given`` (None, a dict of field values, or an instance); unknown or badly
        typed fields are a one-line :class:`ConfigError`."""
        if given is None:
            return self.options()
        if isinstance(given, self.options):
            return given
        if not isinstance(given, dict):
            raise ConfigError(f"options of backend {self.name!r} must be a mapping of its settings, got {given!r}")
        known = {field.name for field in dataclasses.fields(self.options)}
        unknown = sorted(set(given) - known)
        if unknown:
            listed = ", ".join(sorted(known)) or "none"
            raise ConfigError(f"backend {self.name!r} has no option {unknown[0]!r} (its options: {listed})")
        try:
            return self.options(**given)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"options of backend {self.name!r}: {exc}") from None


_BACKENDS: dict[str, Backend] = {}


def register_backend(
    name: str, projection: type, options: type, *, trainable: bool, weighted_objectives: bool
) -> Backend:
    """Add a backend; registering the same name twice with another class is an error."""
    if not name.isidentifier() or name == "none":
        raise ValueError(f"backend name {name!r} must be an identifier other than 'none'")
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"options of backend {name!r} must be a dataclass, got {options!r}")
    entry = Backend(name, projection, options, trainable, weighted_objectives)
    existing = _BACKENDS.get(name)
    if existing is not None and existing != entry:
        raise ValueError(f"backend {name!r} is already registered ({existing.projection.__name__})")
    _BACKENDS[name] = entry
    projection.algo = name
    return entry


def unregister_backend(name: str) -> None:
    """Remove a backend (for tests that register a toy one)."""
    _BACKENDS.pop(name, None)


def backend_names() -> tuple[str, ...]:
    """The registered backends, in registration order."""
    return tuple(_BACKENDS)


def backend(name: str) -> Backend:
    """The backend called ``name``; an unknown name is a one-line :class:`ConfigError` listing the known ones."""
    try:
        return _BACKENDS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"{name!r} is not a known backend (known: {', '.join(_BACKENDS)})") from None
