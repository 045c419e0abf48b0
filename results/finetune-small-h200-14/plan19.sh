#!/bin/bash
# Fourteenth session, 1 x H200: a per-layer hidden-state loss (--hidden-weight) beside the KL.
cd "$(dirname "$0")/.."
source gpujobs/lib.sh
export OMP_NUM_THREADS=1
small() {  # name, finetune.py flags...
  local n=$1; shift
  timed ft-$n timeout 1000 python3 finetune.py --arch gpujobs/small/gdn16.json --out $D/small/$n --checkpoint-every 100000 "$@" \
      > $R/ft-$n.log 2>&1 && timed ruler-$n timeout 900 python3 eval_ruler.py --arch $D/small/$n/arch.json \
      --fill gdn --baselines none --samples 20 --no-speed --out $R/ruler-$n > $R/ruler-$n.log 2>&1
  cp $D/small/$n/arch.json $R/ft-$n.arch.json 2>/dev/null
}
if phase p19; then
  small b1-h0.1 --batch-size 1 --hidden-weight 0.1 &
  small b1-h1 --batch-size 1 --hidden-weight 1 &
  small b1-h10 --batch-size 1 --hidden-weight 10 &
  small b4-h1 --hidden-weight 1 &
  small b1-lw20-h1 --batch-size 1 --long-weight 20 --hidden-weight 1 &
  small b1-lw20-h10 --batch-size 1 --long-weight 20 --hidden-weight 10 &
  small b1-lw20-h1-327k --batch-size 1 --long-weight 20 --hidden-weight 1 --tokens 327680 &
  small b1-h1-327k --batch-size 1 --hidden-weight 1 --tokens 327680 &
  small b1-lw20-327k-again --batch-size 1 --long-weight 20 --tokens 327680 &
  small b1-h100 --batch-size 1 --hidden-weight 100 &
  wait; done_ p19
fi
log "all done"
