"""Calibration and evaluation text: sources -> documents -> fixed-length token windows -> a LightningDataModule.

The token stream of a source is cut into consecutive windows; the first ``eval_samples`` windows are the
evaluation set and the next ``calibration_samples`` the calibration set, so the two never overlap and are the
same on every run and every rank. Each DDP rank then takes its own ``rank::world_size`` share of both.
"""

import hashlib
import json
import math
import os
import platform
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from kvlight.errors import CaptureError, DataLoadError
from kvlight.shards import KVShardStream

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BUILTIN_CORPUS = "builtin"
BUILTIN_ALIASES = frozenset({BUILTIN_CORPUS, "pydoc", "offline"})
# Extension -> datasets packaged builder; local files stream through the same machinery as hub datasets.
_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_DEFAULT_CONFIGS = {"wikitext": "wikitext-2-raw-v1", "Salesforce/wikitext": "wikitext-2-raw-v1"}
_SOURCE_HINT = (
    "use a local file (e.g. --calibration-dataset path/to/text.txt) or the built-in corpus "
    "(--calibration-dataset builtin)"
)


def builtin_documents() -> list[str]:
    """CPython's offline documentation prose, always available without a network.

    Returns:
        The values of ``pydoc_data.topics.topics`` in sorted key order (about 80 documents, >400k characters).

    Raises:
        DataLoadError: This Python install ships without ``pydoc_data``.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as error:
        raise DataLoadError(
            "the built-in corpus needs CPython's pydoc_data module, which this Python install lacks; use a local "
            "file (e.g. --calibration-dataset path/to/text.txt)"
        ) from error
    return [topics[key] for key in sorted(topics)]


def _short_reason(error: BaseException) -> str:
    # Library errors can span many lines (tracebacks, retry logs); the CLI prints one line.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return reason if len(reason) <= 200 else reason[:197] + "..."


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name", so one "/" alone does not make a path (os.sep is "/" on POSIX).
    if Path(name).suffix.lower() in _BUILDERS:
        return True
    if name.startswith(("/", ".", "~")) or "\\" in name:
        return True
    return name.count("/") > 1


def _local_files(path: Path) -> tuple[str, list[Path]]:
    """The datasets builder and the files for a local file or directory (directories are searched recursively)."""
    if path.is_dir():
        files = sorted(
            file
            for file in path.rglob("*")
            if file.is_file()
            and file.suffix.lower() in _BUILDERS
            and not any(part.startswith(".") for part in file.relative_to(path).parts)
        )
        if not files:
            raise DataLoadError(
                f"directory {path} holds no .txt, .text, .json, .jsonl or .parquet files; point "
                "--calibration-dataset at a directory or file with text"
            )
        suffixes = sorted({file.suffix.lower() for file in files})
        builders = {_BUILDERS[suffix] for suffix in suffixes}
        if len(builders) > 1:
            raise DataLoadError(
                f"directory {path} mixes file types ({', '.join(suffixes)}); keep one type per directory or point "
                "--calibration-dataset at a single file"
            )
        return builders.pop(), files
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataLoadError(
            f"unsupported file type '{path.suffix or '(none)'}' for {path}; use a .txt, .text, .json, .jsonl or "
            ".parquet file"
        )
    return builder, [path]


def _rows(dataset: Iterable[dict[str, Any]], text_field: str, where: str, hint: str) -> Iterator[str]:
    """Non-blank values of ``text_field``; errors raised while streaming become one-line DataLoadErrors."""
    columns = getattr(dataset, "column_names", None)  # None when a streaming builder only knows them per row
    if columns is not None and text_field not in columns:
        raise DataLoadError(
            f"{where} has no '{text_field}' column (columns: {', '.join(columns)}); pass the text column with "
            "--text-field"
        )
    try:
        iterator = iter(dataset)
    except Exception as error:
        raise DataLoadError(f"could not read {where}: {_short_reason(error)}; {hint}") from error
    while True:
        # Only the datasets call is guarded, so the consumer's own exceptions are not rewrapped.
        try:
            row = next(iterator)
        except StopIteration:
            return
        except Exception as error:
            raise DataLoadError(f"could not read {where}: {_short_reason(error)}; {hint}") from error
        if text_field not in row:
            raise DataLoadError(
                f"{where} has no '{text_field}' column (columns: {', '.join(row)}); pass the text column with "
                "--text-field"
            )
        text = row[text_field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataLoadError(
                f"column '{text_field}' of {where} holds {type(text).__name__} values, not text; pass a text "
                "column with --text-field"
            )
        if text.strip():
            yield text


def iter_texts(
    dataset: str,
    config: str | None = None,
    split: str = "train",
    text_field: str = "text",
) -> Iterator[str]:
    """Stream the non-blank documents of a text source.

    The source is opened when this is called (so a bad source fails here) and read lazily while iterating.

    Args:
        dataset: One of
            - ``"builtin"`` (aliases ``"pydoc"``, ``"offline"``): :func:`builtin_documents`;
            - an existing local file or directory: ``.txt``/``.text`` (one document per blank-line separated
              paragraph), ``.json``/``.jsonl`` or ``.parquet``; a directory contributes all such files inside it,
              recursively, which must share one format. Read with ``datasets.load_dataset(..., streaming=True)``;
            - otherwise a hub dataset id (``"name"`` or ``"owner/name"``), streamed with
              ``datasets.load_dataset(dataset, config, split=split, streaming=True)``.
        config: Hub dataset config; ``"wikitext"`` without one means ``"wikitext-2-raw-v1"``.
        split: Hub dataset split (local files have a single split).
        text_field: Column holding the text (rows of ``.txt`` files have only ``"text"``).

    Returns:
        An iterator over documents, blank ones skipped.

    Raises:
        DataLoadError: The source is missing, unsupported or unreachable, or has no ``text_field`` column.
    """
    if dataset.strip().lower() in BUILTIN_ALIASES:
        return (text for text in builtin_documents() if text.strip())

    path = Path(dataset).expanduser()
    if path.exists():
        builder, files = _local_files(path)
        import datasets  # deferred: importing datasets takes a second and only data loading needs it

        hint = "check the file's format, or use the built-in corpus (--calibration-dataset builtin)"
        # Paragraphs rather than lines: lines would put an EOS after every line break of ordinary prose.
        options = {"sample_by": "paragraph"} if builder == "text" else {}
        try:
            stream = datasets.load_dataset(
                builder,
                data_files={"train": [str(file) for file in files]},
                split="train",
                streaming=True,
                **options,
            )
        except Exception as error:
            raise DataLoadError(
                f"could not load {path} with the datasets '{builder}' builder: {_short_reason(error)}; {hint}"
            ) from error
        return _rows(stream, text_field, str(path), hint)

    if _looks_like_path(dataset):
        raise DataLoadError(
            f"no such file or directory: {path}; check the path given to --calibration-dataset, or use the "
            "built-in corpus (--calibration-dataset builtin)"
        )

    import datasets  # deferred, as above

    config = config or _DEFAULT_CONFIGS.get(dataset)
    where = (
        f"dataset '{dataset}' (config '{config}', split '{split}')"
        if config
        else f"dataset '{dataset}' (split '{split}')"
    )
    try:
        stream = datasets.load_dataset(dataset, config, split=split, streaming=True)
    except Exception as error:
        raise DataLoadError(f"could not load {where} from the hub: {_short_reason(error)}; {_SOURCE_HINT}") from error
    return _rows(stream, text_field, f"{where} from the hub", _SOURCE_HINT)


def _pack(
    texts: Iterable[str],
    tokenizer: "PreTrainedTokenizerBase",
    seq_len: int,
    skip: int,
    limit: int | None,
) -> Iterator[torch.Tensor]:
    end = None if limit is None else skip + limit
    if end is not None and end <= skip:
        return
    separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    buffer: list[int] = []
    cut = 0  # windows cut so far, skipped ones included
    for number, text in enumerate(texts):
        if number:
            buffer.extend(separator)
        # verbose=False: documents longer than model_max_length are expected here; windows bound the length.
        buffer.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        full = len(buffer) // seq_len
        for start in range(0, full * seq_len, seq_len):
            if cut >= skip:
                yield torch.tensor(buffer[start : start + seq_len], dtype=torch.long)
            cut += 1
            if end is not None and cut >= end:
                return  # before pulling another document: the source is read no further than needed
        # One slice per document keeps packing linear in the stream length, even for huge documents.
        del buffer[: full * seq_len]


def pack_windows(
    texts: Iterable[str],
    tokenizer: "PreTrainedTokenizerBase",
    seq_len: int,
    skip: int = 0,
    limit: int | None = None,
) -> Iterator[torch.Tensor]:
    """Cut a stream of documents into consecutive, non-overlapping windows of ``seq_len`` tokens.

    Documents are tokenized one at a time without special tokens and joined by ``tokenizer.eos_token_id`` (or
    directly when the tokenizer has none). A trailing partial window is dropped. Documents are pulled from
    ``texts`` only while more windows are needed.

    Args:
        texts: Documents.
        tokenizer: A Hugging Face tokenizer.
        seq_len: Tokens per window.
        skip: Windows to drop from the start of the stream.
        limit: Windows to yield after the skipped ones; ``None`` for all.

    Returns:
        An iterator over LongTensors ``[seq_len]``.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if skip < 0 or (limit is not None and limit < 0):
        raise ValueError(f"skip and limit must be >= 0, got skip={skip}, limit={limit}")
    return _pack(texts, tokenizer, seq_len, skip, limit)


