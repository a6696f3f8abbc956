"""Lightning checkpoints on disk: written whole in their own directory, read as plain data only.

- :class:`AtomicCheckpointIO` is Lightning's ``TorchCheckpointIO`` with both directions changed. It saves through a
  temp file in the checkpoint's own directory, synced and renamed into place: Lightning's own save goes through an
  fsspec transaction whose temp file lies in ``$TMPDIR``, so across filesystems its "rename" is a copy that a full
  disk or a kill leaves half-written under the final name. It loads with ``weights_only=True`` whatever the caller
  or torch's default says (torch 2.4/2.5 defaulted to False; ``kvlight fit`` accepts ``--weights_only false``), so a
  crafted checkpoint cannot run code, and refuses with one line (:class:`~kvlight.errors.CheckpointError`).
- :func:`newest_loadable` is what ``--ckpt_path last`` resumes from: the newest candidate that loads.

Everything kvlight's checkpoints hold (tensors, plain hyperparameters, Lightning's loop and callback state) is
within torch's ``weights_only`` allow-list, so nothing needs allow-listing.
"""

from __future__ import annotations

import io
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _load as pl_load
from lightning.pytorch.plugins.io import TorchCheckpointIO

from kvlight.errors import CheckpointError
from kvlight.files import atomic_write_bytes, fsync_directory


def _local(path) -> bool:
    return isinstance(path, Path) or "://" not in str(path) or str(path).startswith("file://")


def load_checkpoint_file(path, map_location: Any = None) -> dict:
    """The checkpoint at ``path`` unpickled as plain data only; :class:`CheckpointError` (one line) otherwise."""
    try:
        checkpoint = pl_load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message spans many lines (with terminal colours); the global the pickle wanted is what matters.
        wanted = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        what = f"calls {wanted.group(1)}" if wanted else "holds objects"
        raise CheckpointError(
            f"refusing to load checkpoint {path}: its pickle {what}, and a checkpoint holds only tensors and plain "
            "data (torch.load weights_only=True); only load checkpoints kvlight or Lightning wrote"
        ) from None
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    except (OSError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile, IndexError, KeyError) as exc:
        # torch's zip reader says a torn file many ways (RuntimeError, EINVAL, EOF, bad records).
        first = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} is truncated or damaged ({first[:200]}); use another checkpoint or fit again"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint (it holds a {type(checkpoint).__name__})")
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes whole files in place and reads plain data only (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _local(path):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        path = Path(str(path).removeprefix("file://"))
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getvalue(), fsync=True)  # temp file beside it, synced, renamed
        fsync_directory(path.parent)

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage, weights_only=None) -> dict:
        return load_checkpoint_file(path, map_location)


def install(strategy) -> None:
    """Give ``strategy`` an :class:`AtomicCheckpointIO` unless it was configured with a CheckpointIO of its own kind
    (async, cloud): those are the user's choice."""
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


def remove_stale_temporaries(directory) -> None:
    """Delete the temp files a killed :meth:`AtomicCheckpointIO.save_checkpoint` left in ``directory``."""
    if directory is not None and _local(directory) and Path(directory).is_dir():
        for stale in Path(directory).glob(".*.ckpt.*.tmp"):
            stale.unlink(missing_ok=True)


def newest_loadable(paths) -> str | None:
    """The newest (by mtime) of ``paths`` that loads; each one skipped is named on stderr. None when none loads."""
    for path in sorted(paths, key=lambda p: Path(p).stat().st_mtime_ns, reverse=True):
        try:
            load_checkpoint_file(path, map_location="cpu")
        except CheckpointError as exc:
            print(f"kvlight: warning: skipping for --ckpt_path last: {exc}", file=sys.stderr)
            continue
        return str(path)
    return None
