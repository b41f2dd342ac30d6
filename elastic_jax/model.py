"""Qwen3 / PawQwen3 / Llama / PawLlama forward passes as pure functions over (params, cache,
tokens). The families share this one code path; their differences are config flags
(``ModelConfig.qk_norm``, ``attention_bias``, ``mlp_bias``) checked in ``project_qkv``,
``_attn_out`` and ``_mlp_block``.

Prefill is layer-major: each layer processes the whole (bucketed) prompt before the next layer
starts. That keeps the PawQwen3 router exact for long prompts, since it pools the first and last
100 keys of the WHOLE prompt at every layer (spec §11), while memory stays bounded: the MLP runs in
chunks of ``rt.prefill_chunk`` tokens (its hidden is the one large intermediate) and attention is
a flash kernel (GPU) or a query-tiled reference (CPU).

Letters: B batch, T tokens, E hidden, H query heads, K kv heads, D head dim, V vocab, L layers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from elastic_jax import attention as attn
from elastic_jax import kv_cache, sharding
from elastic_jax.config import ModelConfig, RuntimeConfig, rope_inv_freq
from elastic_jax.elastic_config import MODE_STREAMING, MODE_XATTN
from elastic_jax.layers import apply_rope, residual_in_chunks, rms_norm, rope_cos_sin, swiglu_mlp
from elastic_jax.params import LayerParams, Params
from elastic_jax.router import route
from pallas_kernels import _compat, gemv
from pallas_kernels.decode_norm import add_rms_norm, qk_norm_rope


def _rope_tables(positions: jax.Array, cfg: ModelConfig):
    inv_freq, scaling = rope_inv_freq(cfg)
    return rope_cos_sin(positions, inv_freq, scaling, cfg.jnp_dtype)


def project_qkv(x: jax.Array, lp: LayerParams, cfg: ModelConfig):
    """x: [B, T, E] (normed) -> q [B, T, H, D], k [B, T, K, D] (pre-RoPE), v [B, T, K, D].

    Per-family steps: projection biases (``cfg.attention_bias``, Llama option) and the per-head
    q/k RMSNorm (``cfg.qk_norm``, Qwen3). The returned k is what the elastic router pools: after
    k_norm (Qwen3) or straight from k_proj (Llama), before RoPE in both cases.
    """
    q, k, v = _qkv_dots(x, lp, cfg)
    if cfg.qk_norm:
        q, k = rms_norm(q, lp.q_norm, cfg.rms_norm_eps), rms_norm(k, lp.k_norm, cfg.rms_norm_eps)
    return q, k, v


def _qkv_dots(x: jax.Array, lp: LayerParams, cfg: ModelConfig):
    """The q/k/v projections (and their biases) of ``project_qkv``, before any norm."""
    q = jnp.einsum("bte,ehd->bthd", x, lp.wq)
    k = jnp.einsum("bte,ekd->btkd", x, lp.wk)
    v = jnp.einsum("bte,ekd->btkd", x, lp.wv)
    if cfg.attention_bias:
        q, k, v = q + lp.q_bias, k + lp.k_bias, v + lp.v_bias
    return q, k, v


def out_proj(o: jax.Array, wo: jax.Array) -> jax.Array:
    """o: [..., H, D] attention output, wo: [H, D, E] -> [..., E].

    One contracting dim (H*D) instead of two: with (h, d) contracted XLA on GPU turned the decode
    projection into a batched cuBLAS GEMV that needed a copy of each layer's wo slice every step
    (~0.7 ms per 8B decode step, found with the profiler); the flattened form reads it in place.
    """
    H, D, E = wo.shape
    return jnp.einsum("...k,ke->...e", o.reshape(*o.shape[:-2], H * D), wo.reshape(H * D, E))


def _attn_out(o: jax.Array, lp: LayerParams, cfg: ModelConfig) -> jax.Array:
    """o_proj of the attention output (plus its bias with ``cfg.attention_bias``)."""
    y = out_proj(o, lp.wo)
    return y + lp.o_bias if cfg.attention_bias else y


def _mlp_update(x: jax.Array, lp: LayerParams, cfg: ModelConfig) -> jax.Array:
    """The MLP's residual update of a normed x [B, T, E] -> [B, T, E]."""
    biases = (lp.gate_bias, lp.up_bias, lp.down_bias) if cfg.mlp_bias else None
    return swiglu_mlp(x, lp.w_gate, lp.w_up, lp.w_down, biases=biases)


