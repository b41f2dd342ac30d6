"""Our router vs the torch port of the official eval code (tests/torch_official), and checks of
the port itself (against transformers' Qwen3 attention and against the spec's selection rule).

All on a tiny random PawQwen3 checkpoint (bf16 weights on disk). Official behaviour is compared at
batch 1; padded batches are compared per sequence (we fix the official batch>1 bug, spec 8.1).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch_official import (  # tests/ is on sys.path (tests/conftest.py, rootdir mode)
    AttentionRouter,
    OfficialPawQwen3,
    PawQwen3AttentionPort,
    apply_rope,
    find_blocks_chunked,
    head_mask_type,
    load_checkpoint_tensors,
    streaming_block_mask,
    xattn_estimate,
)

from elastic_jax.elastic_config import ElasticConfig
from elastic_jax.router import (
    RouterParams,
    ctx_q_pool,
    head_modes,
    route,
    router_decision,
    router_logits,
    router_params_from_hf,
)
from elastic_jax.testing.tiny_elastic import make_tiny_pawqwen3, read_checkpoint_tensors

H, K, D = 4, 2, 16
PROMPT_LENGTHS = (320, 257, 120, 37)


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_pawqwen3(tmp_path_factory.mktemp("paw") / "ckpt", seed=3, dtype="bfloat16")


@pytest.fixture(scope="module")
def hf_config(ckpt):
    return json.loads((ckpt / "config.json").read_text())


@pytest.fixture(scope="module")
def elastic(hf_config):
    return ElasticConfig.from_hf_dict(hf_config)


@pytest.fixture(scope="module")
def torch_tensors(ckpt):
    return load_checkpoint_tensors(ckpt)


@pytest.fixture(scope="module")
def jax_routers(ckpt, elastic):
    t = read_checkpoint_tensors(ckpt)
    return [
        router_params_from_hf(t.__getitem__, i, D, elastic.use_softmax, available=set(t))
        for i in range(2)
    ]


def port_router(torch_tensors, layer, dtype=torch.bfloat16) -> AttentionRouter:
    r = AttentionRouter(K, D, use_softmax=True)
    prefix = f"model.layers.{layer}.self_attn.mask_allocator."
    r.load_state_dict(
        {
            n[len(prefix) :]: v
            for n, v in torch_tensors.items()
            if n.startswith(prefix) and not n.endswith(("log_temp", "task_embedding.weight"))
        }
    )
    return r.to(dtype)


@pytest.fixture(scope="module")
def hf_model(ckpt):
    from transformers import Qwen3ForCausalLM

    return Qwen3ForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()


def capture(model, ids: torch.Tensor):
    """Per layer: (self_attn input hidden states [B, T, E], self_attn output [B, T, E],
    pre-RoPE keys = k_norm output [B, T, K, D])."""
    got: dict[str, list] = {"x": [], "o": [], "k": []}

    def attn_hook(module, args, kwargs, out) -> None:  # returning None keeps the output
        got["x"].append(kwargs["hidden_states"])
        got["o"].append(out[0])

    def k_hook(module, args, out) -> None:
        got["k"].append(out)

    hooks = []
    for layer in model.model.layers:
        hooks.append(layer.self_attn.register_forward_hook(attn_hook, with_kwargs=True))
        hooks.append(layer.self_attn.k_norm.register_forward_hook(k_hook))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return got


@pytest.fixture(scope="module")
def prompt_keys(hf_model):
    """Pre-RoPE keys of 4 random prompts, each run alone: list[prompt][layer] -> [1, T, K, D] bf16."""
    gen = torch.Generator().manual_seed(11)
    out = []
    for t in PROMPT_LENGTHS:
        ids = torch.randint(0, hf_model.config.vocab_size, (1, t), generator=gen)
        out.append([k.to(torch.bfloat16) for k in capture(hf_model, ids)["k"]])
    return out


def to_jax(t: torch.Tensor) -> jax.Array:
    return jnp.asarray(t.float().numpy()).astype(
        jnp.bfloat16 if t.dtype == torch.bfloat16 else jnp.float32
    )


# --------------------------------------------------------------------- router vs official port


def test_router_matches_port_batch1(prompt_keys, jax_routers, torch_tensors, elastic):
    seen = set()
    for keys in prompt_keys:
        for layer, k in enumerate(keys):
            z_port, logits_port = port_router(torch_tensors, layer)(k)
            modes, z, logits = route(to_jax(k), None, jax_routers[layer], elastic, H)
            np.testing.assert_array_equal(np.asarray(logits, np.float32), logits_port.float())
            np.testing.assert_array_equal(z, z_port)
            port_modes = head_mask_type(
                z_port.repeat_interleave(H // K, dim=1), elastic.retrieval_mode, elastic.toggle_type
            )
            np.testing.assert_array_equal(modes, port_modes)
            seen.update(np.asarray(z).ravel().tolist())
    assert seen == {0, 1}, "the tiny router should give both classes on these prompts"


def test_router_matches_port_per_sequence(prompt_keys, jax_routers, torch_tensors, elastic):
    t_max = max(PROMPT_LENGTHS)
    lengths = torch.tensor(PROMPT_LENGTHS)
    for layer in range(2):
        batch = torch.full((len(PROMPT_LENGTHS), t_max, K, D), 7.0, dtype=torch.bfloat16)
        for b, keys in enumerate(prompt_keys):
            batch[b, : PROMPT_LENGTHS[b]] = keys[layer][0]
        z_port, logits_port = port_router(torch_tensors, layer)(batch, lengths)
        fn = jax.jit(lambda k, n, p: route(k, n, p, elastic, H))
        modes, z, logits = fn(
            to_jax(batch), jnp.asarray(lengths.numpy(), jnp.int32), jax_routers[layer]
        )
        np.testing.assert_array_equal(z, z_port)
        np.testing.assert_allclose(
            np.asarray(logits, np.float32), logits_port.float(), rtol=2**-7, atol=0
        )  # at most one bf16 step (sum order)
        for b, keys in enumerate(prompt_keys):  # each sequence routed as if alone
            _, z1, _ = route(to_jax(keys[layer]), None, jax_routers[layer], elastic, H)
            np.testing.assert_array_equal(z[b], z1[0])


def test_port_layer_routes_on_pre_rope_keys(
    ckpt, hf_config, hf_model, torch_tensors, elastic, jax_routers
):
    ids = torch.randint(
        0, hf_config["vocab_size"], (1, 300), generator=torch.Generator().manual_seed(5)
    )
    got = capture(hf_model, ids)
    for layer in range(2):
        port = PawQwen3AttentionPort(hf_config)
        port.load_checkpoint_layer(torch_tensors, layer)
        port = port.float()
        _, info = port(got["x"][layer])
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), jax_routers[layer])
        _, z, logits = route(to_jax(got["k"][layer]), None, params, elastic, H)
        np.testing.assert_allclose(np.asarray(logits), info["logits"], rtol=1e-4, atol=1e-4)
        margin = np.abs(np.diff(np.asarray(logits), axis=-1))
        assert margin.min() > 1e-3, "near-tie: pick another prompt"
        np.testing.assert_array_equal(z, info["z_kv"])


def _probe_router(d: int = D) -> RouterParams:
    """Hand-made router: the class-1 logit follows pooled[..., 0] through the SiLU chain
    (~0.30 for an input of 1, ~0 for an input near 0); class 0 is a constant 0.15."""
    z = np.zeros
    w_in, w_mid = z((d, 4 * d), np.float32), z((4 * d, d), np.float32)
    w_in[0, 0] = 1.0
    w_mid[0, 0] = 1.0
    w4 = z((d, 2), np.float32)
    w4[0, 1] = 1.0
    return RouterParams(
        w_in,
        z(4 * d, np.float32),
        w_mid,
        z(d, np.float32),
        w_in.copy(),
        z(4 * d, np.float32),
        w_mid.copy(),
        z(d, np.float32),
        w4,
        np.array([0.15, 0.0], np.float32),
    )


def test_post_rope_keys_would_change_the_decision(hf_config):
    """Pooling must see keys BEFORE RoPE: a key constant over positions pools to itself, but after
    RoPE its fast-rotating dimensions average out, so the crafted router flips class."""
    t = 300
    c = torch.zeros(1, t, K, D)
    c[..., 0] = 1.0  # dimension 0 rotates by 1 radian per position under RoPE
    post = apply_rope(c, PawQwen3AttentionPort(hf_config).inv_freq, 1.0)
    params = _probe_router()
    z_pre = router_decision(router_logits(ctx_q_pool(to_jax(c)), params))
    z_post = router_decision(router_logits(ctx_q_pool(to_jax(post)), params))
    np.testing.assert_array_equal(z_pre, [[1, 1]])
    np.testing.assert_array_equal(z_post, [[0, 0]])
    # The port pools its k_norm output before applying RoPE: feed it projections that produce c.
    port = PawQwen3AttentionPort({**hf_config, "use_softmax": True}).float()
    with torch.no_grad():
        for name, p in zip(
            (
                "cls_feat_extractor.0",
                "cls_feat_extractor.2",
                "cls_router_head_agnostic.0",
                "cls_router_head_agnostic.2",
                "cls_router_head_agnostic.4",
            ),
            (
                ("feat_w0", "feat_b0"),
                ("feat_w2", "feat_b2"),
                ("head_w0", "head_b0"),
                ("head_w2", "head_b2"),
                ("head_w4", "head_b4"),
            ),
        ):
            mod = port.mask_allocator.get_submodule(name)
            mod.weight.copy_(torch.from_numpy(np.asarray(getattr(params, p[0])).T))
            mod.bias.copy_(torch.from_numpy(np.asarray(getattr(params, p[1]))))
        port.k_norm.weight.fill_(1.0)
        port.k_proj.weight.zero_()
        port.k_proj.weight[0, 0] = port.k_proj.weight[D, 0] = 1.0  # k[..., 0] = x[..., 0]
    x = torch.zeros(1, t, hf_config["hidden_size"])
    x[..., 0] = 1.0
    _, info = port(x)
    # k_norm turns the one-hot key into sqrt(D) * e0: still constant over positions.
    np.testing.assert_array_equal(info["z_kv"], [[1, 1]])


def test_tie_logits_go_to_class_0(torch_tensors):
    logits = torch.tensor([[[0.25, 0.25], [0.0, 2.0**-8], [0.0, 2.0**-5]]], dtype=torch.bfloat16)
    z_port = port_router(torch_tensors, 0).decide(logits)
    z = router_decision(to_jax(logits))
    np.testing.assert_array_equal(z_port, [[0, 0, 1]])
    np.testing.assert_array_equal(z, z_port)


@pytest.mark.parametrize(
    ("retrieval", "toggle"),
    [
        ("full", "xattn"),
        ("full", "streaming"),
        ("xattn", "streaming"),
        ("xattn", "xattn"),
        ("full", "full"),
    ],
)
def test_head_modes_match_official_branches(retrieval, toggle):
    z_kv = torch.tensor([[0, 1, 1], [1, 0, 0]])
    port = head_mask_type(z_kv.repeat_interleave(2, dim=1), retrieval, toggle)
    ours = head_modes(jnp.asarray(z_kv.numpy(), jnp.int32), retrieval, toggle, 6)
    np.testing.assert_array_equal(ours, port)


# ---------------------------------------------------------------- the port itself (sanity)


def test_port_dense_matches_transformers(hf_config, hf_model, torch_tensors):
    ids = torch.randint(
        0, hf_config["vocab_size"], (2, 200), generator=torch.Generator().manual_seed(6)
    )
    got = capture(hf_model, ids)
    for layer in range(2):
        port = PawQwen3AttentionPort(hf_config)
        port.load_checkpoint_layer(torch_tensors, layer)
        out, info = port.float()(got["x"][layer], force_modes=torch.zeros(H, dtype=torch.int32))
        np.testing.assert_allclose(out, got["o"][layer], rtol=1e-5, atol=1e-5)
        assert (info["head_modes"] == 0).all()


def test_port_masks_reduce_to_dense(hf_config, hf_model, torch_tensors):
    """Streaming with a window covering the prompt and XAttention with threshold 1 keep every
    causal block, so they equal dense; the checkpoint's own window (256) does not."""
    ids = torch.randint(
        0, hf_config["vocab_size"], (1, 700), generator=torch.Generator().manual_seed(7)
    )
    x = capture(hf_model, ids)["x"][0]
    port = PawQwen3AttentionPort(hf_config)
    port.load_checkpoint_layer(torch_tensors, 0)
    port = port.float()
    dense, _ = port(x, force_modes=torch.zeros(H, dtype=torch.int32))
    for modes in ([1, 1, -1, -1], [-1, -1, 1, 1]):
        port.local_blocks, port.threshold = 8, 1.0
        out, info = port(x, force_modes=torch.tensor(modes))
        assert all(
            bool(bm.equal(torch.ones(6, 6, dtype=torch.bool).tril().expand(H, 6, 6)))
            for bm in info["block_masks"]
        )
        np.testing.assert_allclose(out, dense, rtol=1e-5, atol=1e-5)
        port.local_blocks, port.threshold = 2, 0.8
        sparse, info = port(x, force_modes=torch.tensor(modes))
        assert not torch.allclose(sparse, dense, atol=1e-3)


