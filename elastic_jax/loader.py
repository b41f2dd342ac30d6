"""``Model`` (config + params + tokenizer + runtime options) and ``load_model(path)``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from elastic_jax import checkpoint, memory
from elastic_jax import sharding as sharding_lib
from elastic_jax.config import ModelConfig, RuntimeConfig
from elastic_jax.params import Params
from elastic_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Model:
    """Everything ``generate()`` needs. Immutable: ``with_runtime(...)`` returns a new Model.

    max_cache_tokens: the longest prompt + generation a sequence may reach (bounds the cache).
    mesh: a ``sharding.make_mesh`` mesh the params are sharded over (None: one device);
      ``generate`` then runs tensor-parallel (docs/multi_gpu.md).
    """

    config: ModelConfig
    params: Params
    tokenizer: Tokenizer | None
    runtime: RuntimeConfig = RuntimeConfig()
    max_cache_tokens: int | None = None
    mesh: Any = None  # jax.sharding.Mesh | None

    @property
    def max_tokens(self) -> int:
        return self.max_cache_tokens or self.config.max_position_embeddings

    def with_runtime(self, **changes: Any) -> Model:
        return dataclasses.replace(self, runtime=dataclasses.replace(self.runtime, **changes))


def load_model(
    path: str | Path,
    *,
    attention_mode: str = "elastic",
    prefill_impl: str = "auto",
    decode_impl: str = "auto",
    prefill_chunk: int = 8192,
    prompt_bucket_steps: int = 1,
    page_size: int = 128,
    max_cache_tokens: int | None = None,
    collect_stats: bool = True,
    sharding=None,
    mesh=None,
) -> Model:
    """Load a checkpoint converted by ``python -m convert``.

    attention_mode: "elastic" (router decides per head; plain Qwen3 / Llama runs dense), or force every
      head "dense", "streaming" or "xattn". Other options: see ``RuntimeConfig``.
    mesh: a ``elastic_jax.sharding.make_mesh`` mesh: params are restored straight into their
      tensor-parallel shardings and ``generate`` runs sharded (``sharding`` must then be None).
    """
    rt = RuntimeConfig(
        attention_mode=attention_mode,
        prefill_impl=prefill_impl,
        decode_impl=decode_impl,
        prefill_chunk=prefill_chunk,
        prompt_bucket_steps=prompt_bucket_steps,
        page_size=page_size,
        collect_stats=collect_stats,
    )
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    cfg = checkpoint.load_config(path)
    if rt.attention_mode in ("streaming", "xattn") and not cfg.is_elastic:
        raise ValueError(
            f"attention_mode={attention_mode!r} needs a PawQwen3 / PawLlama checkpoint (its sink/window/"
            f"XAttention settings); {path} is {cfg.architecture}"
        )
    if mesh is None and sharding is None:  # one device: weights + one short request must fit
        memory.check_fits(cfg, rt, 128, 1, page_size)
    if mesh is not None:
        if sharding is not None:
            raise ValueError("pass either mesh= or sharding=, not both")
        sharding = sharding_lib.param_state_shardings(cfg, mesh)  # checks head divisibility
    params = checkpoint.load_params(path, cfg, sharding=sharding)
    tokenizer = Tokenizer(path) if (path / "tokenizer.json").exists() else None
    return Model(cfg, params, tokenizer, rt, max_cache_tokens, mesh)
