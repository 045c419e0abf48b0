#!/bin/bash
# For the first session that gets nvidia-h200-x4 (or -h100-x4): the parts of #20 that need 4 GPUs, in one plan
# (about 20 min of device time: send each follow-up call at once, `bash gpujobs/call.sh plan15.sh 575`).
#   pP  preparation on 4 GPUs, the default 8.4M tokens (target <= 3 min), timed from start to the candidate file
#   p4  the search end to end on 4 GPUs, --cuda-graph, with those candidates (target <= 2.5 min)
#   pF  the Qwen2.5-32B shape sharded with --fsdp on 4 GPUs (tokens/s and peak memory per GPU)
#   p4w the 4-GPU search again, its kernels now in the disk caches (what a second run on a machine takes)
cd "$(dirname "$0")/.."
source gpujobs/lib.sh
C=$D/cands-4.safetensors
if phase p0; then model_and_text; done_ p0; fi
if phase pP; then
  timed prep-4 timeout 900 torchrun --standalone --nproc-per-node $NG prepare_candidates.py --model $M \
      --data $TXT --cache $C > $R/prep-4.log 2>&1; done_ pP
fi
if phase p4; then
  timed dash-4 timeout 900 torchrun --standalone --nproc-per-node $NG dash.py --model $M --data $TXT --cache $C \
      --no-prepare --check-samples 0 --cuda-graph --out $D/out-4 > $R/dash-4.log 2>&1
  cp $D/out-4/arch.json $R/arch-dash-4.json 2>/dev/null; done_ p4
fi
if phase pF; then
  timed fsdp32-4 timeout 900 torchrun --standalone --nproc-per-node $NG tests/benchmark_dist.py --shape qwen2.5-32b \
      --fsdp --steps 20 --out $R/bench-32b-fsdp4.json > $R/fsdp32-4.log 2>&1; done_ pF
fi
if phase p4w; then
  timed dash-4-warm timeout 900 torchrun --standalone --nproc-per-node $NG dash.py --model $M --data $TXT --cache $C \
      --no-prepare --check-samples 0 --cuda-graph --out $D/out-4w > $R/dash-4w.log 2>&1
  cp $D/out-4w/arch.json $R/arch-dash-4w.json 2>/dev/null; done_ p4w
fi
log "all done"
