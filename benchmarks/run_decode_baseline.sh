#!/usr/bin/env bash
# Device run: decode step vs HBM ideal (issue 16), today's code + an XLA command-buffer variant + HF peer.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit --format=csv | tee $OUT/gpu.txt
timeout 330 python3 benchmarks/bench_decode.py --configs 4b:1:32768,4b:8:32768,8b:1:32768,8b:8:32768,8b:1:65536 \
  --profile --gemv --generate --gen-tokens 48 --steps 40 --label baseline --out $OUT/decode_baseline.json 2>&1 | grep -v "^W1\|^I1" | tail -40
XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN --xla_gpu_graph_min_graph_size=1" \
timeout 100 python3 benchmarks/bench_decode.py --configs 4b:1:32768,8b:1:65536 --steps 40 --profile --label cmdbuf_all \
  --out $OUT/decode_cmdbuf.json 2>&1 | tail -8
timeout 120 python3 benchmarks/bench_hf.py --shape 4b --prefill "" --decode-context 32768 --decode-batch 1,8 --out $OUT/hf_decode_4b.json 2>&1 | tail -3
