"""``stacked_gemv`` as a Pallas kernel on the Triton GPU backend.

Why: in the unrolled decode step each layer's weight is a static slice of the stacked ``[L, ...]``
parameter. Where XLA hands a projection to cuBLAS (the out-projection of every Qwen3 layer in the
H100 profile, as a split-K batched GEMM), it first copies the slice: a 21 MB copy per layer of
the 4B shape (0.43 ms of a 6.2 ms batch-1 step). Here the BlockSpec picks the layer, so the weight
is read once, in place.

Grid ``(N / block_n, splits)``: program ``(n, s)`` reads the ``[K / splits, block_n]`` tile of
``w[layer]`` in ``block_k`` row chunks and writes a float32 partial ``[rows, block_n]``; the
caller sums the ``splits`` partials (XLA fuses that sum into its consumer). Splitting K keeps
enough programs in flight to saturate HBM when ``N / block_n`` alone is below the SM count.
``x`` rows are padded to 16 (a Triton dot needs M >= 16): by XLA before the call (a [16, K] copy
of ``x``, fused with its producer; every padded row of the partials is stored), or with
``rows_in_kernel`` inside the kernel, which reads row ``min(r, B - 1)`` for each of its rows (the
trick of the paged decode kernel's query tile) and stores only the ``B`` real rows. In the 4B
batch-1 H100 profile the pad fused with the attention split merge took 5.9 us a layer, against
about 1.4 us for XLA's other small fusions. With ``tensor_cores=False`` (one row only) each step
is a multiply and a column sum on the CUDA cores instead: no padding and no 15 zero rows in the
dot. Which is faster is the autotune table's call (``benchmarks/bench_gemv.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat

_MIN_DOT_ROWS = 16


def _kernel(x_ref, w_ref, o_ref, *, block_k: int, tensor_cores: bool, rows_in_kernel: bool):
    """x_ref [Bp, Ks] ([B, Ks] with rows_in_kernel), w_ref [Ks, bn], o_ref [Bp, bn] float32 (one
    split's partial); without tensor cores Bp is 1 and the accumulator a [bn] vector."""
    steps = w_ref.shape[0] // block_k
    rows = o_ref.shape[0]
    # rows_in_kernel: padded rows repeat the last real row (never stored), so no padded x exists.
    row_ids = jnp.minimum(lax.iota(jnp.int32, rows), x_ref.shape[0] - 1)
    x_rows = row_ids if rows_in_kernel else slice(None)

    def body(i, acc):
        k0 = pl.multiple_of(i * block_k, block_k)
        ws = w_ref[pl.ds(k0, block_k), :]
        if not tensor_cores:  # [bk] x [bk, bn] -> [bn]
            xs = x_ref[0, pl.ds(k0, block_k)].astype(jnp.float32)
            return acc + jnp.sum(xs[:, None] * ws.astype(jnp.float32), axis=0)
        xs = x_ref[x_rows, pl.ds(k0, block_k)]
        return acc + lax.dot_general(
            xs, ws, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )

    if tensor_cores:
        acc = lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))
        if rows_in_kernel:  # only the real rows: B / 16 of the partials' write traffic
            real = lax.iota(jnp.int32, rows) < x_ref.shape[0]
            _compat.triton_store(o_ref, acc, mask=jnp.broadcast_to(real[:, None], acc.shape))
        else:
            o_ref[...] = acc
    else:
        acc = lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape[1:], jnp.float32))
        o_ref[...] = acc[None, :]


@functools.partial(
    jax.jit,
    static_argnames=(
        "layer",
        "block_n",
        "block_k",
        "splits",
        "num_warps",
        "num_stages",
        "tensor_cores",
        "rows_in_kernel",
        "interpret",
    ),
)
def stacked_gemv_partials(
    x: jax.Array,
    w: jax.Array,
    *,
    layer: int,
    block_n: int,
    block_k: int,
    splits: int,
    num_warps: int,
    num_stages: int,
    interpret: bool,
    tensor_cores: bool = True,
    rows_in_kernel: bool = False,
) -> jax.Array:
    """x: [B, K], w: [L, K, N] -> float32 partials [splits, B, N] (sum over axis 0 = x @ w[layer]).
    ``tensor_cores=False`` needs B == 1 (arguments are validated in ``api.stacked_gemv``);
    ``rows_in_kernel`` pads x's rows inside the kernel (tensor-core path only)."""
    B, K = x.shape
    _, _, N = w.shape
    rows = max(_MIN_DOT_ROWS, -(-B // _MIN_DOT_ROWS) * _MIN_DOT_ROWS) if tensor_cores else 1
    ks = K // splits
    in_kernel = rows_in_kernel and tensor_cores
    xp = jnp.pad(x, ((0, rows - B), (0, 0))) if rows != B and not in_kernel else x
    out = pl.pallas_call(
        functools.partial(
            _kernel, block_k=block_k, tensor_cores=tensor_cores, rows_in_kernel=in_kernel
        ),
        grid=(N // block_n, splits),
        in_specs=[
            pl.BlockSpec((xp.shape[0], ks), lambda n, s: (0, s)),
            pl.BlockSpec((None, ks, block_n), lambda n, s: (layer, s, n)),
        ],
        out_specs=pl.BlockSpec((None, rows, block_n), lambda n, s: (s, 0, n)),
        out_shape=jax.ShapeDtypeStruct((splits, rows, N), jnp.float32),
        compiler_params=_compat.triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="stacked_gemv",
    )(xp, w)
    return out[:, :B]