def _mlp_block(h: jax.Array, lp: LayerParams, cfg: ModelConfig) -> jax.Array:
    return h + _mlp_update(rms_norm(h, lp.mlp_norm, cfg.rms_norm_eps), lp, cfg)


def head_modes_for(
    k_pre: jax.Array, lengths: jax.Array, lp: LayerParams, cfg: ModelConfig, rt: RuntimeConfig
) -> jax.Array | None:
    """int32 [B, H] per-head prefill modes, or None for the plain dense path."""
    B, H = k_pre.shape[0], cfg.num_heads
    forced = {"streaming": MODE_STREAMING, "xattn": MODE_XATTN}
    if rt.attention_mode == "dense" or (rt.attention_mode == "elastic" and not cfg.is_elastic):
        return None, None
    if rt.attention_mode in forced:
        if not cfg.is_elastic:
            raise ValueError(
                f"attention_mode={rt.attention_mode!r} needs the elastic settings (sink, window, "
                f"XAttention) of a PawQwen3 / PawLlama config; this model is {cfg.architecture}"
            )
        return jnp.full((B, H), forced[rt.attention_mode], jnp.int32), None
    modes, z_kv, _ = route(k_pre, lengths, lp.router, cfg.elastic, H)
    return modes, z_kv


def layer_prefill(
    h: jax.Array,
    lp: LayerParams,
    cos: jax.Array,
    sin: jax.Array,
    lengths: jax.Array,
    cfg: ModelConfig,
    rt: RuntimeConfig,
):
    """One decoder layer over a whole right-padded prompt.

    h: [B, T, E]; cos, sin: [B, T, D]; lengths: int32 [B].
    Returns (h [B, T, E], k [B, T, K, D] post-RoPE, v [B, T, K, D], stats dict of [B, H] arrays).
    Under a mesh whose model axis m exceeds K, k and v have m kv heads (``sharding``).
    """
    with jax.named_scope("attn_pre"):
        x = rms_norm(h, lp.attn_norm, cfg.rms_norm_eps)
        # Unchunked: q, k, v are needed whole by attention anyway, and chunking only added
        # copies into stacked outputs.
        q, k_pre, v = project_qkv(x, lp, cfg)
    with jax.named_scope("router"):
        modes, z_kv = head_modes_for(k_pre, lengths, lp, cfg, rt)
    with jax.named_scope("rope"):
        q = apply_rope(q, cos, sin)
        k = apply_rope(k_pre, cos, sin)
        k, v = sharding.replicate_kv_heads(k, v)  # under a mesh with K < model axis only
    with jax.named_scope("attention"):
        o, stats = attn.prefill_attention(q, k, v, lengths, modes, cfg, rt)
    with jax.named_scope("attn_post"):
        h = h + _attn_out(o, lp, cfg)
    with jax.named_scope("mlp"):
        # Chunked: the MLP hidden ([B, T, F], F = 3E for the 8B shape) is the one intermediate
        # that grows past the activations themselves at 128K tokens.
        h = residual_in_chunks(lambda t: _mlp_block(t, lp, cfg), h, rt.prefill_chunk)
    h = sharding.constrain(h, sharding.HIDDEN)  # no-op without a mesh
    if modes is not None:
        stats = {"modes": modes, **stats}
    if z_kv is not None:
        stats["router_class"] = z_kv.astype(jnp.int32)
    return h, k, v, stats


def final_logits(h: jax.Array, params: Params, cfg: ModelConfig) -> jax.Array:
    """h: [..., E] -> float32 logits [..., V]."""
    return _lm_head(rms_norm(h, params.final_norm, cfg.rms_norm_eps), params)


