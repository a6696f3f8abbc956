"""End-to-end objectives: the KL distillation of kvlight.distill and output-weighted values.

On the tiny models: the simulated cache is exact at full rank without quantization (zero KL), keeps sink
positions exact, lets gradients through rounding (straight-through), the KL grows as the rank falls, training on
it lowers it on held-out windows, mixed-width codes learn their static steps (and serving reads the learned ones),
and ``kvlight calibrate --objective kl`` does the same through Lightning.
Output-weighted values: ``M_g`` is the output projection's view of a value error, and the closed form trades plain
error for that error on held-out rows.
"""

import json

import pytest
import torch
from helpers import HEAD_DIM, mixed_widths

from kvlight.calibration.distill import (
    STEP_LR_SCALE,
    compressor_optimizer,
    distill,
    distillation_loss,
    kept_positions,
    latent_quantizers,
    simulate,
    step_generator,
    token_kl,
    warmup_cosine,
)
from kvlight.calibration.options import grouped
from kvlight.compressors.base import principal_basis
from kvlight.compressors.compressor import KVCompressor, load_compressor
from kvlight.compressors.weighting import output_weight, weighted_projection
from kvlight.config import CompressionConfig
from kvlight.errors import ConfigError
from kvlight.geometry import kv_geometry
from kvlight.hf import cache_kwargs, logits_at
from kvlight.models import decoder_blocks, output_projections
from kvlight.serving.positions import PositionTracker


def _compressor(tiny_models, tiny_rows, arch: str, rank: int, bits=None, sinks: int = 0, group: int = 4):
    """A KVSplice compressor at its PCA start, fitted on the tiny model's calibration rows."""
    geometry = kv_geometry(tiny_models[arch])
    config = CompressionConfig.uniform(
        geometry.num_layers, geometry.num_kv_heads, HEAD_DIM, rank=rank, sink_tokens=sinks, latent_bits=bits
    )
    config.quant_group_size = group
    compressor = KVCompressor(config, geometry, algo="kvsplice", options={"kvsplice": {"latent_affine": False}})
    keys, values = tiny_rows[arch]["calib"]
    compressor.fit_statistics([{"keys": keys, "values": values}])
    return compressor


def _tracker(model):
    return PositionTracker(model) if kv_geometry(model).rope else None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_full_rank_without_quantization_reproduces_the_logits(arch, tiny_models, tiny_rows, tiny_windows):
    model = tiny_models[arch]
    compressor = _compressor(tiny_models, tiny_rows, arch, rank=HEAD_DIM)
    tracker = _tracker(model)
    try:
        with torch.no_grad():
            kl = distillation_loss(model, compressor, tiny_windows["eval"][:2], tracker, latent_quantizers(compressor))
    finally:
        if tracker is not None:
            tracker.close()
    assert latent_quantizers(compressor) is None
    assert abs(float(kl)) < 1e-6


@pytest.mark.parametrize("sinks", [0, 3])
def test_simulate_keeps_sinks_exact_and_passes_gradients_through_rounding(sinks, tiny_models, tiny_rows):
    compressor = _compressor(tiny_models, tiny_rows, "llama", rank=4, bits=4, sinks=sinks)
    quantizer = latent_quantizers(compressor)[(0, "k")]
    x = tiny_rows["llama"]["heldout"][0][:10, 0].transpose(0, 1).unsqueeze(0)  # [1, H, 10, D]
    out = simulate(compressor, 0, "k", x, quantizer, sinks)
    assert out.shape == x.shape
    assert torch.equal(out[:, :, :sinks], x[:, :, :sinks])
    codec = compressor.codec(0, "k")
    with torch.no_grad():  # the forward sees the rounded latents, not the unrounded reconstruction
        z = codec.encode(x[:, :, sinks:])
        rounded = codec.decode(quantizer.dequantize(quantizer.quantize(z), torch.float32))
    torch.testing.assert_close(out[:, :, sinks:], rounded)
    assert not torch.allclose(rounded, codec.decode(z))
    out.square().sum().backward()
    head = codec.heads[0]
    assert head.compress.grad is not None and head.compress.grad.abs().sum() > 0  # through rounding (STE)
    assert head.expand.grad is not None and head.expand.grad.abs().sum() > 0


