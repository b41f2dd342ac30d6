"""elastic-jax: Elastic Attention (PawQwen3, PawLlama) with Qwen3 and Llama-3.x backbones in JAX,
with Pallas GPU kernels.

Quick use::

    import elastic_jax
    model = elastic_jax.load_model("converted_dir")          # after `python -m convert HF_DIR converted_dir`
    out = elastic_jax.generate(model, ["Hello"], max_new_tokens=32, return_info=True)
    print(out.texts[0], out.timings[0], out.prefill_info[0]["sparsity"])
"""

from elastic_jax.config import ModelConfig, RuntimeConfig, load_hf_config
from elastic_jax.generate import (
    GenerationResult,
    RequestTiming,
    TokenEvent,
    generate,
    generate_static,
    stream_text,
)
from elastic_jax.loader import Model, load_model

__all__ = [
    "GenerationResult",
    "Model",
    "ModelConfig",
    "RequestTiming",
    "RuntimeConfig",
    "TokenEvent",
    "generate",
    "generate_static",
    "load_hf_config",
    "load_model",
    "stream_text",
]
__version__ = "0.1.0"
