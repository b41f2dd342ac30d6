"""Regenerate ``pallas_kernels/autotune/<device_kind>/block_sparse_attn.json`` on a GPU.

Runs the block-sparse attention benchmark (``benchmarks/bench_block_sparse_attn.py``, without
the FlexAttention rows): for each sequence length it times every kernel variant at 100 / 30 /
10 / 5 % kept blocks on random masks and keeps, per backend, the config with the best
geometric-mean time. The table is written next to this script under the device kind, to be
committed; kernels only read it (``block_sparse_attn.config.lookup_config``).

Usage (GPU machine, repository root):
  PYTHONPATH=. python3 pallas_kernels/autotune/autotune_block_sparse.py [--seqs 8192,32768]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="8192,32768,65536,131072")
    args = ap.parse_args()
    from benchmarks import bench_block_sparse_attn as bench
    from pallas_kernels import _compat

    with tempfile.TemporaryDirectory() as tmp:
        bench.main(["--no-flex", "--seqs", args.seqs, "--out", tmp])
        dest = os.path.join(os.path.dirname(__file__), _compat.device_kind())
        os.makedirs(dest, exist_ok=True)
        shutil.copy(
            os.path.join(tmp, "block_sparse_attn.json"),
            os.path.join(dest, "block_sparse_attn.json"),
        )
        print(f"wrote {dest}/block_sparse_attn.json")


if __name__ == "__main__":
    main()
