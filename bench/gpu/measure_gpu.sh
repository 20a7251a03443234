#!/bin/bash
# The measurement check on one GPU (H100 / H200), about 9 minutes. From the repository root:
#   bash bench/gpu/measure_gpu.sh                 # wheels for deepspeed / megatron-core in .whl/ (as check.sh)
#   SKIP_INSTALL=1 bash bench/gpu/measure_gpu.sh  # packages already installed
# Writes $OUT (default bench/gpu/results_measure/): log.txt and the --json of every bench.
#  1. machine, measured bf16 matmul ceiling
#  2. megagrow bench on a ~1.3B GPT-2 (24 x 2048, seq 2048, vocab 50304), bf16, ZeRO-1, DP=1, synthetic
#     tokens, SDPA (flash) attention: micro batch 8 / 16 without, 16 / 32 with activation checkpointing
#     (an OOM row is a row), then micro batch 8 against the plain AMP loop (fp32 master, fused AdamW), then each
#     MFU option on/off at micro batch 8 (--options: fused QKV, torch.compile, chunked loss, recompute modes)
#  3. a two-stage run through the trainer on the GPU (GPT-2 12 x 768 -> width x2, bf16, stdlib corpus):
#     the executor's CUDA path, eval loss before/after growth, MFU in the log; bench --transition
# Target: MFU >= 40% at 1.3B (llm-foundry: 41.8% for MPT-1B on H100).
set -u -o pipefail
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
OUT=${OUT:-bench/gpu/results_measure}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
PY=${PY:-python3}
W=${W:-/tmp/measure_gpu}
rm -rf "$W"; mkdir -p "$W"
T0=$(date +%s)
el() { echo "[t+$(( $(date +%s) - T0 ))s] $*"; }
TR="$PY -m torch.distributed.run --nproc_per_node=1 --master_port=0 --rdzv_backend=c10d --rdzv_endpoint=127.0.0.1:0"

el "== 1. machine"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null
if [ -z "${SKIP_INSTALL:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || { echo "INSTALL FAILED"; exit 3; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
$PY - <<'EOF'
import torch, time
print(torch.__version__, torch.cuda.get_device_name())
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
for _ in range(3): a @ b
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): a @ b
torch.cuda.synchronize(); print(f"bf16 8192^3 matmul: {2 * 8192**3 / ((time.perf_counter() - t) / 10) / 1e12:.0f} TFLOP/s (measured ceiling)")
EOF

el "== 2. megagrow bench, ~1.3B GPT-2, bf16 ZeRO-1"
cat > $W/big.yaml <<EOF
name: gpt1p3b
seed: 1234
data: {prefix: $W/none}
stages:
  - name: s0
    model: {flavour: gpt2, n_layers: 24, d_model: 2048, n_heads: 16, vocab_size: 50304, seq_len: 2048}
    layout: {tp: 1, dp: 1, zero_stage: 1, micro_batch: 8, dtype: bf16}
    steps: 1000
EOF
B="-m megagrow.cli bench $W/big.yaml --synthetic --steps 8 --warmup 2"
timeout 150 $TR $B --sweep micro_batch=8,16 --no-baseline --out $OUT/bench_1p3b_nockpt.json
timeout 120 $TR $B --sweep micro_batch=16,32 --sweep activation_checkpointing=full --no-baseline --out $OUT/bench_1p3b_ckpt.json
timeout 150 $TR $B --steps 10 --block 5 --phases --out $OUT/bench_1p3b_vs_plain.json
timeout 480 $TR $B --options --no-baseline --out $OUT/bench_1p3b_options.json  # each MFU option on/off, one launch

el "== 3. two stages through the trainer on the GPU (width x2, bf16)"
timeout 60 $PY tools/prepare_data.py --out $W/d/stdlib --vocab-size 8192 --max-files 400 --no-progress --json
cat > $W/staged.yaml <<EOF
name: gpustaged
seed: 1234
data: {prefix: $W/d/stdlib}
defaults:
  optim: {lr: 0.0006, min_lr: 0.00006, warmup_steps: 10}
  log_every: 10
  save_every: 1000
  eval_every: 20
  eval_tokens: 65536
stages:
  - name: small
    model: {flavour: gpt2, n_layers: 12, d_model: 768, n_heads: 12, vocab_size: 8192, seq_len: 1024}
    layout: {tp: 1, dp: 1, zero_stage: 1, micro_batch: 8, dtype: bf16}
    steps: 40
  - name: wide
    grow: width
    model: {flavour: gpt2, n_layers: 12, d_model: 1536, n_heads: 24, vocab_size: 8192, seq_len: 1024}
    layout: {tp: 1, dp: 1, zero_stage: 1, micro_batch: 8, dtype: bf16}
    steps: 20
EOF
timeout 200 $PY -m megagrow.cli run $W/staged.yaml --run-dir $W/run --max-procs 1
echo "run rc=$?"
$PY -m megagrow.cli status $W/run
cp $W/run/small/log.jsonl $OUT/staged_small_log.jsonl 2>/dev/null
cp $W/run/wide/log.jsonl $OUT/staged_wide_log.jsonl 2>/dev/null
$PY -m megagrow.cli plot $W/run --out $OUT/staged_loss.png
timeout 120 $TR -m megagrow.cli bench $W/staged.yaml --stage 1 --steps 5 --warmup 1 --no-baseline --transition --out $OUT/bench_transition.json

el "== summary"
$PY - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
for name in ("bench_1p3b_nockpt", "bench_1p3b_ckpt", "bench_1p3b_vs_plain", "bench_1p3b_options", "bench_transition"):
    try:
        r = json.load(open(os.path.join(out, name + ".json")))
    except OSError as e:
        print(name, "missing:", e); continue
    for row in r["rows"]:
        what = f"mb {row['micro_batch']} ckpt {row['activation_checkpointing']}" + (f" {row['option']}" if row.get("option") else "")
        if row["oom"]:
            print(f"{name}: {what}: OOM"); continue
        mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        print(f"{name}: {what}: {row['step_time_s'] * 1e3:.0f} ms, x base {row.get('time_vs_base')}, "
              f"{row['tokens_per_s']:.0f} tok/s, {row['tflops_per_device']:.0f} TFLOP/s, MFU {mfu} "
              f"(megatron {100 * (row['mfu_megatron'] or 0):.1f}%), peak {row['peak_mem_gb']:.1f} GB, ratio {row['ratio']}")
    if r.get("transition"):
        t = r["transition"]
        print(f"transition {t['from']} -> {t['to']}: {t['transition_total_s']:.2f} s {t['transition_s']}; resume "
              f"{t['resume_total_s']:.2f} s; ratio {t['ratio']:.2f}")
for st in ("small", "wide"):
    try:
        recs = [json.loads(l) for l in open(os.path.join(out, f"staged_{st}_log.jsonl"))]
    except OSError:
        continue
    ev = [(r["step"], r["at"], round(r["eval_loss"], 4)) for r in recs if "eval_loss" in r]
    tr = [r for r in recs if "loss" in r]
    print(st, "evals", ev, "last train", {k: tr[-1].get(k) for k in ("step", "loss", "mfu", "tflops_per_device", "peak_mem_gb")} if tr else None)
EOF
el "done"
