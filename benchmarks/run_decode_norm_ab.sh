#!/usr/bin/env bash
# Device run (issue 16): the whole decode step with the residual adds and RMSNorms as XLA
# fusions (decode_norm=xla, today's default) and as Pallas add_rms_norm kernels
# (decode_norm=pallas), one process each, consecutive, same machine, both with the Pallas
# out-projection and a kernel profile. Estimated (not measured) at about 5 minutes for the
# default CONFIGS. Writes $OUT/decode_norm_{xla,pallas}.json.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
CONFIGS=${CONFIGS:-4b:1:32768}
for norm in xla pallas; do
  timeout "${T_EACH:-140}" python3 benchmarks/bench_decode.py --configs "$CONFIGS" --steps 30 \
    --profile --decode-out-proj pallas --decode-norm "$norm" --label "norm-$norm" \
    --out "$OUT/decode_norm_$norm.json" 2>&1 | grep -v "^[WIE]1" | grep -v '^{' | tail -4
done
