#!/bin/bash
# For the next session (any kind; 4 GPUs best): the graph slack (graph_covers, commit ea8a4d2) on a GPU.
#   `bash gpujobs/call.sh plan16.sh 575`, carry [".gpu", ".whl"]; send each follow-up call at once (idle release 30 s).
#   pP  preparation on all GPUs, the default 8.4M tokens (as results/e2e-h200x4/)
#   pS  the search end to end, --cuda-graph, with those candidates: compare graph_captures and the loop's time with
#       results/e2e-h200x4/ (86 captures, 155 s recapturing; expected 5 captures)
#   pG  the GPU test of the graphed step (a replay after one operator is pruned, a capture after more)
#   pW  the search again, caches warm (what a second run takes; phase_s in arch.json says where the time went)
cd "$(dirname "$0")/.."
source gpujobs/lib.sh
C=$D/cands-$NG.safetensors
# pG on the last GPU while p0 builds the model and the text on the CPU (model_and_text's wait covers it)
if phase pG; then
  ( CUDA_VISIBLE_DEVICES=$((NG-1)) PYTHONPATH=tests/quick_autotune:$PYTHONPATH timed gputest timeout 900 python3 -m pytest \
      -m gpu -q tests/test_gpu.py -k "cuda_graph or compiled_layers" > $R/gputest.log 2>&1; done_ pG ) &
fi
if phase p0; then model_and_text; done_ p0; fi
wait
if phase pP; then
  timed prep timeout 900 torchrun --standalone --nproc-per-node $NG prepare_candidates.py --model $M \
      --data $TXT --cache $C > $R/prep.log 2>&1; done_ pP
fi
if phase pS; then
  timed dash timeout 900 torchrun --standalone --nproc-per-node $NG dash.py --model $M --data $TXT --cache $C \
      --no-prepare --check-samples 0 --cuda-graph --out $D/out > $R/dash.log 2>&1
  cp $D/out/arch.json $R/arch-dash.json 2>/dev/null; done_ pS
fi
if phase pW; then
  timed dash-warm timeout 900 torchrun --standalone --nproc-per-node $NG dash.py --model $M --data $TXT --cache $C \
      --no-prepare --check-samples 0 --cuda-graph --out $D/out-w > $R/dash-w.log 2>&1
  cp $D/out-w/arch.json $R/arch-dash-w.json 2>/dev/null; done_ pW
fi
log "all done"
