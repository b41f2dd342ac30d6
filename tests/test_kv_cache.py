"""The paged cache's two prefill writes (whole pages, token by token) agree."""

import jax.numpy as jnp
import numpy as np
import pytest

from elastic_jax import kv_cache
from elastic_jax.config import ModelConfig, RopeConfig


def _cfg() -> ModelConfig:
    return ModelConfig(
        architecture="Qwen3ForCausalLM",
        rms_norm_eps=1e-6,
        rope=RopeConfig(theta=10000.0),
        max_position_embeddings=256,
        tie_word_embeddings=True,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        dtype="float32",
    )


@pytest.mark.parametrize("capacity", [64, 40])  # 40: the prompt runs past the table (trash page)
def test_page_write_equals_token_write(capacity):
    cfg, B, T, N = _cfg(), 3, 64, 8
    rng = np.random.default_rng(0)
    M = -(-capacity // N)
    table = rng.permutation(B * M + 4)[: B * M].reshape(B, M).astype(np.int32)  # shuffled pages
    cache = kv_cache.create(cfg, B, capacity, page_size=N, page_table=table, num_pages=B * M + 5)
    k_new = jnp.asarray(rng.standard_normal((B, T, cfg.num_kv_heads, cfg.head_dim)), jnp.float32)
    v_new = k_new * 2 + 1
    layer = 1
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    pages, slots = kv_cache.token_slots(cache, positions)
    want_k, want_v = kv_cache.write(cache.k, cache.v, layer, pages, slots, k_new, v_new)
    whole = kv_cache.prompt_pages(cache, T)
    assert whole.shape == (B, T // N)
    got_k, got_v = kv_cache.write_pages(cache.k, cache.v, layer, whole, k_new, v_new)
    real = np.arange(cache.num_pages) != cache.trash_page  # the trash page's content is unread
    np.testing.assert_array_equal(np.asarray(got_k)[:, :, real], np.asarray(want_k)[:, :, real])
    np.testing.assert_array_equal(np.asarray(got_v)[:, :, real], np.asarray(want_v)[:, :, real])
    # Page j of sequence b holds its tokens j*N .. j*N+N-1 (kv-head-major).
    b, j = 2, min(M, T // N) - 1
    np.testing.assert_array_equal(
        np.asarray(got_k)[layer, :, table[b, j]],
        np.asarray(k_new)[b, j * N : (j + 1) * N].transpose(1, 0, 2),
    )


def test_prompt_pages_needs_whole_pages():
    cache = kv_cache.create(_cfg(), 1, 64, page_size=16)
    assert kv_cache.prompt_pages(cache, 40) is None
    assert kv_cache.prompt_pages(cache, 48).shape == (1, 3)
