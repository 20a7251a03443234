#!/bin/bash
# One-call GPU check of megagrow (see bench/gpu/README.md), about 9 minutes on one H100. From the repository root:
#   bash bench/gpu/check.sh                  # on the GPU machine, wheels for deepspeed / megatron-core in .whl/
#   SKIP_INSTALL=1 bash bench/gpu/check.sh   # packages already installed
# CPU dry run (the same script path on tiny models, no matmul ceiling):
#   SMALL=1 SKIP_INSTALL=1 PY=.venv/bin/python OUT=/tmp/gpucheck_out bash bench/gpu/check.sh
#  1. machine, packages, measured bf16 matmul ceiling
#  2. `megagrow bench` on a ~1.3B GPT-2 (24 x 2048, seq 2048, vocab 50304), bf16, ZeRO-1, DP=1, synthetic
#     tokens: MFU over a micro-batch sweep (an OOM row is a row), then micro batch 8 against the plain AMP loop,
#     then each MFU option on/off (--options: fused QKV, torch.compile, chunked loss, recompute modes)
#  3. the trainer on the GPU (GPT-2 12 x 768 -> width x2, bf16, ZeRO-1, stdlib corpus): stage 1 saves at
#     step 20 and stops, resumes to step 40 and saves, stage 2 grows its width (the shard-to-shard executor
#     on CUDA tensors) and trains; every checkpoint verified against its manifest
#  4. summary: MFU per row, save / resume / transition evidence, and which steps failed
# Exit status: the number of failed steps (0: all passed). Raw files in $OUT.
set -u -o pipefail
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
OUT=${OUT:-bench/gpu/results_check}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
PY=${PY:-python3}
W=${W:-/tmp/gpucheck}
rm -rf "$W"; mkdir -p "$W"
T0=$(date +%s)
FAILED=()
el() { echo "[t+$(( $(date +%s) - T0 ))s] $*"; }
# step NAME TIMEOUT_S CMD...: run it, keep its output in the log, remember a failure
step() {
  local name=$1 limit=$2; shift 2
  el "-- $name"
  timeout "$limit" "$@"
  local rc=$?
  echo "$name rc=$rc"
  [ "$rc" -eq 0 ] || FAILED+=("$name (rc $rc)")
  return "$rc"
}
TR="$PY -m torch.distributed.run --nproc_per_node=1 --master_port=0 --rdzv_backend=c10d --rdzv_endpoint=127.0.0.1:0"

el "== 1. machine"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null || echo "no nvidia-smi"
if [ -z "${SKIP_INSTALL:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || { echo "INSTALL FAILED"; exit 100; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import sys, torch, deepspeed, megatron.core; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), 'deepspeed', deepspeed.__version__, 'megatron-core', megatron.core.__version__)" 2>&1 | grep -v "Warning\|warn(" || { echo "IMPORT FAILED"; exit 100; }
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  $PY - <<'EOF'
import torch, time
print(torch.cuda.get_device_name())
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
for _ in range(3): a @ b
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): a @ b
torch.cuda.synchronize(); print(f"bf16 8192^3 matmul: {2 * 8192**3 / ((time.perf_counter() - t) / 10) / 1e12:.0f} TFLOP/s (measured ceiling)")
EOF
elif [ -z "${SMALL:-}" ]; then
  echo "no CUDA device: run with SMALL=1 for the CPU dry run"; exit 100
fi

if [ -n "${SMALL:-}" ]; then  # the CPU dry run: same commands, tiny models
  BIG="{flavour: gpt2, n_layers: 2, d_model: 128, n_heads: 4, vocab_size: 512, seq_len: 128}"
  SWEEP=micro_batch=2,4; BASE_MB=2; BSTEPS=3
  SMALLM="{flavour: gpt2, n_layers: 2, d_model: 64, n_heads: 4, vocab_size: 512, seq_len: 64}"
  WIDEM="{flavour: gpt2, n_layers: 2, d_model: 128, n_heads: 8, vocab_size: 512, seq_len: 64}"
  MB=2; STEPS=8; STOP=4; WSTEPS=4; EVERY=2; ETOK=4096; VOCAB=512; FILES=20
else
  BIG="{flavour: gpt2, n_layers: 24, d_model: 2048, n_heads: 16, vocab_size: 50304, seq_len: 2048}"
  SWEEP=micro_batch=4,8,16; BASE_MB=8; BSTEPS=8
  SMALLM="{flavour: gpt2, n_layers: 12, d_model: 768, n_heads: 12, vocab_size: 8192, seq_len: 1024}"
  WIDEM="{flavour: gpt2, n_layers: 12, d_model: 1536, n_heads: 24, vocab_size: 8192, seq_len: 1024}"
  MB=8; STEPS=40; STOP=20; WSTEPS=20; EVERY=20; ETOK=65536; VOCAB=8192; FILES=400
fi

el "== 2. megagrow bench: bf16 MFU and a micro-batch sweep"
cat > $W/big.yaml <<EOF
name: gpt1p3b
seed: 1234
data: {prefix: $W/none}
stages:
  - name: s0
    model: $BIG
    layout: {tp: 1, dp: 1, zero_stage: 1, micro_batch: $BASE_MB, dtype: bf16}
    steps: 1000