def eval_and_calibration_windows(
    texts_factory: Callable[[], Iterable[str]],
    tokenizer: "PreTrainedTokenizerBase",
    seq_len: int,
    eval_samples: int,
    calibration_samples: int,
    *,
    source_name: str = "the text source",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation and calibration windows from one pass over a fresh document stream.

    Windows ``[0, eval_samples)`` of the stream are for evaluation and ``[eval_samples, eval_samples +
    calibration_samples)`` for calibration: disjoint, and identical on every call for the same source.

    Args:
        texts_factory: Returns a new iterable of documents each time it is called.
        tokenizer: A Hugging Face tokenizer.
        seq_len: Tokens per window.
        eval_samples: Number of evaluation windows ``E``.
        calibration_samples: Number of calibration windows ``C``.
        source_name: How error messages name the source.

    Returns:
        ``(eval_windows, calibration_windows)``: LongTensors ``[E, seq_len]`` and ``[C, seq_len]``.

    Raises:
        DataLoadError: The source holds fewer than ``E + C`` windows.
    """
    if eval_samples < 0 or calibration_samples < 0:
        raise ValueError(f"sample counts must be >= 0, got {eval_samples} and {calibration_samples}")
    wanted = eval_samples + calibration_samples
    windows = list(pack_windows(texts_factory(), tokenizer, seq_len, limit=wanted))
    if len(windows) < wanted:
        raise DataLoadError(
            f"{source_name} holds only {len(windows)} windows of {seq_len} tokens but {wanted} are needed "
            f"({eval_samples} evaluation + {calibration_samples} calibration); lower --eval-samples/"
            "--calibration-samples or --seq-len, or use a larger dataset"
        )
    stacked = torch.stack(windows) if windows else torch.empty((0, seq_len), dtype=torch.long)
    return stacked[:eval_samples].clone(), stacked[eval_samples:].clone()


def shard_for_rank(n: int, rank: int, world_size: int) -> list[int]:
    """Indices of the ``n`` items one rank handles: ``rank::world_size``.

    Across ranks ``0..world_size-1`` every index appears exactly once (ranks may differ by one item).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(range(rank, n, world_size))


def default_capture_dir() -> Path:
    """``$KVLIGHT_CACHE/captures`` if ``KVLIGHT_CACHE`` is set, else ``~/.cache/kvlight/captures``."""
    root = os.environ.get("KVLIGHT_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "kvlight"
    return base / "captures"


def _source_fingerprint(dataset: str) -> list | str | None:
    """What identifies a source's content beyond its name, so an edited local file is captured again."""
    if dataset.strip().lower() in BUILTIN_ALIASES:
        return f"python-{platform.python_version()}"  # pydoc topics change between Python releases
    path = Path(dataset).expanduser()
    if not path.exists():
        return None  # hub datasets: the name, config and split are all that is known offline
    try:
        _, files = _local_files(path)
        return [[str(file.resolve()), file.stat().st_size, file.stat().st_mtime_ns] for file in files]
    except (DataLoadError, OSError):
        return None


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
    LightningModule captured from :meth:`calibration_windows` (see :meth:`set_kv_shards`).

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

    def __init__(
        self,
        model: str | None = None,
        dataset: str = BUILTIN_CORPUS,
        dataset_config: str | None = None,
        split: str = "train",
        text_field: str = "text",
        seq_len: int = 512,
        calibration_samples: int = 16,
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
        positive = {
            "--seq-len": seq_len,
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
        if self.tokenizer is None:
            from kvlight.models import load_tokenizer  # deferred: models imports transformers model code

            self.tokenizer = load_tokenizer(self.hparams.model)
        hp = self.hparams
        self._eval_windows, self._calibration_windows = eval_and_calibration_windows(
            lambda: iter_texts(hp.dataset, hp.dataset_config, hp.split, hp.text_field),
            self.tokenizer,
            hp.seq_len,
            hp.eval_samples,
            hp.calibration_samples,
            source_name=f"dataset '{hp.dataset}'",
        )

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

    def capture_key(self, model_fingerprint: str) -> str:
        """sha256 hex digest identifying one rank's K/V capture.

        Covers the model fingerprint, every setting that changes which tokens are captured, this rank and world
        size, and for local files their paths, sizes and modification times (an edited file is captured again).
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
            "source": _source_fingerprint(hp.dataset),
        }
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def capture_path(self, model_fingerprint: str) -> Path:
        """Directory of this rank's K/V capture: ``capture_dir / capture_key(...)[:16]``."""
        root = Path(self.hparams.capture_dir).expanduser() if self.hparams.capture_dir else default_capture_dir()
        return root / self.capture_key(model_fingerprint)[:16]

    def set_kv_shards(self, directory: Path, num_batches: int, exact_epochs: int = 0) -> None:
        """Record the captured shards to train on, the training batches per epoch and the leading single-pass
        (statistics) epochs, see :class:`~kvlight.shards.KVShardStream`."""
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
        """Captured K/V mini-batches from :class:`~kvlight.shards.KVShardStream`, already batched.

        Raises:
            CaptureError: :meth:`set_kv_shards` was not called.
        """
        if self._kv_shards is None:
            raise CaptureError(
                "training needs captured K/V but none were set; the LightningModule must capture them and call "
                "datamodule.set_kv_shards(...) before training starts"
            )
        directory, num_batches, exact_epochs = self._kv_shards
        hp = self.hparams
        self.kv_stream = KVShardStream(directory, hp.kv_batch_size, num_batches, hp.seed, exact_epochs)
        return ResumableKVLoader(self.kv_stream, num_workers=hp.num_workers)
