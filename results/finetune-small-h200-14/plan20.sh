#!/bin/bash
# Fourteenth session, 1 x H200: the hidden-state loss's weight at the CPU budget, and on 5.2M fresh tokens.
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
FT=$D/ft-text
( [ -f $FT/more.json ] || timed more-text python3 small_model/more_text.py --out $FT --tokens 5300000 \
    --workers 10 > $R/more-text.log 2>&1; touch $D/ft.done ) &
if phase p20; then
  small b1-h3 --batch-size 1 --hidden-weight 3 &
  small b1-h30 --batch-size 1 --hidden-weight 30 &
  small b1-h3-327k --batch-size 1 --hidden-weight 3 --tokens 327680 &
  small b1-h10-327k --batch-size 1 --hidden-weight 10 --tokens 327680 &
  small b1-lw20-h3-327k --batch-size 1 --long-weight 20 --hidden-weight 3 --tokens 327680 &
  small b1-lw20-h10-327k --batch-size 1 --long-weight 20 --hidden-weight 10 --tokens 327680 &
  small b1-lw10-h3-327k --batch-size 1 --long-weight 10 --hidden-weight 3 --tokens 327680 &
  while [ ! -f $D/ft.done ]; do sleep 5; done
  small fresh5m-lw20-h3 --data $FT --tokens 5242880 --long-weight 20 --hidden-weight 3 &
  small fresh5m-h3 --data $FT --tokens 5242880 --hidden-weight 3 &
  wait; done_ p20
fi
log "all done"
