"""Captured K/V rows on disk: atomic checksummed shards and a streaming reader (the reservoir: calibration.reservoir).

A *row* is one token's keys and values for every layer and KV head, ``[L, H, D]`` each, so compressors for all
layers are fitted on the same tokens. Rows are captured once (reservoir), written as safetensors shards with a
manifest (so an interrupted or corrupted capture is detected and redone), and streamed back in shuffled
mini-batches while the compressors train.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from kvlight.errors import CaptureError, OutputError
from kvlight.files import atomic_write_bytes, fsync_directory, remove_stale_temporaries

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "kvlight-kv-shards"
MANIFEST_VERSION = 1
_SHARD_PATTERN = "shard-{:05d}.safetensors"
_HASH_CHUNK = 1 << 20


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see either the old file, no file, or the complete new file (synced)."""
    atomic_write_bytes(path, data, fsync=True)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_shards(
    directory: Path,
    keys: torch.Tensor,
    values: torch.Tensor,
    rows_per_shard: int,
    meta: dict,
) -> dict:
    """Write captured rows as safetensors shards plus a manifest, every file atomically.

    Rows are written in the order given (shuffle before calling if needed). The manifest is written last, so a
    directory whose manifest is missing or does not match its shards is never trusted (see :func:`load_manifest`).
    A previous capture in the same directory is invalidated first (with the temp files a killed one left) and its
    leftover shards removed at the end.

    Args:
        directory: Destination, created if missing.
        keys: ``[n, L, H, D]``.
        values: ``[n, L, H, D]``, same shape as ``keys``.
        rows_per_shard: Maximum rows per shard file.
        meta: JSON-serialisable metadata stored in the manifest (model, data settings, ...).

    Returns:
        The manifest: ``files`` (``name``, ``rows``, ``bytes``, ``sha256``), ``num_rows``, ``row_shape``,
        ``dtype`` and ``meta``.

    Raises:
        OutputError: The directory or a file in it cannot be written.
    """
    if keys.dim() != 4 or keys.shape != values.shape:
        raise ValueError(
            f"expected keys and values of shape [n, L, H, D], got {tuple(keys.shape)} and {tuple(values.shape)}"
        )
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    # Fail on unserialisable meta before spending time on the shards.
    json.dumps(meta)
    from safetensors.torch import save  # deferred: only capture code needs it

    directory = Path(directory)
    num = keys.shape[0]
    files = []
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MANIFEST_NAME).unlink(missing_ok=True)
        remove_stale_temporaries(directory)  # a killed capture's half-written files; this capture owns the directory
        for index, start in enumerate(range(0, num, rows_per_shard)):
            name = _SHARD_PATTERN.format(index)
            shard = {
                "keys": keys[start : start + rows_per_shard].detach().cpu().contiguous(),
                "values": values[start : start + rows_per_shard].detach().cpu().contiguous(),
            }
            blob = save(shard)
            _atomic_write(directory / name, blob)
            rows = shard["keys"].shape[0]
            files.append({"name": name, "rows": rows, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()})
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "num_rows": num,
            "row_shape": list(keys.shape[1:]),
            "dtype": str(keys.dtype).removeprefix("torch."),
            "files": files,
            "meta": meta,
        }
        _atomic_write(directory / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True).encode())
        fsync_directory(directory)
        listed = {entry["name"] for entry in files}
        for stale in directory.glob("shard-*.safetensors"):
            if stale.name not in listed:
                stale.unlink(missing_ok=True)
    except OSError as error:
        raise OutputError(
            f"could not write captured K/V shards to {directory}: {error.strerror or error}; "
            "point KVLIGHT_CACHE (or the data module's capture_dir) at a writable directory with enough free space"
        ) from error
    return manifest


def _valid_entry(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("name"), str)
        and Path(entry["name"]).name == entry["name"]  # a plain file name: never read outside the directory
        and isinstance(entry.get("rows"), int)
        and isinstance(entry.get("bytes"), int)
        and isinstance(entry.get("sha256"), str)
    )


def _read_manifest(directory: Path) -> dict | None:
    """The manifest of ``directory`` if it is well formed, without looking at the shards; else ``None``."""
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None
    if manifest.get("version") != MANIFEST_VERSION:
        return None
    files = manifest.get("files")
    if not isinstance(files, list) or not all(_valid_entry(entry) for entry in files):
        return None
    if sum(entry["rows"] for entry in files) != manifest.get("num_rows"):
        return None
    return manifest


def load_manifest(directory: Path, verify: bool = True) -> dict | None:
    """Read the manifest of a complete, intact capture.

    Args:
        directory: A directory written by :func:`write_shards`.
        verify: Also check every shard's sha256 (reads all shards); sizes are always checked.

    Returns:
        The manifest, or ``None`` when the directory holds no complete, intact capture (missing or unreadable
        manifest, missing shard, wrong size or checksum): the caller captures again. Never raises for that.
    """
    directory = Path(directory)
    manifest = _read_manifest(directory)
    if manifest is None:
        return None
    try:
        for entry in manifest["files"]:
            path = directory / entry["name"]
            if path.stat().st_size != entry["bytes"]:
                return None
            if verify and _sha256_file(path) != entry["sha256"]:
                return None
    except OSError:
        return None
    return manifest


def num_rows(manifest: dict) -> int:
    """Total number of rows listed in a manifest."""
    return sum(int(entry["rows"]) for entry in manifest["files"])


