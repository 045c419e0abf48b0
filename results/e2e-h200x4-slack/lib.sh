# Sourced by the plans: the GPU site, paths, and idempotent phases (a phase with a .done marker is skipped).
D=/tmp/dg; R=$D/res; mkdir -p $R
source .gpu/setup.sh > $R/setup.log 2>&1
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
M=/tmp/qwen2.5-3b-random; TXT=/tmp/dash-text; PT=65536; C=$D/cands.safetensors
NG=$(nvidia-smi -L | wc -l)
log() { echo "$(date +%T) $*" | tee -a $R/plan.txt; }
timed() { local name=$1; shift; local s=$(date +%s); "$@"; local rc=$?; echo "$name rc=$rc $(( $(date +%s) - s )) s $(date +%T)" >> $R/times.txt; return $rc; }
phase() { [ -f $D/$1.done ] && { log "skip $1 (done)"; return 1; }; log "start $1"; return 0; }
done_() { touch $D/$1.done; log "done $1"; }
model_and_text() {
  ( [ -d $M ] || CUDA_VISIBLE_DEVICES=0 timed model python3 tests/local_shape.py model $M --shape qwen2.5-3b > $R/model.log 2>&1 ) &
  ( [ -f $TXT/text.jsonl.gz ] || timed text python3 tests/local_shape.py text $TXT --tokens 21000000 > $R/text.log 2>&1 ) &
  wait
}
nvidia-smi --query-gpu=index,name,memory.total --format=csv > $R/gpus.txt 2>&1
log "code $(cat gpujobs/HEAD), $NG GPUs"
