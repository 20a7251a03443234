#!/usr/bin/env bash
# Regrow of a ~1 GB checkpoint (81M-param GPT-2 with Adam, DP=2 ZeRO-2) to TP=2 ZeRO-1, timed
# against `cp -r` of the same checkpoint, with peak RSS per rank. CPU, 2 processes.
#   bash bench/regrow_1gb.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-/tmp/megagrow-regrow-bench}
PY=${PY:-.venv/bin/python}
rm -rf "$W"; mkdir -p "$W"
cat > "$W/plan.yaml" <<YAML
name: regrow1gb
data: {prefix: data_cache/stdlib}
defaults: {steps: 1, save_every: 1, log_every: 1}
stages:
  - name: a
    model: {flavour: gpt2, n_layers: 8, d_model: 896, n_heads: 14, vocab_size: 4096, seq_len: 64}
    layout: {tp: 1, dp: 2, zero_stage: 2, micro_batch: 1}
  - name: b
    model: {flavour: gpt2, n_layers: 8, d_model: 896, n_heads: 14, vocab_size: 4096, seq_len: 64}
    layout: {tp: 2, dp: 1, zero_stage: 1, micro_batch: 1}
YAML
run() { $PY -m torch.distributed.run --nproc_per_node=2 --master_port=0 --rdzv_backend=c10d --rdzv_endpoint=127.0.0.1:0 "$@"; }
run -m megagrow.cli train "$W/plan.yaml" --stage a --run-dir "$W/run" >/dev/null 2>&1
SRC="$W/run/a/checkpoints"
du -sb "$SRC" | awk '{printf "checkpoint bytes: %d\n", $1}'
sync; t0=$(date +%s.%N); cp -r "$SRC" "$W/copy"; sync; t1=$(date +%s.%N)
run tools/regrow.py --src "$SRC" --plan "$W/plan.yaml" --to-stage b --out "$W/out" --json 2>/dev/null | grep '^{' > "$W/summary.json"
sync; t2=$(date +%s.%N)
$PY - "$W/summary.json" "$t0" "$t1" "$t2" <<'PYEOF'
import json, sys
s = json.load(open(sys.argv[1])); t0, t1, t2 = map(float, sys.argv[2:5])
cp, rg = t1 - t0, t2 - t1
print(json.dumps({"checkpoint_bytes": s["source"]["bytes"], "cp_seconds": round(cp, 2), "regrow_seconds_wall": round(rg, 2),
                  "regrow_seconds_inside": round(s["seconds"], 2), "ratio_wall": round(rg / cp, 2),
                  "bytes_read_per_rank": s["bytes_read_per_rank"], "state_bytes_per_rank": s["state_bytes_per_rank"],
                  "peak_rss_bytes_per_rank": s["peak_rss_bytes_per_rank"],
                  "phase_seconds_rank0": s["phase_seconds_rank0"]}, indent=1))
PYEOF