def test_kl_grows_as_rank_falls(tiny_models, tiny_rows, tiny_windows):
    model = tiny_models["llama"]
    tracker = _tracker(model)
    try:
        with torch.no_grad():
            kls = [
                float(
                    distillation_loss(
                        model, _compressor(tiny_models, tiny_rows, "llama", rank), tiny_windows["eval"], tracker
                    )
                )
                for rank in (12, 8, 4, 2)
            ]
    finally:
        tracker.close()
    assert kls == sorted(kls) and kls[0] > 0, kls


@pytest.mark.parametrize(
    "length, share, count", [(10, 1.0, None), (10, 0.5, 5), (10, 0.25, 3), (4096, 0.5, 2048), (7, 0.01, 1)]
)
def test_kept_positions_are_a_sorted_sample_of_the_share(length, share, count):
    positions = kept_positions(length, share, step_generator(0, 3))
    if count is None:
        assert positions is None
        return
    assert len(positions) == count and len(set(positions.tolist())) == count
    assert (
        positions.tolist() == sorted(positions.tolist()) and 0 <= int(positions.min()) <= int(positions.max()) < length
    )
    assert torch.equal(positions, kept_positions(length, share, step_generator(0, 3)))  # a resumed step draws the same
    draws = {
        tuple(kept_positions(length, share, step_generator(seed, step)).tolist()) for seed in (0, 1) for step in (0, 1)
    }
    assert count == length or len(draws) > 1  # each step (and seed) draws afresh


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward has no ``logits_to_keep`` (an older or custom model class)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids=None, **kwargs):
        return self.model(input_ids=input_ids, **kwargs)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("wrapped", [False, True])
def test_logits_at_are_the_full_logits_at_those_positions(arch, wrapped, tiny_models, tiny_windows):
    model = tiny_models[arch]
    ids = tiny_windows["eval"][:2]
    positions = torch.tensor([0, 3, 4, ids.shape[1] - 1])
    with torch.no_grad():
        full = model(input_ids=ids).logits
        kept = logits_at(_NoLogitsToKeep(model) if wrapped else model, positions, input_ids=ids)
        every = logits_at(model, None, input_ids=ids)
    torch.testing.assert_close(kept, full[:, positions])
    torch.testing.assert_close(every, full)


def test_distillation_loss_at_kept_positions_is_their_mean_kl(tiny_models, tiny_rows, tiny_windows):
    """With positions, the loss is the mean per-token KL over those positions alone (each computed from the full
    forward), and its gradient reaches every trainable parameter."""
    model = tiny_models["llama"]
    compressor = _compressor(tiny_models, tiny_rows, "llama", rank=3, bits=4, sinks=1)
    quantizers = latent_quantizers(compressor)
    ids = tiny_windows["eval"][:2]
    positions = kept_positions(ids.shape[1], 0.5, step_generator(0, 0))
    tracker = _tracker(model)
    try:
        loss = distillation_loss(model, compressor, ids, tracker, quantizers, positions=positions)
        loss.backward()
        with torch.no_grad():
            full = [
                token_kl(
                    model(input_ids=ids).logits[:, [p]],
                    _student_logits(model, compressor, ids, tracker, quantizers)[:, [p]],
                )
                for p in positions.tolist()
            ]
    finally:
        tracker.close()
    torch.testing.assert_close(loss.detach(), torch.stack(full).mean(), rtol=1e-4, atol=1e-7)
    assert float(loss.detach()) > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in compressor.parameters() if p.requires_grad)


def _student_logits(model, compressor, ids, tracker, quantizers):
    """The student's logits at every position: distillation_loss's forward, with the teacher's KL taken away."""
    from kvlight.serving.capture_cache import CaptureCache

    sinks = compressor.config.sink_tokens

    def replace(layer, keys, values):
        return (
            simulate(compressor, layer, "k", keys, quantizers.get((layer, "k")), sinks),
            simulate(compressor, layer, "v", values, quantizers.get((layer, "v")), sinks),
        )

    cache = CaptureCache(compressor.num_layers, replace, tracker, compressor.rope_blocks)
    return model(input_ids=ids, **cache_kwargs(cache)).logits


