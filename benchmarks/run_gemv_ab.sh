#!/usr/bin/env bash
# Device run (issue 16): the whole decode step with the out-projection GEMV three ways, one
# process each, consecutive, same machine:
#   default  no GEMV table for this GPU (GemvConfig defaults: XLA pads x to 16 rows, and XLA fuses
#            the paged kernel's split merge into that pad);
#   tuned    after bench_gemv.py sweeps the out-projection shapes (wo of the 4B and 8B shapes at
#            batch 1 and 8) and writes the table where stacked_gemv reads it;
#   rows     the tuned table with rows_in_kernel on for every tensor-core entry (x's rows padded
#            inside the kernel: no pad fusion, the merge becomes a plain reduction).
# Estimated (not measured) at about 8 minutes in all: one 10-minute device call. Writes
# $OUT/decode_gemv_{default,tuned,rows}.json (with kernel profiles), $OUT/gemv_sweep.json and
# $OUT/gemv.json (the tuned table: commit it under pallas_kernels/autotune/<device_kind>/).
# The table written into the tree is removed at the end (the tree on the device is a copy).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
CONFIGS=${CONFIGS:-4b:1:32768}  # batch 1: where the GEMV and the merge matter (B=8 is 1.06x)
DK=$(python3 -c "from pallas_kernels import _compat; print(_compat.device_kind())" 2>/dev/null)
TABLE=pallas_kernels/autotune/$DK/gemv.json
if [ -e "$TABLE" ]; then
  echo "a GEMV table already exists for $DK ($TABLE): the default run would not be the default"
  exit 2
fi
mkdir -p "$(dirname "$TABLE")"

step() {  # $1: variant name; the optimized HLO of each step goes to $OUT/hlo_$1 (gzip), so
  # the profile's fusion names can be read back to the ops they hold
  timeout "${T_EACH:-130}" python3 benchmarks/bench_decode.py --configs "$CONFIGS" --steps 30 \
    --profile --decode-out-proj pallas --label "gemv-$1" --dump-hlo "$OUT/hlo_$1" \
    --out "$OUT/decode_gemv_$1.json" 2>&1 | grep -v "^[WIE]1" | grep -v '^{' | tail -4
}

step default
timeout "${T_SWEEP:-170}" python3 benchmarks/bench_gemv.py --shapes 4096x2560,4096x4096 \
  --batches 1,8 --max-seconds "${T_SWEEP_INNER:-150}" --out "$OUT/gemv_sweep.json" \
  --table "$OUT/gemv.json" 2>&1 | grep -v "^[WIE]1" | tail -6
if [ -s "$OUT/gemv.json" ]; then
  cp "$OUT/gemv.json" "$TABLE"
  step tuned
  python3 - "$TABLE" <<'EOF'
import json, sys
path = sys.argv[1]
table = json.load(open(path))
for entry in table["configs"].values():
    if entry["config"].get("tensor_cores", True):
        entry["config"]["rows_in_kernel"] = True
json.dump(table, open(path, "w"), indent=2)
EOF
  step rows
  rm -f "$TABLE"
fi
