"""kvlight never monkey-patches: importing it changes no library object, and serving/capturing leaves no hooks."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import ARCHS

from kvlight.calibration.capture import capture_kv
from kvlight.geometry import kv_geometry
from kvlight.models import rotary_module
from kvlight.serving.wrapper import CompressedKVModelWrapper

# Runs in a fresh interpreter: snapshot library objects, import kvlight and every submodule, compare.
_PROBE = r"""
import importlib, json, pkgutil
import torch, torch.nn.functional
import transformers, transformers.cache_utils as cu, transformers.generation.utils as gu
import transformers.modeling_utils as mu
from transformers.models.llama import modeling_llama as ml
from transformers.models.gpt2 import modeling_gpt2 as mg
import lightning.pytorch as pl

CLASSES = {
    "torch.nn.Module": torch.nn.Module,
    "torch.Tensor": torch.Tensor,
    "LlamaAttention": ml.LlamaAttention,
    "LlamaRotaryEmbedding": ml.LlamaRotaryEmbedding,
    "LlamaModel": ml.LlamaModel,
    "LlamaForCausalLM": ml.LlamaForCausalLM,
    "GPT2Attention": mg.GPT2Attention,
    "GPT2Model": mg.GPT2Model,
    "Cache": cu.Cache,
    "DynamicCache": cu.DynamicCache,
    "DynamicLayer": cu.DynamicLayer,
    "GenerationMixin": gu.GenerationMixin,
    "PreTrainedModel": mu.PreTrainedModel,
    "LightningModule": pl.LightningModule,
}
MODULES = {"torch.nn.functional": torch.nn.functional, "modeling_llama": ml, "modeling_gpt2": mg, "cache_utils": cu}
GLOBAL_HOOKS = [n for n in dir(torch.nn.modules.module) if n.startswith("_global_")]

def snapshot():
    snap = {}
    for name, cls in CLASSES.items():
        for attr, value in vars(cls).items():
            snap[f"{name}.{attr}"] = id(value)
    for name, module in MODULES.items():
        for attr, value in vars(module).items():
            if callable(value):
                snap[f"{name}.{attr}"] = id(value)
    for name, fn in mu.ALL_ATTENTION_FUNCTIONS.items():
        snap[f"ALL_ATTENTION_FUNCTIONS[{name}]"] = id(fn)
    for name in GLOBAL_HOOKS:
        value = getattr(torch.nn.modules.module, name)
        snap[f"hooks.{name}"] = repr(value) if value is None or isinstance(value, bool) else len(value)
    return snap

keep = [ml.LlamaAttention.forward, cu.DynamicCache.update, torch.nn.Module.__call__]  # keep ids alive
before = snapshot()
import kvlight
imported = [m.name for m in pkgutil.walk_packages(kvlight.__path__, "kvlight.")]
for name in imported:
    importlib.import_module(name)
after = snapshot()
changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
print(json.dumps({"imported": imported, "changed": changed,
                  "same": [ml.LlamaAttention.forward is keep[0], cu.DynamicCache.update is keep[1],
                           torch.nn.Module.__call__ is keep[2]]}))
"""


def test_importing_kvlight_patches_nothing():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"kvlight.serving.cache", "kvlight.serving.wrapper", "kvlight.calibration.module", "kvlight.cli"} <= set(
        report["imported"]
    )
    assert report["changed"] == []
    assert report["same"] == [True, True, True]


def hook_state(model):
    """Every hook dict of every submodule, by qualified name (empty ones left out)."""
    state = {}
    for name, module in model.named_modules():
        for kind in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_state_dict_hooks",
            "_load_state_dict_pre_hooks",
        ):
            hooks = getattr(module, kind, None)
            if hooks:
                state[(name, kind)] = list(hooks)
    return state


@pytest.mark.parametrize("arch", ARCHS)
def test_wrapper_close_leaves_no_hooks(arch, tiny_models, fitted_compressor):
    model = tiny_models[arch]
    before = hook_state(model)
    forward = type(model).forward
    wrapper = CompressedKVModelWrapper(model, fitted_compressor(arch, "pca", rank=8))
    rotary = rotary_module(model)
    if kv_geometry(model).rope:
        assert len(rotary._forward_pre_hooks) == 1  # the position observer, and nothing else
    else:
        assert hook_state(model) == before  # GPT-2: nothing to observe
    wrapper.generate(input_ids=torch.tensor([[3, 4, 5]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    wrapper.close()
    wrapper.close()  # idempotent
    assert hook_state(model) == before == {}
    assert type(model).forward is forward
    assert not hasattr(model, "_kvlight") and "forward" not in vars(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_leaves_no_hooks_even_on_error(arch, tiny_models):
    model = tiny_models[arch]
    geometry = kv_geometry(model)
    capture_kv(model, geometry, [torch.tensor([[1, 2, 3, 4]])], capacity=16, progress=False)
    assert hook_state(model) == {}
    with pytest.raises(IndexError):  # token id beyond the vocabulary: the forward fails mid-capture
        capture_kv(model, geometry, [torch.tensor([[1, 10_000]])], capacity=16, progress=False)
    assert hook_state(model) == {}
