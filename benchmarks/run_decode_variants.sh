#!/usr/bin/env bash
# Device run (issue 16): the decode step with its attention out-projection two ways, one process
# each, consecutive, same machine: XLA's dot (with the per-matrix GEMV table, which includes the
# Pallas stacked GEMV) and the Pallas stacked GEMV (RuntimeConfig.decode_out_proj="pallas", what
# "auto" picks on one GPU). Each writes $OUT/decode_<variant>.json with a kernel profile.
# VARIANTS picks some of them.
# (XLA_FLAGS=--xla_gpu_enable_split_k_autotuning=false, once a third variant, is not a flag of
# jax 0.11's XLA.)
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
CONFIGS=${CONFIGS:-4b:1:32768,4b:8:32768,8b:1:32768}
T=${T_EACH:-250}
for v in ${VARIANTS:-xla pallas}; do
  extra=""
  [ "$v" = xla ] && extra="--gemv"
  timeout $T python3 benchmarks/bench_decode.py --configs $CONFIGS --steps 30 --profile $extra \
    --decode-out-proj $v --label $v --out $OUT/decode_$v.json 2>&1 | grep -v "^[WIE]1" \
    | grep -v '^{' | tail -8
done
