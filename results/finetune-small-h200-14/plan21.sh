#!/bin/bash
# Fourteenth session, 1 x H200: the new small-model defaults (327,680 tokens, batch 1, --hidden-weight 3) and their learning rates.
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
if phase p21; then
  small default &
  small d-lo3e-4 --lr-other 3e-4 &
  small d-lo2e-4 --lr-other 2e-4 &
  small d-lr5e-4 --lr 5e-4 --lr-other 3.5e-5 &
  small d-lr2e-3 --lr 2e-3 --lr-other 1.4e-4 &
  small d-lw20 --long-weight 20 &
  wait; done_ p21
fi
log "all done"
