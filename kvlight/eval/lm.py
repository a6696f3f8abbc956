"""``KVLightLM``: an lm-evaluation-harness model whose every prompt goes through a chosen KV cache in chunks.

Registered as ``kvlight`` when :mod:`kvlight.eval` is imported::

    lm_eval.simple_evaluate(model="kvlight", model_args="pretrained=DIR,cache=kvlight,compressor_path=OUT", ...)

The caches (:data:`CACHES`): ``kvlight`` (the compressor of ``compressor_path``, served through
``kvlight.compress``), ``dynamic`` (transformers' DynamicCache, the uncompressed reference) and ``quanto-int4`` /
``quanto-int2`` (transformers' QuantizedCache, group 64, the last 16 tokens exact). A prompt is fed ``prefill_chunk``
tokens at a time (default 64), so every chunk after the first attends to what the cache stored, not to the exact
prefill: quanto's first update returns the exact K/V, and a one-shot prefill would flatter it as much as kvlight.
"""

from __future__ import annotations

import os

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.models.utils_hf import stop_sequences_criteria
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn
from tqdm import tqdm

from kvlight.errors import ConfigError
from kvlight.hf import cache_kwargs, dynamic_cache, quantized_cache
from kvlight.serving.wrapper import positions_from_mask

#: every cache ``cache=`` names, and what it is.
CACHES = {
    "kvlight": "kvlight's compressed cache (the compressor of compressor_path)",
    "dynamic": "transformers' DynamicCache, uncompressed",
    "quanto-int4": "transformers' QuantizedCache, quanto int4, group 64, last 16 tokens exact",
    "quanto-int2": "transformers' QuantizedCache, quanto int2, group 64, last 16 tokens exact",
}
#: bits of the quanto caches.
_QUANTO_BITS = {"quanto-int4": 4, "quanto-int2": 2}


def check_cache_names(names, compressor_path) -> None:
    """Refuse, with one line, a cache name :data:`CACHES` does not hold, or ``kvlight`` without a compressor."""
    unknown = [name for name in names if name not in CACHES]
    if unknown:
        raise ConfigError(f"unknown cache {', '.join(map(repr, unknown))}; the caches are {', '.join(CACHES)}")
    if "kvlight" in names and compressor_path is None:
        raise ConfigError(
            "the kvlight cache needs a compressor: give compressor_path (a directory kvlight calibrate wrote, or a "
            "hub repo id), or choose another cache"
        )