@pytest.mark.parametrize(
    "arch, bits, tokens", [("llama", 4, 1.0), ("llama", None, 1.0), ("gpt2", 2, 1.0), ("llama", 4, 0.5)]
)
def test_distillation_lowers_heldout_kl(arch, bits, tokens, tiny_models, tiny_rows, tiny_windows):
    model = tiny_models[arch]
    compressor = _compressor(tiny_models, tiny_rows, arch, rank=3, bits=bits, sinks=1)
    frozen = {name: p.clone() for name, p in model.named_parameters()}
    tracker = _tracker(model)
    try:
        quantizers = latent_quantizers(compressor)

        def heldout() -> float:
            with torch.no_grad():
                return float(distillation_loss(model, compressor, tiny_windows["eval"], tracker, quantizers))

        before = heldout()
        losses = distill(
            model, compressor, tiny_windows["calib"], tracker, steps=40, lr=1e-2, batch_size=4, tokens=tokens
        )
        after = heldout()
    finally:
        if tracker is not None:
            tracker.close()
    assert sum(losses[-4:]) < sum(losses[:4]), losses
    assert after < 0.9 * before, (before, after)
    for name, p in model.named_parameters():  # the frozen model is untouched
        assert p.grad is None and torch.equal(p, frozen[name]), name


def _widths_compressor(tiny_models, tiny_rows, arch: str) -> KVCompressor:
    """A KVSplice compressor storing mixed-width codes (helpers.mixed_widths), steps calibrated on the rows."""
    geometry = kv_geometry(tiny_models[arch])
    config = CompressionConfig.uniform(geometry.num_layers, geometry.num_kv_heads, HEAD_DIM, rank=HEAD_DIM)
    for (layer, head), entry in config.per_layer_head.items():
        entry.pop("rank_k"), entry.pop("rank_v")
        entry["bits_k"], entry["bits_v"] = mixed_widths(layer, head)
    config = CompressionConfig.from_dict(config.to_dict())
    compressor = KVCompressor(config, geometry, algo="kvsplice")
    keys, values = tiny_rows[arch]["calib"]
    compressor.fit_statistics([{"keys": keys, "values": values}])
    return compressor


def test_distillation_learns_the_static_steps_and_serving_uses_them(tiny_models, tiny_rows, tiny_windows, tmp_path):
    """Mixed-width codes: the step corrections train with the projections (the KL falls), the quantizer the
    cache builds reads the learned steps, save/load keeps them, and an artefact saved without them loads as zero
    corrections (the calibrated steps)."""
    model = tiny_models["llama"]
    compressor = _widths_compressor(tiny_models, tiny_rows, "llama")
    calibrated = {key: compressor.codec(*key).code_step.clone() for key in compressor.width_codecs()}
    tracker = _tracker(model)
    try:
        losses = distill(model, compressor, tiny_windows["calib"], tracker, steps=30, lr=3e-3, batch_size=4)
    finally:
        tracker.close()
    assert sum(losses[-4:]) < sum(losses[:4]), losses
    gains = torch.cat([p.detach() for n, p in compressor.named_parameters() if n.endswith("code_log_gain")])
    assert gains.abs().max() > 1e-3  # the steps moved
    for key, step in calibrated.items():
        codec = compressor.codec(*key)
        learned_step, learned_offset = (t.detach() for t in codec.quantizer_steps())
        snapshot = latent_quantizers(compressor)[key]  # what the cache and the fast path build
        assert torch.equal(snapshot.step, learned_step) and torch.equal(snapshot.offset, learned_offset)
        coded = (codec.widths > 0) & (codec.widths < 16)
        assert not torch.equal(learned_step[coded], step[coded])
    compressor.save_pretrained(tmp_path / "learned")
    loaded = load_compressor(tmp_path / "learned")
    for key in calibrated:
        assert torch.equal(loaded.codec(*key).code_step, compressor.codec(*key).code_step)
    state = {n: t for n, t in compressor.state_dict().items() if not n.endswith(("code_log_gain", "code_shift"))}
    old = KVCompressor(compressor.config, compressor.geometry, algo="kvsplice")
    old.load_state_dict(state)  # an artefact from before the corrections existed
    for key in calibrated:  # the stored steps without corrections
        assert torch.equal(old.codec(*key).code_step, torch.cat([p.code_step for p in compressor.codec(*key).heads]))
    compressor.calibrate_steps([{"keys": tiny_rows["llama"]["calib"][0], "values": tiny_rows["llama"]["calib"][1]}])
    gains = torch.cat([p.detach() for n, p in compressor.named_parameters() if n.endswith("code_log_gain")])
    assert not gains.any()  # a step calibration starts the corrections again from zero


