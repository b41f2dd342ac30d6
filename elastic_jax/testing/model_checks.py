"""Building blocks of the model-level test suite (``tests/gpu/test_model_gpu.py``).

The suite runs the whole model at real shapes on the GPU and compares it with the reference path
(``prefill_impl="reference"``, ``decode_impl="reference"``: pure jnp) and with transformers. The
same functions run on the CPU at tiny sizes in CI, so a bug in a helper shows without a GPU.

- ``build_checkpoints``: a random Qwen3 checkpoint at given dimensions (transformers, fp32 weights)
  converted to fp32 and bf16, and a PawQwen3 variant on the same backbone whose router is
  calibrated to mix decisions (``tiny_elastic``), converted to bf16.
- ``logits_at`` / ``hf_logits_at``: our logits / transformers' fp32 logits at chosen positions of
  a right-padded batch (the [B, T, V] logits never leave the device).
- ``layerwise_prefill``: every layer under several runtimes on the SAME input hidden states, so
  that head modes and block masks can be compared exactly. Run free, the bf16 differences of layer
  0 would reach layer 1's router and XAttention threshold and could flip decisions legitimately.
- comparison rules ``check_logits``, ``check_block_masks``, ``check_greedy_tokens`` and
  ``check_prefill_stats``, with the tolerances below (each with its reason).

Logits are compared by the relative L2 error over the vocabulary of each position,
``||got - want|| / ||want||``: one number per token, so a tiling or index bug that corrupts a few
positions is not averaged away, and the number does not depend on the logit scale.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from elastic_jax import engine, kv_cache
from elastic_jax import model as model_lib
from elastic_jax.config import ModelConfig, RuntimeConfig, rope_inv_freq
from elastic_jax.elastic_config import MODE_DENSE, MODE_XATTN
from elastic_jax.layers import rope_cos_sin
from elastic_jax.loader import Model
from elastic_jax.params import Params
from elastic_jax.testing.tiny import make_tiny_qwen3
from elastic_jax.testing.tiny_elastic import make_tiny_pawqwen3

# Tolerances -------------------------------------------------------------------------------------

FP32_REL = 2e-4
"""fp32 weights, activations and rotary tables with matmuls at precision "highest" (no TF32) on
both sides: only the summation order differs (XLA vs torch GEMMs and softmax); the tiny model on
the CPU gives 1.4e-6 against transformers."""

BF16_REL = 4e-2
"""A bf16 path vs another bf16 path (a GPU kernel vs the reference path) from the same weights:
every op rounds its output to bf16 (2^-8 relative), and where the two paths differ (inside
attention: the kernels round P to bf16 and accumulate P.V tile by tile, the reference keeps P in
fp32) those roundings stop cancelling and add up over the ~20 rounded ops of two layers. The tiny
model on the CPU (Triton kernels in interpret mode vs the reference) gives a median of 0.9% and a
maximum of 1.8% over positions, for logits and hidden states alike."""

BF16_VS_FP32_REL = 5e-2
"""A bf16 model vs the fp32 transformers model: weights rounded to bf16 as well as every
activation; the tiny model on the CPU gives a median of 1.3% and a maximum of 2.2%."""

TIE_REL = 0.05
"""Greedy decoding in bf16: where the GPU path picks another token than the reference path, the
reference's logit of its own token may exceed that of the GPU's token by at most TIE_REL x the RMS
of its logits. The bf16 noise between two paths is about 1% of that RMS per logit (``BF16_REL``),
so this bound is a near-tie that the noise can flip (a few standard deviations of the difference
of two logits). The two continuations are different texts after that step and are not compared
further."""

MASK_ROW_FRACTION = 5e-3
"""Query-block rows of XAttention heads whose kept blocks may differ between the Pallas estimate
and the jnp reference on identical q and k: the two sum in different fp32 orders, which moves a
bf16 block sum by one ulp in about 0.1% of the entries (benchmarks/results/xattn.md), and that
changes the selection only where a row's cumulative sum sits within that ulp of the threshold.
Rows of dense and streaming heads must match exactly."""

MASK_BLOCKS_PER_ROW = 2
"""Blocks a near-tie row may differ by: one block in or out at the threshold, or two blocks of
(near) equal sums swapping places across it."""

QWEN3_4B_2L: dict[str, Any] = dict(
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=2,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=262144,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    tie_word_embeddings=True,
)
"""Qwen3-4B's dimensions with 2 layers (0.58B parameters, 2.3 GB in fp32); positions up to 256K."""


