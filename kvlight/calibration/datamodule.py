"""Calibration and evaluation text: sources -> documents -> fixed-length token windows -> a LightningDataModule.

The token stream of a source is cut into consecutive windows; the first ``eval_samples`` windows are the
evaluation set and the next ``calibration_samples`` the calibration set, so the two never overlap and are the
same on every run and every rank. Each DDP rank then takes its own ``rank::world_size`` share of both.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from kvlight.calibration.shards import KVShardStream
from kvlight.calibration.texts import BUILTIN_CORPUS, iter_texts, source_fingerprint
from kvlight.calibration.windows import eval_and_calibration_windows, shard_for_rank
from kvlight.errors import CaptureError, DataLoadError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def default_capture_dir() -> Path:
    """``$KVLIGHT_CACHE/captures`` if ``KVLIGHT_CACHE`` is set, else ``~/.cache/kvlight/captures``."""
    root = os.environ.get("KVLIGHT_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "kvlight"
    return base / "captures"


def max_positions(model: str | None) -> int | None:
    """The most positions ``model``'s config says it takes, read from local files only (no hub request: a model
    not on disk is checked when it loads). None when the config says nothing or is not at hand."""
    from transformers import AutoConfig

    local = Path(str(model)).expanduser()
    path, gguf = (str(local) if local.exists() else str(model)), None
    one_gguf_dir = local.is_dir() and not (local / "config.json").exists()  # resolve_model_path finds its GGUF
    if model is None or path.endswith(".gguf") or one_gguf_dir:  # the embedded default, or a GGUF file
        from kvlight.models import resolve_model_path

        path, gguf = resolve_model_path(model)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError):
        return None
    config = getattr(config, "text_config", None) or config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_len(model: str | None, seq_len: int) -> None:
    """Refuse windows longer than the model's positions before any text is read: GPT-2 would fail on an index
    deep in its forward, and RoPE models would run silently past what they were trained on."""
    limit = max_positions(model)
    if limit is not None and seq_len > limit:
        raise DataLoadError(
            f"--seq-len {seq_len} is longer than the {limit} positions model {model or 'embedded default'!r} takes; "
            f"pass --seq-len {limit} or less"
        )


class _WindowBatches(IterableDataset):
    """Consecutive ``[B, seq_len]`` batches of in-memory windows.

    Iterable on purpose: Lightning never injects a DistributedSampler into an iterable dataset's loader, so a
    rank's share of the windows is not split again whatever ``use_distributed_sampler`` is.
    """

    def __init__(self, windows: torch.Tensor, batch_size: int):
        super().__init__()
        self.windows = windows
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(self.windows.shape[0] / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for start in range(0, self.windows.shape[0], self.batch_size):
            yield self.windows[start : start + self.batch_size]


class ResumableKVLoader(DataLoader):
    """The training loader over a :class:`KVShardStream`, resumable mid-epoch.

    Lightning checkpoints the ``state_dict`` of a loader that has one (``{"epoch", "batches"}``: the stream's epoch
    and the batches handed out in it) and hands it back to ``load_state_dict`` on ``--ckpt_path`` resume. The next
    iteration then replays that epoch's shuffling and skips the batches already trained on, so a resumed fit sees
    exactly the batches an uninterrupted one would. (Lightning does not call ``on_train_epoch_start`` again when it
    resumes mid-epoch, so the epoch must come from here too.)
    """

    def __init__(self, stream: KVShardStream, num_workers: int = 0):
        super().__init__(stream, batch_size=None, num_workers=num_workers)
        self.delivered = 0
        self._skip = 0

    def __iter__(self) -> Iterator[Any]:
        skip, self._skip = self._skip, 0
        self.delivered = skip
        for index, batch in enumerate(super().__iter__()):
            if index >= skip:  # the skipped batches are still read: the shuffling must advance exactly as before
                self.delivered += 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.dataset.epoch), "batches": int(self.delivered)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self.dataset):  # saved after an epoch's last batch: resume at the next epoch's start
            epoch, batches = epoch + 1, 0
        self.dataset.set_epoch(epoch)
        self._skip = batches


class KVCalibrationDataModule(pl.LightningDataModule):
    """Token windows for evaluation and K/V capture, and streamed captured K/V rows for training.

    Evaluation batches are LongTensors ``[batch_size, seq_len]``; training batches are
    ``{"keys": [kv_batch_size, L, H, D], "values": [kv_batch_size, L, H, D]}`` read from the shards the
    frozen model produced from :meth:`calibration_windows` (kvlight.calibration.callbacks.CaptureKV hands them over with
    :meth:`stream_shards`).

    Args:
        model: Model id or local path the tokenizer is loaded from (None: kvlight's embedded default model).
        dataset: Text source: "builtin" (CPython's documentation, offline), a local .txt/.jsonl/.json/.parquet
            file or directory, or a Hugging Face hub dataset id.
        dataset_config: Hub dataset config ("wikitext" defaults to "wikitext-2-raw-v1").
        split: Hub dataset split.
        text_field: Column that holds the text in .json/.jsonl/.parquet files and hub datasets.
        seq_len: Tokens per window.
        calibration_samples: Windows whose K/V are captured to fit the compressors.
        eval_samples: Windows used to evaluate (they come before the calibration windows and never overlap them).
        batch_size: Windows per evaluation batch.
        kv_batch_size: Captured K/V rows (tokens) per training batch.
        max_samples_per_head: Most captured K/V rows kept (uniform reservoir sample over the calibration tokens).
        capture_dir: Where captured K/V are cached (default: $KVLIGHT_CACHE/captures or ~/.cache/kvlight/captures).
        seed: Seed for sampling and shuffling the captured K/V rows.
        num_workers: DataLoader worker processes reading captured K/V shards.
    """

    def __init__(  # flat on purpose: each is one LightningCLI key (data.seq_len) and one calibrate/analyze flag
        self,
        model: str | None = None,
        dataset: str = BUILTIN_CORPUS,
        dataset_config: str | None = None,
        split: str = "train",
        text_field: str = "text",
        seq_len: int = 512,
        calibration_samples: int = 32,
        eval_samples: int = 8,
        batch_size: int = 4,
        kv_batch_size: int = 1024,
        max_samples_per_head: int = 10_000,
        capture_dir: str | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        # Named as the user sets them: the kvlight calibrate flag where one exists, else the LightningCLI key.
        if seq_len < 2:  # a window of one token predicts nothing: its perplexity would read 1.00
            raise DataLoadError(
                f"--seq-len must be at least 2 (perplexity scores each token after the first), got {seq_len}"
            )
        positive = {
            "--batch-size": batch_size,
            "--max-samples-per-head": max_samples_per_head,
            "data.kv_batch_size": kv_batch_size,
        }
        non_negative = {
            "--calibration-samples": calibration_samples,
            "--eval-samples": eval_samples,
            "data.num_workers": num_workers,
        }
        for name, value in positive.items():
            if value < 1:
                raise DataLoadError(f"{name} must be at least 1, got {value}; pass a positive number")
        for name, value in non_negative.items():
            if value < 0:
                raise DataLoadError(f"{name} must be at least 0, got {value}; pass zero or a positive number")
        self.save_hyperparameters()
        self.tokenizer: PreTrainedTokenizerBase | None = None
        """Set it before ``setup`` to use this tokenizer instead of loading the one of ``model``."""
        self.kv_stream: KVShardStream | None = None
        """The training stream once ``train_dataloader`` ran; call its ``set_epoch`` at each epoch start."""
        self._eval_windows: torch.Tensor | None = None
        self._calibration_windows: torch.Tensor | None = None
        self._kv_shards: tuple[Path, int, int] | None = None

    def rank_and_world_size(self) -> tuple[int, int]:
        """``(global_rank, world_size)`` of the attached trainer, ``(0, 1)`` without one."""
        if self.trainer is None:
            return 0, 1
        return int(self.trainer.global_rank), int(self.trainer.world_size)

    def setup(self, stage: str | None = None) -> None:
        """Tokenize the source into evaluation and calibration windows (once; later calls reuse them)."""
        if self._eval_windows is not None:
            return
        ask = self.tokenizer is None or self.hparams.model is not None  # a tokenizer set by hand has no model to ask
        if self.tokenizer is None:
            from kvlight.models import load_tokenizer

            self.tokenizer = load_tokenizer(self.hparams.model)
        if ask:  # after the tokenizer: a hub model's config is on disk by then (fetched with it), no text read yet
            check_seq_len(self.hparams.model, self.hparams.seq_len)
        hp = self.hparams
        self._eval_windows, self._calibration_windows = eval_and_calibration_windows(
            lambda: iter_texts(hp.dataset, hp.dataset_config, hp.split, hp.text_field),
            self.tokenizer,
            hp.seq_len,
            hp.eval_samples,
            hp.calibration_samples,
            source_name=f"dataset '{hp.dataset}'",
        )

    def keep_calibration_windows(self, count: int) -> None:
        """Calibrate on the first ``count`` calibration windows only (what a time budget trades first); the
        hyperparameters, and with them the capture's key, say so."""
        self.setup()
        assert self._calibration_windows is not None
        if not 1 <= count <= self._calibration_windows.shape[0]:
            raise ValueError(f"count must be between 1 and {self._calibration_windows.shape[0]}, got {count}")
        self._calibration_windows = self._calibration_windows[:count]
        self.hparams.calibration_samples = count

    def _rank_share(self, windows: torch.Tensor) -> torch.Tensor:
        rank, world_size = self.rank_and_world_size()
        index = torch.tensor(shard_for_rank(windows.shape[0], rank, world_size), dtype=torch.long)
        return windows.index_select(0, index)

    def eval_windows(self) -> torch.Tensor:
        """This rank's evaluation windows, LongTensor ``[E_rank, seq_len]``."""
        self.setup()
        assert self._eval_windows is not None
        return self._rank_share(self._eval_windows)

    def calibration_windows(self) -> torch.Tensor:
        """This rank's calibration windows, LongTensor ``[C_rank, seq_len]``, to run the frozen model over."""
        self.setup()
        assert self._calibration_windows is not None
        return self._rank_share(self._calibration_windows)

    def _eval_loader(self) -> DataLoader:
        # Workers would only copy in-memory windows between processes, so the main process serves them.
        return DataLoader(_WindowBatches(self.eval_windows(), self.hparams.batch_size), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        """This rank's evaluation windows in order, batches LongTensor ``[batch_size, seq_len]`` (last may be short)."""
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        """Same as :meth:`val_dataloader`."""
        return self._eval_loader()

    def capture_key(self, model_fingerprint: str, rope_blocks: tuple[int, ...] = ()) -> str:
        """sha256 hex digest identifying one rank's K/V capture.

        Covers the model fingerprint, every setting that changes which tokens are captured, this rank and world
        size, for local files their paths, sizes and modification times (an edited file is captured again), and
        the RoPE blocks the keys are captured relative to (``rope_blocks``, per layer).
        """
        hp = self.hparams
        rank, world_size = self.rank_and_world_size()
        fields = {
            "model": model_fingerprint,
            "dataset": hp.dataset,
            "dataset_config": hp.dataset_config,
            "split": hp.split,
            "text_field": hp.text_field,
            "seq_len": hp.seq_len,
            "calibration_samples": hp.calibration_samples,
            "eval_samples": hp.eval_samples,
            "max_samples_per_head": hp.max_samples_per_head,
            "seed": hp.seed,
            "rank": rank,
            "world_size": world_size,
            "source": source_fingerprint(hp.dataset),
            # 2: windows lead with the tokenizer's leading special tokens (a BOS-trained model's captures changed)
            "windowing": 2,
        }
        if any(block != 1 for block in rope_blocks):  # keys relative to RoPE blocks (pre-RoPE captures keep their key)
            fields["rope_blocks"] = list(rope_blocks)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def capture_path(self, model_fingerprint: str, rope_blocks: tuple[int, ...] = ()) -> Path:
        """Directory of this rank's K/V capture: ``capture_dir / capture_key(...)[:16]``."""
        root = Path(self.hparams.capture_dir).expanduser() if self.hparams.capture_dir else default_capture_dir()
        return root / self.capture_key(model_fingerprint, rope_blocks)[:16]

    def stream_shards(self, directory: Path, num_batches: int, exact_epochs: int = 0) -> None:
        """Record the captured shards to train on, the training batches per epoch and the leading single-pass
        (statistics) epochs, see :class:`~kvlight.calibration.shards.KVShardStream`."""
        self._kv_shards = (Path(directory), num_batches, exact_epochs)

    def all_calibration_windows(self) -> torch.Tensor:
        """Every calibration window ``[calibration_samples, seq_len]``, whatever this process's share."""
        self.setup()
        assert self._calibration_windows is not None
        return self._calibration_windows

    def calibration_indices(self) -> list[int]:
        """Indices (into all calibration windows) of the windows :meth:`calibration_windows` returns on this rank."""
        self.setup()
        assert self._calibration_windows is not None
        return shard_for_rank(self._calibration_windows.shape[0], *self.rank_and_world_size())

    def train_dataloader(self) -> DataLoader:
        """Captured K/V mini-batches from :class:`~kvlight.calibration.shards.KVShardStream`, already batched.

        Raises:
            CaptureError: :meth:`stream_shards` was not called.
        """
        if self._kv_shards is None:
            raise CaptureError(
                "training needs captured K/V but none were set; fit with KVCalibrationModule (its CaptureKV callback "
                "captures them) or call datamodule.stream_shards(...) before training starts"
            )
        directory, num_batches, exact_epochs = self._kv_shards
        hp = self.hparams
        self.kv_stream = KVShardStream(directory, hp.kv_batch_size, num_batches, hp.seed, exact_epochs)
        return ResumableKVLoader(self.kv_stream, num_workers=hp.num_workers)
