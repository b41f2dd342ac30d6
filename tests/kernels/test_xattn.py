"""XAttention estimate + selection: Pallas kernel (interpret mode) vs the jnp reference, the
selection rule's edge cases, and the kept-block list format (pallas_kernels/README.md)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.xattn import Config, reference, synthetic, xattn_select
from pallas_kernels.xattn import pallas_triton as pt
from pallas_kernels.xattn import select as sel

H, K, D = 4, 2, 32
# Small tiles so that short inputs still span several row/column tiles.
CFG = Config(block_m=16, block_n=16, block_k=16)


def _run(q, k, impl, **kw):
    cfg = CFG if impl == "pallas_triton" else None
    return xattn_select(
        q,
        k,
        implementation=impl,
        interpret=True,
        config=cfg,
        return_mask=True,
        return_scores=True,
        **kw,
    )


def _check_list_format(out, n_kb):
    """Ascending kept indices in the first `count` slots, tail repeats the last kept one."""
    counts = np.asarray(out.block_counts)
    idx = np.asarray(out.block_indices)
    assert counts.min() >= 1
    slot = np.arange(n_kb)
    head = np.where(slot < counts[..., None], idx, -1)
    first = idx[..., :1]
    assert np.all((np.diff(idx, axis=-1) > 0) | (slot[1:] >= counts[..., None]))
    last = np.take_along_axis(idx, counts[..., None] - 1, axis=-1)
    assert np.all(np.where(slot >= counts[..., None], idx == last, True))
    assert np.all((head < n_kb) & (first >= 0))


def _check_mask_matches_list(out, row_valid):
    mask = np.asarray(out.mask)
    counts = np.asarray(out.block_counts)
    idx = np.asarray(out.block_indices)
    n_kb = mask.shape[-1]
    from_list = np.zeros_like(mask)
    b, h, r = np.meshgrid(*map(np.arange, counts.shape), indexing="ij")
    for s in range(n_kb):
        sel_ = s < counts
        from_list[b[sel_], h[sel_], r[sel_], idx[..., s][sel_]] = True
    valid = np.asarray(row_valid)[:, None, :, None]
    np.testing.assert_array_equal(np.where(valid, from_list, False), mask)


# ------------------------------------------------------------------------------------------
# Kernel vs reference.

CASES = [
    # stride, block, threshold, Tq, Tk, lengths, structured
    (8, 64, 0.9, 600, 600, (600, 431), False),
    (16, 128, 0.95, 600, 600, (600, 300), False),
    (16, 64, 0.9, 520, 520, (520, 77), True),
    (8, 128, 0.95, 384, 640, (640, 600), True),  # later chunk of a chunked prefill
]


@pytest.mark.parametrize("stride,block,threshold,t_q,t_k,lengths,structured", CASES)
def test_kernel_matches_reference(stride, block, threshold, t_q, t_k, lengths, structured):
    make = synthetic.structured_qk if structured else synthetic.random_qk
    q, k = make(jax.random.key(stride * block), len(lengths), t_k, H, K, D)
    q = q[:, t_k - t_q :]
    kv = jnp.asarray(lengths, jnp.int32)
    kw = dict(kv_lengths=kv, stride=stride, block_size=block, threshold=threshold)
    want = _run(q, k, "reference", **kw)
    got = _run(q, k, "pallas_triton", **kw)
    # bf16 block sums: the kernel sums in another order, allow one bf16 ulp (8 bits).
    np.testing.assert_allclose(
        np.asarray(got.scores, np.float32),
        np.asarray(want.scores, np.float32),
        rtol=2**-7,
        atol=1e-6,
    )
    np.testing.assert_array_equal(np.asarray(got.mask), np.asarray(want.mask))
    np.testing.assert_array_equal(np.asarray(got.block_counts), np.asarray(want.block_counts))
    np.testing.assert_array_equal(np.asarray(got.block_indices), np.asarray(want.block_indices))

    n_qb, n_kb = -(-t_q // block), -(-t_k // block)
    assert got.mask.shape == (len(lengths), H, n_qb, n_kb)
    assert got.scores.dtype == jnp.bfloat16
    _check_list_format(got, n_kb)
    diag, _, causal, row_valid = sel.row_geometry(n_qb, n_kb, (t_k - t_q) // block, kv, block)
    _check_mask_matches_list(got, row_valid)
    mask = np.asarray(got.mask)
    # Sink and diagonal always kept on valid rows; nothing outside the causal valid region.
    rv = np.asarray(row_valid)[:, None, :]
    assert np.all(mask[..., 0][np.broadcast_to(rv, mask.shape[:3])])
    diag_kept = np.take_along_axis(
        mask, np.broadcast_to(np.asarray(diag)[None, None, :, None], mask.shape[:3] + (1,)), axis=-1
    )[..., 0]
    assert np.all(diag_kept[np.broadcast_to(rv, mask.shape[:3])])
    assert not np.any(mask & ~np.asarray(causal)[:, None])


def test_structured_inputs_are_sparse_and_random_are_dense():
    # Reference path (the kernel equals it, tested above); 32 blocks per row at the end.
    t, block, stride = 2048, 64, 16
    dens = {}
    for name, make in (("structured", synthetic.structured_qk), ("random", synthetic.random_qk)):
        q, k = make(jax.random.key(7), 1, t, H, K, 64)
        out = xattn_select(
            q,
            k,
            stride=stride,
            block_size=block,
            threshold=0.9,
            return_mask=True,
            implementation="reference",
        )
        dens[name] = synthetic.causal_density(out.mask, None, block)
    assert 0.05 <= dens["structured"] <= 0.35, dens  # measured 0.29
    assert dens["random"] >= 0.85, dens  # measured 0.92


# ------------------------------------------------------------------------------------------
# Selection rule: threshold search vs the sort-based transcription, ties, edge cases.


def _random_sums(key, b, h, n_qb, n_kb, q_block_offset, ties):
    """bf16 block sums shaped like the estimate's (zero after the diagonal)."""
    x = jax.random.exponential(key, (b, h, n_qb, n_kb))
    if ties:  # few distinct values: many exact ties across the threshold
        x = jnp.round(x * 4) / 4
    diag = q_block_offset + jnp.arange(n_qb)
    x = jnp.where(jnp.arange(n_kb)[None, :] <= diag[:, None], x, 0.0)
    return (x / jnp.maximum(x.sum(-1, keepdims=True), 1e-9) * 8).astype(jnp.bfloat16)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("sink_rule", ["always", "official"])
