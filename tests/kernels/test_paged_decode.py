"""Paged decode attention: Pallas kernel (interpret mode on CPU) vs the jnp reference.

The reference is itself checked against an independent float64 numpy computation on contiguous
K/V. GPU-only cases (realistic sizes, a cache past 2**31 elements) are marked ``gpu``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_decode import (
    PagedDecodeConfig,
    get_config,
    paged_decode_attention,
    paged_decode_reference,
    shape_key,
)
from pallas_kernels.paged_decode import config as config_lib
from pallas_kernels.paged_decode.pallas_triton import merge_splits

# Kernel vs reference (STYLE.md: f32 1e-5, bf16 1e-2, rtol = atol / 10). bf16 and fp16 also round
# the softmax weights to the input dtype before the P @ V dot, as flash kernels do.
TOLERANCES = {
    jnp.float32: dict(atol=1e-5, rtol=1e-6),
    jnp.bfloat16: dict(atol=1e-2, rtol=1e-3),
    jnp.float16: dict(atol=2e-3, rtol=2e-4),
}


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    kv_heads: int
    group: int
    head_dim: int
    page_size: int
    max_pages: int
    num_pages: int
    dtype: type


def make_inputs(case: Case, lengths, seed: int, *, poison: bool = False):
    """Random q / pages and a shuffled page table; with ``poison``, every cache entry that the
    sequences must not read (pages outside their range, tokens past their length) is NaN and
    unused page-table entries point at NaN pages."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32)
    n_pages = -(-lengths // case.page_size)
    assert n_pages.sum() <= case.num_pages
    shape = (case.kv_heads, case.num_pages, case.page_size, case.head_dim)
    # q with std 2 so that the softmax is peaked and the running max matters.
    q = 2.0 * rng.standard_normal((case.batch, case.kv_heads * case.group, case.head_dim))
    k = rng.standard_normal(shape)
    v = rng.standard_normal(shape)
    perm = rng.permutation(case.num_pages)
    used = perm[: n_pages.sum()]
    spare = perm[n_pages.sum() :]
    table = np.empty((case.batch, case.max_pages), np.int32)
    offset = 0
    for b in range(case.batch):
        own = used[offset : offset + n_pages[b]]
        offset += n_pages[b]
        filler = spare if len(spare) else used
        table[b, : n_pages[b]] = own
        table[b, n_pages[b] :] = rng.choice(filler, case.max_pages - n_pages[b])
    if poison:
        k[:, spare] = np.nan
        v[:, spare] = np.nan
        for b in range(case.batch):
            tail = lengths[b] % case.page_size
            if tail:
                last = table[b, n_pages[b] - 1]
                k[:, last, tail:] = np.nan
                v[:, last, tail:] = np.nan
    cast = lambda x: jnp.asarray(x, case.dtype)
    return cast(q), cast(k), cast(v), jnp.asarray(table), jnp.asarray(lengths)


def numpy_attention(q, k_pages, v_pages, table, lengths, sm_scale):
    """Float64 per-(sequence, head) attention on contiguous K/V gathered in numpy."""
    q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[0]
    out = np.zeros_like(q)
    for b in range(batch):
        n = int(lengths[b])
        for h in range(num_heads):
            kv = h // (num_heads // num_kv_heads)
            k = k_pages[kv, np.asarray(table[b])].reshape(-1, head_dim)[:n]
            v = v_pages[kv, np.asarray(table[b])].reshape(-1, head_dim)[:n]
            s = k @ q[b, h] * sm_scale
            p = np.exp(s - s.max())
            out[b, h] = p @ v / p.sum()
    return out


def assert_close(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert bool(jnp.all(jnp.isfinite(out))), "non-finite output"
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(ref, np.float32), **TOLERANCES[dtype]
    )


def run_pallas(q, k, v, table, lengths, cfg: PagedDecodeConfig):
    return paged_decode_attention(
        q, k, v, table, lengths, implementation="pallas", interpret=True, config=cfg
    )


def test_reference_matches_float64_numpy():
    case = Case(3, 2, 4, 32, 16, 5, 16, jnp.float32)
    lengths = [1, 33, 80]
    q, k, v, table, lens = make_inputs(case, lengths, seed=0)
    ref = paged_decode_reference(q, k, v, table, lens, sm_scale=0.3)
    expect = numpy_attention(q, k, v, table, lengths, 0.3)
    np.testing.assert_allclose(np.asarray(ref), expect, atol=1e-5, rtol=1e-5)


# Ragged lengths: 1, page boundary -1/0/+1, a full table and a random one, for GQA ratios
# 1/4/8, head dims 64/128, pages per block 1/2/4 and several splits (incl. non-powers of two).
RAGGED = [
    # (kv_heads, group, head_dim, dtype, pages_per_block, num_splits)
    (2, 1, 64, jnp.float32, 1, 1),
    (2, 4, 128, jnp.bfloat16, 2, 3),
    (1, 8, 64, jnp.bfloat16, 1, 4),
    (2, 4, 64, jnp.float32, 4, 2),
    (2, 2, 128, jnp.float16, 1, 5),
    (2, 4, 64, jnp.bfloat16, -2, 3),  # negative: page_chunks (pages of 32 in 2 chunks of 16)
]


@pytest.mark.parametrize("kv_heads,group,head_dim,dtype,ppb,splits", RAGGED)
def test_kernel_matches_reference_ragged(kv_heads, group, head_dim, dtype, ppb, splits):
    page_size, max_pages = (16, 12) if ppb > 0 else (32, 6)
    case = Case(6, kv_heads, group, head_dim, page_size, max_pages, 48, dtype)
    rng = np.random.default_rng(head_dim + group)
    lengths = [1, page_size - 1, page_size, page_size + 1, max_pages * page_size]
    lengths.append(int(rng.integers(2, max_pages * page_size)))
    q, k, v, table, lens = make_inputs(case, lengths, seed=group * 7 + splits)
    cfg = PagedDecodeConfig(
        pages_per_block=max(ppb, 1), page_chunks=max(-ppb, 1), num_splits=splits
    )
    out = run_pallas(q, k, v, table, lens, cfg)
    ref = paged_decode_reference(q, k, v, table, lens)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("ppb,chunks,splits", [(1, 1, 3), (2, 1, 6), (1, 2, 4)])
def test_never_reads_pages_past_length_or_outside_table(ppb, chunks, splits):
    """Every cache entry a sequence must not touch is NaN; one read would reach the output."""
    case = Case(4, 2, 4, 64, 16 * chunks, 10, 40, jnp.float32)
    lengths = [5, 16, 33, 150]
    q, k, v, table, lens = make_inputs(case, lengths, seed=ppb, poison=True)
    assert bool(jnp.any(jnp.isnan(k))), "poisoning failed"
    cfg = PagedDecodeConfig(pages_per_block=ppb, page_chunks=chunks, num_splits=splits)
    out = run_pallas(q, k, v, table, lens, cfg)
    ref = paged_decode_reference(q, k, v, table, lens)
    assert_close(out, ref, jnp.float32)
    expect = numpy_attention(q, jnp.nan_to_num(k), jnp.nan_to_num(v), table, lengths, 0.125)
    np.testing.assert_allclose(np.asarray(out), expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("splits", [1, 3])
def test_stacked_cache_reads_only_the_given_layer(splits):
    """The model passes the whole [L, K, P, N, D] cache plus a (traced) layer index; the other
    layers are NaN, so reading them would poison the output."""
    case = Case(2, 2, 4, 64, 16, 6, 14, jnp.float32)
    q, k, v, table, lengths = make_inputs(case, [37, 80], seed=7, poison=True)
    nan = jnp.full_like(k, jnp.nan)
    k_all, v_all = jnp.stack([nan, k, nan]), jnp.stack([nan, v, nan])
    ref = paged_decode_reference(q, k, v, table, lengths)
    cfg = PagedDecodeConfig(pages_per_block=1, page_chunks=1, num_splits=splits)
    layer = jnp.int32(1)
    out = paged_decode_attention(
        q, k_all, v_all, table, lengths, layer, implementation="pallas", interpret=True, config=cfg
    )
    assert_close(out, ref, jnp.float32)
    out_ref_impl = paged_decode_attention(
        q, k_all, v_all, table, lengths, layer, implementation="reference"
    )
    assert_close(out_ref_impl, ref, jnp.float32)
    with pytest.raises(ValueError, match=r"\[L, K, P, N, D\] \(layer given\)"):
        paged_decode_attention(q, k, v, table, lengths, layer)


def test_more_splits_than_blocks_and_zero_length():
    """Short sequences leave most splits empty; a zero-length sequence gives zeros."""
    case = Case(3, 2, 4, 64, 16, 8, 16, jnp.float32)
    q, k, v, table, lens = make_inputs(case, [0, 3, 20], seed=3)
    out = run_pallas(q, k, v, table, lens, PagedDecodeConfig(pages_per_block=1, num_splits=8))
    ref = paged_decode_reference(q, k, v, table, lens)
    assert_close(out, ref, jnp.float32)
    assert float(jnp.max(jnp.abs(out[0]))) == 0.0


def test_lengths_past_the_table_are_clamped():
    case = Case(2, 1, 4, 64, 16, 4, 8, jnp.float32)
    q, k, v, table, lens = make_inputs(case, [64, 64], seed=4)
    longer = jnp.asarray([64, 1000], jnp.int32)
    out = run_pallas(q, k, v, table, longer, PagedDecodeConfig(pages_per_block=2, num_splits=2))
    assert_close(out, paged_decode_reference(q, k, v, table, lens), jnp.float32)


def test_merge_splits_equals_one_softmax():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((1, 1, 3, 2, 8))  # [B, K, S, G, tokens of the split]
    values = rng.standard_normal((1, 1, 3, 8, 4))  # [B, K, S, tokens, D]
    m = logits.max(-1) / np.log(2.0)  # log2 units
    p = np.exp(logits - logits.max(-1, keepdims=True))
    acc = np.einsum("bksgt,bkstd->bksgd", p, values)
    out = merge_splits(*(jnp.asarray(x, jnp.float32) for x in (acc, m, p.sum(-1))))
    flat_p = np.exp(logits - logits.max((2, 4), keepdims=True))
    expect = np.einsum("bksgt,bkstd->bkgd", flat_p, values) / flat_p.sum((2, 4))[..., None]
    np.testing.assert_allclose(np.asarray(out), expect, atol=1e-5, rtol=1e-5)


def test_auto_uses_reference_on_cpu():
    case = Case(2, 2, 2, 64, 16, 4, 8, jnp.bfloat16)
    q, k, v, table, lens = make_inputs(case, [7, 50], seed=6)
    out = paged_decode_attention(q, k, v, table, lens, sm_scale=0.2)
    ref = paged_decode_reference(q, k, v, table, lens, sm_scale=0.2)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))