def test_the_optimizer_gives_step_corrections_their_own_learning_rate(tiny_models, tiny_rows):
    """Projections at lr, the learned step corrections at STEP_LR_SCALE x lr; nothing trainable: None."""
    compressor = _widths_compressor(tiny_models, tiny_rows, "llama")
    optimizer = compressor_optimizer(compressor, 1e-3)
    names = {id(p): n.rsplit(".", 1)[-1] for n, p in compressor.named_parameters()}
    (weights, steps) = optimizer.param_groups
    assert weights["lr"] == 1e-3 and steps["lr"] == pytest.approx(1e-3 * STEP_LR_SCALE)
    assert {names[id(p)] for p in steps["params"]} == {"code_log_gain", "code_shift"}
    assert not {names[id(p)] for p in weights["params"]} & {"code_log_gain", "code_shift"}
    assert len(weights["params"]) + len(steps["params"]) == len(list(compressor.parameters()))
    geometry = kv_geometry(tiny_models["gpt2"])
    config = CompressionConfig.uniform(geometry.num_layers, geometry.num_kv_heads, HEAD_DIM, rank=4, algo="pca")
    pca = KVCompressor(config, geometry)
    assert compressor_optimizer(pca, 1e-3) is None


def test_distill_needs_trainable_heads(tiny_models, tiny_rows, tiny_windows):
    geometry = kv_geometry(tiny_models["gpt2"])
    config = CompressionConfig.uniform(geometry.num_layers, geometry.num_kv_heads, HEAD_DIM, rank=4, algo="pca")
    compressor = KVCompressor(config, geometry)
    with pytest.raises(ValueError, match="nothing to train"):
        distill(tiny_models["gpt2"], compressor, tiny_windows["calib"], None, steps=1)


def test_output_weight_is_the_output_projections_view(tiny_models):
    model = tiny_models["llama"]
    geometry = kv_geometry(model)
    o_proj = decoder_blocks(model)[0].self_attn.o_proj.weight.double()
    weights = output_weight(o_proj, geometry.num_kv_heads, HEAD_DIM)  # [H_kv, D, D]
    query_heads = o_proj.shape[1] // HEAD_DIM
    group = query_heads // geometry.num_kv_heads
    error = torch.randn(HEAD_DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for kv_head in range(geometry.num_kv_heads):
        expected = sum(
            float((o_proj[:, h * HEAD_DIM : (h + 1) * HEAD_DIM] @ error).square().sum())
            for h in range(kv_head * group, (kv_head + 1) * group)
        )
        assert float(error @ weights[kv_head] @ error) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="does not split"):
        output_weight(o_proj[:, :-1], geometry.num_kv_heads, HEAD_DIM)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_output_weighted_values_trade_plain_error_for_output_error(arch, tiny_models, tiny_rows):
    model = tiny_models[arch]
    geometry = kv_geometry(model)
    calib, heldout = tiny_rows[arch]["calib"][1].double(), tiny_rows[arch]["heldout"][1].double()
    rank, gain, cost = 4, 0.0, 0.0
    for layer, projection in enumerate(output_projections(model)):
        weights = output_weight(projection, geometry.num_kv_heads, HEAD_DIM)
        for head in range(geometry.num_kv_heads):
            train = calib[:, layer, head]
            mean, covariance = train.mean(0), torch.cov(train.T)
            x = heldout[:, layer, head] - mean
            basis = principal_basis(covariance, rank)
            plain_error = x - x @ basis @ basis.T
            encoder, decoder, _ = weighted_projection(covariance, weights[head], rank)
            weighted_error = x - x @ encoder.T @ decoder.T
            seen = lambda e: torch.einsum("nd,de,ne->", e, weights[head], e) / len(e)  # noqa: E731
            gain += float(seen(plain_error) - seen(weighted_error))
            cost += float((weighted_error**2).sum() - (plain_error**2).sum()) / len(x)
    assert gain > 0 and cost > 0


