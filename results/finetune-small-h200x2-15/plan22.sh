#!/bin/bash
# Fifteenth session, 1 or 2 H200s: (1) the per-layer loss's speed and memory on the 3B finetune step, alone on the GPU;
# (2) the new small-model recipe (batch 1, --hidden-weight 3) on fresh text at 655k-2.6M tokens, beside the GPU tests.
cd "$(dirname "$0")/.."
source gpujobs/lib.sh
if phase bench; then
  timed bench-ft timeout 900 python3 tests/benchmark.py --finetune attn,all --finetune-hidden 0,3 --steps 12 \
      --fla-configs fla_configs/NVIDIA_H100_80GB_HBM3 --out $R/bench-h200-finetune-hidden.json > $R/bench-ft.log 2>&1
  done_ bench
fi
export OMP_NUM_THREADS=1
small() {  # gpu, name, finetune.py flags...
  local g=$1 n=$2; shift 2
  export CUDA_VISIBLE_DEVICES=$(( g % NG ))
  timed ft-$n timeout 1500 python3 finetune.py --arch gpujobs/small/gdn16.json --out $D/small/$n --checkpoint-every 100000 "$@" \
      > $R/ft-$n.log 2>&1 && timed ruler-$n timeout 900 python3 eval_ruler.py --arch $D/small/$n/arch.json \
      --fill gdn --baselines none --samples 20 --no-speed --out $R/ruler-$n > $R/ruler-$n.log 2>&1
  cp $D/small/$n/arch.json $R/ft-$n.arch.json 2>/dev/null
}
FT=$D/ft-text
if phase p22; then
  [ -f $FT/more.json ] || timed more-text python3 small_model/more_text.py --out $FT --tokens 3000000 \
      --workers 12 > $R/more-text.log 2>&1
  ( PYTHONPATH=tests/quick_autotune:$PYTHONPATH timed gpu-tests timeout 900 python3 -m pytest -m gpu -q -rA \
      --durations=0 tests/test_gpu.py tests/test_distributed.py > $R/gpu-tests.log 2>&1 ) &
  small 0 e2 --epochs 2 &
  small 0 f655k --data $FT --tokens 655360 &
  small 0 f655k-lw20 --data $FT --tokens 655360 --long-weight 20 &
  small 0 f1m --data $FT --tokens 1310720 &
  small 1 f1m-lw20 --data $FT --tokens 1310720 --long-weight 20 &
  small 1 f2m --data $FT --tokens 2621440 &
  small 1 f2m-lw20 --data $FT --tokens 2621440 --long-weight 20 &
  wait; done_ p22
fi
log "all done"
