#!/bin/bash
# The rest of the GPU suite (the graphed-step tests ran in plan16) on one GPU: `bash gpujobs/plan17.sh`, carry [".gpu", ".whl"]
cd "$(dirname "$0")/.."
source .gpu/setup.sh > $OUT/setup.log 2>&1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,memory.total --format=csv > $OUT/gpus.txt
git rev-parse --short HEAD 2>/dev/null > $OUT/head.txt || cp gpujobs/HEAD $OUT/head.txt
PYTHONPATH=tests/quick_autotune:$PYTHONPATH timeout ${1:-470} python3 -m pytest -m gpu -q -rA --durations=0 \
    tests/test_gpu.py tests/test_distributed.py -k "not cuda_graph and not compiled_layers" 2>&1 | tee $OUT/gpu-rest.log | tail -60
