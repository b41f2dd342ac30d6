#!/usr/bin/env bash
# Device run (issue 16): the decode step in three variants, one process each, consecutive, same
# machine: XLA's defaults (with the per-matrix GEMV table, which includes the Pallas stacked GEMV),
# the out-projection through the Pallas stacked GEMV (RuntimeConfig.decode_out_proj="pallas"), and
# XLA with split-K autotuning off (the H100 profile shows wo as a split-K cuBLAS GEMM on a copied
# slice). Each writes $OUT/decode_<variant>.json with a kernel profile.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
CONFIGS=${CONFIGS:-4b:1:32768,4b:8:32768,8b:1:32768}
T=${T_EACH:-170}
timeout $T python3 benchmarks/bench_decode.py --configs $CONFIGS --steps 30 --profile --gemv \
  --label xla --out $OUT/decode_xla.json 2>&1 | grep -v "^[WIE]1" | grep -v '^{' | tail -8
timeout $T python3 benchmarks/bench_decode.py --configs $CONFIGS --steps 30 --profile \
  --decode-out-proj pallas --label pallas_out_proj --out $OUT/decode_pallas_out_proj.json 2>&1 \
  | grep -v "^[WIE]1" | grep -v '^{' | tail -8
XLA_FLAGS=--xla_gpu_enable_split_k_autotuning=false timeout $T python3 benchmarks/bench_decode.py \
  --configs $CONFIGS --steps 30 --profile --label splitk_off --out $OUT/decode_splitk_off.json 2>&1 \
  | grep -v "^[WIE]1" | grep -v '^{' | tail -8
