#!/bin/bash
# One-call GPU check of megagrow (see bench/gpu/README.md). Run from the repository root:
#   bash bench/gpu/check.sh            # on the GPU machine, with .whl carried
# CPU dry run (small model):  SMALL=1 SKIP_INSTALL=1 PY=.venv/bin/python OUT=/tmp/out bash bench/gpu/check.sh
set -u -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpucheck_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
PY=${PY:-python3}
W=${W:-/tmp/gpucheck}
rm -rf "$W"; mkdir -p "$W"
T0=$(date +%s)
el() { echo "[t+$(( $(date +%s) - T0 ))s] $*"; }

el "== 1. machine"
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv 2>/dev/null
$PY -c "import sys, torch; print(sys.version.split()[0], torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
if [ -z "${SKIP_INSTALL:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || { echo "INSTALL FAILED"; exit 3; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import torch; print('torch after install', torch.__version__, torch.__file__)"
$PY -c "import deepspeed, megatron.core, pydantic; print('deepspeed', deepspeed.__version__, 'megatron-core', megatron.core.__version__, 'pydantic', pydantic.__version__)" 2>&1 | grep -v "Warning\|warnings.warn" || { echo "IMPORT FAILED"; exit 4; }

if [ -n "${CUDA_OK:-1}" ] && $PY -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  $PY - <<'EOF'
import torch, time
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
for _ in range(3): a @ b
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): a @ b
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 10
print(f"bf16 8192^3 matmul: {2*8192**3/dt/1e12:.0f} TFLOP/s (measured ceiling)")
EOF
fi

el "== data"
DATA=$W/d/stdlib
if ! timeout 120 $PY tools/prepare_data.py --out $DATA --vocab-size ${VOCAB:-8192} --max-files 400 --no-progress --json; then
  echo "prepare_data failed; falling back to carried data_cache/stdlib"
  DATA=$PWD/data_cache/stdlib
fi

el "== plan"
PLAN=$W/plan.yaml
if [ -n "${SMALL:-}" ]; then
  MODEL="{flavour: gpt2, n_layers: 2, d_model: 128, n_heads: 4, vocab_size: 8192, seq_len: 128}"
  MB=4; STEPS=${STEPS:-20}
else
  MODEL="{flavour: gpt2, n_layers: 12, d_model: 768, n_heads: 12, vocab_size: 8192, seq_len: 1024}"
  MB=8; STEPS=${STEPS:-60}
fi
cat > $PLAN <<EOF
name: gpucheck
seed: 1234
data: {prefix: $DATA}
stages:
  - name: s0
    model: $MODEL
    layout: {tp: 1, dp: 1, zero_stage: 2, micro_batch: $MB, grad_accum: 1, dtype: bf16}
    steps: $STEPS
    log_every: 10
    save_every: 1000
EOF
cat $PLAN

el "== 2a. megagrow bench overhead, as shipped (tiny model only: its plain loop runs fp32 on the CPU)"
TINY=$W/tiny.yaml
sed -e "s/n_layers: [0-9]*, d_model: [0-9]*, n_heads: [0-9]*/n_layers: 2, d_model: 128, n_heads: 4/" -e "s/seq_len: [0-9]*/seq_len: 128/" $PLAN > $TINY
timeout 90 $PY -m megagrow.cli bench overhead $TINY --steps 5 --json --data $DATA 2>&1 | grep -v "Warning\|warnings.warn"
echo "bench overhead rc=$?"

el "== 2b. GPU-correct overhead: bench/gpu/overhead_gpu.py"
timeout 200 $PY bench/gpu/overhead_gpu.py $PLAN --steps ${OSTEPS:-20} --block 5 --warmup 3 --json-out $OUT/overhead.json 2>&1 | grep -v "Warning\|warnings.warn"
echo "overhead_gpu rc=$?"

el "== 3. trainer: torchrun, $STEPS steps"
rm -rf $W/run
timeout 200 $PY -m torch.distributed.run --nproc_per_node=1 -m megagrow.cli train $PLAN --run-dir $W/run --data $DATA 2>&1 | grep -v "Warning\|warnings.warn"
echo "train rc=$?"
cp $W/run/s0/log.jsonl $OUT/train_log.jsonl 2>/dev/null
cat $W/run/s0/status.json 2>/dev/null; echo
ls -la $W/run/s0/checkpoints 2>/dev/null
$PY - "$W/run/s0/log.jsonl" <<'EOF'
import json, sys
try:
    recs = [json.loads(l) for l in open(sys.argv[1])]
except OSError as e:
    print("no trainer log:", e); sys.exit(0)
print(f"{'step':>5} {'loss':>8} {'lr':>9} {'tok/s':>9} {'step_ms':>8} {'gnorm':>7}")
for r in recs:
    print(f"{r['step']:5d} {r['loss']:8.4f} {r['lr']:9.2e} {r['tokens_per_s']:9.0f} {r['step_time_s']*1e3:8.1f} {r['grad_norm'] if r['grad_norm'] is None else round(r['grad_norm'],3)}")
if len(recs) >= 2:
    print("loss falls:", recs[-1]["loss"] < recs[0]["loss"], f"({recs[0]['loss']:.4f} -> {recs[-1]['loss']:.4f})")
EOF
el "== summary (overhead)"
$PY - "$OUT/overhead.json" <<'EOF'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except OSError as e:
    print("no overhead.json:", e); sys.exit(0)
print("errors:", r.get("errors"))
print(r["device"], "params", r["params_total"], "tokens/step", r["tokens_per_step"], "data_fetch_ms", round(r["data_fetch_s"]*1e3, 2))
for n, x in r["loops"].items():
    print(f"{n:>16} {x['median_step_s']*1e3:8.2f} ms  {x['tokens_per_s']:9.0f} tok/s  MFU6N {x['mfu_6N']:.3f}  MFU+attn {x['mfu_6N_plus_attn']:.3f}  mg/this {x.get('megagrow_over_this', float('nan')):.3f}  loss {x['loss_first']:.3f}->{x['loss_last']:.3f}")
EOF
el "done"; sleep 1
