"""HF safetensors -> elastic-jax checkpoint conversion (``python -m convert HF_DIR OUT_DIR``)."""
