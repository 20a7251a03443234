#!/usr/bin/env bash
# Regrow of a checkpoint (GPT-2 with Adam, DP=2 ZeRO-2) to TP=2 ZeRO-1, timed against `cp -r` of
# the same checkpoint, with peak RSS and source files opened per rank. CPU, 2 processes.
# bench/regrow_offline.py measures the same reshard and a depth x2 against cold and warm `cp -r` of
# the bytes written, with the page cache dropped, per-rank RSS bounds and import time.
#   bash bench/regrow_1gb.sh [WORKDIR]
# Environment:
#   SIZES  checkpoint sizes to run, any of 0.25 (16M params, ~0.25 GB) and 1.3 (81M params, ~1.3 GB);
#          default "1.3"
#   TREES  megagrow checkouts whose tools/regrow.py is timed, side by side on the same source
#          checkpoint (cp, then each tree, per size; the first tree trains the source); default: this checkout
#   DATA   dataset prefix (default data_cache/stdlib; make demo prepares it)
#   PY     python (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
HERE=$PWD
W=${1:-/tmp/megagrow-regrow-bench}
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data_cache/stdlib}
SIZES=${SIZES:-1.3}
TREES=${TREES:-$HERE}
rm -rf "$W"; mkdir -p "$W"
run() { $PY -m torch.distributed.run --nproc_per_node=2 --master_port=0 --rdzv_backend=c10d --rdzv_endpoint=127.0.0.1:0 "$@"; }
for SIZE in $SIZES; do
  case $SIZE in
    0.25) MODEL="n_layers: 8, d_model: 384, n_heads: 6" ;;
    1.3) MODEL="n_layers: 8, d_model: 896, n_heads: 14" ;;
    *) echo "error: SIZES takes 0.25 and 1.3, not $SIZE" >&2; exit 2 ;;
  esac
  S="$W/$SIZE"; mkdir -p "$S"
  cat > "$S/plan.yaml" <<YAML
name: regrow_bench
data: {prefix: $DATA}
defaults: {steps: 1, save_every: 1, log_every: 1}
stages:
  - name: a
    model: {flavour: gpt2, $MODEL, vocab_size: 4096, seq_len: 64}
    layout: {tp: 1, dp: 2, zero_stage: 2, micro_batch: 1}
  - name: b
    model: {flavour: gpt2, $MODEL, vocab_size: 4096, seq_len: 64}
    layout: {tp: 2, dp: 1, zero_stage: 1, micro_batch: 1}
YAML
  FIRST=${TREES%% *}  # the source is trained by the first tree: an older tree may not read a newer record
  (cd "$FIRST" && PYTHONPATH=$FIRST run -m megagrow.cli train "$S/plan.yaml" --stage a --run-dir "$S/run" >/dev/null 2>&1)
  SRC="$S/run/a/checkpoints"
  sync; t0=$(date +%s.%N); cp -r "$SRC" "$S/copy"; sync; t1=$(date +%s.%N)
  rm -rf "$S/copy"
  i=0
  for T in $TREES; do
    i=$((i + 1))
    sync; r0=$(date +%s.%N)
    (cd "$T" && PYTHONPATH=$T run tools/regrow.py --src "$SRC" --plan "$S/plan.yaml" --to-stage b --out "$S/out$i" --json 2>/dev/null) \
      | grep '^{' > "$S/summary$i.json"
    sync; r1=$(date +%s.%N)
    rm -rf "$S/out$i"
    $PY - "$S/summary$i.json" "$t0" "$t1" "$r0" "$r1" "$T" "$SIZE" <<'PYEOF'
import json, sys
s = json.load(open(sys.argv[1])); t0, t1, r0, r1 = map(float, sys.argv[2:6])
cp, rg = t1 - t0, r1 - r0
print(json.dumps({"tree": sys.argv[6], "size_gb": float(sys.argv[7]), "checkpoint_bytes": s["source"]["bytes"],
                  "cp_seconds": round(cp, 2), "regrow_seconds_wall": round(rg, 2),
                  "regrow_seconds_inside": round(s["seconds"], 2), "ratio_wall": round(rg / cp, 2),
                  "bytes_read_per_rank": s["bytes_read_per_rank"], "state_bytes_per_rank": s["state_bytes_per_rank"],
                  "peak_rss_bytes_per_rank": s["peak_rss_bytes_per_rank"],
                  "files_opened_per_rank": s.get("files_opened_per_rank"),
                  "phase_seconds_rank0": s["phase_seconds_rank0"]}))
PYEOF
  done
done
