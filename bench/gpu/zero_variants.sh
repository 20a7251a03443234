#!/bin/bash
# Where does the DeepSpeed engine's step time go at DP=1? One GPU call (see bench/gpu/README.md):
# overhead_gpu.py (megagrow vs plain AMP) for ZeRO-1 / ZeRO-2 / ZeRO-2 with ds_configs/zero2.json,
# then a torch.profiler table of 5 megagrow ZeRO-2 steps.
#   CPU dry run: SMALL=1 SKIP_INSTALL=1 PY=.venv/bin/python OUT=/tmp/out bash bench/gpu/zero_variants.sh
set -u -o pipefail
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/zv_out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
PY=${PY:-python3}; W=${W:-/tmp/zv}; rm -rf "$W"; mkdir -p "$W"
if [ -z "${SKIP_INSTALL:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
DATA=$W/d/stdlib
timeout 120 $PY tools/prepare_data.py --out $DATA --vocab-size 8192 --max-files ${MAXF:-400} --no-progress --json || DATA=$PWD/data_cache/stdlib
if [ -n "${SMALL:-}" ]; then
  MODEL="{flavour: gpt2, n_layers: 2, d_model: 128, n_heads: 4, vocab_size: 8192, seq_len: 128}"; MB=4; DT=fp32; N=6
else
  MODEL="{flavour: gpt2, n_layers: 12, d_model: 768, n_heads: 12, vocab_size: 8192, seq_len: 1024}"; MB=8; DT=bf16; N=20
fi
plan() {  # $1 name, $2 zero stage, $3 extra layout
cat > $W/$1.yaml <<YAML
name: $1
seed: 1234
data: {prefix: $DATA}
stages:
  - name: s
    model: $MODEL
    layout: {tp: 1, dp: 1, zero_stage: $2, micro_batch: $MB, dtype: $DT $3}
    steps: 1000
YAML
}
plan z1 1 ""; plan z2 2 ""; plan z2tuned 2 ", ds_config: ds_configs/zero2.json"
for v in z1 z2 z2tuned; do
  echo "== $v"
  $PY bench/gpu/overhead_gpu.py $W/$v.yaml --steps $N --loops megagrow,plain_amp --json-out $OUT/overhead_$v.json 2>&1 | grep -v "Warning\|warn(" | tail -4
done
echo "== profile (z2, 5 steps after 3 warm-up)"
$PY - $W/z2.yaml <<'PYEOF' 2>&1 | grep -v "Warning\|warn(" | tail -45
import sys, torch
from megagrow.bench import single_process_stage
from megagrow.config import load_plan
from megagrow.parallel.engine import set_lr
from megagrow.parallel.groups import init_distributed
from megagrow.data.batches import Batches
from megagrow.parallel.engine import build_stage as build
plan = single_process_stage(load_plan(sys.argv[1]), 0); st = plan.stages[0]
init_distributed(st.layout); engine, opt = build(plan, 0); b = Batches.open(plan, st, 0, 1)
def step(i):
    set_lr(opt, 1e-4); x, y, _ = b.micro(i * st.layout.global_batch, 0, engine.device)
    loss = engine(x, y); engine.backward(loss); engine.step()
for i in range(3): step(i)
acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
with torch.profiler.profile(activities=acts) as prof:
    for i in range(3, 8): step(i)
    if torch.cuda.is_available(): torch.cuda.synchronize()
key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60))
PYEOF
