"""``qk_norm_rope``: the decode step's per-head q/k RMSNorm (Qwen3) and RoPE in one Pallas
Triton kernel.

Why: in the H100 profile of the 4B batch-1 decode step the slice of the QKV projection's
output, the two per-head norms and the two rotations are several small XLA fusions a layer
(about 1.2-1.8 us each, mostly launch and drain). One program per (sequence, head) reads the
head's two halves (D / 2 columns each: Triton blocks must be powers of two, and rotate-half
pairs column i with i + D / 2), norms them together and writes the rotated head. The inputs may
have more rows than ``batch`` (the batch-1 QKV projection's zero padding row): only the first
``batch`` rows are read, so no slice of them is materialised first.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat


def _kernel(*refs, eps, num_q_heads, has_norm):
    if has_norm:
        q_ref, k_ref, cos_ref, sin_ref, qw_ref, kw_ref, qo_ref, ko_ref = refs
    else:
        q_ref, k_ref, cos_ref, sin_ref, qo_ref, ko_ref = refs
        qw_ref = kw_ref = None
    b, j = pl.program_id(0), pl.program_id(1)
    D = q_ref.shape[-1]
    half = D // 2
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    dt = q_ref.dtype

    def rotate(x_ref, w_ref, o_ref, head):
        x1, x2 = x_ref[b, head, lo], x_ref[b, head, hi]
        if w_ref is not None:
            a1, a2 = x1.astype(jnp.float32), x2.astype(jnp.float32)
            inv = lax.rsqrt((jnp.sum(a1 * a1) + jnp.sum(a2 * a2)) / D + eps)
            x1 = _mul(w_ref[lo].astype(dt), (a1 * inv).astype(dt))
            x2 = _mul(w_ref[hi].astype(dt), (a2 * inv).astype(dt))
        c1, c2 = cos_ref[b, lo].astype(dt), cos_ref[b, hi].astype(dt)
        s1, s2 = sin_ref[b, lo].astype(dt), sin_ref[b, hi].astype(dt)
        # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1); each product rounded to
        # the activation dtype before the add, as the jnp model computes it.
        o_ref[b, head, lo] = _add(_mul(x1, c1), -_mul(x2, s1))
        o_ref[b, head, hi] = _add(_mul(x2, c2), _mul(x1, s2))

    @pl.when(j < num_q_heads)
    def _():
        rotate(q_ref, qw_ref, qo_ref, j)

    @pl.when(j >= num_q_heads)
    def _():
        rotate(k_ref, kw_ref, ko_ref, j - num_q_heads)


def _mul(a, b):
    """a * b in a's dtype, computed in float32 and rounded once (XLA's bf16 multiply)."""
    return (a.astype(jnp.float32) * b.astype(jnp.float32)).astype(a.dtype)


def _add(a, b):
    return (a.astype(jnp.float32) + b.astype(jnp.float32)).astype(a.dtype)


@functools.partial(jax.jit, static_argnames=("batch", "eps", "num_warps", "interpret"))
def qk_norm_rope_pallas(
    q: jax.Array,
    k: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    q_weight: jax.Array | None,
    k_weight: jax.Array | None,
    *,
    batch: int,
    eps: float,
    num_warps: int,
    interpret: bool,
) -> tuple[jax.Array, jax.Array]:
    """Shapes and semantics as ``reference.qk_norm_rope_reference`` (validated in ``api``)."""
    _, H, D = q.shape
    K = k.shape[1]
    has_norm = q_weight is not None
    inputs = [q, k, cos, sin] + ([q_weight, k_weight] if has_norm else [])
    return pl.pallas_call(
        functools.partial(_kernel, eps=eps, num_q_heads=H, has_norm=has_norm),
        grid=(batch, H + K),
        out_shape=(
            jax.ShapeDtypeStruct((batch, H, D), q.dtype),
            jax.ShapeDtypeStruct((batch, K, D), k.dtype),
        ),
        compiler_params=_compat.triton_compiler_params(num_warps, 1),
        interpret=interpret,
        name="qk_norm_rope",
    )(*inputs)
