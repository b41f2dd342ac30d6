#!/usr/bin/env bash
# Device run (issue 16): the decode step at batch 1 and the largest of 16/8/4 that fits the GPU,
# through the jitted step and through generate(), then HF transformers on the same shapes.
# PART=jax|hf|all (default all); the two parts go in consecutive calls on one machine (the JAX
# part took 400 s for five H100 configs, so give it a call of its own).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
PART=${PART:-all}
MEM_GB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
if [ "$MEM_GB" -gt 100000 ]; then   # H200: 141 GB
  CONFIGS=4b:1:32768,4b:16:32768,8b:1:32768,8b:16:32768,8b:1:65536,8b:8:65536
  B4=1,16; B8_32=1,16; B8_64=1,8
else                                # H100: 80 GB
  CONFIGS=4b:1:32768,4b:8:32768,8b:1:32768,8b:8:32768,8b:1:65536,8b:4:65536
  B4=1,8; B8_32=1,8; B8_64=1,4
fi
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee $OUT/gpu.txt
if [ "$PART" != hf ]; then
  timeout ${T_JAX:-540} python3 benchmarks/bench_decode.py --configs ${CONFIGS_OVERRIDE:-$CONFIGS} \
    --profile --generate --gen-tokens 48 --steps 30 --label "${LABEL:-$(git rev-parse --short HEAD 2>/dev/null)}" \
    --out $OUT/decode_suite.json 2>&1 | grep -v "^[WIE]1" | grep -v '^{' | tail -20
fi
if [ "$PART" != jax ]; then
  timeout 150 python3 benchmarks/bench_hf.py --shape 4b --prefill "" --decode-context 32768 \
    --decode-batch $B4 --out $OUT/hf_decode_4b_32k.json 2>&1 | tail -3
  timeout 150 python3 benchmarks/bench_hf.py --shape 8b --prefill "" --decode-context 32768 \
    --decode-batch $B8_32 --out $OUT/hf_decode_8b_32k.json 2>&1 | tail -3
  timeout 150 python3 benchmarks/bench_hf.py --shape 8b --prefill "" --decode-context 65536 \
    --decode-batch $B8_64 --out $OUT/hf_decode_8b_64k.json 2>&1 | tail -3
fi
