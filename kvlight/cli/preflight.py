"""Checks of the command line that run before any model, text or Trainer is loaded, and the conversion of the
few Lightning / jsonargparse failures a user causes into one :class:`~kvlight.errors.KVLightError` line.

A bad flag must cost a second, not the minutes of loading a model, and must leave no ``lightning_logs/`` behind.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

from kvlight.errors import ConfigError, KVLightError, OutputError

#: ``--ckpt_path`` values Lightning resolves itself (kvlight.cli.lightning resolves "last").
CHECKPOINT_KEYWORDS = {"last", "best", "hpc", "registry", "null", "none"}
#: accelerators that need hardware torch can tell is there (Lightning's own message names no fix).
_NEEDS = {"gpu": "cuda", "cuda": "cuda", "mps": "mps"}


def values_of(argv: list[str], *names: str) -> list[str]:
    """Every value given to one of the options ``names`` in ``argv`` (``--name value`` or ``--name=value``)."""
    found = []
    for index, argument in enumerate(argv):
        for name in names:
            if argument == name and index + 1 < len(argv):
                found.append(argv[index + 1])
            elif argument.startswith(f"{name}="):
                found.append(argument[len(name) + 1 :])
    return found


def check_config_files(argv: list[str]) -> None:
    """Every ``--config`` file that exists reads as UTF-8 YAML (a missing one is jsonargparse's one-line error)."""
    import yaml

    for value in values_of(argv, "--config", "-c"):
        path = Path(value)
        if not path.exists():
            continue
        where = f"--config {value!r}"
        if not path.is_file():
            raise ConfigError(f"{where} is a directory; pass a YAML file such as configs/smollm2_pca.yaml")
        try:
            yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"{where} is not UTF-8 text; pass a YAML file such as configs/smollm2_pca.yaml") from None
        except OSError as exc:
            raise ConfigError(f"cannot read {where}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where} is not valid YAML: {' '.join(str(exc).split())[:200]}") from None
        except (ValueError, RecursionError):  # e.g. an integer beyond Python's 4300-digit conversion limit
            raise ConfigError(f"{where} holds a value no option takes (an enormous number?); fix the file") from None


def check_checkpoint(argv: list[str]) -> None:
    """A ``--ckpt_path`` file exists (whether it loads, kvlight.calibration.checkpoints checks before any model)."""
    for value in values_of(argv, "--ckpt_path"):
        if value.lower() not in CHECKPOINT_KEYWORDS and not Path(value).is_file():
            raise KVLightError(
                f"--ckpt_path {value!r} does not exist; pass the last.ckpt a fit wrote (its path is printed at the end)"
            )


def check_hardware(accelerator, devices, prefix: str) -> None:
    """``accelerator`` is present and ``devices`` is a device count or list Lightning takes, before the model loads.

    ``prefix`` is how the flags are spelled: ``--`` (``kvlight calibrate``) or ``--trainer.`` (``kvlight fit``).
    """
    import torch

    need = _NEEDS.get(str(accelerator).lower())
    present = {"cuda": torch.cuda.is_available, "mps": lambda: torch.backends.mps.is_available()}
    if need is not None and not present[need]():
        raise KVLightError(f"{prefix}accelerator {accelerator}: no {need.upper()} device is visible; use cpu or auto")
    if not _devices_ok(devices):
        raise KVLightError(
            f"{prefix}devices {devices!r} is not a device count; pass a positive number, -1 (all), auto, or "
            "indices such as 0,1"
        )


def _devices_ok(devices) -> bool:
    if isinstance(devices, bool):
        return False
    if isinstance(devices, int):
        return devices >= 1 or devices == -1
    if isinstance(devices, (list, tuple)):
        return bool(devices) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices)
    if isinstance(devices, str):
        text = devices.strip()
        if text == "auto":
            return True
        if re.fullmatch(r"-?\d+", text):
            return _devices_ok(int(text))
        return re.fullmatch(r"\d+(\s*,\s*\d+)*\s*,?", text) is not None
    return devices is None


@contextmanager
def trainer_errors(prefix: str):
    """Lightning's refusal of a trainer setting (precision, strategy, devices on this machine) as one line."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        yield
    except MisconfigurationException as exc:
        message = " ".join(str(exc).split())
        raise KVLightError(f"{prefix}accelerator/devices/precision/strategy: {message[:300]}; see --help") from None


def check_repo_id(repo_id: str) -> None:
    """``repo_id`` is a Hugging Face repo id (``name`` or ``owner/name``), and a token and the network are there to
    push to it: the upload comes after the whole run."""
    import os

    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ConfigError(
            f"--push-to-hub {repo_id!r} is not a Hugging Face repo id: owner/name of letters, digits, '-', '_' and "
            "'.', such as me/smollm2-kv"
        ) from None
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ConfigError(f"--push-to-hub {repo_id} needs the network, but HF_HUB_OFFLINE is set; unset it")
    if get_token() is None:
        raise ConfigError(
            f"--push-to-hub {repo_id} needs a Hugging Face token: run 'hf auth login' or set HF_TOKEN first"
        )


def argument_error(exc: Exception, prog: str) -> KVLightError:
    """jsonargparse's multi-line parse error as one line naming the option and pointing to ``--help``."""
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    hint = f"see '{prog} --help'"
    key = re.match(r'Parser key "([^"]+)":\s*(.*)', lines[0]) if lines else None
    if key is None:
        return KVLightError(f"{' '.join(lines)[:300]}; {hint}")
    name, detail = key.group(1), key.group(2) or (lines[1] if len(lines) > 1 else "invalid value")
    given = re.search(r"(?:Given|Got) value: (.*?)$", text, flags=re.MULTILINE)
    if given:
        detail = f"invalid value {given.group(1).strip()!r}"
    return KVLightError(f"--{name}: {detail[:300]}; {hint}")


def no_space(exc: OSError) -> OutputError | None:
    """A full disk or quota while writing, as one line naming the file; None for any other OSError."""
    import errno

    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    where = f" writing {exc.filename}" if exc.filename else ""
    return OutputError(f"no space left on the device{where}; free space or pick another --output-dir")