def test_bad_inputs_raise():
    case = Case(2, 2, 2, 64, 16, 4, 8, jnp.float32)
    q, k, v, table, lens = make_inputs(case, [7, 50], seed=7)
    with pytest.raises(ValueError, match="implementation"):
        paged_decode_attention(q, k, v, table, lens, implementation="cuda")
    with pytest.raises(ValueError, match="must divide query heads"):
        paged_decode_attention(q[:, :3], k, v, table, lens)
    with pytest.raises(ValueError, match="lengths must be"):
        paged_decode_attention(q, k, v, table, lens[:1])
    with pytest.raises(ValueError, match="int32"):
        paged_decode_attention(q, k, v, table.astype(jnp.int16), lens)
    with pytest.raises(ValueError, match="dtype"):
        paged_decode_attention(q, k.astype(jnp.bfloat16), v, table, lens)
    with pytest.raises(ValueError, match="pages_per_block=3"):
        paged_decode_attention(q, k, v, table, lens, pages_per_block=3, implementation="pallas")
    with pytest.raises(NotImplementedError, match="page size N"):
        paged_decode_attention(q, k[:, :, :12], v[:, :, :12], table, lens, implementation="pallas")


def test_config_validation_and_lookup():
    with pytest.raises(ValueError, match="num_splits=0"):
        PagedDecodeConfig(num_splits=0)
    with pytest.raises(ValueError, match="num_warps=3"):
        PagedDecodeConfig(num_warps=3)
    with pytest.raises(ValueError, match="page_chunks=2 needs pages_per_block=1"):
        PagedDecodeConfig(pages_per_block=2, page_chunks=2)
    clamped = PagedDecodeConfig(pages_per_block=8, num_splits=64).clamp(6, page_size=16)
    assert (clamped.pages_per_block, clamped.num_splits) == (4, 2)
    clamped = PagedDecodeConfig(page_chunks=8, num_splits=64).clamp(3, page_size=32)
    assert (clamped.page_chunks, clamped.num_splits) == (2, 6)
    key = shape_key(1, 32, 8, 512, 128, 128, jnp.bfloat16)
    assert key == "B=1,H=32,K=8,S=65536,N=128,D=128,bfloat16"
    # No table for an unknown device: the heuristic, clamped to the table width.
    cfg = get_config(1, 32, 8, 512, 128, 128, jnp.bfloat16, device_kind="no_such_gpu")
    assert cfg == config_lib.heuristic_config(1, 8, 512, 128).clamp(512, 128)
    assert cfg.num_splits * 8 >= 132  # fills the SMs of an H100 at batch 1


