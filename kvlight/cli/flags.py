"""Short flags for the one-shot commands, each a name for options the classes already declare.

``kvlight calibrate --rank 8`` sets ``model.compression.rank``: the flag is only a name. Its type, default and help
come from the signatures and docstrings the LightningCLI reads (the module's options dataclasses, the DataModule,
the Trainer), through a jsonargparse parser built from those classes, so no option is declared twice and a default
cannot differ between ``kvlight calibrate``, ``kvlight analyze`` and ``kvlight fit``. A flag may turn what the user
types into the value of its keys (``--kv-budget 0.24`` sets ``target_memory_reduction`` 0.76), and an old name stays
as a deprecated alias that warns in one line.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from kvlight.errors import KVLightError

#: The help sections of the one-shot commands, in the order ``--help`` shows them.
GROUPS = {
    "basic": "basic",
    "budget": "budget: how many bytes the cache keeps, and how they are spent",
    "training": "training: the calibration text and what the fit minimises",
    "hardware": "hardware",
}
#: Deprecation notes go through logging: on a terminal (no logging configured) Python prints the bare line on stderr;
#: a program or test that configures logging receives it as a record instead.
LOG = logging.getLogger("kvlight.cli")


@dataclass(frozen=True)
class Flag:
    """``name`` (e.g. ``--rank``) sets every key of ``keys`` (e.g. ``model.compression.rank``) to its value; a
    ``switch`` takes no value and sets the keys to ``switch`` (e.g. ``--no-progress`` sets ``progress`` false).

    Attributes:
        group: the help section (a key of :data:`GROUPS`, or another title).
        choices: the values it takes, listed in the help and checked when parsed (a function: read when the parser
            is built, so a backend registered later is offered too).
        help: replaces the help text read from the docstrings.
        shown: the default the help names, when it is not the key's own (``--kv-budget``: 0.24, not none).
        convert: turns the typed text into the keys' value; raises :class:`KVLightError` on a bad one.
        alias_of: this is a deprecated name of that flag: hidden from the help, one warning line when used, an
            error when given together with it.
        note: what the deprecation warning adds after "use <alias_of>" (a function: of the value given).
        metavar: how the help names the value (default: the flag's name in capitals).
        short: a one-letter spelling of the same flag (``-o``).
    """

    name: str
    keys: tuple[str, ...]
    switch: str | None = None
    group: str = "basic"
    choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None
    help: str | None = None
    shown: str | None = None
    convert: Callable[[str], str] | None = None
    alias_of: str | None = None
    note: str | Callable[[str], str] = ""
    metavar: str | None = None
    short: str | None = None

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one :class:`KVLightError` line naming the flag, not 20 lines of usage.

    Help shows each flag's default (:func:`add_flags` writes it into the help text).
    """

    def error(self, message: str):
        raise KVLightError(f"{' '.join(message.split())}; see '{self.prog} --help'")


def flags(*pairs: tuple, group: str = "basic") -> tuple[Flag, ...]:
    """Flags of help section ``group`` from ``(name, key or keys[, switch value])`` tuples."""
    return tuple(Flag(p[0], p[1] if isinstance(p[1], tuple) else (p[1],), *p[2:], group=group) for p in pairs)


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
#: How the cache keeps tokens exact and codes its keys: what ``calibrate`` fits and ``analyze`` measures alike.
STORAGE_FLAGS = flags(
    ("--sink-tokens", "model.compression.sink_tokens"),
    ("--recent-window", "model.compression.recent_window"),
    ("--key-rope-block", "model.compression.key_rope_block"),
    group="budget",
)


def text_flags(group: str) -> tuple[Flag, ...]:
    """:data:`DATA_FLAGS` but ``--model`` (the calibration text: its source and window sizes), in help section
    ``group``."""
    return tuple(replace(flag, group=group) for flag in DATA_FLAGS if flag.name != "--model")


def kv_budget(text: str) -> str:
    """``--kv-budget B`` as the ``target_memory_reduction`` it sets: ``1 - B``; B outside (0, 1) is one line."""
    try:
        budget = float(text)
    except ValueError:
        budget = math.nan
    if not 0.0 < budget < 1.0:  # nan fails too
        raise KVLightError(
            f"--kv-budget {text!r} must be a fraction strictly between 0 and 1: the share of an fp16 cache's bytes "
            "the compressed cache keeps (0.24 keeps about a quarter)"
        )
    return repr(round(1.0 - budget, 12))


#: ``--kv-budget``, one vocabulary for the budget in every command; the old name counted the other way.
KV_BUDGET_HELP = (
    "the fraction B of an fp16 DynamicCache's bytes the compressed cache keeps at long context, strictly between 0 "
    "and 1: 0.24 keeps about a quarter (3.8 bits per element), 0.125 an eighth (2 bits); it sets "
    "target_memory_reduction = 1 - B"
)


def budget_flags(key: str, shown: str, help: str = KV_BUDGET_HELP) -> tuple[Flag, ...]:
    """``--kv-budget`` and its deprecated alias ``--target-memory-reduction`` (``1 - B``), both setting ``key``."""
    return (
        Flag("--kv-budget", (key,), group="budget", help=help, shown=shown, convert=kv_budget, metavar="B"),
        Flag("--target-memory-reduction", (key,), group="budget", alias_of="--kv-budget", note=_budget_of),
    )


def _budget_of(reduction: str) -> str:
    """What the deprecation warning of ``--target-memory-reduction R`` suggests: the budget ``1 - R``."""
    try:
        budget = f"{1.0 - float(reduction):.6g}"
    except ValueError:
        budget = "B"
    return f" {budget}, the fraction kept (1 - the reduction)"


def plain(text: str) -> str:
    """Docstring text as a terminal shows it: no reST markup (double backquotes, roles such as class or data), no module
    paths."""
    text = re.sub(r":\w+:`~[\w.]*?\.?(\w+)`", r"\1", text)  # :class:`~a.b.C` -> C
    text = re.sub(r":\w+:`([^`]+)`", r"\1", text)  # a role around a name -> the name
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"\s*\((?:see )?kvlight\.[\w.]+\)", "", text)  # "(kvlight.compressors.registry)"
    text = re.sub(r",? see kvlight\.[\w.]+", "", text)
    return " ".join(text.split())


