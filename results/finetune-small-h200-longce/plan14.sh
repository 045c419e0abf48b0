#!/bin/bash
# Eleventh session, 1 x H200: LongCE token weights (finetune.py --long-weight) on the small teacher's gdn hybrid
# (full attention in layers 1 and 6). Default tokens at caps 0 (baseline), 5, 20, 100; then fresh text, 5.2M and
# 21M tokens, at cap 20 (their cap-0 runs: results/finetune-small-h200/). RULER with 20 samples after each.
cd "$(dirname "$0")/.."
source gpujobs/lib.sh
FT=$D/ft-text
export OMP_NUM_THREADS=2
( [ -f $FT/more.json ] || timed more-text python3 small_model/more_text.py --out $FT --tokens 21000000 \
    --workers 10 > $R/more-text.log 2>&1; touch $D/ft.done ) &
small() {  # name, finetune.py flags...
  local n=$1; shift
  timed ft-$n timeout 1000 python3 finetune.py --arch gpujobs/small/gdn16.json --out $D/small/$n --checkpoint-every 1000 "$@" \
      > $R/ft-$n.log 2>&1 && timed ruler-$n timeout 600 python3 eval_ruler.py --arch $D/small/$n/arch.json \
      --fill gdn --baselines none --samples 20 --no-speed --out $R/ruler-$n > $R/ruler-$n.log 2>&1
  cp $D/small/$n/arch.json $R/ft-$n.arch.json 2>/dev/null
}
if phase pD; then
  small default &
  small lw5 --long-weight 5 &
  small lw20 --long-weight 20 &
  small lw100 --long-weight 100 &
  while [ ! -f $D/ft.done ]; do sleep 5; done
  small fresh5m-lw20 --data $FT --tokens 5242880 --long-weight 20 &
  small fresh21m-lw20 --data $FT --tokens 20971520 --long-weight 20 &
  wait; done_ pD
fi
log "all done"
