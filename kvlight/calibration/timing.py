"""How long a calibration will take, said before it starts, and how to make it fit a time budget.

A calibration's phases each cost a multiple of one of three things this machine does: a forward pass of the model
over one window without gradients (the capture, the teacher of distillation, validation), a forward plus backward
pass of it (the sensitivity pass, the student of distillation), and a float32 step on a batch of captured rows (the
statistics and reconstruction epochs). :func:`measure_speed` times them on the loaded model at the lengths the run
uses (a second or two at 512 tokens); :func:`estimate` multiplies them by the run's :class:`Workload` and by
per-phase factors measured on whole runs (``bench/results/recipes.md`` sets each run's estimate beside the time it
took). :func:`fit_time_budget` shrinks a workload's text and steps until its
estimate fits a number of minutes.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, replace

import lightning.pytorch as pl
import torch

from kvlight.calibration.distill import kept_positions
from kvlight.calibration.shards import load_manifest
from kvlight.hf import logits_at

#: The per-phase factors, each the phase's measured seconds over what the probes predict for it, fitted across whole
#: runs of ``kvlight calibrate`` on the embedded default on the two kinds of 2-core machine the project measures on
#: (``bench/results/recipes.md``: AMD EPYC with AVX512-BF16, the default in float32 and bf16 and the 12.5 % recipe in
#: bf16; ``bench/results/recipes_xeon.md`` and ``default_sensitivity32.md``: Intel Xeon with AMX, the same in bf16).
#: On the Xeon the bf16 matrix units make the model's own products several times faster than the float32 and memory
#: work around them, so a model-based factor there is up to about twice the EPYC's (in brackets: EPYC / Xeon); each
#: value sits between the two:
#: sensitivity: per window, over (forward + forward-and-backward) at its length (eager attention, two passes);
#: capture: per window, over a forward (hooks, moments and shard writes);
#: distillation: per window and step, over the step's probe (the student codes every layer);
#: reconstruction: per epoch (the statistics epoch counted as one), over a float32 step of stand-in codecs on one batch
#: of captured rows (the epochs run in float32 whatever the model's dtype) times the batches an epoch reads;
#: validation: per window, over a forward at its length, for keys in RoPE blocks (> 1) and before RoPE (1), whose
#: every chunk rebuilds the stored keys.
FACTORS = {
    "sensitivity": 2.0,  # (1.35 in float32, 1.8 in bf16 / 2.5)
    "capture": 1.25,  # (1.1 / 1.3-1.4)
    "distillation": 1.2,  # (1.08 on every position / 1.3 on half of them)
    "reconstruction": 6.3,  # (- / 6.3; the Xeon's alone: the EPYC runs predate this probe)
    "validation_blocks": 2.6,  # (1.58 / 3.9)
    "validation_prerope": 6.4,  # (3.3 / 12.5)
}
#: seconds between two progress lines of distillation.
SAY_EVERY = 60.0


@dataclass(frozen=True)
class Speed:
    """Seconds this machine takes for one window of each length the run uses (batch 1).

    Attributes:
        forward: ``{length: seconds}`` of a forward pass without gradients.
        backward: ``{length: seconds}`` of a forward and backward pass (gradients with respect to activations only,
            as distillation and the sensitivity pass take them: the model stays frozen).
        kept: ``{length: seconds}`` of a forward and a forward-and-backward that compute logits at a share of the
            positions only, as a distillation step with ``distill_tokens < 1`` does (measured only for such a run).
        rows_step: seconds of a float32 forward and backward of stand-in codecs (every layer and kind, each head
            through a square projection and back) on one batch of captured rows, as a reconstruction epoch's step
            runs (measured only for a run without distillation, whose statistics and epochs read the rows).
    """

    forward: dict[int, float]
    backward: dict[int, float]
    kept: dict[int, float] = field(default_factory=dict)
    rows_step: float = 0.0


@dataclass(frozen=True)
class Workload:
    """What a calibration run does, counted in windows and steps.

    Attributes:
        seq_len: tokens per calibration and evaluation window.
        sensitivity_windows: windows of the sensitivity pass (0: no allocation).
        sensitivity_len: their length.
        capture_windows: calibration windows captured.
        distill_steps: optimizer steps of end-to-end distillation (0: none).
        distill_batch: windows per distillation step.
        reconstruction_epochs: Adam epochs on captured rows (0: none).
        rows: captured rows per layer and head (what one reconstruction epoch reads).
        rows_batch: captured rows per step of a reconstruction epoch (``kv_batch_size``).
        geometry: ``(layers, kv_heads, head_dim)``.
        eval_windows: validation windows.
        prerope_keys: keys coded before RoPE (key_rope_block 1), which makes chunked validation slower.
        capture_reused: an intact capture of the same windows is on disk (the capture phase then only reads it).
        distill_tokens: the share of positions a distillation step compares (``ObjectiveOptions.distill_tokens``).
    """

    seq_len: int
    sensitivity_windows: int
    sensitivity_len: int
    capture_windows: int
    distill_steps: int
    distill_batch: int
    reconstruction_epochs: int
    rows: int
    rows_batch: int
    geometry: tuple[int, int, int]
    eval_windows: int
    prerope_keys: bool
    capture_reused: bool = False
    distill_tokens: float = 1.0

    def lengths(self) -> tuple[int, ...]:
        """The window lengths :func:`measure_speed` must time for this workload."""
        return tuple(sorted({self.seq_len, self.sensitivity_len} if self.sensitivity_windows else {self.seq_len}))


def measure_speed(
    model: torch.nn.Module,
    lengths: tuple[int, ...],
    vocab_size: int | None = None,
    distill_tokens: float = 1.0,
    rows: tuple[tuple[int, int, int], int] | None = None,
) -> Speed:
    """Time a forward (the faster of two) and a forward-and-backward of ``model`` on a random window of each of
    ``lengths``; with ``distill_tokens < 1``, also both with logits at that share of the positions, at the longest
    length (the calibration windows', which distillation reads); with ``rows = ((layers, kv_heads, head_dim),
    batch)``, a reconstruction step's float32 work on one batch of rows (:func:`time_rows_step`).

    A 16-token forward first pays the first call's one-off costs, so the times are those of the run's steady state.
    """
    parameter = next(model.parameters())
    device, vocab = parameter.device, vocab_size or model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    embeddings = model.get_input_embeddings()
    forward, backward, kept = {}, {}, {}
    with torch.no_grad():
        model(input_ids=torch.randint(vocab, (1, 16), generator=generator).to(device))
    for length in lengths:
        ids = torch.randint(vocab, (1, length), generator=generator).to(device)
        times = []
        for _ in range(2):  # the first forward at a new length also pays for growing the allocator's pools
            _sync(device)
            start = time.perf_counter()
            with torch.no_grad():
                model(input_ids=ids)
            _sync(device)
            times.append(time.perf_counter() - start)
        forward[length] = min(times)
        start = time.perf_counter()
        with torch.enable_grad():
            inputs = embeddings(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=inputs).logits
            logits.float().logsumexp(-1).mean().backward()
        _sync(device)
        backward[length] = time.perf_counter() - start
        del inputs, logits
        if distill_tokens < 1 and length == max(lengths):
            kept[length] = _time_kept(model, ids, kept_positions(length, distill_tokens, generator, device))
    rows_step = 0.0 if rows is None else time_rows_step(*rows, device=device)
    return Speed(forward, backward, kept, rows_step)


def time_rows_step(geometry: tuple[int, int, int], batch: int, device: torch.device | str = "cpu") -> float:
    """Seconds (the faster of two) of a float32 forward and backward of stand-in codecs on ``batch`` captured rows.

    Why a stand-in: the reconstruction epochs run in float32 whatever dtype the model runs in, so a model forward
    (in bf16 on a GPU or an AMX CPU, several times faster than float32) says little about them, and the real codecs
    are allocated only after this estimate. Per layer and kind, rows ``[1, H, batch, D]`` go through a trainable
    ``[H, D, D]`` projection, rounding (straight through) and back, into a mean squared error, as a codec does.
    """
    layers, heads, dim = geometry
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(1, heads, batch, dim, generator=generator).to(device)
    weight = (torch.randn(heads, dim, dim, generator=generator) / dim**0.5).to(device).requires_grad_(True)
    times = []
    for _ in range(2):
        _sync(device)
        start = time.perf_counter()
        with torch.enable_grad():
            total = rows.new_zeros(())
            for _ in range(2 * layers):
                codes = rows @ weight
                codes = codes + (codes.round() - codes).detach()
                total = total + ((codes @ weight.transpose(1, 2)) - rows).square().mean()
            total.backward()
        _sync(device)
        times.append(time.perf_counter() - start)
        weight.grad = None
    return min(times)


def _time_kept(model: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor | None) -> float:
    """Seconds of a forward and a forward-and-backward of ``ids [1, T]`` with logits at ``positions`` only."""
    device = ids.device
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        logits_at(model, positions, input_ids=ids)
    with torch.enable_grad():
        inputs = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits_at(model, positions, inputs_embeds=inputs).float().logsumexp(-1).mean().backward()
    _sync(device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def estimate(work: Workload, speed: Speed, factors: dict[str, float] = FACTORS) -> dict[str, float]:
    """Seconds per phase of ``work`` at ``speed``: ``{"sensitivity", "capture", "fit", "validation"}`` (fit: the
    statistics pass, then distillation or reconstruction epochs)."""
    forward, both = speed.forward[work.seq_len], speed.backward[work.seq_len]
    phases = {"sensitivity": 0.0}
    if work.sensitivity_windows:
        length = work.sensitivity_len
        per_window = speed.forward[length] + speed.backward[length]
        phases["sensitivity"] = factors["sensitivity"] * work.sensitivity_windows * per_window
    phases["capture"] = 0.0 if work.capture_reused else factors["capture"] * work.capture_windows * forward
    step = speed.kept[work.seq_len] if work.distill_tokens < 1 and work.seq_len in speed.kept else forward + both
    distill = factors["distillation"] * work.distill_steps * work.distill_batch * step
    # The statistics epoch reads every row once too (distillation's factor covers it in a distillation run).
    epochs = work.reconstruction_epochs + (0 if work.distill_steps else 1)
    batches = math.ceil(work.rows / work.rows_batch)
    reconstruction = factors["reconstruction"] * epochs * batches * speed.rows_step
    phases["fit"] = distill + reconstruction
    validation = factors["validation_prerope" if work.prerope_keys else "validation_blocks"]
    phases["validation"] = work.eval_windows * forward * (1.0 + validation)
    return phases


def fit_time_budget(work: Workload, speed: Speed, seconds: float, minimum_windows: int = 4) -> Workload:
    """``work`` with fewer calibration windows, then fewer distillation passes or reconstruction epochs, until its
    estimate fits ``seconds``: text goes first down to ``minimum_windows`` (or 2 passes of distillation over more),
    then passes down to one. Returns the smallest such workload when even that does not fit (the caller says so)."""
    current = work
    while sum(estimate(current, speed).values()) > seconds:
        smaller = _shrink(current, minimum_windows)
        if smaller == current:
            break
        current = smaller
    return current


def _shrink(work: Workload, minimum_windows: int) -> Workload:
    """One step smaller: a quarter fewer calibration windows (and the steps that read them), else one pass fewer."""
    if work.capture_windows > minimum_windows:
        windows = max(minimum_windows, math.floor(work.capture_windows * 0.75))
        passes = work.distill_steps * work.distill_batch / work.capture_windows if work.capture_windows else 0
        steps = math.ceil(passes * windows / work.distill_batch) if work.distill_steps else 0
        rows = math.ceil(work.rows * windows / work.capture_windows)
        return replace(work, capture_windows=windows, distill_steps=steps, rows=rows, capture_reused=False)
    per_pass = math.ceil(work.capture_windows / work.distill_batch)
    if work.distill_steps > per_pass:
        return replace(work, distill_steps=max(per_pass, work.distill_steps - per_pass))
    if work.reconstruction_epochs > 1:
        return replace(work, reconstruction_epochs=work.reconstruction_epochs - 1)
    return work


def workload_of(trainer, module, datamodule) -> Workload:
    """The :class:`Workload` a fit of ``module`` on ``datamodule`` with ``trainer`` will run, on this process."""
    hp, compression = datamodule.hparams, module.compression_options
    windows = len(datamodule.calibration_windows())
    sensitivity_windows, sensitivity_len = 0, hp.seq_len
    if module.allocation_pending:
        sensitivity_len = min(hp.seq_len, compression.sensitivity_seq_len or hp.seq_len)
        pieces = len(datamodule.all_calibration_windows()) * (hp.seq_len // sensitivity_len)
        sensitivity_windows = min(compression.sensitivity_samples, pieces)
    objective = module.objective_options
    steps, epochs = 0, 0
    if module.trains:
        loop = trainer.fit_loop
        if objective.objective == "kl":
            per_pass = math.ceil(windows / objective.distill_batch_size)
            steps = loop.epoch_loop.max_steps if loop.epoch_loop.max_steps > 0 else per_pass * (loop.max_epochs - 1)
        else:
            epochs = max(0, (loop.max_epochs or 1) - module.stats_epochs)
    geometry = module.geometry
    return Workload(
        seq_len=hp.seq_len,
        sensitivity_windows=sensitivity_windows,
        sensitivity_len=sensitivity_len,
        capture_windows=windows,
        distill_steps=steps,
        distill_batch=objective.distill_batch_size,
        reconstruction_epochs=epochs,
        rows=min(hp.max_samples_per_head, windows * hp.seq_len),
        rows_batch=hp.kv_batch_size,
        geometry=(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim),
        eval_windows=len(datamodule.eval_windows()),
        prerope_keys=any(block == 1 for block in module.compressor.rope_blocks) and geometry.rope,
        distill_tokens=objective.distill_tokens if steps else 1.0,
    )


def minutes(seconds: float) -> str:
    """``seconds`` as a person reads a duration: ``45 s``, ``3.5 min``, ``1 h 12 min``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{int(seconds // 3600)} h {round(seconds % 3600 / 60):d} min"


class TimeEstimate(pl.Callback):
    """Say how long the fit and validation will take before they start (``setup`` of fit, before the widths are
    allocated), and with ``time_budget`` (seconds) shrink the calibration text and steps until the estimate fits.

    Rank 0 times the model and decides; every process applies the same decision (broadcast).

    Attributes:
        estimated: the estimate of the phases still to run once it is made, seconds per phase (the run's results
            record it beside what each took).
        workload: the workload it estimated (after any shrinking).
        speed: what the probes timed (the estimate's inputs; the run's results record them, so that the factors can be
            checked against whole runs on other machines).
        probe_seconds: how long loading and timing the model took, before the estimate (the "setup" phase of the
            run's measured phases).
    """

    def __init__(self, time_budget: float | None = None) -> None:
        self.time_budget = time_budget
        self.estimated: dict[str, float] | None = None
        self.workload: Workload | None = None
        self.speed: Speed | None = None
        self.probe_seconds = 0.0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or pl_module.sharded:  # a sharded model cannot be timed whole before FSDP shards it
            return
        datamodule = trainer.datamodule
        planned = workload_of(trainer, pl_module, datamodule)
        decision = None
        if trainer.global_rank == 0:
            start = time.perf_counter()  # the model loads here: its time counts as the setup phase's
            model = pl_module.frozen.to(trainer.strategy.root_device)
            directory = datamodule.capture_path(pl_module.fingerprint, pl_module.compressor.rope_blocks)
            planned = replace(planned, capture_reused=load_manifest(directory, verify=False) is not None)
            rows = None if planned.distill_steps else (planned.geometry, planned.rows_batch)
            speed = measure_speed(model, planned.lengths(), distill_tokens=planned.distill_tokens, rows=rows)
            probe = time.perf_counter() - start
            work = planned if self.time_budget is None else fit_time_budget(planned, speed, self.time_budget - probe)
            decision = (work, estimate(work, speed), speed, probe)
        work, phases, speed, probe = trainer.strategy.broadcast(decision, src=0)
        if work.capture_windows != planned.capture_windows:
            datamodule.keep_calibration_windows(work.capture_windows * trainer.world_size)
        if work.distill_steps != planned.distill_steps:
            trainer.fit_loop.epoch_loop.max_steps = work.distill_steps
        if work.reconstruction_epochs != planned.reconstruction_epochs:
            trainer.fit_loop.max_epochs = pl_module.stats_epochs + work.reconstruction_epochs
        self.workload, self.estimated, self.probe_seconds, self.speed = work, phases, probe, speed
        if trainer.global_rank == 0:
            print(_estimate_line(phases, speed, work, probe), flush=True)
            if self.time_budget is not None:
                print(_budget_line(planned, work, sum(phases.values()), self.time_budget), flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        self._since = (time.perf_counter(), trainer.global_step, trainer.current_epoch)
        self._said = 0.0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """Reconstruction epochs: one line per epoch with the time left (the statistics epoch excluded from the
        rate: it runs no optimizer step), so a log that is not a terminal shows progress too."""
        if not trainer.is_global_zero or self.workload is None:
            return
        loop, now = trainer.fit_loop, time.perf_counter()
        start, _, epoch0 = self._since
        if trainer.current_epoch < pl_module.stats_epochs:  # the rate counts from the first training epoch
            self._since = (now, trainer.global_step, trainer.current_epoch + 1)
            return
        if loop.epoch_loop.max_steps > 0 or not loop.max_epochs or loop.max_epochs < 0:
            return  # distillation counts steps: on_train_batch_end says
        epochs = trainer.current_epoch + 1 - epoch0
        left = (now - start) / epochs * (loop.max_epochs - trainer.current_epoch - 1)
        _say(trainer, f"fit: {trainer.current_epoch + 1}/{loop.max_epochs} epochs, about {minutes(left)} left")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Distillation: a line with the steps done and the time left, at most once every :data:`SAY_EVERY`
        seconds (its steps are long: 30 s each at 4096 tokens on two CPU cores), and at the last step."""
        total = trainer.fit_loop.epoch_loop.max_steps
        if not trainer.is_global_zero or self.workload is None or total <= 0:
            return
        now = time.perf_counter()
        if trainer.current_epoch < pl_module.stats_epochs:  # the statistics epoch runs no step
            self._since = (now, trainer.global_step, trainer.current_epoch)
            return
        start, step0, _ = self._since
        steps = trainer.global_step - step0
        if steps <= 0 or (now - self._said < SAY_EVERY and trainer.global_step < total):
            return
        self._said = now
        left = (now - start) / steps * (total - trainer.global_step)
        _say(trainer, f"fit: {trainer.global_step}/{total} steps, about {minutes(left)} left")


def _estimate_line(phases: dict[str, float], speed: Speed, work: Workload, probe: float) -> str:
    parts = "".join(f"{name} {minutes(seconds)}, " for name, seconds in phases.items() if seconds >= 0.5)
    return (
        f"Time estimate:          about {minutes(sum(phases.values()))} ({parts}from a forward of "
        f"{work.seq_len} tokens timed at {speed.forward[work.seq_len]:.2f} s on this machine)"
    )


def _budget_line(planned: Workload, work: Workload, total: float, budget: float) -> str:
    changes = []
    if work.capture_windows != planned.capture_windows:
        changes.append(f"{work.capture_windows} calibration windows instead of {planned.capture_windows}")
    if work.distill_steps != planned.distill_steps:
        changes.append(f"{work.distill_steps} distillation steps instead of {planned.distill_steps}")
    if work.reconstruction_epochs != planned.reconstruction_epochs:
        changes.append(f"{work.reconstruction_epochs} epochs instead of {planned.reconstruction_epochs}")
    what = "; ".join(changes) if changes else "the plan fits as it is"
    line = f"Time budget:            {minutes(budget)}: {what}"
    if total > budget:
        line += f" (the smallest plan still takes about {minutes(total)}: give more time or a larger --kv-budget)"
    return line


def _say(trainer, line: str) -> None:
    """Print ``line`` through the progress bar on a terminal (its own print keeps the bar intact); elsewhere (a log
    file, a pipe), where the bar draws nothing and a rich bar would swallow what is printed while it runs, straight
    to the process's stdout."""
    bar = trainer.progress_bar_callback
    terminal = sys.__stdout__ is not None and sys.__stdout__.isatty()
    if terminal and bar is not None and hasattr(bar, "print"):
        bar.print(line)
    elif sys.__stdout__ is not None:
        sys.__stdout__.write(line + "\n")
        sys.__stdout__.flush()
