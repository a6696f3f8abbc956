"""Batches with padding: left-padded generation equals generating each row alone, right-padded evaluation leaves the
padding out of the perplexity.

transformers 5.23's ``generate`` derives position ids from the attention mask (the first real token of every row
gets position 0); kvlight's cache re-rotates compressed keys with exactly those ids and keeps each row's first
``sink_tokens`` *positions* exact, wherever padding puts them. The wrapper's ``forward`` derives them the same way.
"""

import pytest
import torch

from kvlight.calibration.options import grouped
from kvlight.hf import dynamic_cache
from kvlight.serving.wrapper import CompressedKVModelWrapper

PAD = 0  # any id: padded positions are masked (the tests also swap it for others)
LENGTHS = (20, 7, 13)  # prompt lengths of one batch: rows padded by 0, 13 and 7 tokens
GENERATE = {"max_new_tokens": 24, "do_sample": False, "pad_token_id": PAD}


def prompts(tiny_windows) -> list[torch.Tensor]:
    return [tiny_windows["eval"][row, :length] for row, length in enumerate(LENGTHS)]


def left_padded(rows: list[torch.Tensor], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    return ids, mask


def generated(model, ids, mask) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """New tokens ``[B, N]`` and the logits of each step ``[B, V]``."""
    out = model.generate(
        input_ids=ids, attention_mask=mask, output_logits=True, return_dict_in_generate=True, **GENERATE
    )
    return out.sequences[:, ids.shape[1] :], list(out.logits)


def assert_rows_match_solo(model, rows: list[torch.Tensor], pad: int = PAD) -> None:
    batch_tokens, batch_logits = generated(model, *left_padded(rows, pad))
    for i, row in enumerate(rows):
        solo_tokens, solo_logits = generated(model, row[None], torch.ones(1, len(row), dtype=torch.long))
        assert torch.equal(batch_tokens[i], solo_tokens[0]), f"row {i}"
        for step, (batch, solo) in enumerate(zip(batch_logits, solo_logits)):
            torch.testing.assert_close(batch[i], solo[0], rtol=0, atol=1e-4, msg=f"row {i}, step {step}")


def test_left_padded_generate_matches_solo_with_a_dynamic_cache(tiny_models, tiny_windows):
    # The reference: transformers itself gets this right for a RoPE model in the tested range.
    model = tiny_models["llama"]

    class Plain(torch.nn.Module):  # generate with an explicit DynamicCache, as the compressed runs pass theirs
        def generate(self, **kwargs):
            return model.generate(past_key_values=dynamic_cache(), **kwargs)

    assert_rows_match_solo(Plain(), prompts(tiny_windows))


#: name -> (algo, rank, config): lossy ranks, quantized latents, exact sink and recent tokens.
COMPRESSED = {
    "pca-full-rank": ("pca", 16, {}),
    "pca-rank4-int4-sinks4-recent4": ("pca", 4, {"sink_tokens": 4, "recent_window": 4, "latent_bits": 4}),
    "pca-rank8-sinks2": ("pca", 8, {"sink_tokens": 2}),
    "kvsplice-rank8-int8-sinks4-recent8": ("kvsplice", 8, {"sink_tokens": 4, "recent_window": 8, "latent_bits": 8}),
    # keys coded relative to the RoPE of blocks of 4 slots, scored in latent space. Blocks follow slots, so below full
    # rank a padded row's keys are coded in other blocks than alone (close, not equal: README, Padding).
    "pca-full-rank-rope-block4": ("pca", 16, {"rope_block": 4}),
}


@pytest.mark.parametrize("case", list(COMPRESSED))
def test_left_padded_compressed_generate_matches_each_row_alone(case, tiny_models, tiny_windows, fitted_compressor):
    algo, rank, config = COMPRESSED[case]
    wrapped = CompressedKVModelWrapper(tiny_models["llama"], fitted_compressor("llama", algo, rank, **config))
    try:
        assert_rows_match_solo(wrapped, prompts(tiny_windows))
        # The short rows' first tokens sit past the sink slots, where only their positions say they are sinks.
        cache = wrapped.new_cache()
        ids, mask = left_padded(prompts(tiny_windows))
        wrapped.model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **GENERATE)
        assert cache.layers[0].num_compressed > 0
        if config.get("sink_tokens"):
            kept = cache.layers[0].row_sink_slot
            first_real = ids.shape[1] - torch.tensor(LENGTHS)
            for row, start in enumerate(first_real.tolist()):
                if start >= config["sink_tokens"]:  # padded past the sink slots: every sink position kept aside
                    assert kept[row].tolist() == list(range(start, start + config["sink_tokens"]))
    finally:
        wrapped.close()