def test_whole_model_port_dense_and_per_sequence_modes(ckpt, hf_model):
    paw = OfficialPawQwen3(ckpt)
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 512, (8, 260), generator=gen)
    with torch.no_grad():
        ref = hf_model(input_ids=ids[:2]).logits
    dense, _ = paw(ids[:2], force_modes=torch.zeros(H, dtype=torch.int32))
    np.testing.assert_allclose(dense, ref, rtol=1e-4, atol=1e-4)
    # Two prompts (of different lengths) whose layer-0 decisions differ: batched and padded, each
    # keeps its own head modes and logits (the official batch>1 path would give both the first
    # prompt's modes; its padded path would ignore the router).
    lens = [260 - 9 * n for n in range(8)]
    single = [paw(ids[n : n + 1, : lens[n]]) for n in range(8)]
    modes = [out[1][0]["head_modes"][0] for out in single]
    pair = next(
        ((i, j) for i in range(8) for j in range(i + 1, 8) if not modes[i].equal(modes[j])), None
    )
    assert pair is not None, "no two prompts with different layer-0 head modes"
    logits, infos = paw(ids[list(pair)], lengths=torch.tensor([lens[n] for n in pair]))
    for row, n in enumerate(pair):
        for layer in range(2):
            np.testing.assert_array_equal(
                infos[layer]["head_modes"][row], single[n][1][layer]["head_modes"][0]
            )
        np.testing.assert_allclose(logits[row, : lens[n]], single[n][0][0], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------- masks: streaming, XAttention


def test_streaming_block_mask_rule():
    m = streaming_block_mask(20, sink_blocks=1, local_blocks=8)
    for i in range(20):
        keep = {0} | set(range(max(0, i - 7), i + 1))
        assert set(torch.nonzero(m[i]).ravel().tolist()) == keep
    m0 = streaming_block_mask(6, sink_blocks=0, local_blocks=1)
    assert m0.equal(torch.eye(6, dtype=torch.bool))
    assert streaming_block_mask(5, 1, 100).equal(torch.ones(5, 5, dtype=torch.bool).tril())


def _spec_select(v: np.ndarray, qb: int, thr: float) -> set[int]:
    """Spec 5.4 for one row (forced {0, qb}), stable order."""
    forced = {0, qb}
    cum, req = sum(v[j] for j in forced), thr * v.sum()
    keep = set(forced)
    for j in sorted((j for j in range(len(v)) if j not in forced), key=lambda j: (-v[j], j)):
        if cum < req:
            keep.add(j)
            cum += v[j]
        else:
            break
    return {j for j in keep if j <= qb}


def _official_first_chunk_select(v: np.ndarray, qb: int, thr: float) -> set[int]:
    """What the official code does for a row of the FIRST chunk (current_index 0): only the
    diagonal is forced and counted, the greedy loop lags one block, column 0 is kept anyway."""
    req = thr * v.sum()
    others = sorted((j for j in range(len(v)) if j != qb), key=lambda j: (-v[j], j))
    keep = {qb, 0}
    for n, j in enumerate(others):
        if n == 0 or v[qb] + sum(v[o] for o in others[: n - 1]) < req:
            keep.add(j)
    return {j for j in keep if j <= qb}


def test_find_blocks_chunked_rules():
    rng = np.random.default_rng(0)
    n = 12
    for _ in range(40):
        v = np.tril(rng.random((n, n)) ** 3 + 1e-3)
        thr = float(rng.uniform(0.1, 1.05))
        x = torch.from_numpy(v)[None, None]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        spec = find_blocks_chunked(x, 0, thr, force_sink_all_rows=True)[0, 0] & causal
        official = find_blocks_chunked(x, 0, thr)[0, 0] & causal
        for qb in range(n):
            assert set(torch.nonzero(spec[qb]).ravel().tolist()) == _spec_select(v[qb], qb, thr)
            assert set(
                torch.nonzero(official[qb]).ravel().tolist()
            ) == _official_first_chunk_select(v[qb], qb, thr)
        assert bool((official | ~spec).all()), "official keeps a superset of the spec rule"
        # rows of a later chunk (current_index > 0) follow the spec rule in the official code
        later = find_blocks_chunked(x[:, :, 4:], 4, thr)[0, 0] & causal[4:]
        assert later.equal(spec[4:])
    assert find_blocks_chunked(x, 0, 0.8, decoding=True).all()


@pytest.fixture(scope="module")
def qk():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 700, D, generator=g)
    k = torch.randn(2, 700, D, generator=g)
    k[:, :3] += 3.0 * q.mean(1, keepdim=True)  # a few heavy-hitter keys for some sparsity
    return q, k