@register_model("kvlight")
class KVLightLM(TemplateLM):
    """A causal LM evaluated through one KV cache: log-likelihoods, rolling log-likelihoods and generation.

    Args:
        pretrained: the model: a name :func:`kvlight.models.load_model` loads (hub id, directory, ``.gguf`` file;
            None or ``embedded`` for the embedded default), or a loaded causal LM.
        compressor_path: the compressor of the ``kvlight`` cache: a directory ``save_pretrained`` wrote, a hub repo
            id, or a fitted :class:`~kvlight.compressors.compressor.KVCompressor`.
        cache: which cache attention reads from, a key of :data:`CACHES`.
        prefill_chunk: tokens fed per forward while a prompt fills the cache.
        batch_size: prompts per forward (log-likelihoods right-padded, generation left-padded).
        max_length: the longest input in tokens (default: the model's ``max_position_embeddings``); longer inputs
            keep their last tokens.
        max_gen_toks: tokens generated when a request does not say.
        dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (bfloat16 where native) for a model loaded by name.
        device: where the model runs (default: cuda when available, else cpu).
        tokenizer: the tokenizer (a name or path :func:`kvlight.models.load_tokenizer` loads, or a tokenizer);
            default: the model's.
    """

    def __init__(
        self,
        pretrained: str | nn.Module | None = None,
        compressor_path: str | os.PathLike | object | None = None,
        cache: str = "kvlight",
        prefill_chunk: int = 64,
        batch_size: int | str = 1,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        dtype: str = "float32",
        device: str | None = None,
        tokenizer: str | object | None = None,
        max_batch_size: int | None = None,  # passed by simple_evaluate; there is no automatic batch size
    ) -> None:
        super().__init__()
        from kvlight.models import load_model, load_tokenizer, resolve_dtype

        check_cache_names([cache], compressor_path)
        if str(batch_size).startswith("auto"):
            raise ConfigError("batch_size auto is not supported by the kvlight model; give a number")
        self.batch_size_per_gpu = int(batch_size)
        self.prefill_chunk = int(prefill_chunk)
        if self.batch_size_per_gpu < 1 or self.prefill_chunk < 1:
            raise ConfigError(f"batch_size and prefill_chunk must be at least 1 (got {batch_size}, {prefill_chunk})")
        self.cache_name = cache
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(pretrained, nn.Module):
            self.model = pretrained
            self.model_name = getattr(pretrained.config, "name_or_path", None) or type(pretrained).__name__
        else:
            name = None if pretrained in (None, "", "embedded", "default") else str(pretrained)
            self.model = load_model(name, resolve_dtype(str(dtype), device)).to(device)
            self.model_name = name or "embedded:smollm2-135m-instruct"
            if tokenizer is None:
                tokenizer = name
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer or getattr(self.model.config, "name_or_path", None) or None)
        self.tokenizer = tokenizer
        self._max_length = int(max_length) if max_length else self._model_max_length()
        self.max_gen_toks = int(max_gen_toks)
        self.compressor_path = compressor_path
        self.wrapper = None
        if cache == "kvlight":
            import kvlight

            self.wrapper = kvlight.compress(self.model, compressor_path)
        self._device = next(self.model.parameters()).device

    # ----------------------------------------------------------------------------------------- properties
    def _model_max_length(self) -> int:
        config = self.model.config
        config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = getattr(config, key, None)
            if value:
                return int(value)
        return 2048

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.eot_token_id

    def get_model_info(self) -> dict:
        """What the harness records in its results' config."""
        path = self.compressor_path if isinstance(self.compressor_path, (str, os.PathLike)) else None
        return {
            "model": self.model_name,
            "cache": self.cache_name,
            "compressor_path": None if path is None else str(path),
            "prefill_chunk": self.prefill_chunk,
        }

    # ----------------------------------------------------------------------------------------- tokens
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of ``string``; special tokens as the tokenizer adds them unless ``string`` starts with BOS."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    # ----------------------------------------------------------------------------------------- the cache
    def new_cache(self):
        """An empty cache of the kind ``cache=`` names."""
        if self.cache_name == "dynamic":
            return dynamic_cache()
        if self.cache_name in _QUANTO_BITS:
            return quantized_cache(self.model.config, "quanto", _QUANTO_BITS[self.cache_name])
        return self.wrapper.new_cache()

    @property
    def runner(self) -> nn.Module:
        """What runs forward and generate: the kvlight wrapper, or the model itself."""
        return self.wrapper if self.wrapper is not None else self.model

    def close(self) -> None:
        """Unwrap the model (the kvlight cache); the model can then be evaluated through another cache."""
        if self.wrapper is not None:
            self.wrapper.close()
            self.wrapper = None

    def __enter__(self) -> KVLightLM:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @torch.no_grad()
    def feed(self, ids: torch.Tensor, cache, attention_mask: torch.Tensor | None = None, targets=None):
        """Feed ``ids [B, T]`` through ``cache``, ``prefill_chunk`` tokens per forward.

        ``attention_mask [B, T]`` marks real tokens (left padding); ``targets [B, T]`` the token each position should
        predict (-1: not scored). Returns ``(log-likelihood [B], greedy [B])`` of the scored positions, or None
        without targets.
        """
        total = torch.zeros(ids.shape[0], dtype=torch.float64, device=ids.device)
        greedy = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
        for start in range(0, ids.shape[1], self.prefill_chunk):
            end = min(start + self.prefill_chunk, ids.shape[1])
            kwargs = cache_kwargs(cache)
            if attention_mask is not None:
                kwargs["attention_mask"] = attention_mask[:, :end]
                if self.wrapper is None:  # the wrapper counts positions over real tokens itself
                    positions = positions_from_mask(attention_mask[:, :end], end - start)
                    if positions is not None:
                        kwargs["position_ids"] = positions
            logits = self.runner(input_ids=ids[:, start:end], **kwargs).logits
            if targets is None:
                continue
            wanted = targets[:, start:end]
            scored = wanted >= 0
            if not bool(scored.any()):
                continue
            logp = torch.log_softmax(logits.float(), dim=-1)
            picked = logp.gather(-1, wanted.clamp_min(0)[..., None])[..., 0]
            total += torch.where(scored, picked, torch.zeros_like(picked)).sum(-1).double()
            greedy &= ((logp.argmax(-1) == wanted) | ~scored).all(-1)
        return None if targets is None else (total, greedy)

    # ----------------------------------------------------------------------------------------- harness requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), continuation is greedy)`` per ``(key, context_enc, continuation_enc)``;
        the longest first, right-padded in batches, each batch through a fresh cache."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="kvlight log-likelihoods")
        for first in range(0, len(order), self.batch_size):
            batch = order[first : first + self.batch_size]
            rows, scored = [], []
            for index in batch:
                _, context, continuation = requests[index]
                whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
                rows.append(whole)
                scored.append(min(len(continuation), len(whole) - 1))
            width = max(len(row) for row in rows) - 1
            ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
            targets = torch.full((len(rows), width), -1, dtype=torch.long)
            for r, (row, count) in enumerate(zip(rows, scored)):
                ids[r, : len(row) - 1] = torch.tensor(row[:-1])
                if count:
                    targets[r, len(row) - 1 - count : len(row) - 1] = torch.tensor(row[len(row) - count :])
            # Right padding: a real token never attends to a later pad, so no mask is needed.
            total, greedy = self.feed(ids.to(self.device), self.new_cache(), targets=targets.to(self.device))
            for r, index in enumerate(batch):
                results[index] = (float(total[r]), bool(greedy[r]))
                key = requests[index][0]
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, results[index])
            progress.update(len(batch))
        progress.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole string, in disjoint windows of ``max_length`` tokens."""
        windows, owners = [], []
        for index, (string,) in enumerate(request.args for request in requests):
            tokens = self.tok_encode(string)
            for window in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1):
                context, continuation = make_disjoint_window(window)
                windows.append((None, context, continuation))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for index, (value, _) in zip(owners, scores):
            totals[index] += value
        for request, value in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, value)
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Text generated after each context until a stop string (or EOS, or ``max_gen_toks``); the context fills the
        cache in chunks, then the model generates from it. Requests are batched by equal generation settings, the
        longest first, left-padded."""
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        encoded = [self.tok_encode(request.args[0]) for request in requests]
        order = sorted(range(len(requests)), key=lambda i: -len(encoded[i]))
        groups: dict[str, list[int]] = {}
        for index in order:
            groups.setdefault(repr(sorted(requests[index].args[1].items())), []).append(index)
        results: list[str | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="kvlight generation")
        for indices in groups.values():
            settings = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(settings.pop("until", None), eos=eos)
            new_tokens = settings.pop("max_gen_toks")
            settings.pop("max_length", None)
            sampling = {"do_sample": bool(settings.pop("do_sample", False))}
            if sampling["do_sample"]:
                sampling.update({k: v for k, v in settings.items() if k in ("temperature", "top_p", "top_k")})
            else:
                sampling.update({"temperature": None, "top_p": None, "top_k": None})
            for first in range(0, len(indices), self.batch_size):
                batch = indices[first : first + self.batch_size]
                texts = self._generate([encoded[i] for i in batch], new_tokens, until, sampling)
                for index, text in zip(batch, texts):
                    results[index] = text
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
                progress.update(len(batch))
        progress.close()
        return results  # type: ignore[return-value]

    def _generate(self, contexts: list[list[int]], new_tokens: int, until: list[str], sampling: dict) -> list[str]:
        """Generate after each context of one batch: all but the last context token fill the cache in chunks, then
        ``generate`` runs from the filled cache."""
        limit = max(self.max_length - new_tokens, 1)
        contexts = [context[-limit:] for context in contexts]
        width = max(len(context) for context in contexts)
        ids = torch.full((len(contexts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(contexts), width), dtype=torch.long)
        for row, context in enumerate(contexts):
            ids[row, width - len(context) :] = torch.tensor(context)
            mask[row, width - len(context) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        padded = not bool(mask.all())
        cache = self.new_cache()
        if width > 1:
            self.feed(ids[:, :-1], cache, attention_mask=mask[:, :-1] if padded else None)
        stopping = stop_sequences_criteria(self.tokenizer, until, width, len(contexts))
        out = self.runner.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            stopping_criteria=stopping,
            pad_token_id=self.pad_token_id,
            **sampling,
            **cache_kwargs(cache),
        )
        return [postprocess_generated_text(self.tok_decode(row[width:].tolist()), until, None) for row in out]