def add_flags(parser: argparse.ArgumentParser, table: tuple[Flag, ...], source) -> None:
    """Add ``table``'s flags to ``parser``, in their help sections, with the help and default of the first key each
    sets in ``source`` (a jsonargparse parser built from the classes). Unset flags leave the classes' defaults in
    place; deprecated aliases are accepted but not shown."""
    actions = {action.dest: action for action in source._actions}
    sections: dict[str, argparse._ArgumentGroup] = {}
    for flag in table:
        action = actions[flag.keys[0]]
        if flag.alias_of is not None:
            parser.add_argument(flag.name, dest=flag.dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            continue
        if flag.group not in sections:
            sections[flag.group] = parser.add_argument_group(GROUPS.get(flag.group, flag.group))
        section = sections[flag.group]
        # argparse %-formats help strings: a literal "%" in a docstring ("12.5 %") must reach it doubled.
        text = plain(flag.help if flag.help is not None else action.help or "").replace("%", "%%")
        shown = flag.shown if flag.shown is not None else "none" if action.default is None else action.default
        also = f"; also sets {', '.join(flag.keys[1:])}" if len(flag.keys) > 1 else ""
        if flag.switch is not None:
            section.add_argument(
                flag.name, dest=flag.dest, action="store_const", const=flag.switch, default=argparse.SUPPRESS,
                help=f"{text} (sets {flag.keys[0]} {flag.switch})",
            )  # fmt: skip
            continue
        choices = flag.choices() if callable(flag.choices) else flag.choices
        section.add_argument(
            *((flag.short,) if flag.short else ()),
            flag.name,
            dest=flag.dest,
            default=argparse.SUPPRESS,
            choices=choices,
            metavar=None if choices else flag.metavar or flag.dest.upper(),
            help=f"{text} (default: {shown}; {flag.keys[0]}{also})",
        )


def given(namespace: argparse.Namespace, table: tuple[Flag, ...], name: str) -> str | None:
    """The spelling of flag ``name`` the user typed (``name`` or one of its deprecated aliases), or None."""
    for flag in table:
        if (flag.name == name or flag.alias_of == name) and hasattr(namespace, flag.dest):
            return flag.name
    return None


#: how YAML (which jsonargparse parses values with) spells the floats a user types as nan and inf.
_YAML_FLOATS = {"nan": ".nan", "inf": ".inf", "+inf": ".inf", "-inf": "-.inf"}


def to_arguments(namespace: argparse.Namespace, table: tuple[Flag, ...]) -> list[str]:
    """The ``--key value`` arguments of the flags given on the command line; a deprecated alias warns in one line,
    and given together with its new name is an error."""
    out: list[str] = []
    for flag in table:
        if flag.alias_of is not None and hasattr(namespace, flag.dest):
            new = next(other for other in table if other.name == flag.alias_of)
            if hasattr(namespace, new.dest):
                raise KVLightError(f"{flag.name} is the old name of {new.name}: give {new.name} alone")
    for flag in table:
        if hasattr(namespace, flag.dest):
            value = str(getattr(namespace, flag.dest))
            if flag.alias_of is not None:
                note = flag.note(value) if callable(flag.note) else flag.note
                LOG.warning(f"kvlight: warning: {flag.name} is deprecated; use {flag.alias_of}{note}")
            if flag.convert is not None:
                value = flag.convert(value)
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