def _lm_head(x: jax.Array, params: Params) -> jax.Array:
    """x: [..., E] after the final norm -> float32 logits [..., V]."""
    w = params.embed.T if params.lm_head is None else params.lm_head
    return jnp.einsum("...e,ev->...v", x, w, preferred_element_type=jnp.float32)


def _embed(params: Params, tokens: jax.Array) -> jax.Array:
    return sharding.constrain(jnp.take(params.embed, tokens, axis=0), sharding.HIDDEN)


def forward(
    params: Params, tokens: jax.Array, lengths: jax.Array, cfg: ModelConfig, rt: RuntimeConfig
) -> jax.Array:
    """Logits for every position, no cache (parity tests, scoring). tokens: int32 [B, T] ->
    float32 [B, T, V]."""
    B, T = tokens.shape
    cos, sin = _rope_tables(jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)), cfg)

    def body(h, lp):
        h, _, _, _ = layer_prefill(h, lp, cos, sin, lengths, cfg, rt)
        return h, None

    h, _ = jax.lax.scan(body, _embed(params, tokens), params.layers)
    return final_logits(h, params, cfg)


def prefill(
    params: Params,
    cache: kv_cache.KVCache,
    tokens: jax.Array,
    lengths: jax.Array,
    cfg: ModelConfig,
    rt: RuntimeConfig,
):
    """Run the prompt through every layer and fill the cache.

    tokens: int32 [B, T] right-padded (T a bucket length); lengths: int32 [B] in [1, T].
    Returns (logits of each sequence's last prompt token float32 [B, V], cache with
    ``lengths`` set, stats: dict of [L, B, H] arrays (modes, kept/causal blocks) when elastic).
    """
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    cos, sin = _rope_tables(positions, cfg)
    whole_pages = kv_cache.prompt_pages(cache, T)
    if whole_pages is None:  # prompt bucket not a whole number of pages: write token by token
        pages, slots = kv_cache.token_slots(cache, positions)

    def body(carry, xs):
        h, ck, cv = carry
        lp, layer = xs
        h, k, v, stats = layer_prefill(h, lp, cos, sin, lengths, cfg, rt)
        with jax.named_scope("cache_write"):
            if whole_pages is not None:
                ck, cv = kv_cache.write_pages(ck, cv, layer, whole_pages, k, v)
            else:
                ck, cv = kv_cache.write(ck, cv, layer, pages, slots, k, v)
        return (h, ck, cv), stats

    layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    (h, ck, cv), stats = jax.lax.scan(
        body, (_embed(params, tokens), cache.k, cache.v), (params.layers, layer_ids)
    )
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]
    logits = final_logits(last, params, cfg)
    new_cache = kv_cache.KVCache(k=ck, v=cv, page_table=cache.page_table, lengths=lengths)
    new_cache = sharding.constrain_cache(new_cache)  # no-op without a mesh
    return logits, new_cache, stats


def _decode_qkv_fused(
    x: jax.Array, batch: int, lp: LayerParams, cfg: ModelConfig, cos: jax.Array, sin: jax.Array
):
    """The fused decode path's q/k/v (``rt.decode_norm == "pallas"``), post-RoPE.

    x: [R, E] from ``add_rms_norm``, R = 2 rows (second zero) when ``batch`` is 1 (see
    ``_decode_qkv``), else R = batch; cos, sin: [B, 1, D]. The q/k norms and RoPE run in one
    ``qk_norm_rope`` kernel that reads only the first ``batch`` rows of the projections, so the
    padding row is never sliced off q and k. Returns q [B, H, D], k, v [B, K, D]."""
    qkv = _qkv_dots(x[:, None], lp, cfg)
    if x.shape[0] != batch:
        qkv = jax.lax.optimization_barrier(qkv)
    q, k, v = (t[:, 0] for t in qkv)
    norm_w = dict(q_weight=lp.q_norm, k_weight=lp.k_norm) if cfg.qk_norm else {}
    q, k = qk_norm_rope(
        q, k, cos[:, 0], sin[:, 0], batch=batch, eps=cfg.rms_norm_eps, implementation="pallas",
        **norm_w,
    )  # fmt: skip
    return q, k, v[:batch]


