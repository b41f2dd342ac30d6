"""Pallas GPU kernels for Elastic Attention, each with a pure-jnp reference beside it.

Subpackages (each has ``reference.py``, a Pallas implementation and ``api.py``):

- ``block_sparse_attn``: causal flash attention with per-head modes (dense / streaming /
  block-sparse from a kept-block list), GQA, returns LSE on request.
- ``xattn``: XAttention antidiagonal scoring and threshold block selection, producing the
  kept-block list that ``block_sparse_attn`` consumes.
- ``paged_decode``: one-token decode attention over a paged KV cache (flash-decoding).
- ``gemv``: the decode step's out-projection GEMV, reading one layer of a stacked weight in place.
- ``decode_norm``: the decode step's residual add + RMSNorm (+ the GEMV's split partials) as one
  kernel.

This package does not import ``elastic_jax``.
"""
