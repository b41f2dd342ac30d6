"""Model shapes shared by the benchmarks (no jax/torch import here)."""

SHAPES = {
    # Qwen3-4B: tied embeddings.
    "4b": dict(
        vocab_size=151936,
        hidden_size=2560,
        intermediate_size=9728,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    ),
    # Qwen3-8B: untied.
    "8b": dict(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
    ),
}

# Llama-3.1 shapes (same keys as SHAPES) and their RoPE: theta 5e5 with llama3 frequency scaling
# (factor 8 over an 8K pretraining window), RMSNorm eps 1e-5, no q/k norm.
LLAMA_SHAPES = {
    # Llama-3.1-8B: untied, 128K vocab.
    "llama8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        tie_word_embeddings=False,
    ),
}
LLAMA31_ROPE = dict(
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)
LLAMA_RMS_NORM_EPS = 1e-5


def hf_config_kwargs(shape: dict) -> dict:
    """The transformers config fields (Qwen3Config / LlamaConfig) of one of our shape dicts."""
    return dict(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"],
        head_dim=shape["head_dim"],
        tie_word_embeddings=shape["tie_word_embeddings"],
    )
