"""Pure building blocks of the Qwen3 / Llama decoder: RMSNorm, rotary embeddings, SwiGLU MLP, projections.

Numerics follow transformers' Qwen3 so that bf16 runs agree closely and fp32 runs agree to
rounding: norms in float32 then cast back before the weight multiply, RoPE tables computed in
float32, scaled, then cast to the activation dtype before use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x: [..., C]; weight: [C]. Normalise in float32, cast to x.dtype, then scale (as HF)."""
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    return weight.astype(x.dtype) * y


def rope_cos_sin(
    positions: jax.Array, inv_freq: np.ndarray, attention_scaling: float, dtype
) -> tuple[jax.Array, jax.Array]:
    """positions: int32 [B, T] -> cos, sin: [B, T, D] in ``dtype`` (neox / rotate-half layout)."""
    # HIGHEST precision: positions up to 2^17 must not be rounded by a bf16 matmul pass.
    freqs = jnp.einsum(
        "bt,f->btf",
        positions.astype(jnp.float32),
        jnp.asarray(inv_freq, jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos = (jnp.cos(emb) * attention_scaling).astype(dtype)
    sin = (jnp.sin(emb) * attention_scaling).astype(dtype)
    return cos, sin


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, T, N, D]; cos/sin: [B, T, D]. Rotate-half RoPE in x.dtype (as HF)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def swiglu_mlp(
    x: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    biases: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """x: [B, T, E]; w_gate/w_up: [E, F]; w_down: [F, E] -> [B, T, E].
    biases: optional (gate [F], up [F], down [E]) (Llama ``mlp_bias``)."""
    gate = jnp.einsum("bte,ef->btf", x, w_gate)
    up = jnp.einsum("bte,ef->btf", x, w_up)
    if biases is not None:
        gate, up = gate + biases[0], up + biases[1]
    out = jnp.einsum("btf,fe->bte", jax.nn.silu(gate) * up, w_down)
    return out if biases is None else out + biases[2]


def residual_in_chunks(fn, h: jax.Array, chunk: int | None) -> jax.Array:
    """``fn(h)`` for a residual block ``fn`` ([B, C, E] -> [B, C, E], output = input + update),
    run ``chunk`` tokens at a time over h: [B, T, E] so only one chunk's intermediates (the MLP
    hidden: [B, C, F]) exist at once. Each chunk's result is written back into h in place
    (``dynamic_update_slice`` in a ``fori_loop``): no stacked output buffer and no copy into it,
    which ``lax.map`` costs (seen as memcpy kernels in the 8B prefill profile). A T that is not
    a multiple of ``chunk`` ends with one shorter chunk (fn traced for that shape too)."""
    T = h.shape[1]
    if chunk is None or T <= chunk:
        return fn(h)
    full, tail = divmod(T, chunk)

    def body(i, h):
        start = i * chunk
        part = jax.lax.dynamic_slice_in_dim(h, start, chunk, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(h, fn(part), start, axis=1)

    h = jax.lax.fori_loop(0, full, body, h)
    if tail:
        h = jax.lax.dynamic_update_slice_in_dim(h, fn(h[:, full * chunk :]), full * chunk, axis=1)
    return h
