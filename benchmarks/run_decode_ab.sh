#!/usr/bin/env bash
# Device run (issue 16): the decode step of an older tree (scratch/old, carried) and of this tree,
# one process each, consecutive, same machine. Prepare: git archive <commit> elastic_jax pallas_kernels | tar -x -C scratch/old
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
CONFIGS=${CONFIGS:-4b:1:32768,4b:8:32768,8b:1:32768,8b:8:32768,8b:1:65536}
PYTHONPATH=scratch/old:. timeout ${T_OLD:-200} python3 benchmarks/bench_decode.py --configs $CONFIGS --steps 30 \
  --label "before (${OLD_COMMIT:-old})" --out $OUT/decode_before.json 2>&1 | grep -v "^[WIE]1" | tail -8
PYTHONPATH=. timeout ${T_NEW:-300} python3 benchmarks/bench_decode.py --configs $CONFIGS --steps 30 ${NEW_FLAGS:-} \
  --label after --out $OUT/decode_after.json 2>&1 | grep -v "^[WIE]1" | tail -12
