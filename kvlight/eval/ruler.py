"""RULER's synthetic tasks offline: which build their data from the tokenizer alone, and what they need to run.

lm-eval's RULER tasks generate their prompts from the model's tokenizer at each length of the task metadata's
``max_seq_lengths`` (:func:`ruler_metadata`). Five need nothing else (:data:`OFFLINE_TASKS`); five build their
haystack from Paul Graham's essays on the hub (:data:`HUB_TASKS`), which :func:`check_hub_tasks` loads first so an
unreachable hub is one line, not a traceback halfway through a run.

lm-eval's ``prepare_niah`` downloads nltk's ``punkt_tab`` when it is imported (it splits the essays into sentences);
offline that download fails after printing an error. :func:`offline_ruler` is the scope in which kvlight builds RULER
tasks: with ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set and ``punkt_tab`` not installed, no download is tried, and
while ``punkt_tab`` is missing the essays are split by :func:`split_sentences`. Both are undone when the scope ends;
importing kvlight or kvlight.eval changes nothing.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Iterator

from kvlight.errors import KVLightError

#: RULER tasks whose data comes from the tokenizer alone (repeated or needle haystack, variable tracking, common words).
OFFLINE_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe")
#: RULER tasks that build their haystack from a hub dataset, and that dataset.
HUB_TASKS = {
    name: "baber/paul_graham_essays"
    for name in ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery")
}
#: the short names the issue and RULER's paper use for lm-eval's task names.
ALIASES = {"vt": "ruler_vt", "cwe": "ruler_cwe", "fwe": "ruler_fwe", "qa_squad": "ruler_qa_squad"}


def task_name(name: str) -> str:
    """lm-eval's name of a task (``vt`` is ``ruler_vt``)."""
    return ALIASES.get(name, name)


def is_ruler(name: str) -> bool:
    """Whether a task generates its data per length of ``max_seq_lengths`` (the RULER tasks)."""
    return name.startswith(("niah_", "ruler_"))


def offline() -> bool:
    """Whether the Hugging Face offline switches are set (the project's convention for 'no network')."""
    return any(
        os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def tokenizer_path(tokenizer) -> str:
    """A path or hub id ``AutoTokenizer.from_pretrained`` loads ``tokenizer`` from (what RULER sizes prompts with)."""
    path = getattr(tokenizer, "name_or_path", None)
    if not path:
        raise KVLightError("RULER tasks need a tokenizer loaded from a path or hub id (its name_or_path is empty)")
    return str(path)


def ruler_metadata(tokenizer, lengths) -> dict:
    """The task metadata RULER reads: the tokenizer (a loaded one, or a name :func:`kvlight.models.load_tokenizer`
    loads; None: the embedded default) and the prompt lengths in tokens."""
    if tokenizer is None or isinstance(tokenizer, str):
        from kvlight.models import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    return {"tokenizer": tokenizer_path(tokenizer), "max_seq_lengths": [int(length) for length in lengths]}


def check_hub_tasks(names) -> None:
    """Load the hub dataset of every task of :data:`HUB_TASKS` in ``names``; one line when it cannot be reached."""
    for name in names:
        dataset = HUB_TASKS.get(task_name(name))
        if dataset is None:
            continue
        import datasets

        try:
            datasets.load_dataset(dataset, split="train")
        except (OSError, ValueError) as exc:  # ConnectionError, DatasetNotFoundError (a FileNotFoundError), ...
            reason = "offline: HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set" if offline() else first_line(exc)
            raise KVLightError(
                f"task {name} builds its haystack from the hub dataset {dataset}, which could not be loaded "
                f"({reason}); run it where the hub is reachable, or choose a task that needs no download: "
                f"{', '.join(OFFLINE_TASKS)}"
            ) from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``, split after ``.``, ``!`` or ``?`` and the quotes or brackets that close them: what
    RULER's essay haystack needs (where a needle may go) when nltk's punkt_tab is not installed."""
    return [part.strip() for part in _SENTENCE_END.split(text.strip()) if part.strip()]


def _punkt_installed(nltk) -> bool:
    try:
        nltk.data.find("tokenizers/punkt_tab")
        return True
    except LookupError:
        return False


@contextlib.contextmanager
def offline_ruler() -> Iterator[None]:
    """The scope in which RULER tasks are built: no punkt download tried offline, :func:`split_sentences` while
    punkt_tab is missing (see the module docstring). Outside it lm-eval and nltk are as they were."""
    try:
        import nltk
    except ImportError:  # no nltk: lm-eval's own error names its ruler extra when a RULER task is built
        yield
        return
    if _punkt_installed(nltk):
        yield
        return
    download = nltk.download
    if offline():
        nltk.download = _no_download
    prepare = sentences = None
    try:
        # Imported here: it tries the punkt_tab download on import (and prints that it downloaded, even when it did not).
        quiet = contextlib.redirect_stdout(io.StringIO()) if offline() else contextlib.nullcontext()
        try:
            with quiet:
                import lm_eval.tasks.ruler.prepare_niah as prepare
        except ImportError:
            prepare = None
        if prepare is not None and not _punkt_installed(nltk):
            sentences = prepare.sent_tokenize
            prepare.sent_tokenize = split_sentences
            prepare.cached_sent_tokenize.cache_clear()
        yield
    finally:
        nltk.download = download
        if prepare is not None and sentences is not None:
            prepare.sent_tokenize = sentences
            prepare.cached_sent_tokenize.cache_clear()


def _no_download(*args, **kwargs) -> bool:
    """nltk.download offline: nothing tried, nothing printed, nothing downloaded."""
    return False
