"""Writing files so that a reader sees the old file or the whole new one, never a part."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import torch

from kvlight.errors import OutputError


def default_file_mode() -> int:
    """The mode ``open()`` would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one, never a part.

    The file gets the umask's mode (``mkstemp`` alone would leave 0600); ``fsync`` also flushes it to disk first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.chmod(tmp, default_file_mode())  # results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def ensure_writable(directory: Path) -> Path:
    """Create ``directory`` and prove it is writable, before any expensive work starts."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".kvlight-probe-"):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write to output directory {str(directory)!r}: {exc.strerror or exc}") from None
    return directory


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` through a temp file renamed into place."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not every platform/filesystem lets a directory be opened, hence best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: Path) -> None:
    """Delete the temp files a killed :func:`atomic_write_bytes` left in ``directory`` (``.<name>.<random>.tmp``).

    Only for a directory the caller now writes alone (a capture starting over): another writer's temp file there
    would be deleted under it.
    """
    for stale in Path(directory).glob(".*.tmp"):
        stale.unlink(missing_ok=True)