def test_threshold_search_equals_sort(ties, sink_rule):
    b, h, n_qb, n_kb, off, block = 2, 3, 24, 40, 16, 64
    sums = _random_sums(jax.random.key(11), b, h, n_qb, n_kb, off, ties)
    kv = jnp.asarray([n_kb * block, 29 * block + 5], jnp.int32)
    act = jnp.asarray([[True, False, True], [True, True, True]])
    for thr in (0.3, 0.8, 0.9, 0.95, 0.999):
        kw = dict(threshold=thr, block_size=block, q_block_offset=off, sink_rule=sink_rule)
        want = reference.select_mask_reference(sums, kv, **kw)
        _, _, causal, row_valid = sel.row_geometry(n_qb, n_kb, off, kv, block)
        want, _ = sel.finalize_rows(want, causal, row_valid, act)
        _, _, got_x = sel.select_xla(sums, kv, act, **kw)
        np.testing.assert_array_equal(np.asarray(got_x), np.asarray(want), err_msg=str(thr))
        if thr in (0.3, 0.9):
            _, _, got_p = pt.select_pallas(
                sums, kv, act, config=Config(select_rows=8), interpret=True, **kw
            )
            np.testing.assert_array_equal(np.asarray(got_p), np.asarray(want), err_msg=str(thr))


def test_tie_order_lower_index_first():
    # Row 3 (diagonal 3): sink 1, diagonal 1, others 1 and 2 equal to 1 -> total 4;
    # threshold 0.7 -> required 2.8: forced 2 + first other (block 1) = 3 >= 2.8, so block 1
    # (lower index) is kept and block 2 is not.
    v = jnp.zeros((1, 1, 4, 4), jnp.float32).at[0, 0, 3].set(1.0).astype(jnp.bfloat16)
    kv = jnp.asarray([256], jnp.int32)
    act = jnp.ones((1, 1), bool)
    kw = dict(threshold=0.7, block_size=64, q_block_offset=0)
    _, _, m = sel.select_xla(v, kv, act, **kw)
    np.testing.assert_array_equal(np.asarray(m[0, 0, 3]), [True, True, False, True])
    np.testing.assert_array_equal(
        np.asarray(reference.select_mask_reference(v, kv, **kw)[0, 0, 3]), [True, True, False, True]
    )