def test_left_padded_generate_does_not_depend_on_the_pad_id(tiny_models, tiny_windows, fitted_compressor):
    config = {"sink_tokens": 4, "recent_window": 4, "latent_bits": 4}
    wrapped = CompressedKVModelWrapper(tiny_models["llama"], fitted_compressor("llama", "pca", 4, **config))
    try:
        rows = prompts(tiny_windows)
        first = generated(wrapped, *left_padded(rows, pad=0))
        for pad in (5, 123):
            tokens, logits = generated(wrapped, *left_padded(rows, pad=pad))
            assert torch.equal(tokens, first[0])
            torch.testing.assert_close(torch.stack(logits), torch.stack(first[1]), rtol=0, atol=1e-5)
    finally:
        wrapped.close()


# Per-row sinks need the position ids, which kvlight observes on RoPE models only (the rotary module's input): on
# GPT-2 the sinks are the first slots, so a left-padded row matches its solo run without sinks.
@pytest.mark.parametrize(("arch", "sinks"), [("llama", 2), ("gpt2", 0)])
def test_left_padded_wrapper_forward_matches_each_row_alone(arch, sinks, tiny_models, tiny_windows, fitted_compressor):
    # forward() gets no positions from the caller: the wrapper counts them over the real tokens, as generate does.
    # Two calls: the prompt, then 5 more tokens through the cache (the mask then covers cached + new tokens).
    wrapped = CompressedKVModelWrapper(tiny_models[arch], fitted_compressor(arch, "pca", 8, sink_tokens=sinks))
    try:
        rows = prompts(tiny_windows)
        more = tiny_windows["eval"][:3, 20:25]
        ids, mask = left_padded(rows)
        cache = wrapped.new_cache()
        first = wrapped(input_ids=ids, attention_mask=mask, past_key_values=cache).logits
        mask = torch.cat([mask, torch.ones(3, 5, dtype=torch.long)], dim=1)
        second = wrapped(input_ids=more, attention_mask=mask, past_key_values=cache).logits
        for i, row in enumerate(rows):
            solo_cache = wrapped.new_cache()
            solo_first = wrapped(input_ids=row[None], past_key_values=solo_cache).logits
            solo_second = wrapped(input_ids=more[i : i + 1], past_key_values=solo_cache).logits
            torch.testing.assert_close(first[i, -len(row) :], solo_first[0], rtol=0, atol=1e-4, msg=f"row {i}")
            torch.testing.assert_close(second[i], solo_second[0], rtol=0, atol=1e-4, msg=f"row {i}")
    finally:
        wrapped.close()


# ---------------------------------------------------------------------- right padding in evaluation
def _module(tiny_llama_path, fitted_compressor, **config):
    from kvlight.calibration.module import KVCalibrationModule

    module = KVCalibrationModule(model=tiny_llama_path, **grouped(compressor="pca", rank=8, eval_chunk=8, **config))
    fitted = fitted_compressor("llama", "pca", 8, **config)
    module.compressor.load_state_dict(fitted.state_dict())
    return module


def _evaluate(module, batches: list[dict]) -> dict[str, tuple[float, float]]:
    """``{metric: (summed NLL, counted tokens)}`` after feeding ``batches`` through ``validation_step``."""
    with torch.no_grad():
        for index, batch in enumerate(batches):
            module.validation_step(batch, index)
    sums = {
        name: (float(m.nll), float(m.tokens))
        for name, m in (("baseline", module.ppl_baseline), ("compressed", module.ppl_compressed))
    }
    for metric in (module.ppl_baseline, module.ppl_compressed, module.bytes_compressed, module.bytes_dynamic):
        metric.reset()
    return sums


def right_padded(rows: list[torch.Tensor], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    return {"input_ids": ids, "attention_mask": mask}


EVAL_LENGTHS = (32, 20, 11)


def test_right_padded_evaluation_counts_only_real_tokens(tiny_llama_path, tiny_windows, fitted_compressor):
    # No exact recent window, so chunking cannot make a row's cache differ from its solo run: exact equality.
    module = _module(tiny_llama_path, fitted_compressor)
    rows = [tiny_windows["eval"][i, :length] for i, length in enumerate(EVAL_LENGTHS)]
    padded = _evaluate(module, [right_padded(rows, PAD)])
    solo = _evaluate(module, [{"input_ids": row[None]} for row in rows])
    for name in ("baseline", "compressed"):
        assert padded[name][1] == solo[name][1] == sum(length - 1 for length in EVAL_LENGTHS)
        assert padded[name][0] == pytest.approx(solo[name][0], rel=1e-5), name


@pytest.mark.parametrize(
    "config", [{}, {"sink_tokens": 4, "recent_window": 8, "latent_bits": 4}], ids=["plain", "sinks-recent-int4"]
)
def test_right_padded_perplexity_does_not_depend_on_the_pad_ids(
    config, tiny_llama_path, tiny_windows, fitted_compressor
):
    module = _module(tiny_llama_path, fitted_compressor, **config)
    rows = [tiny_windows["eval"][i, :length] for i, length in enumerate(EVAL_LENGTHS)]
    reference = _evaluate(module, [right_padded(rows, PAD)])
    for pad in (7, 311):
        other = _evaluate(module, [right_padded(rows, pad)])
        for name in ("baseline", "compressed"):
            assert other[name] == pytest.approx(reference[name], rel=1e-6), (name, pad)
