#!/usr/bin/env bash
# On a machine with a CUDA GPU, in one go: the GPU tests (tests marked `gpu`: equivalence in float32 and bfloat16,
# agreement with the CPU, pinned side-stream adapter copies, a decode step without host syncs, bf16 generation
# independent of the batch), then the benchmarks' hardware sections on the GPU (float32 and bfloat16 rows, the
# calibrated planner beside a sweep of fixed overhead_tokens, PEFT one at a time in both dtypes), written to
# benchmarks/RESULTS.md (sections *_cuda). Fails at once when torch sees no GPU: these checks must not pass vacuously.
#
#   bash scripts/gpu_check.sh            # PYTHON=... to use another interpreter; ARGS_CLASSIFY / ARGS_GENERATE add flags
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}

"$PYTHON" - <<'PY'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device (torch.version.cuda = {torch.version.cuda}); "
             "install a CUDA build of torch on a GPU machine")
props = torch.cuda.get_device_properties(0)
print(f"gpu_check: {props.name}, {props.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}, "
      f"torch {torch.__version__}, cuda {torch.version.cuda}")
PY

# -m gpu selects exactly the GPU tests; a skip there means something is wrong, so skips fail the run too
"$PYTHON" -m pytest -q -p no:cacheprovider -m gpu -rs tests/server/test_gpu.py | tee /tmp/ptserve-gpu-tests.log
if grep -qE "[0-9]+ skipped" /tmp/ptserve-gpu-tests.log; then
    echo "gpu_check: GPU tests were skipped" >&2
    exit 1
fi

"$PYTHON" -m benchmarks.bench_classify --only-dtypes --device cuda --threads 2 ${ARGS_CLASSIFY:-}
"$PYTHON" -m benchmarks.bench_generate --only-dtypes --device cuda --threads 2 ${ARGS_GENERATE:-}
echo "gpu_check: done; see benchmarks/RESULTS.md (sections bench_classify_dtypes_cuda, bench_generate_dtypes_cuda)"
