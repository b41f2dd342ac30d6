"""Convert a Hugging Face Qwen3 / PawQwen3 / Llama / PawLlama checkpoint to an elastic-jax
checkpoint.

    python -m convert HF_DIR OUT_DIR [--dtype bf16] [--verify] [--overwrite]

Reads config.json, every safetensors shard (``model.safetensors.index.json`` or single files) and
the tokenizer files; checks every tensor's name and shape before reading any data; writes an orbax
checkpoint plus our config and the tokenizer files into a temporary directory next to OUT_DIR and
renames it at the end, so an interrupted conversion leaves no OUT_DIR behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from convert import mapping
from convert.safetensors_io import SafetensorsError, TensorInfo, load, read_header
from elastic_jax import checkpoint
from elastic_jax.config import ModelConfig, load_hf_config

log = logging.getLogger("elastic_jax.convert")

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
)
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
DTYPES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp32": "float32",
    "float32": "float32",
    "fp16": "float16",
    "float16": "float16",
}


class ConversionError(ValueError):
    """The input checkpoint cannot be converted (missing/wrong tensors or files)."""


# ------------------------------------------------------------------------------ inputs


def find_weight_files(hf_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, validated to exist; pickles are refused."""
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ConversionError(f"{index}: unreadable index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (hf_dir / f).exists()]
        if missing:
            raise ConversionError(f"{index} lists shard(s) that do not exist: {missing}")
        return [hf_dir / f for f in files]
    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = [p.name for p in hf_dir.iterdir() if p.name in PICKLE_WEIGHTS or p.suffix == ".bin"]
    if pickles:
        raise ConversionError(
            f"{hf_dir} has only pickle weights ({', '.join(sorted(pickles))}); pickles can run "
            "arbitrary code and are never loaded. Re-save the model with safetensors "
            "(model.save_pretrained(dir, safe_serialization=True)) and convert that."
        )
    raise ConversionError(f"{hf_dir}: no *.safetensors weights found")


def index_tensors(files: list[Path]) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_header(f).items():
            if name in tensors:
                raise ConversionError(
                    f"tensor '{name}' appears in both {tensors[name].file} and {f}"
                )
            tensors[name] = info
    return tensors


def _router_layout(cfg: ModelConfig):
    """(expected router tensors {name: shape}, training-only suffixes) or empty for Qwen3."""
    if not cfg.is_elastic:
        return {}, ()
    from elastic_jax import router

    names = {}
    for i in range(cfg.num_layers):
        names.update(router.router_tensor_names(i, cfg.elastic.use_softmax, head_dim=cfg.head_dim))
    return names, tuple(router.TRAINING_ONLY_SUFFIXES)


def check_tensors(cfg: ModelConfig, tensors: dict[str, TensorInfo]) -> list[mapping.Rule]:
    """Every expected tensor present with the right shape; unknown ones logged. Reads no data."""
    rules = mapping.backbone_rules(cfg)
    router_names, training_only = _router_layout(cfg)
    expected = {r.hf_name: r.hf_shape for r in rules} | router_names
    missing = [n for n in expected if n not in tensors]
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" ... ({len(missing)} in all)" if len(missing) > 8 else ""
        )
        raise ConversionError(f"checkpoint is missing tensor(s): {shown}")
    for name, shape in expected.items():
        info = tensors[name]
        if info.shape != tuple(shape):
            raise ConversionError(
                f"tensor '{name}' in {info.file.name} has shape {list(info.shape)}, "
                f"expected {list(shape)} for this config.json"
            )
    for name in sorted(set(tensors) - set(expected)):
        if any(name.endswith(s) for s in training_only):
            log.info("skipping training-only tensor %s", name)
        elif mapping.is_ignorable(name, cfg):
            log.info("skipping unused tensor %s", name)
        elif (why := mapping.unexpected_tensor_message(name, cfg)) is not None:
            raise ConversionError(f"{why} (in {tensors[name].file.name})")
        else:
            log.warning("skipping unknown tensor %s %s", name, list(tensors[name].shape))
    return rules


# ------------------------------------------------------------------------------ conversion


