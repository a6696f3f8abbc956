"""Shared pieces of the benchmarks: the embedded default, offline windows, chunked perplexity, calibration."""

from __future__ import annotations

import ast
import contextlib
import fcntl
import importlib
import inspect
import math
import platform
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from kvlight.calibration.capture import capture_kv
from kvlight.calibration.texts import builtin_documents
from kvlight.calibration.windows import pack_windows
from kvlight.compressors.compressor import KVCompressor
from kvlight.config import CompressionConfig
from kvlight.geometry import kv_geometry
from kvlight.hf import cache_kwargs
from kvlight.models import load_model, load_tokenizer


def machine() -> str:
    """One line naming the machine a number was measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        model = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next((ln.split(":", 1)[1].strip() for ln in model.splitlines() if ln.startswith("Model name")), cpu)
    except OSError:
        name = cpu
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({name}), {torch.get_num_threads()} threads"
    )
    return f"{device}; torch {torch.__version__}; python {sys.version.split()[0]}"


@contextlib.contextmanager
def results_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on a results file while it is read, merged and written.

    Two benchmarks run side by side with ``--merge`` (each fitting its own rows for many minutes) would otherwise
    both read the old table and the one that writes last would drop the other's rows.
    """
    with open(path.with_name(f".{path.name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prose_documents() -> list[str]:
    """Docstrings (300+ characters, mostly words) of the standard library's top-level modules, in file order."""
    documents = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text and len(text) >= 300 and sum(c.isalpha() or c.isspace() for c in text) > 0.85 * len(text):
                    documents.append(text)
    return documents


#: the standard-library modules :func:`docstring_documents` reads: pure Python, importable on every platform, sorted.
DOCSTRING_MODULES = (
    "argparse", "ast", "base64", "calendar", "cmd", "code", "collections", "configparser", "contextlib", "csv",
    "dataclasses", "difflib", "email.message", "email.utils", "enum", "fileinput", "fractions", "ftplib", "functools",
    "gettext", "glob", "gzip", "http.client", "http.server", "inspect", "ipaddress", "json", "logging",
    "logging.handlers", "mailbox", "optparse", "pathlib", "pprint", "random", "shlex", "shutil", "smtplib",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing", "unittest",
    "urllib.parse", "urllib.request", "uuid", "zipfile",
)  # fmt: skip


def docstring_documents(modules: tuple[str, ...] = DOCSTRING_MODULES) -> list[str]:
    """``inspect.getdoc`` of each module in ``modules`` (sorted) and of its public classes and functions (those it
    defines, by sorted name, each class's public methods after it), non-empty and each text once.

    Deterministic for a given Python version (the docstrings are the running interpreter's): a text no calibration
    reads (kvlight's built-in corpus is CPython's pydoc topics, not these docstrings).
    """
    documents: dict[str, None] = {}

    def add(obj) -> None:
        text = inspect.getdoc(obj)
        if text and text.strip():
            documents.setdefault(text.strip())

    for name in sorted(modules):
        module = importlib.import_module(name)
        add(module)
        for attr in sorted(vars(module)):
            obj = vars(module)[attr]
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue  # private, or re-exported from another module
            if inspect.isfunction(obj):
                add(obj)
            elif inspect.isclass(obj):
                add(obj)
                for method in sorted(vars(obj)):
                    member = vars(obj)[method]
                    if not method.startswith("_") and inspect.isfunction(member):
                        add(member)
    return list(documents)


def prose_tokens(tokenizer) -> torch.Tensor:
    return torch.tensor(tokenizer("\n\n".join(prose_documents()), add_special_tokens=False).input_ids)


def offline_windows(tokenizer, seq_len: int, skip: int, count: int) -> torch.Tensor:
    """Windows ``[count, seq_len]`` of the built-in corpus, after ``skip`` windows of the same length."""
    windows = list(pack_windows(builtin_documents(), tokenizer, seq_len, skip=skip, limit=count))
    return torch.stack(windows)


def embedded_default(dtype: torch.dtype):
    """(model, tokenizer, geometry) of the embedded default."""
    model = load_model(None, dtype)
    return model, load_tokenizer(None), kv_geometry(model)


@torch.no_grad()
def chunked_perplexity(
    model, windows: torch.Tensor, make_cache: Callable[[], object] | None, chunk: int = 64, batch: int = 4
) -> tuple[float, list[object]]:
    """Perplexity with each window fed in chunks through a fresh cache per batch.

    Returns ``(perplexity, [(cache, batch_size), ...])``.
    """
    nll, count, caches = 0.0, 0, []
    for i in range(0, len(windows), batch):
        x = windows[i : i + batch]
        cache = make_cache() if make_cache else None
        for s in range(0, x.shape[1], chunk):
            out = model(input_ids=x[:, s : s + chunk], **cache_kwargs(cache))
            # Scored chunk by chunk: position p predicts token p + 1 (the last window token predicts nothing). Why
            # not all logits at once: 4 x 2048 positions of Gemma 3's 262k-token vocabulary are 8.6 GB in float32.
            targets = x[:, s + 1 : s + chunk + 1]
            logp = torch.log_softmax(out.logits[:, : targets.shape[1]].float(), -1)
            nll += -logp.gather(-1, targets[..., None]).sum().item()
            count += targets.numel()
        caches.append((cache, x.shape[0]))
    return math.exp(nll / count), caches


def captured_rows(
    model, geometry, windows: torch.Tensor, capacity: int = 10_000, queries=None, rope_blocks=()
) -> dict[str, torch.Tensor]:
    """K/V rows ``[N, L, H, D]`` of the calibration windows, keys pre-RoPE (relative to their RoPE block where
    ``rope_blocks`` says so, per layer), and, with a QueryMoments, query moments."""
    start = time.perf_counter()
    batches = [windows[i : i + 4] for i in range(0, len(windows), 4)]
    reservoir = capture_kv(model, geometry, batches, capacity, queries=queries, rope_blocks=rope_blocks)
    keys, values = reservoir.rows()
    print(f"captured {keys.shape[0]} rows in {time.perf_counter() - start:.1f}s", flush=True)
    return {"keys": keys, "values": values}


def fitted_pca(config: CompressionConfig, geometry, rows: dict[str, torch.Tensor], dtype: torch.dtype) -> KVCompressor:
    """A PCA compressor for ``config`` fitted on ``rows`` (float64 statistics)."""
    compressor = KVCompressor(config, geometry, algo="pca")
    compressor.fit_statistics([rows])
    return compressor.to(dtype)


def fitted_query_weighted(
    config: CompressionConfig, geometry, rows: dict[str, torch.Tensor], key_weights: torch.Tensor, dtype: torch.dtype
) -> KVCompressor:
    """KVSplice heads at their closed-form start: keys query-weighted (``key_weights [L, H, D, D]``), values PCA."""
    compressor = KVCompressor(config, geometry, algo="kvsplice", options={"kvsplice": {"latent_affine": False}})
    compressor.fit_statistics([rows], key_weights=key_weights)
    return compressor.to(dtype)


def quantized_cache_bytes(cache, geometry, batch: int, group: int = 64) -> int:
    """Bytes an HF QuantizedCache holds: codes + fp16 scale and zero per group + exact residual tokens."""
    total = 0
    heads, dim = geometry.num_kv_heads, geometry.head_dim
    for layer in cache.layers:
        residual = 0 if layer.keys is None or layer.keys.dim() != 4 else layer.keys.shape[-2]
        quantized_values = batch * heads * (layer.cumulative_length - residual) * dim
        total += 2 * (quantized_values * layer.nbits // 8 + (quantized_values // group) * 4)
        total += 2 * batch * heads * residual * dim * 2
    return total


def held_bytes(cache) -> int:
    """Bytes of the K/V tensors a DynamicCache holds."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