class KVShardStream(torch.utils.data.IterableDataset):
    """Shuffled mini-batches of captured rows, read one shard at a time.

    Each epoch visits the shards in a shuffled order and the rows of each shard in a shuffled order, both drawn
    from ``torch.Generator(seed + epoch)``; batches may span two shards so all have exactly ``batch_size`` rows.
    An epoch is exactly ``num_batches`` batches, cycling through the data again if it is too short and stopping
    early if it is longer, so every DDP rank takes the same number of optimiser steps.

    The first ``exact_epochs`` epochs are single passes instead (the statistics epoch: means and covariances must
    count every row exactly once): every row once, the last batch short if need be, then empty batches (0 rows) up
    to ``num_batches`` so that ranks holding fewer rows still take the same number of steps.

    Yields:
        ``{"keys": [batch_size, L, H, D], "values": [batch_size, L, H, D]}``.

    Args:
        directory: A capture written by :func:`write_shards`.
        batch_size: Rows per batch.
        num_batches: Batches per epoch.
        seed: Base seed of the per-epoch shuffling.
        exact_epochs: Leading epochs that are single passes over the rows (see above).

    Raises:
        CaptureError: The directory holds no complete capture, holds no rows, or a shard fails its checksum
            when opened.
        ValueError: ``num_batches`` batches cannot hold every row once while ``exact_epochs > 0``.
    """

    def __init__(self, directory: Path, batch_size: int, num_batches: int, seed: int = 0, exact_epochs: int = 0):
        super().__init__()
        if batch_size < 1 or num_batches < 0:
            raise ValueError(f"need batch_size >= 1 and num_batches >= 0, got {batch_size} and {num_batches}")
        self.directory = Path(directory)
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.seed = seed
        self.exact_epochs = exact_epochs
        self.epoch = 0
        # Shards are checked (size and sha256) as each one is opened, so a capture is read once per epoch.
        manifest = _read_manifest(self.directory)
        if manifest is None:
            raise CaptureError(
                f"no complete K/V capture in {self.directory} (missing or damaged manifest.json); delete the "
                "directory and run again to recapture"
            )
        if num_rows(manifest) == 0:
            raise CaptureError(
                f"the K/V capture in {self.directory} holds no rows; raise --calibration-samples and run again"
            )
        self.manifest = manifest
        if exact_epochs and num_rows(manifest) > num_batches * batch_size:
            raise ValueError(
                f"{num_batches} batches of {batch_size} cannot hold the {num_rows(manifest)} rows of a single pass"
            )

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffling of the next iteration (call once per epoch, like ``DistributedSampler``)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def _open(self, entry: dict) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors.torch import load  # deferred: only training needs it

        path = self.directory / entry["name"]
        try:
            blob = path.read_bytes()
        except OSError as error:
            raise CaptureError(
                f"could not read K/V shard {path}: {error.strerror or error}; delete {self.directory} and run again "
                "to recapture"
            ) from error
        if len(blob) != entry["bytes"] or hashlib.sha256(blob).hexdigest() != entry["sha256"]:
            raise CaptureError(
                f"K/V shard {path} failed its checksum (damaged or modified); delete {self.directory} and run again "
                "to recapture"
            )
        tensors = load(blob)
        keys, values = tensors.get("keys"), tensors.get("values")
        if keys is None or values is None or keys.shape != values.shape or keys.shape[0] != entry["rows"]:
            raise CaptureError(
                f"K/V shard {path} does not hold the 'keys'/'values' rows its manifest lists; delete "
                f"{self.directory} and run again to recapture"
            )
        return keys, values

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        files = self.manifest["files"]
        produced = 0
        pending_keys: list[torch.Tensor] = []
        pending_values: list[torch.Tensor] = []
        pending = 0
        single_pass, passes = self.epoch < self.exact_epochs, 0
        while produced < self.num_batches:
            if single_pass and passes:  # the one pass is over: flush the short batch, then empty ones
                if not pending:
                    dtype = getattr(torch, str(self.manifest.get("dtype")), None)
                    dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
                    pending_keys = [torch.empty((0, *self.manifest["row_shape"]), dtype=dtype)]
                    pending_values = [pending_keys[0].clone()]
                yield {"keys": torch.cat(pending_keys), "values": torch.cat(pending_values)}
                pending_keys, pending_values, pending = [], [], 0
                produced += 1
                continue
            # Each pass over the data draws a fresh shard order, so cycling does not repeat the same batches.
            for shard_index in torch.randperm(len(files), generator=generator).tolist():
                if files[shard_index]["rows"] == 0:
                    continue
                keys, values = self._open(files[shard_index])
                order = torch.randperm(keys.shape[0], generator=generator)
                start = 0
                while start < order.numel():
                    take = order[start : start + self.batch_size - pending]
                    start += take.numel()
                    pending_keys.append(keys[take])
                    pending_values.append(values[take])
                    pending += take.numel()
                    if pending == self.batch_size:
                        yield {"keys": torch.cat(pending_keys), "values": torch.cat(pending_values)}
                        pending_keys, pending_values, pending = [], [], 0
                        produced += 1
                        if produced == self.num_batches:
                            return
                # Release the shard before the next one is read: only one is held at a time.
                del keys, values
            passes += 1

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = torch.utils.data.get_worker_info()
        if worker is None or worker.num_workers == 1:
            yield from self._batches()
            return
        # DataLoader workers each replay the same deterministic sequence and keep every num_workers-th batch, so
        # together they yield it once, in order, instead of each yielding a full copy.
        for index, batch in enumerate(self._batches()):
            if index % worker.num_workers == worker.id:
                yield batch