# Checkpoints ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Checkpoints:
    """hf_dir: transformers Qwen3ForCausalLM, fp32 weights; qwen_fp32 / qwen_bf16: it converted;
    paw_bf16: the PawQwen3 variant (same backbone, calibrated router) converted to bf16."""

    hf_dir: Path
    qwen_fp32: Path
    qwen_bf16: Path
    paw_bf16: Path


def build_checkpoints(
    root: str | Path,
    dims: dict[str, Any],
    *,
    elastic: dict[str, Any] | None = None,
    seed: int = 0,
    calibration_device: str = "cpu",
) -> Checkpoints:
    """Build the suite's checkpoints under ``root`` (random weights, nothing downloaded).

    dims: Qwen3Config fields (e.g. ``QWEN3_4B_2L``; {} gives the tiny test model).
    elastic: PawQwen3 config.json fields over ``tiny_elastic.DEFAULT_TINY_ELASTIC``.
    calibration_device: torch device of the router calibration passes.
    """
    from convert.hf_to_jax import convert

    root = Path(root)
    hf = make_tiny_qwen3(root / "qwen3_hf", seed=seed, dtype="float32", **dims)
    qwen_fp32 = convert(hf, root / "qwen3_fp32", dtype="fp32", progress=False)
    qwen_bf16 = convert(hf, root / "qwen3_bf16", dtype="bf16", progress=False)
    paw_hf = make_tiny_pawqwen3(
        root / "paw_hf",
        seed=seed,
        elastic=elastic,
        backbone=hf,
        calibration_device=calibration_device,
    )
    paw_bf16 = convert(paw_hf, root / "paw_bf16", dtype="bf16", progress=False)
    shutil.rmtree(paw_hf)  # only the converted variant is used; frees a backbone's worth of disk
    return Checkpoints(hf, Path(qwen_fp32), Path(qwen_bf16), Path(paw_bf16))


def with_elastic_pair(model: Model, pair: str) -> Model:
    """The model with another (retrieval_mode, toggle_type) pair, e.g. "full+xattn": the router
    weights do not depend on it, only which mode each router class gets."""
    retrieval, toggle = pair.split("+")
    cfg = model.config
    elastic = dataclasses.replace(cfg.elastic, retrieval_mode=retrieval, toggle_type=toggle)
    return dataclasses.replace(model, config=dataclasses.replace(cfg, elastic=elastic))


def matmul_precision(cfg: ModelConfig):
    """Context for running ``cfg``'s model: fp32 models at matmul precision "highest", since on
    the GPU fp32 matmuls default to TF32 (10-bit mantissa) in XLA and in Pallas Triton dots."""
    if cfg.dtype == "float32":
        return jax.default_matmul_precision("highest")
    return contextlib.nullcontext()


# Inputs -----------------------------------------------------------------------------------------


