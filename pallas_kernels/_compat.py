"""Small compatibility layer over JAX/Pallas API differences between the versions we support.

CI runs jax 0.10.x on CPU (kernels in ``interpret=True`` mode); the GPU machine runs jax 0.11.x.
Keep every version-dependent import or call in this module.
"""

from __future__ import annotations

import dataclasses

import jax

GPU_PLATFORMS = ("gpu", "cuda", "rocm")


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """What kernel dispatch reads about the default device. platform: ``jax.default_backend()``;
    kind: ``device_kind`` (e.g. ``NVIDIA H100 80GB HBM3``); compute_capability: e.g. ``"9.0"``
    (None off CUDA); core_count: streaming multiprocessors (None where unknown)."""

    platform: str
    kind: str
    compute_capability: str | None = None
    core_count: int | None = None


def device_info() -> DeviceInfo:
    """The one place kernels and the model look at the device (tests that lower the GPU code on
    a CPU machine substitute an H100 here: ``tests/test_gpu_lowering.py``)."""
    dev = jax.devices()[0]
    cc = getattr(dev, "compute_capability", None)
    return DeviceInfo(
        platform=jax.default_backend(),
        kind=dev.device_kind,
        compute_capability=None if cc is None else str(cc),
        core_count=getattr(dev, "core_count", None),
    )


def on_gpu() -> bool:
    return device_info().platform in GPU_PLATFORMS


def default_interpret() -> bool:
    """Interpret Pallas kernels unless the default backend is a GPU."""
    return not on_gpu()


def triton_compiler_params(num_warps: int, num_stages: int):
    """``compiler_params`` for a Pallas Triton-backend ``pallas_call``."""
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def device_kind() -> str:
    """Normalised device kind used to name autotune tables, e.g. ``nvidia_h100_80gb_hbm3``."""
    kind = device_info().kind
    return "".join(c if c.isalnum() else "_" for c in kind.lower()).strip("_")


def triton_dot(a, b, *, trans_b: bool = False):
    """``pl.dot`` of the Triton backend (moved to ``jax.experimental.pallas.triton`` in 0.10)."""
    try:
        from jax.experimental.pallas.triton import dot
    except ImportError:  # older jax
        from jax.experimental.pallas import dot
    return dot(a, b, trans_b=trans_b)


def triton_load(ref, *, mask=None, other=None):
    """Masked load of a Pallas Triton ref view (``plgpu.load``; older jax: ``pl.load``)."""
    from jax.experimental.pallas import triton as plgpu

    if hasattr(plgpu, "load"):
        return plgpu.load(ref, mask=mask, other=other)
    from jax.experimental import pallas as pl  # pragma: no cover - older jax

    return pl.load(ref, (), mask=mask, other=other)


def triton_store(ref, val, *, mask=None):
    """Masked store to a Pallas Triton ref view (``plgpu.store``; older jax: ``pl.store``)."""
    from jax.experimental.pallas import triton as plgpu

    if hasattr(plgpu, "store"):
        return plgpu.store(ref, val, mask=mask)
    from jax.experimental import pallas as pl  # pragma: no cover - older jax

    return pl.store(ref, (), val, mask=mask)
