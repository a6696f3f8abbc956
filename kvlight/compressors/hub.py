"""Compressors on the Hugging Face Hub, shared like PEFT adapters: a repository holds what ``save_pretrained`` writes
(``compressor.safetensors``, ``compressor_config.json``) and a ``README.md`` model card (kvlight.compressors.card).

:func:`resolve` turns a local directory or a repo id into a directory to load (a local directory never touches the
network); :func:`push_directory` uploads a saved compressor directory. Every failure the network, the hub or the id
can cause is one line, a :class:`~kvlight.errors.HubError` naming the id and saying what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

from kvlight.compressors.artefacts import CONFIG_NAME, WEIGHTS_NAME
from kvlight.compressors.card import CARD_NAME
from kvlight.errors import HubError, KVLightError

#: the files of a compressor repository (anything else there, e.g. .gitattributes, is not downloaded).
FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


def check_repo_id(repo_id: str, what: str) -> None:
    """Refuse (one line) a string that is not a hub repo id (``name`` or ``owner/name``); ``what`` says where it was
    meant to go, e.g. "no directory of that name exists and it is not a hub repo id"."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise HubError(
            f"{repo_id!r}: {what}; a repo id is owner/name of letters, digits, '-', '_' and '.', such as me/smollm2-kv"
        ) from None


def resolve(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """The directory holding the compressor ``path_or_repo_id`` names: a local directory as it is (offline), else a
    hub repo id downloaded (or found in the hub cache) with ``huggingface_hub.snapshot_download``.

    Raises:
        HubError: neither an existing directory nor a valid repo id; the hub cannot be reached and the repo is not
            cached; no such repo or revision (or no access); the repo holds no compressor.
    """
    repo_id = str(path_or_repo_id)
    if not repo_id.strip():  # Path("") is the working directory
        raise HubError("an empty name names no compressor; pass the directory save_pretrained wrote, or a hub repo id")
    if Path(path_or_repo_id).is_dir():
        return Path(path_or_repo_id)
    if Path(repo_id).exists():
        raise HubError(f"{repo_id} is a file; pass the directory save_pretrained wrote, or a hub repo id")
    check_repo_id(repo_id, "no directory of that name exists, and it is not a Hugging Face Hub repo id either")
    import huggingface_hub
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        directory = huggingface_hub.snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=bool(local_files_only),
            allow_patterns=list(FILES),
        )
    except LocalEntryNotFoundError:
        why = (
            "local_files_only is set"
            if local_files_only
            else "HF_HUB_OFFLINE is set"
            if _offline()
            else "the Hugging Face Hub cannot be reached"
        )
        raise HubError(
            f"{repo_id!r} is not a local directory, {why} and the hub cache does not hold it; pass the directory "
            "save_pretrained wrote, or go online (unset HF_HUB_OFFLINE) to download it"
        ) from None
    except GatedRepoError:
        raise HubError(
            f"{repo_id!r} on the Hugging Face Hub is gated: accept its terms on the hub and log in (hf auth login) "
            "or pass token="
        ) from None
    except RepositoryNotFoundError:
        raise HubError(
            f"{repo_id!r} is neither a local directory nor a Hugging Face Hub repository this account can read; "
            "check the id, or log in (hf auth login) or pass token= for a private repository"
        ) from None
    except RevisionNotFoundError:
        raise HubError(f"{repo_id!r} on the Hugging Face Hub has no revision {revision!r}; check revision=") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise HubError(
            f"cannot download {repo_id!r} from the Hugging Face Hub: {_first_line(exc)}; retry, or pass the "
            "directory save_pretrained wrote"
        ) from None
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        raise HubError(
            f"{repo_id!r} on the Hugging Face Hub holds no {CONFIG_NAME}: it is not a kvlight compressor repository"
        )
    return directory


def push_directory(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload the compressor directory ``directory`` (what ``save_pretrained`` wrote, with its ``README.md`` model
    card) to the hub repository ``repo_id``, created if missing; returns the repository's URL.

    A directory without a card is refused: ``KVCompressor.from_pretrained(directory).push_to_hub(repo_id)`` writes one
    from what the compressor records (this module moves files; it does not build compressors).

    Raises:
        KVLightError: ``directory`` is not a compressor directory, or has no model card.
        HubError: not a repo id, offline, no token or no write access, or the upload failed.
    """
    directory = Path(directory)
    if not all((directory / name).is_file() for name in (WEIGHTS_NAME, CONFIG_NAME)):
        raise KVLightError(
            f"{directory} holds no {WEIGHTS_NAME} and {CONFIG_NAME}: pass the directory save_pretrained wrote"
        )
    check_repo_id(repo_id, "not a Hugging Face Hub repo id to push to")
    if _offline():
        raise HubError(f"pushing to {repo_id!r} needs the network, but HF_HUB_OFFLINE is set; unset it")
    if not (directory / CARD_NAME).is_file():
        raise KVLightError(
            f"{directory} has no {CARD_NAME} model card: push it with "
            f"KVCompressor.from_pretrained({str(directory)!r}).push_to_hub({repo_id!r}), which writes one"
        )
    return _upload(directory, repo_id, private, token, commit_message)


def _upload(directory: Path, repo_id: str, private: bool | None, token, commit_message: str | None) -> str:
    """``create_repo(exist_ok=True)`` then ``upload_folder`` of the compressor files; the repo's URL."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    api = huggingface_hub.HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(directory),
            allow_patterns=list(FILES),
            commit_message=commit_message or "Upload kvlight compressor",
        )
    except LocalTokenNotFoundError:
        raise HubError(f"pushing to {repo_id!r} needs a token: log in with 'hf auth login' or pass token=") from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        hint = "log in with 'hf auth login' or pass a token with write access" if status in (401, 403) else "retry"
        raise HubError(f"cannot push to {repo_id!r} on the Hugging Face Hub: {_first_line(exc)}; {hint}") from None
    except (OSError, ValueError) as exc:  # no connection (ConnectionError is an OSError), a refused argument
        raise HubError(
            f"cannot push to {repo_id!r} on the Hugging Face Hub: {_first_line(exc)}; check the network and retry"
        ) from None
    return str(url)