def _decode_qkv(x: jax.Array, lp: LayerParams, cfg: ModelConfig):
    """``project_qkv`` for decode. x: [B, 1, E] -> q [B, 1, H, D], k, v [B, 1, K, D].

    With one sequence (B == 1) XLA on GPU strength-reduces every vector x matrix dot whose
    operands hold under 10M elements (the k and v projections of every Qwen3 size) into a
    multiply that writes a weight-sized product and a reduce over it: 0.14-0.23 TB/s for wk in
    the 4B/8B decode step (bench_decode --gemv), about 1 ms of a 7 ms step. Two rows (the second
    zero) keep them matrix products, which XLA also merges with the q projection into one GEMM;
    the optimisation barrier stops the simplifier from slicing the padding back off before the
    dots."""
    if x.shape[0] != 1:
        return project_qkv(x, lp, cfg)
    two = jnp.concatenate([x, jnp.zeros_like(x)], axis=0)
    q, k, v = jax.lax.optimization_barrier(project_qkv(two, lp, cfg))
    return q[:1], k[:1], v[:1]


def resolve_decode_out_proj(rt: RuntimeConfig, cfg: ModelConfig) -> str:
    """``rt.decode_out_proj`` with "auto" resolved: the Pallas GEMV where decode attention runs
    the Pallas kernel (so a ``decode_impl="reference"`` run stays pure jnp), on one GPU without a
    mesh and for shapes it tiles (it reads the stacked weight in place); XLA's dot otherwise (CPU:
    no interpret-mode cost; under a mesh: XLA partitions the dot)."""
    if rt.decode_out_proj != "auto":
        return rt.decode_out_proj
    fits = gemv.supported(cfg.num_heads * cfg.head_dim, cfg.hidden_size)
    kernels = attn.resolve_decode_impl(rt) == "pallas" and _compat.on_gpu()
    return "pallas" if fits and kernels and sharding.context_mesh() is None else "xla"


def _decode_out_proj_in_place(
    o: jax.Array, layers: LayerParams, layer: int, cfg: ModelConfig
) -> jax.Array:
    """``_attn_out`` for decode with ``rt.decode_out_proj == "pallas"``: o [B, H, D] -> [B, E],
    the out-projection read from the stacked wo [L, H, D, E] in place by a Pallas GEMV (XLA's
    cuBLAS path copied each layer's slice first: 0.43 ms of a 6.2 ms 4B batch-1 step)."""
    if sharding.context_mesh() is not None:
        raise ValueError(
            'decode_out_proj="pallas" runs on one device; use decode_out_proj="xla" with a mesh'
        )
    y = jnp.sum(_decode_out_proj_partials(o, layers, layer), axis=0)
    if cfg.attention_bias:
        y = y + layers.o_bias[layer]
    return y.astype(o.dtype)


def _decode_out_proj_partials(o: jax.Array, layers: LayerParams, layer: int) -> jax.Array:
    """The Pallas out-projection's float32 K-split partials [S, B, E], left for
    ``add_rms_norm`` to sum (no separate XLA reduction)."""
    L, H, D, E = layers.wo.shape
    w = layers.wo.reshape(L, H * D, E)
    return gemv.stacked_gemv(o.reshape(o.shape[0], H * D), w, layer, partials=True)


