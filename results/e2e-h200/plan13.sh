#!/bin/bash
# Tenth session, 2 x H200. First both GPUs: the Qwen2.5-32B shape sharded with --fsdp (tests/benchmark_dist.py),
# while the CPUs write the 3B model, its text, and fresh finetuning text for the small teacher. Then two lanes:
#   GPU 0: preparation on 1 rank (reproduces step 1036's candidates), then the 1-GPU --cuda-graph search end to end
#   GPU 1: small-teacher finetunes (repeated and fresh text) and their RULER, and the replay of step 1036 (--all)
cd "$(dirname "$0")/.."
source gpujobs/lib.sh
FT=$D/ft-text
if phase c0; then
  ( model_and_text; touch $D/mt.done ) &
  ( [ -f $FT/more.json ] || timed more-text python3 small_model/more_text.py --out $FT --tokens 21000000 \
      --workers 12 > $R/more-text.log 2>&1; touch $D/ft.done ) &
  done_ c0
fi
if phase pF; then
  timed fsdp32 timeout 480 torchrun --standalone --nproc-per-node 2 tests/benchmark_dist.py --shape qwen2.5-32b \
      --fsdp --steps 20 --out $R/bench-32b-fsdp2.json > $R/fsdp32.log 2>&1; done_ pF
fi
while [ ! -f $D/mt.done ]; do sleep 5; done
lane_a() {
  export CUDA_VISIBLE_DEVICES=0
  if phase pP; then
    timed prep timeout 400 torchrun --standalone --nproc-per-node 1 prepare_candidates.py --model $M \
        --data $TXT --tokens $PT --cache $C > $R/prep.log 2>&1; done_ pP
  fi
  if phase p1; then
    timed dash-1 timeout 1100 python3 dash.py --model $M --data $TXT --cache $C --prep-tokens $PT \
        --no-prepare --check-samples 0 --cuda-graph --out $D/out-1 > $R/dash-1.log 2>&1
    cp $D/out-1/arch.json $R/arch-dash-1.json 2>/dev/null; done_ p1
  fi
}
small() {  # name, finetune.py flags...
  local n=$1; shift
  timed ft-$n timeout 1000 python3 finetune.py --arch gpujobs/small/gdn16.json --out $D/small/$n --checkpoint-every 1000 "$@" \
      > $R/ft-$n.log 2>&1 && timed ruler-$n timeout 600 python3 eval_ruler.py --arch $D/small/$n/arch.json \
      --fill gdn --baselines none --samples 20 --out $R/ruler-$n > $R/ruler-$n.log 2>&1
  cp $D/small/$n/arch.json $R/ft-$n.arch.json 2>/dev/null
}
replay() {
  export CUDA_VISIBLE_DEVICES=1
  while [ ! -f $D/pP.done ]; do sleep 5; done
  if phase pA; then
    timed replay-all timeout 300 python3 tests/replay_step.py results/e2e-h200x2/nonfinite-step-1036.pt --cache $C \
        --all 2>&1 | grep -v "Loading\|TileLang:" > $R/replay-all.log; done_ pA
  fi
}
lane_b() {
  export CUDA_VISIBLE_DEVICES=1 OMP_NUM_THREADS=2
  if phase pS; then
    timed ruler-before timeout 600 python3 eval_ruler.py --arch gpujobs/small/gdn16.json --fill gdn --baselines none \
        --samples 20 --out $R/ruler-before > $R/ruler-before.log 2>&1 &
    small default &
    small rep16 --tokens 327680 --epochs 16 &
    small rep64 --tokens 327680 --epochs 64 &
    while [ ! -f $D/ft.done ]; do sleep 5; done
    small fresh5m --data $FT --tokens 5242880 &
    small fresh21m --data $FT --tokens 20971520 &
    wait; done_ pS
  fi
}
lane_a & lane_b & replay & wait
log "all done"
