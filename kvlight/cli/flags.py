"""Short flags for the one-shot commands, each a name for options the classes already declare.

``kvlight calibrate --rank 8`` sets ``model.compression.rank``: the flag is only a name. Its type, default and help
come from the signatures and docstrings the LightningCLI reads (the module's options dataclasses, the DataModule,
the Trainer), through a jsonargparse parser built from those classes, so no option is declared twice and a default
cannot differ between ``kvlight calibrate``, ``kvlight analyze`` and ``kvlight fit``.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

from kvlight.errors import KVLightError


@dataclass(frozen=True)
class Flag:
    """``name`` (e.g. ``--rank``) sets every key of ``keys`` (e.g. ``model.compression.rank``) to its value; a
    ``switch`` takes no value and sets the keys to ``switch`` (e.g. ``--no-progress`` sets ``progress`` false)."""

    name: str
    keys: tuple[str, ...]
    switch: str | None = None

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one :class:`KVLightError` line naming the flag, not 20 lines of usage.

    Help shows each flag's default (:func:`add_flags` writes it into the help text).
    """

    def error(self, message: str):
        raise KVLightError(f"{' '.join(message.split())}; see '{self.prog} --help'")


def flags(*pairs: tuple) -> tuple[Flag, ...]:
    """Flags from ``(name, key or keys[, switch value])`` tuples."""
    return tuple(Flag(p[0], p[1] if isinstance(p[1], tuple) else (p[1],), *p[2:]) for p in pairs)


#: The text and data flags that ``calibrate`` and ``analyze`` share (the DataModule's options).
DATA_FLAGS = flags(
    ("--model", "model.model"),
    ("--calibration-dataset", "data.dataset"),
    ("--dataset-config", "data.dataset_config"),
    ("--split", "data.split"),
    ("--text-field", "data.text_field"),
    ("--calibration-samples", "data.calibration_samples"),
    ("--eval-samples", "data.eval_samples"),
    ("--seq-len", "data.seq_len"),
)


def add_flags(parser: argparse.ArgumentParser, table: tuple[Flag, ...], source) -> None:
    """Add ``table``'s flags to ``parser`` with the help and default of the first key each sets in ``source`` (a
    jsonargparse parser built from the classes). Unset flags leave the classes' defaults in place."""
    actions = {action.dest: action for action in source._actions}
    for flag in table:
        action = actions[flag.keys[0]]
        default = action.default
        text = " ".join((action.help or "").split())
        shown = "none" if default is None else default
        also = f"; also sets {', '.join(flag.keys[1:])}" if len(flag.keys) > 1 else ""
        if flag.switch is not None:
            parser.add_argument(
                flag.name, dest=flag.dest, action="store_const", const=flag.switch, default=argparse.SUPPRESS,
                help=f"{text} (sets {flag.keys[0]} {flag.switch})",
            )  # fmt: skip
            continue
        parser.add_argument(
            flag.name,
            dest=flag.dest,
            default=argparse.SUPPRESS,
            metavar=flag.dest.upper(),
            help=f"{text} (default: {shown}; {flag.keys[0]}{also})",
        )


#: how YAML (which jsonargparse parses values with) spells the floats a user types as nan and inf.
_YAML_FLOATS = {"nan": ".nan", "inf": ".inf", "+inf": ".inf", "-inf": "-.inf"}


def to_arguments(namespace: argparse.Namespace, table: tuple[Flag, ...]) -> list[str]:
    """The ``--key value`` arguments of the flags given on the command line."""
    out: list[str] = []
    for flag in table:
        if hasattr(namespace, flag.dest):
            value = str(getattr(namespace, flag.dest))
            value = _YAML_FLOATS.get(value.strip().lower(), value)
            for key in flag.keys:
                out += [f"--{key}", value]
    return out


def build(kind: type, values, table: tuple[Flag, ...], group: str):
    """The options dataclass ``kind`` from the parsed ``values`` of ``group``; a value it refuses is a one-line error
    that names the flag it came from."""
    from kvlight.errors import ConfigError

    try:
        return kind(**vars(values))
    except ConfigError as exc:
        raise ConfigError(named(str(exc), table, (group,))) from None


def named(message: str, table: tuple[Flag, ...], groups: tuple[str, ...]) -> str:
    """``message`` with the option it starts with (``rank must be ...``) replaced by the flag that sets it, when a flag
    of ``table`` sets that option of one of ``groups``."""
    for flag in table:
        for key in flag.keys:
            head, _, field = key.rpartition(".")
            if head in groups and message.startswith(f"{field} "):
                return f"{flag.name} {message[len(field) + 1 :]}"
    return message


def parse(source, arguments: list[str], table: tuple[Flag, ...]):
    """``source.parse_args(arguments)``, a bad value a one-line error naming the flag it came from."""
    try:
        return source.parse_args(arguments)
    except (argparse.ArgumentError, TypeError, ValueError) as exc:
        message = " ".join(str(exc).split())
        for flag in table:
            for key in flag.keys:
                if f'"{key}"' in message or f"'{key}'" in message or f"--{key}" in message:
                    given = re.search(r"Given value: (.*?)(?:$| - )", message)
                    value = f" {given.group(1)!r}" if given else ""
                    raise KVLightError(f"{flag.name}: invalid value{value}; see --help for what it takes") from None
        raise KVLightError(f"{message[:300]}; see --help") from None


def namespace_get(config, key: str):
    """``config.a.b.c`` for the dotted ``key``."""
    value = config
    for part in key.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value