EOF
B="-m megagrow.cli bench $W/big.yaml --synthetic --warmup 2"
step "bench sweep" 240 $TR $B --steps $BSTEPS --sweep $SWEEP --no-baseline --out $OUT/bench_sweep.json
step "bench vs plain" 180 $TR $B --steps $((BSTEPS + 2)) --block 5 --phases --out $OUT/bench_vs_plain.json
# each MFU option on/off beside the stage as it is (fused QKV, torch.compile, chunked loss, recompute modes; overlap
# needs DP > 1, so no row on one GPU): one launch, one row per option value
step "bench options" 480 $TR $B --steps $BSTEPS --options --no-baseline --out $OUT/bench_options.json

el "== 3. the trainer: save, resume, width transition"
step "data" 180 $PY tools/prepare_data.py --out $W/d/stdlib --vocab-size $VOCAB --max-files $FILES --no-progress --json
cat > $W/staged.yaml <<EOF
name: gpucheck
seed: 1234
data: {prefix: $W/d/stdlib}
defaults:
  optim: {lr: 0.0006, min_lr: 0.00006, warmup_steps: 4}
  log_every: 2
  save_every: 1000
  eval_every: $EVERY
  eval_tokens: $ETOK
stages:
  - name: small
    model: $SMALLM
    layout: {tp: 1, dp: 1, zero_stage: 1, micro_batch: $MB, dtype: bf16}
    steps: $STEPS
  - name: wide
    grow: width
    model: $WIDEM
    layout: {tp: 1, dp: 1, zero_stage: 1, micro_batch: $MB, dtype: bf16}
    steps: $WSTEPS
EOF
RUN=$W/run
T="-m megagrow.cli train $W/staged.yaml --run-dir $RUN"
step "save" 200 $TR $T --stage small --stop-at $STOP
step "resume" 200 $TR $T --stage small
step "transition" 300 $TR $T --stage wide
step "verify small" 120 $PY -m megagrow.cli verify $RUN/small/checkpoints
step "verify wide" 120 $PY -m megagrow.cli verify $RUN/wide/checkpoints
for st in small wide; do cp $RUN/$st/log.jsonl $OUT/train_${st}_log.jsonl 2>/dev/null; done

el "== 4. summary"
$PY - "$OUT" "$RUN" "$STOP" <<'EOF'
import json, os, sys
out, run, stop = sys.argv[1], sys.argv[2], int(sys.argv[3])
for name in ("bench_sweep", "bench_vs_plain", "bench_options"):
    try:
        r = json.load(open(os.path.join(out, name + ".json")))
    except (OSError, ValueError) as e:
        print(f"{name}: missing ({type(e).__name__})"); continue
    for row in r["rows"]:
        what = f"micro batch {row['micro_batch']}" + (f" {row['option']}" if row.get("option") else "")
        if row["oom"]:
            print(f"{name}: {what}: OOM"); continue
        mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        vs = f", x base {row['time_vs_base']:.3f}" if row.get("time_vs_base") is not None else ""
        print(f"{name}: {what}: {row['step_time_s'] * 1e3:.0f} ms{vs}, {row['tokens_per_s']:.0f} tok/s, "
              f"{row['tflops_per_device']:.3g} TFLOP/s, MFU {mfu} (megatron {100 * (row['mfu_megatron'] or 0):.1f}%), "
              f"peak {row['peak_mem_gb']:.1f} GB, megagrow/plain {row['ratio']}")
for st in ("small", "wide"):
    try:
        recs = [json.loads(line) for line in open(os.path.join(run, st, "log.jsonl"))]
    except OSError:
        print(st, "no log"); continue
    tr = [r for r in recs if "loss" in r]
    ev = [(r["step"], r["at"], round(r["eval_loss"], 4)) for r in recs if "eval_loss" in r]
    steps = [r["step"] for r in tr]
    print(f"{st}: steps {steps[0] if steps else '-'}..{steps[-1] if steps else '-'}, loss "
          f"{tr[0]['loss'] if tr else float('nan'):.4f} -> {tr[-1]['loss'] if tr else float('nan'):.4f}, evals {ev}")
    if tr:
        last = tr[-1]
        print(f"  last: {last['tokens_per_s']:.0f} tok/s, MFU {last.get('mfu')}, peak {last.get('peak_mem_gb')} GB")
    if st == "small":
        tags = sorted(t for t in os.listdir(os.path.join(run, st, "checkpoints")) if t.startswith("step_"))
        ok = f"step_{stop:08d}" in tags and steps == sorted(set(steps)) and steps[-1] > stop
        print(f"  saved at step {stop}, resumed from it to step {steps[-1] if steps else '-'}: {ok} (tags {tags})")
    try:
        print(f"  status: {json.load(open(os.path.join(run, st, 'status.json')))['state']}")
    except (OSError, ValueError, KeyError):
        print("  status: missing")
EOF
if [ ${#FAILED[@]} -eq 0 ]; then el "done: every step passed"; else el "done: FAILED: ${FAILED[*]}"; fi
exit ${#FAILED[@]}