def decode(
    params: Params, cache: kv_cache.KVCache, tokens: jax.Array, cfg: ModelConfig, rt: RuntimeConfig
):
    """One new token per sequence. tokens: int32 [B] -> (float32 logits [B, V], cache).

    The token sits at position ``cache.lengths[b]``. Decode attention is dense for every head
    (Elastic Attention sparsifies prefill only). Layers are unrolled in Python rather than
    scanned: inside a while loop XLA copied the whole cache (loop state) every step, which cost
    1.6x in decode time at 64K context on an H100. The cache is only read per layer; every
    layer's new K/V is written in one scatter at the end (in place: the jitted step donates it).
    With ``rt.decode_norm == "pallas"`` each residual add + RMSNorm is one kernel, a layer ends
    with the next layer's input norm (the last with the final norm), and the q/k norms and RoPE
    are one more kernel.
    """
    out_proj = resolve_decode_out_proj(rt, cfg)
    fused = rt.decode_norm == "pallas"
    if fused and sharding.context_mesh() is not None:
        raise ValueError(
            'decode_norm="pallas" runs on one device; use decode_norm="xla" with a mesh'
        )
    pos = cache.lengths[:, None]  # [B, 1]
    cos, sin = _rope_tables(pos, cfg)
    pages, slots = kv_cache.token_slots(cache, pos)
    h = _embed(params, tokens[:, None])
    B, L = tokens.shape[0], cfg.num_layers
    # Fused norms: h is [B, E] and each add + norm one kernel; x comes out with the batch-1 QKV
    # projection's zero row already in place (see _decode_qkv).
    norm = functools.partial(add_rms_norm, eps=cfg.rms_norm_eps, implementation="pallas")
    qkv_rows = 2 if B == 1 else B
    if fused:
        h, x = norm(h[:, 0], params.layers.attn_norm[0], out_rows=qkv_rows)
    ks, vs = [], []
    for layer in range(L):
        lp = jax.tree.map(lambda x, layer=layer: x[layer], params.layers)
        with jax.named_scope(f"layer_{layer}"):
            if fused:
                q, k, v = (t[:, None] for t in _decode_qkv_fused(x, B, lp, cfg, cos, sin))
            else:
                x = rms_norm(h, lp.attn_norm, cfg.rms_norm_eps)
                q, k, v = _decode_qkv(x, lp, cfg)
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k, v = sharding.replicate_kv_heads(k, v)  # under a mesh with K < model axis only
            o = attn.decode_attention(
                q[:, 0],
                k[:, 0],
                v[:, 0],
                cache.k,
                cache.v,
                jnp.int32(layer),
                cache.page_table,
                cache.lengths,
                rt,
            )
            if fused:
                if out_proj == "pallas":
                    bias = params.layers.o_bias[layer] if cfg.attention_bias else None
                    parts = _decode_out_proj_partials(o, params.layers, layer)
                    h, x = norm(h, lp.mlp_norm, partials=parts, bias=bias)
                else:
                    h, x = norm(h, lp.mlp_norm, residual=_attn_out(o, lp, cfg))
                last = layer + 1 == L
                nxt = params.final_norm if last else params.layers.attn_norm[layer + 1]
                h, x = norm(
                    h,
                    nxt,
                    residual=_mlp_update(x[:, None], lp, cfg)[:, 0],
                    out_rows=B if last else qkv_rows,
                )
            else:
                if out_proj == "pallas":
                    h = h + _decode_out_proj_in_place(o, params.layers, layer, cfg)[:, None]
                else:
                    h = h + _attn_out(o, lp, cfg)[:, None]
                h = sharding.constrain(_mlp_block(h, lp, cfg), sharding.HIDDEN)
        ks.append(k)
        vs.append(v)
    with jax.named_scope("cache_write"):
        ck, cv = kv_cache.write_all_layers(
            cache.k, cache.v, pages, slots, jnp.stack(ks), jnp.stack(vs)
        )
    # Fused: x is already the final norm of h.
    logits = _lm_head(x, params) if fused else final_logits(h[:, 0], params, cfg)
    return logits, sharding.constrain_cache(
        kv_cache.KVCache(k=ck, v=cv, page_table=cache.page_table, lengths=cache.lengths + 1)
    )


@functools.partial(jax.jit, static_argnames=("cfg", "rt"))
def forward_jit(params, tokens, lengths, cfg, rt):
    return forward(params, tokens, lengths, cfg, rt)