def random_tokens(
    seed: int, lengths: Sequence[int], vocab: int, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded random prompts: (tokens int32 [B, width], lengths int32 [B]); ids avoid the
    first 8 (special tokens of the test tokenizer), padding is 0."""
    width = max(lengths) if width is None else width
    rng = np.random.default_rng(seed)
    tokens = np.zeros((len(lengths), width), np.int32)
    for b, n in enumerate(lengths):
        tokens[b, :n] = rng.integers(8, vocab, n)
    return tokens, np.asarray(lengths, np.int32)


def sample_positions(
    lengths: Sequence[int], width: int, *, block: int = 128, n_random: int = 40, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Positions to compare logits at: the first ones, both sides of block edges, the last token of
    every sequence and its neighbours, plus random ones. Returns (positions int32 [P] ascending,
    valid bool [B, P] = position < length)."""
    pos = {0, 1, width - 1}
    for edge in (block, 2 * block, width // 2, width - block):
        pos |= {edge - 1, edge}
    for n in lengths:
        pos |= {n - 2, n - 1, n}
    pos |= set(np.random.default_rng(seed).integers(0, width, n_random).tolist())
    positions = np.asarray(sorted(p for p in pos if 0 <= p < width), np.int32)
    valid = positions[None, :] < np.asarray(lengths)[:, None]
    return positions, valid


# Logits -----------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("cfg", "rt"))
def logits_at(
    params: Params,
    tokens: jax.Array,
    lengths: jax.Array,
    positions: jax.Array,
    cfg: ModelConfig,
    rt: RuntimeConfig,
) -> jax.Array:
    """``model.forward`` logits at some positions: tokens int32 [B, T], lengths int32 [B],
    positions int32 [P] -> float32 [B, P, V]."""
    return jnp.take(model_lib.forward(params, tokens, lengths, cfg, rt), positions, axis=1)


def model_logits_at(model: Model, tokens, lengths, positions, **rt_changes) -> np.ndarray:
    """``logits_at`` for a loaded model under ``model.runtime`` with ``rt_changes`` (fp32 models
    at precision "highest"). Returns float32 [B, P, V]."""
    rt = dataclasses.replace(model.runtime, **rt_changes)
    with matmul_precision(model.config):
        out = logits_at(
            model.params,
            jnp.asarray(tokens, jnp.int32),
            jnp.asarray(lengths, jnp.int32),
            jnp.asarray(positions, jnp.int32),
            model.config,
            rt,
        )
        return np.asarray(out)


def hf_logits_at(
    hf_dir: str | Path,
    tokens: np.ndarray,
    lengths: Sequence[int],
    positions: np.ndarray,
    *,
    device: str = "cpu",
) -> np.ndarray:
    """transformers' fp32 logits [B, P, V] (NaN where a position is past its sequence).

    Every sequence runs alone, unpadded. The model is loaded with ``dtype=float32`` and never cast,
    so its rotary tables stay fp32 (``.to(torch.bfloat16)`` would also round ``inv_freq`` and
    shift logits at long positions); eager attention, torch matmuls at "highest" (no TF32)."""
    import torch
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(
        str(hf_dir), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    model = model.to(device)
    if model.model.rotary_emb.inv_freq.dtype != torch.float32:
        raise AssertionError("transformers baseline: rotary inv_freq is not float32")
    out = np.full((len(lengths), len(positions), model.config.vocab_size), np.nan, np.float32)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.no_grad():
            for b, n in enumerate(lengths):
                keep = np.flatnonzero(positions < n)
                ids = torch.as_tensor(tokens[b, :n][None], dtype=torch.long, device=device)
                h = model.model(input_ids=ids).last_hidden_state[0]  # [n, E]
                idx = torch.as_tensor(positions[keep], dtype=torch.long, device=device)
                out[b, keep] = model.lm_head(h[idx]).float().cpu().numpy()
    finally:
        torch.set_float32_matmul_precision(previous)
        del model
        if device != "cpu":
            torch.cuda.empty_cache()  # JAX shares the GPU
    return out


def relative_errors(got, want, valid: np.ndarray) -> np.ndarray:
    """||got - want|| / ||want|| over the last axis: got, want [B, P, X] -> float64 [B, P], NaN
    where ``valid`` [B, P] is False. Reduced on the device, so large arrays stay there."""
    got32 = jnp.asarray(got).astype(jnp.float32)
    want32 = jnp.asarray(want).astype(jnp.float32)
    num = jnp.linalg.norm(got32 - want32, axis=-1)
    den = jnp.maximum(jnp.linalg.norm(want32, axis=-1), 1e-30)
    err = np.asarray(num / den, np.float64)
    return np.where(valid, err, np.nan)


def check_logits(got, want, valid: np.ndarray, *, rel: float, what: str) -> float:
    """Assert finite values and a per-position relative error <= ``rel`` at valid positions.
    got, want: [B, P, X]; valid: bool [B, P]. Returns the largest error."""
    if not valid.any():
        raise AssertionError(f"{what}: no valid position to compare")
    for name, x in (("values", got), ("baseline", want)):
        finite = np.asarray(jnp.all(jnp.isfinite(jnp.asarray(x)), axis=-1))
        if not finite[valid].all():
            bad = np.argwhere(valid & ~finite)[:5].tolist()
            raise AssertionError(f"{what}: non-finite {name} at (row, position index) {bad}")
    err = relative_errors(got, want, valid)
    worst = float(np.nanmax(err))
    if not worst <= rel:
        b, p = np.unravel_index(np.nanargmax(err), err.shape)
        raise AssertionError(
            f"{what}: relative error {worst:.3g} > {rel:.3g} at batch row {b}, position index "
            f"{p}; {int(np.sum(err > rel))} of {int(valid.sum())} positions over"
        )
    return worst


# Elastic prefill, layer by layer ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerResult:
    """One layer under one runtime: h [B, T, E] on the device, stats {name: np.ndarray}
    (``modes`` [B, H], ``router_class`` [B, K], ``kept_blocks`` / ``causal_blocks`` [B, H],
    ``block_mask`` [B, H, nQb, nKb] as the runtime collects them)."""

    h: jax.Array
    stats: dict[str, np.ndarray]


@functools.partial(jax.jit, static_argnames=("cfg", "rt"))
def _one_layer(h, lp, cos, sin, lengths, cfg: ModelConfig, rt: RuntimeConfig):
    h, _, _, stats = model_lib.layer_prefill(h, lp, cos, sin, lengths, cfg, rt)
    return h, stats


def layerwise_prefill(
    params: Params,
    tokens: np.ndarray,
    lengths: np.ndarray,
    cfg: ModelConfig,
    rts: Sequence[RuntimeConfig],
) -> list[list[LayerResult]]:
    """Run every layer under each runtime in ``rts`` on the same input: layer l of every runtime
    reads the hidden states that layer l - 1 of ``rts[0]`` (the baseline) wrote.

    tokens: int32 [B, T] right-padded; lengths: int32 [B]. Returns results[r][l].
    """
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    inv_freq, scaling = rope_inv_freq(cfg)
    cos, sin = rope_cos_sin(positions, inv_freq, scaling, cfg.jnp_dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    h = jnp.take(params.embed, jnp.asarray(tokens, jnp.int32), axis=0)
    results: list[list[LayerResult]] = [[] for _ in rts]
    with matmul_precision(cfg):
        for layer in range(cfg.num_layers):
            lp = jax.tree.map(lambda x, layer=layer: x[layer], params.layers)
            outs = [_one_layer(h, lp, cos, sin, lengths, cfg, rt) for rt in rts]
            for r, (h_r, stats) in enumerate(outs):
                results[r].append(LayerResult(h_r, {k: np.asarray(v) for k, v in stats.items()}))
            h = outs[0][0]
    return results


def final_logits_at(h: jax.Array, positions: np.ndarray, params: Params, cfg: ModelConfig):
    """Logits float32 [B, P, V] of the last layer's hidden states h [B, T, E] at positions [P]."""
    return model_lib.final_logits(jnp.take(h, jnp.asarray(positions), axis=1), params, cfg)


def check_block_masks(
    got: np.ndarray,
    want: np.ndarray,
    modes: np.ndarray,
    *,
    max_row_fraction: float = MASK_ROW_FRACTION,
    max_blocks_per_row: int = MASK_BLOCKS_PER_ROW,
    what: str = "block masks",
) -> int:
    """got, want: bool [B, H, R, C]; modes: int32 [B, H] head modes (the same on both sides).

    Rows of non-XAttention heads must be identical; of the rows of XAttention heads at most
    ``max_row_fraction`` may differ, each in at most ``max_blocks_per_row`` blocks (near-ties,
    see ``MASK_ROW_FRACTION``). Returns the number of differing rows."""
    got, want = np.asarray(got, bool), np.asarray(want, bool)
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shapes {got.shape} vs {want.shape}")
    diff = np.sum(got != want, axis=-1)  # [B, H, R]
    xattn = np.broadcast_to((np.asarray(modes) == MODE_XATTN)[..., None], diff.shape)
    exact_bad = np.count_nonzero(diff[~xattn])
    if exact_bad:
        raise AssertionError(f"{what}: {exact_bad} rows of dense/streaming heads differ")
    rows = int(np.count_nonzero(diff[xattn]))
    allowed = int(max_row_fraction * np.count_nonzero(xattn))
    worst = int(diff.max(initial=0))
    if rows > allowed or worst > max_blocks_per_row:
        raise AssertionError(
            f"{what}: {rows} XAttention rows differ (allowed {allowed} of "
            f"{np.count_nonzero(xattn)}), at most {worst} blocks in a row (allowed "
            f"{max_blocks_per_row})"
        )
    return rows


def check_layer_stats(got: dict, want: dict, *, what: str) -> int:
    """Compare the stats of one layer (``LayerResult.stats``) of a GPU path with the reference's:
    head modes and router classes identical, block masks per ``check_block_masks``, kept-block
    counts identical on non-XAttention heads. Returns the number of differing mask rows."""
    if set(got) != set(want):
        raise AssertionError(f"{what}: stats {sorted(got)} vs reference {sorted(want)}")
    for name in ("modes", "router_class", "causal_blocks"):
        if name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{what}: {name}")
    rows = 0
    if "modes" in want:
        modes = want["modes"]
        if "block_mask" in want:
            rows = check_block_masks(got["block_mask"], want["block_mask"], modes, what=what)
        if "kept_blocks" in want:
            exact = modes != MODE_XATTN
            np.testing.assert_array_equal(
                got["kept_blocks"][exact], want["kept_blocks"][exact], err_msg=f"{what}: kept"
            )
    return rows


# Generation -------------------------------------------------------------------------------------


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """First step where two token lists differ (a length difference counts), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def check_greedy_tokens(
    got: Sequence[Sequence[int]],
    want: Sequence[Sequence[int]],
    prompts: Sequence[Sequence[int]],
    next_logits: Callable[[list[int]], np.ndarray],
    *,
    tie_rel: float | None,
    what: str,
) -> list[int | None]:
    """Greedy tokens of a GPU path (got) vs the reference path (want), per request.

    tie_rel None: identical token lists. Otherwise a request may diverge at a step s where the
    reference's logits for prompt + want[:s] (``next_logits`` -> float [V]) rank want[s] above
    got[s] by at most ``tie_rel`` x their RMS (see ``TIE_REL``). Returns each request's first
    divergence step (None: identical)."""
    steps = []
    for r, (g, w, p) in enumerate(zip(got, want, prompts, strict=True)):
        s = first_divergence(g, w)
        steps.append(s)
        if s is None:
            continue
        if tie_rel is None or s >= min(len(g), len(w)):
            raise AssertionError(f"{what}: request {r} differs at step {s}: {g} vs {w}")
        logits = np.asarray(next_logits(list(p) + list(w[:s])), np.float64)
        gap = logits[w[s]] - logits[g[s]]
        bound = tie_rel * float(np.sqrt(np.mean(logits**2)))
        if not gap <= bound:
            raise AssertionError(
                f"{what}: request {r} differs at step {s} (token {g[s]} vs reference {w[s]}) "
                f"where the reference leads by {gap:.4g} > near-tie bound {bound:.4g}"
            )
    return steps


def reference_next_logits(model: Model) -> Callable[[list[int]], np.ndarray]:
    """``next_logits`` for ``check_greedy_tokens``: the reference path's logits [V] after a token
    list (a full forward; recompiles per length, used only where tokens diverge)."""

    def next_logits(seq: list[int]) -> np.ndarray:
        n = len(seq)
        out = model_logits_at(
            model,
            np.asarray([seq], np.int32),
            [n],
            [n - 1],
            prefill_impl="reference",
            decode_impl="reference",
        )
        return out[0, 0]

    return next_logits


# Long prefill -----------------------------------------------------------------------------------


def long_prefill(model: Model, length: int, *, seed: int = 0):
    """One random prompt of ``length`` tokens through the jitted prefill step (padded to the
    bucket ``generate`` uses) and one decode step after it.

    Returns (prefill logits float32 [V], decode logits float32 [V], stats {name: [L, 1, ...]})."""
    cfg, rt = model.config, model.runtime
    width = engine.prompt_bucket_for(length, rt)
    tokens, lengths = random_tokens(seed, [length], cfg.vocab_size, width)
    capacity = engine.capacity_bucket(length + 1, rt.page_size)
    cache = kv_cache.create(cfg, 1, capacity, page_size=rt.page_size)
    logits, cache, stats = engine.prefill_step(
        model.params, cache, jnp.asarray(tokens), jnp.asarray(lengths), cfg, rt
    )
    nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    dlogits, _ = engine.decode_step(model.params, cache, nxt, cfg, rt)
    stats = {k: np.asarray(v) for k, v in jax.device_get(stats).items()}
    return np.asarray(logits[0]), np.asarray(dlogits[0]), stats


def check_prefill_stats(stats: dict, lengths: Sequence[int], block_size: int) -> np.ndarray:
    """Sanity of prefill stats ([L, B, H] arrays from ``model.prefill``): finite, causal block
    counts of each sequence's length, 0 < kept <= causal, dense heads keep everything, modes in
    {-1, 0, 1}. Returns the kept fraction float64 [L, B, H]."""
    kept = np.asarray(stats["kept_blocks"], np.float64)
    causal = np.asarray(stats["causal_blocks"], np.float64)
    modes = np.asarray(stats["modes"])
    if not (np.isfinite(kept).all() and np.isfinite(causal).all()):
        raise AssertionError("prefill stats: non-finite block counts")
    nb = -(-np.asarray(lengths) // block_size)
    np.testing.assert_array_equal(
        causal, np.broadcast_to((nb * (nb + 1) // 2)[None, :, None], causal.shape)
    )
    if not set(np.unique(modes).tolist()) <= {-1, 0, 1}:
        raise AssertionError(f"prefill stats: modes {np.unique(modes)}")
    frac = kept / causal
    if not ((frac > 0) & (frac <= 1)).all():
        raise AssertionError(f"prefill stats: kept fraction outside (0, 1]: {frac.min()}..")
    np.testing.assert_array_equal(frac[modes == MODE_DENSE], 1.0)
    return frac