def test_xattn_estimate_properties(qk):
    q, k = qk
    nb = 6
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    s, m = xattn_estimate(q, k, threshold=0.8)
    assert s.shape == m.shape == (2, nb, nb) and m.dtype == torch.bool
    assert not (m & ~causal).any()
    assert m[:, :, 0].all() and m.diagonal(dim1=-2, dim2=-1).all()
    # every valid reshaped query row carries softmax mass 1: 8 rows per block, 700 -> 44 rows
    rows = torch.tensor([8.0] * 5 + [44 - 40])
    np.testing.assert_allclose(s.float().sum(-1), rows.expand(2, nb), rtol=1e-5, atol=1e-5)
    full = xattn_estimate(q, k, threshold=1.0)[1]
    assert full.equal(causal.expand(2, nb, nb))
    dens = [xattn_estimate(q, k, threshold=t, semantics="spec")[1].sum() for t in (0.1, 0.5, 0.9)]
    assert dens[0] <= dens[1] <= dens[2] and dens[0] < dens[2]
    one = xattn_estimate(q[:, :1], k[:, :1])[1]
    assert one.shape == (2, 1, 1) and one.all()


def test_xattn_official_vs_spec_semantics(qk):
    q, k = qk
    spec = xattn_estimate(q, k, threshold=0.6, semantics="spec")[1]
    official = xattn_estimate(q, k, threshold=0.6)[1]  # one 2048-token chunk: all first-chunk
    assert bool((official | ~spec).all()) and official.sum() > spec.sum()
    # with one block row per chunk only row 0 is a first-chunk row, where both rules agree
    per_block = xattn_estimate(q, k, threshold=0.6, chunk_size=128)[1]
    assert per_block.equal(spec)
    assert xattn_estimate(q, k, threshold=0.6, semantics="spec", chunk_size=256)[1].equal(spec)