def test_committed_tables_parse():
    """Every committed table entry builds a valid config under its own shape key."""
    tables = sorted(config_lib._TABLE_DIR.glob(f"*/{config_lib.TABLE_NAME}"))
    for path in tables:
        kind = path.parent.name
        for key, fields in config_lib._load_table(kind):
            cfg = config_lib.lookup_config(key, kind)
            assert cfg == PagedDecodeConfig(**dict(fields))


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("ppb,chunks,splits", [(1, 1, 16), (2, 1, 5), (1, 1, 1), (1, 2, 7)])
def test_gpu_matches_reference(dtype, ppb, chunks, splits):
    case = Case(4, 8, 4, 128, 128, 64, 300, dtype)
    lengths = [1, 127, 129, 64 * 128]
    q, k, v, table, lens = make_inputs(case, lengths, seed=splits, poison=True)
    cfg = PagedDecodeConfig(pages_per_block=ppb, page_chunks=chunks, num_splits=splits)
    out = paged_decode_attention(q, k, v, table, lens, implementation="pallas", config=cfg)
    assert_close(out, paged_decode_reference(q, k, v, table, lens), dtype)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_gpu_cache_past_int32_offsets():
    """Pages of the last kv head lie past element 2**31 of the cache."""
    kv_heads, page_size, head_dim = 8, 128, 128
    num_pages = (1 << 31) // (kv_heads * page_size * head_dim) + 64
    shape = (kv_heads, num_pages, page_size, head_dim)
    k = jax.random.normal(jax.random.key(0), shape, jnp.bfloat16)
    v = jax.random.normal(jax.random.key(1), shape, jnp.bfloat16)
    q = jax.random.normal(jax.random.key(2), (2, 32, head_dim), jnp.bfloat16)
    table = jnp.stack([jnp.arange(num_pages - 32, num_pages), jnp.arange(32)]).astype(jnp.int32)
    lens = jnp.asarray([32 * page_size, 1000], jnp.int32)
    out = paged_decode_attention(q, k, v, table, lens, implementation="pallas", num_splits=4)
    assert_close(out, paged_decode_reference(q, k, v, table, lens), jnp.bfloat16)