def convert_params(
    cfg: ModelConfig,
    tensors: dict[str, TensorInfo],
    rules: list[mapping.Rule],
    *,
    progress: bool = True,
) -> dict:
    """Read, transform and stack every tensor into our state dict (numpy, cfg.dtype)."""
    from elastic_jax import params as params_lib

    dtype = np.dtype(cfg.jnp_dtype)
    abstract = params_lib.to_state_dict(params_lib.abstract(cfg))
    state: dict = {}

    def slot(target: str):
        node, ref = state, abstract
        *parents, leaf = target.split(".")
        for p in parents:
            node, ref = node.setdefault(p, {}), ref[p]
        if leaf not in node:
            node[leaf] = np.empty(ref[leaf].shape, dtype)
        return node[leaf]

    router_names, _ = _router_layout(cfg)
    total = len(rules) + len(router_names)
    bar = tqdm(total=total, desc="converting", unit="tensor", disable=not progress)
    for rule in rules:
        value = rule.transform(load(tensors[rule.hf_name])).astype(dtype)
        dst = slot(rule.target)
        if rule.layer is None:
            dst[...] = value
        else:
            dst[rule.layer] = value
        bar.update(1)
    if cfg.is_elastic:
        from elastic_jax import router

        per_layer = []
        for i in range(cfg.num_layers):
            rp = router.router_params_from_hf(
                lambda n: load(tensors[n]), i, cfg.head_dim, cfg.elastic.use_softmax
            )
            per_layer.append(rp)
            bar.update(
                len(router.router_tensor_names(i, cfg.elastic.use_softmax, head_dim=cfg.head_dim))
            )
        stacked = {
            f: np.stack([np.asarray(getattr(rp, f)) for rp in per_layer]).astype(dtype)
            for f in router.RouterParams.shapes(cfg.head_dim, cfg.elastic.use_softmax)
        }
        state["layers"]["router"] = stacked
    bar.close()
    return state


def convert(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "bf16",
    verify: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert ``hf_dir`` into ``out_dir`` (see module docstring). Returns ``out_dir``."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}; allowed: {sorted(DTYPES)}")
    if not hf_dir.is_dir():
        raise ConversionError(f"input directory not found: {hf_dir}")
    if out_dir.exists() and not overwrite:
        raise ConversionError(f"output directory already exists: {out_dir} (pass --overwrite)")
    cfg = load_hf_config(hf_dir, dtype=DTYPES[dtype])
    try:
        tensors = index_tensors(find_weight_files(hf_dir))
    except SafetensorsError as e:
        raise ConversionError(str(e)) from None
    rules = check_tensors(cfg, tensors)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        state = convert_params(cfg, tensors, rules, progress=progress)
        checkpoint.save(tmp, cfg, state)
        for name in TOKENIZER_FILES:
            if (hf_dir / name).exists():
                shutil.copy2(hf_dir / name, tmp / name)
        shutil.copy2(hf_dir / "config.json", tmp / "hf_config.json")
        if verify:
            verify_checkpoint(tmp, cfg, tensors, rules, progress=progress)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Exact comparison that also treats NaNs with equal bits as equal."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def verify_checkpoint(
    path: Path,
    cfg: ModelConfig,
    tensors: dict[str, TensorInfo],
    rules: list[mapping.Rule],
    *,
    progress: bool = True,
) -> None:
    """Reload the written checkpoint and compare every tensor with the source, exactly."""
    state = checkpoint.load_state(path, cfg)
    dtype = np.dtype(cfg.jnp_dtype)
    for rule in tqdm(rules, desc="verifying", unit="tensor", disable=not progress):
        expect = rule.transform(load(tensors[rule.hf_name])).astype(dtype)
        node = state
        for p in rule.target.split("."):
            node = node[p]
        got = np.asarray(node if rule.layer is None else node[rule.layer])
        if got.shape != expect.shape or not _bitwise_equal(got, expect):
            raise ConversionError(f"verification failed for tensor '{rule.hf_name}'")
    if cfg.is_elastic:
        from elastic_jax import router

        for i in range(cfg.num_layers):
            rp = router.router_params_from_hf(
                lambda n: load(tensors[n]), i, cfg.head_dim, cfg.elastic.use_softmax
            )
            for f in router.RouterParams.shapes(cfg.head_dim, cfg.elastic.use_softmax):
                expect = np.asarray(getattr(rp, f)).astype(dtype)
                got = np.asarray(state["layers"]["router"][f][i])
                if not _bitwise_equal(got, expect):
                    raise ConversionError(f"verification failed for router tensor {f} of layer {i}")
    log.info("verified %d tensors", len(rules))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "hf_dir", help="Hugging Face checkpoint directory (config.json + safetensors)"
    )
    parser.add_argument("out_dir", help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--verify", action="store_true", help="reload and compare every tensor")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        out = convert(
            args.hf_dir,
            args.out_dir,
            dtype=args.dtype,
            verify=args.verify,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except (ConversionError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