# ------------------------------------------------------------------------- tiny checkpoint


def test_tiny_checkpoint_sharded_index_and_options(tmp_path):
    ckpt = make_tiny_pawqwen3(
        tmp_path / "sharded",
        seed=1,
        max_shard_size="20KB",
        training_only_tensors=False,
        mixed_router=False,
        elastic={"xattn_threshold": None, "retrieval_mode": "full"},
    )
    hf = json.loads((ckpt / "config.json").read_text())
    assert hf["architectures"] == ["PawQwen3ForCausalLM"] and hf["model_type"] == "qwen3"
    assert "xattn_threshold" not in hf
    cfg = ElasticConfig.from_hf_dict(hf)
    assert cfg.xattn_threshold == 0.8 and cfg.retrieval_mode == "full"
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    tensors = read_checkpoint_tensors(ckpt)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
    assert not any(
        n.endswith(("log_temp", "attn_mask_log_alphas", "task_embedding.weight")) for n in tensors
    )
    from safetensors import safe_open

    for name in (n for n in tensors if "mask_allocator" in n):
        with safe_open(str(ckpt / index["weight_map"][name]), "np") as f:
            assert name in f.keys()
    for layer in range(2):
        p = router_params_from_hf(tensors.__getitem__, layer, D, True, available=set(tensors))
        assert p.head_w4.shape == (D, 2)
