"""Calibration and evaluation text: a source (built-in, local files, a hub dataset) -> documents."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvlight.errors import DataLoadError

if TYPE_CHECKING:
    pass


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
        offline = (
            "" if os.environ.get("HF_DATASETS_OFFLINE") else " (offline? set HF_DATASETS_OFFLINE=1 to fail at once)"
        )
        raise DataLoadError(
            f"could not load {where} from the hub: {_short_reason(error)}; {_SOURCE_HINT}{offline}"
        ) from error
    return _rows(stream, text_field, f"{where} from the hub", _SOURCE_HINT)


def source_fingerprint(dataset: str) -> list | str | None:
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