@pytest.mark.parametrize("splits", [1, 4])
def test_lse_matches_float64_logsumexp(splits):
    case = Case(2, 2, 4, 64, 16, 6, 14, jnp.float32)
    q, k, v, table, lengths = make_inputs(case, [37, 80], seed=11, poison=True)
    scale = 1 / np.sqrt(64)
    want = np.zeros((2, 8))
    for b, n in enumerate([37, 80]):
        for h in range(8):
            kk = np.asarray(k, np.float64)[h // 4, np.asarray(table[b])].reshape(-1, 64)[:n]
            s = kk @ np.asarray(q, np.float64)[b, h] * scale
            want[b, h] = np.log(np.exp(s - s.max()).sum()) + s.max()
    cfg = PagedDecodeConfig(pages_per_block=1, page_chunks=1, num_splits=splits)
    for impl in ("pallas", "reference"):
        out, lse = paged_decode_attention(
            q,
            k,
            v,
            table,
            lengths,
            implementation=impl,
            interpret=True,
            config=cfg,
            return_lse=True,
        )
        np.testing.assert_allclose(np.asarray(lse), want, atol=1e-5, rtol=1e-6)
        assert_close(out, paged_decode_reference(q, k, v, table, lengths), jnp.float32)


def _extra_kv(case: Case, seed: int):
    rng = np.random.default_rng(seed)
    shape = (case.batch, case.kv_heads, case.head_dim)
    return (jnp.asarray(rng.standard_normal(shape), case.dtype) for _ in range(2))


def test_reference_extra_key_is_one_more_token():
    """An extra key/value equals the same token written at position ``lengths[b]`` of the cache
    (float64 numpy on the contiguous K/V with the extra token appended)."""
    case = Case(3, 2, 4, 32, 16, 5, 16, jnp.float32)
    lengths = [0, 33, 79]
    q, k, v, table, lens = make_inputs(case, lengths, seed=11)
    kx, vx = _extra_kv(case, seed=12)
    ref = paged_decode_reference(q, k, v, table, lens, k_extra=kx, v_extra=vx, sm_scale=0.3)
    # Write the extra token into the cache at its position, then attend to lengths + 1 tokens.
    k_np, v_np = np.array(k), np.array(v)
    for b, n in enumerate(lengths):
        page, slot = int(table[b, n // case.page_size]), n % case.page_size
        k_np[:, page, slot], v_np[:, page, slot] = np.asarray(kx[b]), np.asarray(vx[b])
    expect = numpy_attention(q, k_np, v_np, table, [n + 1 for n in lengths], 0.3)
    np.testing.assert_allclose(np.asarray(ref), expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "dtype,ppb,chunks,splits,stacked",
    [
        (jnp.float32, 1, 1, 1, False),  # no partials: the kernel normalises itself
        (jnp.float32, 2, 1, 3, True),
        (jnp.bfloat16, 1, 2, 8, True),  # more splits than blocks for the short rows
    ],
)
def test_kernel_extra_key_matches_reference(dtype, ppb, chunks, splits, stacked):
    case = Case(4, 2, 4, 64, 16 * chunks, 6, 24, dtype)
    lengths = [0, 1, 16 * chunks, 6 * 16 * chunks]
    q, k, v, table, lens = make_inputs(case, lengths, seed=13, poison=True)
    kx, vx = _extra_kv(case, seed=14)
    cfg = PagedDecodeConfig(pages_per_block=ppb, page_chunks=chunks, num_splits=splits)
    layer = None
    if stacked:  # layer 1 of a two-layer cache whose layer 0 is NaN
        k, v = (jnp.stack([jnp.full_like(x, jnp.nan), x]) for x in (k, v))
        layer = jnp.int32(1)
    kwargs = dict(k_extra=kx, v_extra=vx, config=cfg, interpret=True)
    out = paged_decode_attention(q, k, v, table, lens, layer, implementation="pallas", **kwargs)
    ref = paged_decode_attention(q, k, v, table, lens, layer, implementation="reference", **kwargs)
    assert_close(out, ref, dtype)
    # The extra key matters (a cache-only result differs), and a zero-length row is its value.
    alone = paged_decode_attention(q, k, v, table, lens, layer, implementation="reference")
    assert not np.allclose(np.asarray(out, np.float32), np.asarray(alone, np.float32), atol=1e-2)
    np.testing.assert_allclose(
        np.asarray(out[0], np.float32),
        np.repeat(np.asarray(vx[0], np.float32), case.group, axis=0),
        **TOLERANCES[dtype],
    )


def test_extra_key_bad_inputs_raise():
    case = Case(2, 2, 2, 64, 16, 4, 8, jnp.float32)
    q, k, v, table, lens = make_inputs(case, [7, 50], seed=15)
    kx, vx = _extra_kv(case, seed=16)
    with pytest.raises(ValueError, match="together"):
        paged_decode_attention(q, k, v, table, lens, k_extra=kx)
    with pytest.raises(ValueError, match=r"k_extra must be \[B, K, D\]"):
        paged_decode_attention(q, k, v, table, lens, k_extra=kx[:1], v_extra=vx)
    with pytest.raises(ValueError, match="v_extra dtype"):
        paged_decode_attention(q, k, v, table, lens, k_extra=kx, v_extra=vx.astype(jnp.bfloat16))


def test_ragged_splits_give_the_longest_row_the_gpu():
    """At least the uniform heuristic's splits, about one program per SM for one row, a power
    of two, and no more than half the key blocks of the table."""
    for B, K, M, N in ((8, 8, 256, 128), (1, 8, 256, 128), (16, 8, 512, 128), (8, 2, 4, 16)):
        got = config_lib.ragged_num_splits(B, K, M, N)
        uniform = config_lib.heuristic_config(B, K, M, N).num_splits
        assert got >= uniform and got & (got - 1) == 0
        assert got <= max(M * N // 128 // 2, uniform, 1)
    assert config_lib.ragged_num_splits(8, 8, 256, 128) == 16  # heuristic alone: 8