def test_threshold_monotone_and_zero_threshold_keeps_forced():
    sums = _random_sums(jax.random.key(5), 1, 2, 16, 16, 0, False)
    kv = jnp.asarray([16 * 64], jnp.int32)
    act = jnp.ones((1, 2), bool)
    prev = None
    for thr in (1e-6, 0.5, 0.8, 0.9, 0.99):
        _, _, m = sel.select_xla(sums, kv, act, threshold=thr, block_size=64, q_block_offset=0)
        m = np.asarray(m)
        if prev is None:  # tiny threshold: only sink + diagonal
            eye = np.eye(16, dtype=bool)
            eye[:, 0] = True
            np.testing.assert_array_equal(m, np.broadcast_to(eye, m.shape))
        else:
            assert m.sum() >= prev.sum() and np.all(m[prev])
        prev = m


# ------------------------------------------------------------------------------------------
# Seed cases and API behaviour.


@pytest.mark.parametrize("impl", ["reference", "pallas_triton"])
def test_threshold_one_equals_causal(impl):
    t, block = 300, 64
    q, k = synthetic.random_qk(jax.random.key(2), 2, t, H, K, D)
    kv = jnp.asarray([300, 150], jnp.int32)
    out = _run(q, k, impl, kv_lengths=kv, stride=8, block_size=block, threshold=1.0)
    n = -(-t // block)
    _, _, causal, _ = sel.row_geometry(n, n, 0, kv, block)
    np.testing.assert_array_equal(
        np.asarray(out.mask), np.broadcast_to(np.asarray(causal)[:, None], out.mask.shape)
    )
    assert float(jnp.max(out.scores.astype(jnp.float32))) > 0  # scores still computed


@pytest.mark.parametrize("t_k", [1, 300])
def test_decode_keeps_all(t_k):
    q, k = synthetic.random_qk(jax.random.key(3), 2, t_k, H, K, D)
    kv = jnp.asarray([t_k, max(1, t_k // 2)], jnp.int32)
    out = xattn_select(q[:, -1:], k, kv_lengths=kv, return_mask=True, block_size=64)
    n_kb = -(-t_k // 64)
    n_valid = -(-np.asarray(kv) // 64)
    assert out.mask.shape == (2, H, 1, n_kb)
    np.testing.assert_array_equal(
        np.asarray(out.block_counts), np.broadcast_to(n_valid[:, None, None], (2, H, 1))
    )
    np.testing.assert_array_equal(
        np.asarray(out.mask)[:, :, 0],
        np.broadcast_to(np.arange(n_kb)[None, None] < n_valid[:, None, None], (2, H, n_kb)),
    )
    _check_list_format(out, n_kb)


def test_one_token_prompt():
    q, k = synthetic.random_qk(jax.random.key(4), 1, 1, H, K, D)
    for impl in ("reference", "pallas_triton"):
        out = xattn_select(q, k, return_mask=True, implementation=impl, interpret=True)
        assert out.mask.shape == (1, H, 1, 1) and bool(jnp.all(out.mask))
        assert np.all(np.asarray(out.block_counts) == 1)


def test_head_mask_rows_are_causal():
    t, block = 256, 64
    q, k = synthetic.structured_qk(jax.random.key(8), 1, t, H, K, D)
    head_mask = jnp.asarray([[True, False, True, False]])
    out = _run(
        q, k, "pallas_triton", stride=16, block_size=block, threshold=0.5, head_mask=head_mask
    )
    full = _run(q, k, "pallas_triton", stride=16, block_size=block, threshold=0.5)
    tril = np.tril(np.ones((4, 4), bool))
    np.testing.assert_array_equal(np.asarray(out.mask[0, 1]), tril)
    np.testing.assert_array_equal(np.asarray(out.mask[0, 3]), tril)
    np.testing.assert_array_equal(np.asarray(out.mask[0, 0]), np.asarray(full.mask[0, 0]))
    assert float(jnp.abs(out.scores[0, 1].astype(jnp.float32)).max()) == 0.0
    assert not np.array_equal(np.asarray(full.mask[0, 0]), tril)  # head 0 is actually sparse


def test_gqa_equals_repeated_kv():
    q, k = synthetic.random_qk(jax.random.key(9), 1, 256, H, K, D)
    k_rep = jnp.repeat(k, H // K, axis=2)  # query head h uses kv head h // G
    a = _run(q, k, "reference", stride=8, block_size=64, threshold=0.9)
    b = _run(q, k_rep, "reference", stride=8, block_size=64, threshold=0.9)
    np.testing.assert_array_equal(np.asarray(a.scores), np.asarray(b.scores))
    np.testing.assert_array_equal(np.asarray(a.mask), np.asarray(b.mask))


# ------------------------------------------------------------------------------------------
# Padding and chunking invariances.


def test_each_sequence_estimated_as_if_alone():
    """A length-L sequence padded inside a longer batch == the same sequence alone."""
    t, n, block, stride = 520, 333, 64, 16
    q, k = synthetic.random_qk(jax.random.key(10), 2, t, H, K, D)
    # Garbage (not zeros) after the length: must not leak into the estimate.
    kv = jnp.asarray([t, n], jnp.int32)
    batched = _run(
        q, k, "pallas_triton", kv_lengths=kv, stride=stride, block_size=block, threshold=0.9
    )
    alone = _run(q[1:, :n], k[1:, :n], "reference", stride=stride, block_size=block, threshold=0.9)
    nb = -(-n // block)
    np.testing.assert_array_equal(
        np.asarray(batched.mask[1, :, :nb, :nb]), np.asarray(alone.mask[0])
    )
    np.testing.assert_array_equal(
        np.asarray(batched.scores[1, :, :nb, :nb]), np.asarray(alone.scores[0])
    )
    assert not np.any(np.asarray(batched.mask[1, :, nb:]))
    # Reference chunking over queries does not change anything.
    est = functools.partial(
        reference.estimate_block_sums_reference, stride=stride, norm=1.0, block_size=block
    )
    np.testing.assert_array_equal(
        np.asarray(est(q, k, kv, chunk_blocks=1)), np.asarray(est(q, k, kv))
    )


@pytest.mark.parametrize("sink_rule", ["always", "official"])
def test_chunked_prefill_equals_one_shot(sink_rule):
    t, block, stride = 512, 64, 8
    n = 470
    q, k = synthetic.structured_qk(jax.random.key(12), 1, t, H, K, D)
    kw = dict(stride=stride, block_size=block, threshold=0.9, sink_rule=sink_rule)
    one = _run(q, k, "reference", kv_lengths=jnp.asarray([n]), **kw)
    rows = []
    for start, end in ((0, 256), (256, 512)):
        kv = jnp.asarray([min(n, end)], jnp.int32)
        part = _run(q[:, start:end], k[:, :end], "pallas_triton", kv_lengths=kv, **kw)
        nb = end // block
        np.testing.assert_array_equal(
            np.asarray(part.scores), np.asarray(one.scores[:, :, start // block : nb, :nb])
        )
        rows.append(np.pad(np.asarray(part.mask), ((0, 0), (0, 0), (0, 0), (0, t // block - nb))))
    np.testing.assert_array_equal(np.concatenate(rows, axis=2), np.asarray(one.mask))


def test_tile_order_covers_causal_tiles_once():
    ti, tj = pt.tile_order(n_i=5, n_j=7, row_offset=16, block_m=16, block_n=16, group_m=2)
    pairs = set(zip(ti.tolist(), tj.tolist()))
    assert len(pairs) == len(ti)
    want = {(i, j) for i in range(5) for j in range(7) if j * 16 <= 16 + (i + 1) * 16 - 1}
    assert pairs == want


# ------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(stride=24), "stride"),
        (dict(block_size=96), "block_size"),
        (dict(threshold=0.0), "threshold"),
        (dict(implementation="cuda"), "implementation"),
        (dict(sink_rule="sometimes"), "sink_rule"),
        (dict(kv_lengths=jnp.ones((3,), jnp.int32)), "kv_lengths"),
        (dict(head_mask=jnp.ones((1, 3), bool)), "head_mask"),
    ],
)
def test_invalid_arguments(kwargs, match):
    q, k = synthetic.random_qk(jax.random.key(0), 1, 128, H, K, D)
    with pytest.raises(ValueError, match=match):
        xattn_select(q, k, **kwargs)


def test_misaligned_chunk_and_bad_config_raise():
    q, k = synthetic.random_qk(jax.random.key(0), 1, 256, H, K, D)
    with pytest.raises(ValueError, match="multiple of block_size"):
        xattn_select(q[:, 100:], k)
    with pytest.raises(ValueError, match="block_m"):
        Config(block_m=48)
    with pytest.raises(ValueError, match="multiple of"):
        xattn_select(
            q,
            k,
            stride=4,
            block_size=128,
            implementation="pallas_triton",
            interpret=True,
            config=Config(block_m=16, block_n=16, block_k=16),
        )


def test_autotune_table_lookup():
    from pallas_kernels.xattn import config as config_lib

    kw = dict(stride=16, block_size=128, head_dim=128, dtype="bfloat16")
    hit = config_lib.lookup_config("nvidia_h100_80gb_hbm3", seq_len=65536, **kw)
    near = config_lib.lookup_config("nvidia_h100_80gb_hbm3", seq_len=100_000, **kw)
    assert hit == near and hit.block_m == 128  # nearest length in the table
    miss = config_lib.lookup_config("no_such_gpu", seq_len=65536, **kw)
    assert miss == config_lib.heuristic_config(head_dim=128, rows=4096, rows_per_block=8)
    short = config_lib.lookup_config("nvidia_h100_80gb_hbm3", seq_len=600, **kw)
    assert short.block_m == 64  # a table tile far larger than the input is not used


def test_official_chunk_rule():
    lengths = [1, 600, 2048, 2049, 5000, 16384, 20000, 32768, 65536, 131072, 300000]
    got = np.asarray(sel.official_chunk_blocks(jnp.asarray(lengths, jnp.int32), 128))
    for n, g in zip(lengths, got):
        p2 = 1 << (n - 1).bit_length()  # Xattention_prefill_dim4's chunk_size rule
        assert g * 128 == max(min(max(2048, p2), 128 * 1024 * 2048 // p2), 2048), n


# ------------------------------------------------------------------------------------------
# Estimate in passes over KV-head groups (bounds the T^2 scratch at long prompts).


@pytest.mark.parametrize("impl", ["reference", "pallas_triton"])
@pytest.mark.parametrize("kv_per_pass", [1, 2])
def test_passes_over_kv_heads_equal_one_pass(impl, kv_per_pass):
    """Heads are independent: estimating K/kv_per_pass groups one after another gives exactly
    the one-pass result (counts, lists, mask, scores), head mask and padding included."""
    h, kh = 8, 4
    q, k = synthetic.structured_qk(jax.random.key(21), 2, 320, h, kh, D)
    kv = jnp.asarray([320, 201], jnp.int32)
    head_mask = jnp.asarray([[1, 0, 1, 1, 1, 1, 0, 1], [1, 1, 1, 0, 1, 1, 1, 1]], bool)
    kw = dict(kv_lengths=kv, stride=8, block_size=64, threshold=0.9, head_mask=head_mask)
    kw["sink_rule"] = "official"
    one = _run(q, k, impl, **kw)
    split = _run(q, k, impl, kv_heads_per_pass=kv_per_pass, **kw)
    for name in ("block_counts", "block_indices", "mask", "scores"):
        np.testing.assert_array_equal(
            np.asarray(getattr(split, name)), np.asarray(getattr(one, name)), err_msg=name
        )
    assert float(jnp.abs(one.scores.astype(jnp.float32)).max()) > 0  # not a trivial match


def test_passes_argument_checked_and_scratch_counted():
    q, k = synthetic.random_qk(jax.random.key(22), 1, 256, H, K, D)
    with pytest.raises(ValueError, match="kv_heads_per_pass=3 must be a divisor of K=2"):
        xattn_select(q, k, kv_heads_per_pass=3)
    from pallas_kernels.xattn.api import scratch_bytes

    # 8B shape at 512K tokens, stride 16, 128-token blocks: the row partial sums are
    # 32 heads x 32768 rows x 4096 key blocks x 4 bytes = 16 GiB in one pass.
    s = scratch_bytes(1, 2**19, 2**19, 32)
    assert s["score_w"] == 32 * 32768 * 4096 * 4
    assert s["block_sums"] == 32 * 4096 * 4096 * 2
    # Quartering the heads quarters every buffer.
    s4 = scratch_bytes(1, 2**19, 2**19, 8)
    assert all(4 * s4[name] == s[name] for name in s)