def test_calibrate_with_kl_objective(tmp_path, tiny_llama_path, tiny_models, tiny_windows, kvlight_cache, capsys):
    """``kvlight calibrate --objective kl`` (comparing half the positions at each step): one epoch is one pass over the
    calibration windows, and the KL of the distilled compressor on every position of the evaluation windows is below
    that of the reconstruction-trained one."""
    from helpers import tiny_calibrate_args

    from kvlight.calibration.module import KVCalibrationModule
    from kvlight.cli import main

    fitted = {}
    for objective in ("reconstruction", "kl"):
        output = tmp_path / objective
        extra = ["--compressor", "kvsplice", "--rank", "3", "--latent-bits", "4", "--quant-group-size", "3"]
        extra += ["--epochs", "3", "--lr", "3e-3", "--objective", objective, "--value-objective", "output"]
        extra += ["--distill-batch-size", "2", "--sink-tokens", "1", "--recent-window", "0"]
        extra += ["--distill-tokens", "0.5"] if objective == "kl" else []  # the KL at half the positions a step
        assert main(tiny_calibrate_args(tiny_llama_path, output, *extra)) == 0
        results = json.loads((output / "calibration_results_kvsplice.json").read_text())
        assert results["objective"] == objective and results["value_objective"] == "output"
        checkpoint = torch.load(output / "checkpoints" / "last.ckpt", weights_only=False)
        if objective == "kl":
            assert checkpoint["global_step"] == 3 * 2  # 3 passes over 4 windows, 2 per step
        fitted[objective] = KVCalibrationModule.load_from_checkpoint(output / "checkpoints" / "last.ckpt").compressor
    capsys.readouterr()
    model = tiny_models["llama"]
    tracker = PositionTracker(model)
    try:
        with torch.no_grad():
            kl = {
                name: float(
                    distillation_loss(model, c, tiny_windows["eval"], tracker, latent_quantizers(c), sink_tokens=1)
                )
                for name, c in fitted.items()
            }
    finally:
        tracker.close()
    assert kl["kl"] < kl["reconstruction"], kl


def test_objective_options_are_checked(tiny_llama_path):
    from kvlight.calibration.module import KVCalibrationModule

    cases = [
        ({"compressor": "pca", "objective": "kl"}, "objective kl trains KVSplice heads"),
        ({"compressor": "pca", "value_objective": "output"}, "value_objective output needs KVSplice value heads"),
        ({"compressor": "kvsplice", "objective": "logits"}, "objective 'logits' must be one of"),
        ({"compressor": "kvsplice", "value_objective": "attention"}, "must be one of mse, output"),
        ({"compressor": "kvsplice", "objective": "kl", "distill_batch_size": 0}, "distill_batch_size must be at"),
        *(
            ({"compressor": "kvsplice", "objective": "kl", "distill_tokens": bad}, "distill_tokens must be a fraction")
            for bad in (0, 0.0, -0.5, 1.5, float("nan"), True, "half")
        ),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            KVCalibrationModule(model=tiny_llama_path, **grouped(rank=4, **kwargs))


def test_warmup_cosine_schedule():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=1.0)
    schedule = warmup_cosine(optimizer, steps=20)  # 2 warm-up steps
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == pytest.approx(0.5) and rates[1] == pytest.approx(1.0)  # linear warm-up to the peak
    assert all(a >= b for a, b in zip(rates[1:], rates[2:]))  # then never rises
    assert rates[-1] < 0.01  # and ends near zero
