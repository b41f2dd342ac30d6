"""Converted checkpoints on disk: an orbax pytree of parameters plus our config and the tokenizer.

Directory layout written by ``python -m convert``::

    OUT_DIR/
      model_config.json     our ModelConfig (architecture, dims, RoPE, elastic fields)
      hf_config.json        the original config.json, for reference
      params/               orbax checkpoint of the parameter state dict
      tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json, ...
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np

from elastic_jax import params as params_lib
from elastic_jax.config import ModelConfig

MODEL_CONFIG = "model_config.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1

log = logging.getLogger("elastic_jax.checkpoint")


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def save(path: str | Path, cfg: ModelConfig, state: dict[str, Any]) -> None:
    """Write ``state`` (nested dict of arrays, layout of ``params.to_state_dict``) and the config."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "config": cfg.to_dict()}
    (path / MODEL_CONFIG).write_text(json.dumps(meta, indent=2))
    with _checkpointer() as ckptr:
        ckptr.save((path / PARAMS_DIR).absolute(), state)


def load_config(path: str | Path) -> ModelConfig:
    p = Path(path) / MODEL_CONFIG
    if not p.exists():
        raise FileNotFoundError(
            f"{p} not found: {path} is not a converted elastic-jax checkpoint "
            "(convert a Hugging Face checkpoint with `python -m convert HF_DIR OUT_DIR`)"
        )
    meta = json.loads(p.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{p}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    return ModelConfig.from_dict(meta["config"])


def load_state(path: str | Path, cfg: ModelConfig, *, sharding=None) -> dict[str, Any]:
    """The parameter state dict, checked against ``cfg``'s shapes and dtypes. With ``sharding``
    (a ``jax.sharding.Sharding`` or a pytree of them) arrays are restored straight to devices."""
    abstract = params_lib.to_state_dict(params_lib.abstract(cfg))
    if sharding is not None:
        shardings = (
            sharding if isinstance(sharding, dict) else jax.tree.map(lambda _: sharding, abstract)
        )
        abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
    params_dir = (Path(path) / PARAMS_DIR).absolute()
    with _checkpointer() as ckptr:
        meta = ckptr.metadata(params_dir).item_metadata.tree
        _check_metadata(meta, abstract, "")
        return ckptr.restore(params_dir, abstract)


def _check_metadata(meta, abstract, prefix: str) -> None:
    if isinstance(abstract, dict):
        for k, sub in abstract.items():
            if k not in meta:
                raise KeyError(f"checkpoint is missing parameter '{prefix}{k}'")
            _check_metadata(meta[k], sub, f"{prefix}{k}.")
        return
    if tuple(meta.shape) != tuple(abstract.shape) or np.dtype(meta.dtype) != np.dtype(
        abstract.dtype
    ):
        raise ValueError(
            f"parameter '{prefix[:-1]}' is {meta.dtype}{list(meta.shape)} in the checkpoint, "
            f"expected {np.dtype(abstract.dtype)}{list(abstract.shape)}"
        )


def load_params(
    path: str | Path, cfg: ModelConfig | None = None, *, sharding=None
) -> params_lib.Params:
    """Load a converted checkpoint's parameters as a ``Params`` pytree on device."""
    cfg = load_config(path) if cfg is None else cfg
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = load_state(path, cfg, sharding=sharding)
    return params_lib.from_state_dict(cfg, state)
