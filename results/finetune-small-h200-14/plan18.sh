#!/bin/bash
# Fourteenth session, 1 x H200: the small teacher's gdn hybrid (full 1, 6) at the CPU budget's tokens: smaller
# batches (more steps), the learning rate outside attention, LongCE. RULER with 20 samples after each.
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
if phase p18; then
  small b4 &
  small b1 --batch-size 1 &
  small b2 --batch-size 2 &
  small b1-lr5e-4 --batch-size 1 --lr 5e-4 --lr-other 3.5e-5 &
  small b1-lr2e-3 --batch-size 1 --lr 2e-3 --lr-other 1.4e-4 &
  small b1-lo3e-4 --batch-size 1 --lr-other 3e-4 &
  small b1-lo1e-3 --batch-size 1 --lr-other 1e-3 &
  small b4-lo1e-3 --lr-other 1e-3 &
  small b1-lw20 --batch-size 1 --long-weight 20 &
  small b1-lw20-lo1e-3 --batch-size 1 --long-weight 20 --lr-other 1e-3 &
  small b1-327k --batch-size 1 --tokens 327680 &
  small b1-lw20-327k --batch-size 1 --long-weight 20 --tokens 327680 &
  wait; done_ p18
fi
log "all done"
