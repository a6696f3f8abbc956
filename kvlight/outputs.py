"""A command's output directory as one set: staged beside it, published with one rename, never a mix.

``kvlight calibrate`` writes results, compressor, config, checkpoint and logs that only make sense together (the
results name the checkpoint; the ``.pt`` is the safetensors' compressor). :class:`OutputSet` makes them one unit:

- the run writes everything into a staging directory ``.<name>.kvlight-staging`` next to the output directory
  (same filesystem, so the publishing rename is atomic), flock-ed while the run holds it;
- :meth:`OutputSet.publish` swaps it into place with one ``renameat2(RENAME_EXCHANGE)`` (Linux) and removes the old
  set; elsewhere two renames, between which the output directory is briefly absent but never mixed;
- a failed run removes its staging directory and any parent directory it created, so a refused or failed run
  leaves nothing; a killed run's staging directory is removed by the next run into the same directory;
- an existing non-empty output directory is refused unless ``overwrite``, and even then only when every entry in it
  is one kvlight writes (a typo'd ``--output-dir $HOME --overwrite`` deletes nothing of the user's).

Processes of a multi-process run other than the launching one (``LOCAL_RANK``/``RANK``/``NODE_RANK`` > 0) only
agree on the staging path; they check, create and publish nothing (rank 0 writes every file).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fnmatch
import os
import shutil
from pathlib import Path

from kvlight.errors import OutputError
from kvlight.files import ensure_writable, fsync_directory

#: What a kvlight calibrate output directory holds (``--overwrite`` replaces a directory of these only).
OWN_ENTRIES = (
    "calibration_results_*.json",
    "compressor_*.pt",
    "compressor_*",
    "compression_config_*.json",
    "fim_metrics.json",
    "checkpoints",
    "logs",
)


def _real(directory: Path) -> Path:
    # Absolute, so "." has a name and a parent; symlinks resolved, so a linked output directory is replaced where it
    # lies and the link keeps pointing at it.
    return Path(os.path.realpath(directory))


def staging_path(directory: Path) -> Path:
    """Where a run into ``directory`` stages its files (the same for every process of the run)."""
    directory = _real(directory)
    return directory.parent / f".{directory.name}.kvlight-staging"


def _aside_path(directory: Path) -> Path:
    return directory.parent / f".{directory.name}.kvlight-replaced"


def _launched_rank() -> int:
    # Set by Lightning's launcher for the processes it starts (and by torchrun); absent in the launching process.
    return max(int(os.environ.get(name, "0") or 0) for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


class OutputSet:
    """The output directory of one run (see the module docstring).

    Args:
        directory: the output directory the user named.
        overwrite: replace an existing kvlight output set there.
    """

    def __init__(self, directory: Path, overwrite: bool = False) -> None:
        self.directory = Path(directory)  # as the user wrote it, in messages and in the results
        self.overwrite = overwrite
        self._target = _real(directory)
        self.staging = staging_path(self.directory)
        self.owner = _launched_rank() == 0
        self._lock: int | None = None
        self._created: Path | None = None  # the topmost parent directory this run made
        self._staged = False  # the staging directory is this run's (never delete another run's)
        self._published = False  # or kept after a failed publish, where the error message says

    def stage(self) -> Path:
        """Check the output directory, take the staging directory (cleared of a killed run's files); returns it."""
        if not self.owner:
            return self.staging
        self._check_existing()
        self._make_parent()
        try:
            self._take_staging()
            return ensure_writable(self.staging)
        except BaseException:
            self.close()
            raise

    def publish(self) -> None:
        """Put the staged set in place of the output directory (one rename), then remove the old set."""
        if not self.owner:
            return
        directory, staging, aside = self._target, self.staging, _aside_path(self._target)
        try:
            if not os.path.lexists(directory):
                os.rename(staging, directory)
            elif _exchange(staging, directory):
                shutil.rmtree(staging, ignore_errors=True)  # now the old set
            else:
                os.rename(directory, aside)
                os.rename(staging, directory)
                shutil.rmtree(aside, ignore_errors=True)
        except OSError as exc:
            self._published = True  # keep the new set in the staging directory the message names
            self._release()
            if os.path.lexists(aside) and not os.path.lexists(directory):
                os.rename(aside, directory)  # the previous set back where it was
            raise OutputError(
                f"cannot replace output directory {str(self.directory)!r} with the new results in {str(staging)!r}: "
                f"{exc.strerror or exc}; move them by hand"
            ) from None
        fsync_directory(directory.parent)
        self._published = True
        self._release()

    def close(self) -> None:
        """Unless published: remove the staging directory and the parent directories this run created."""
        if not self.owner or self._published:
            return
        if self._staged:
            shutil.rmtree(self.staging, ignore_errors=True)
        self._release()
        if self._created is not None:
            for parent in [self._target.parent, *self._target.parent.parents]:
                try:
                    parent.rmdir()  # only empty ones: another process may have written there meanwhile
                except OSError:
                    break
                if parent == self._created:
                    break

    # ------------------------------------------------------------------ stage's steps
    def _check_existing(self) -> None:
        directory, target = self.directory, self._target
        if os.path.lexists(target) and not target.is_dir():
            raise OutputError(f"output directory {str(directory)!r} is a file; choose another --output-dir")
        entries = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
        if not entries:
            return
        if not self.overwrite:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise OutputError(
                f"output directory {str(directory)!r} is not empty ({shown}); pass --overwrite to replace the "
                "previous run's files, or choose another --output-dir"
            )
        foreign = [name for name in entries if not any(fnmatch.fnmatchcase(name, p) for p in OWN_ENTRIES)]
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise OutputError(
                f"--overwrite replaces only kvlight's own files, and output directory {str(directory)!r} also holds "
                f"{shown}: move them or choose another --output-dir"
            )

    def _make_parent(self) -> None:
        parent = self._target.parent
        missing = [p for p in [parent, *parent.parents] if not os.path.lexists(p)]
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(
                f"cannot write to output directory {str(self.directory)!r}: {exc.strerror or exc}"
            ) from None
        self._created = missing[-1] if missing else None

    def _take_staging(self) -> None:
        staging = self.staging
        if os.path.lexists(staging):
            held = _try_lock(staging)
            if held is None:
                raise OutputError(
                    f"another kvlight run is writing output directory {str(self.directory)!r} (its staging directory "
                    f"{str(staging)!r} is in use); wait for it or choose another --output-dir"
                )
            os.close(held)
        try:
            if os.path.lexists(staging):
                shutil.rmtree(staging)  # a killed run's files, never published
            shutil.rmtree(_aside_path(self._target), ignore_errors=True)  # an old set whose removal was interrupted
            staging.mkdir()
        except OSError as exc:
            raise OutputError(
                f"cannot write to output directory {str(self.directory)!r}: {exc.strerror or exc}"
            ) from None
        self._staged = True
        self._lock = _try_lock(staging)

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def _try_lock(directory: Path) -> int | None:
    """An open descriptor holding an exclusive flock on ``directory``, or None while another process holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (a descriptor to close all the same), nothing refused
        return os.open(os.devnull, os.O_RDONLY)
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unavailable."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (38, 22, 95):  # ENOSYS, EINVAL, EOPNOTSUPP: this kernel or filesystem cannot; fall back
        return False
    raise OSError(errno, os.strerror(errno))
