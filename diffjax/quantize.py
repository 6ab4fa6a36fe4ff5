"""FP8 weight-only experts: float8_e4m3fn weights with a float32 scale per output channel.

The experts are 45.7 GB of the released model's 50.5 GB in bf16, and a decoder step reads nearly all of them;
stored in e4m3 they take half the bytes. A weight `w [..., k, n]` (k the contraction axis) becomes

    q = w / scale  (rounded to e4m3),   scale[..., n] = max_k |w[..., k, n]| / 448

so every output column uses e4m3's whole range (448 is its largest finite value). Per-column scales commute
with the k-sum, `x @ (q * scale) == (x @ q) * scale`: a kernel can convert `q` to the activation dtype
(exact: every e4m3 value is a bf16 and an f16), accumulate in float32 and scale the accumulator once.

With `Config(expert_quantization="fp8")` each MoE layer's `experts` holds (after the scanned [blocks] axis):

    gate_up_proj        float8_e4m3fn [blocks, experts, hidden, 2 * inter]
    gate_up_proj_scale  float32       [blocks, experts, 2 * inter]
    down_proj           float8_e4m3fn [blocks, experts, inter, hidden]
    down_proj_scale     float32       [blocks, experts, hidden]

    config, params = quantize_model(config, params)   # or: diffjax.load(path, experts_fp8=True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from diffjax.config import Config

Array = jax.Array

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0
SCALE_DTYPE = jnp.float32
# The weights of an `experts` node that are quantized, each `[..., contraction, output]`.
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def scale_name(weight: str) -> str:
    """The leaf holding the scales of expert weight `weight` (e.g. `gate_up_proj_scale`)."""
    return f"{weight}_scale"


SCALE_LEAVES = tuple(scale_name(w) for w in EXPERT_WEIGHTS)


@jax.jit
def quantize(w: Array) -> tuple[Array, Array]:
    """`w [..., k, n]` -> (`q` float8_e4m3fn `[..., k, n]`, `scale` float32 `[..., n]`), `w ~= q * scale[..., None, :]`.

    A column whose scale would be 0 (all zeros, or a largest magnitude so small that amax / 448 rounds or
    flushes to 0) gets scale 1: its q is 0 either way, where a zero scale would divide 0 by 0. A column
    holding NaN or inf gets a NaN scale.
    """
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=-2)
    scale = amax / FP8_MAX
    # A non-finite column keeps a NaN scale, for `quantize_experts` to refuse (`>=` alone would hide a NaN).
    scale = jnp.where(jnp.isfinite(amax), jnp.where(scale >= jnp.finfo(jnp.float32).tiny, scale, 1.0), jnp.nan)
    # The clip guards against w / (amax / 448) rounding just above 448: e4m3fn has no infinity, so an
    # out-of-range value would become NaN.
    q = jnp.clip(w32 / scale[..., None, :], -FP8_MAX, FP8_MAX).astype(FP8)
    return q, scale.astype(SCALE_DTYPE)


def dequantize(q: Array, scale: Array, dtype: Any) -> Array:
    """`q [..., k, n] * scale [..., n]` in float32, rounded once to `dtype`."""
    return (q.astype(jnp.float32) * scale[..., None, :]).astype(dtype)


def map_experts(params: Mapping[str, Any], fn: Any) -> dict[str, Any]:
    """`params` with every `experts` node replaced by `fn(node)`; other leaves are kept (not copied)."""
    found = False

    def walk(tree: Mapping[str, Any]) -> dict[str, Any]:
        nonlocal found
        out = {}
        for key, value in tree.items():
            if key == "experts" and isinstance(value, Mapping):
                found = True
                out[key] = fn(value)
            else:
                out[key] = walk(value) if isinstance(value, Mapping) else value
        return out

    result = walk(params)
    if not found:
        raise ValueError("no `experts` parameters in this tree: not a DiffusionGemma parameter tree")
    return result


def is_quantized(experts: Mapping[str, Any]) -> bool:
    """Whether an `experts` node holds fp8 weights (raises on a half-quantized node)."""
    fp8 = [jnp.dtype(experts[w].dtype) == FP8 for w in EXPERT_WEIGHTS]
    scales = [name in experts for name in SCALE_LEAVES]
    if len(set(fp8 + scales)) > 1:
        state = ", ".join(f"{w}: {experts[w].dtype}" for w in EXPERT_WEIGHTS)
        raise ValueError(
            f"half-quantized experts ({state}; scales present: {', '.join(n for n in SCALE_LEAVES if n in experts) or 'none'}): "
            f"fp8 weights need both {SCALE_LEAVES}, and scales belong to fp8 weights only"
        )
    return fp8[0]


def quantize_experts(params: Mapping[str, Any]) -> dict[str, Any]:
    """Every MoE layer's `gate_up_proj` / `down_proj` as float8_e4m3fn plus a float32 `*_scale` per output
    channel (module docstring); every other leaf is returned as is.

    Leaves may be jax or numpy arrays: each weight is quantized by its own call on the default device, so the
    peak is one unquantized weight stack beyond the result. Use with `config.replace(expert_quantization="fp8")`.
    """

    def quantize_node(experts: Mapping[str, Any]) -> dict[str, Any]:
        if is_quantized(experts):
            raise ValueError("the experts are already quantized (float8_e4m3fn)")
        out = dict(experts)
        for weight in EXPERT_WEIGHTS:
            out[weight], out[scale_name(weight)] = quantize(experts[weight])
            # A NaN or inf would give its whole column a NaN (or a misleading) scale: refused, not spread.
            if not bool(jnp.all(jnp.isfinite(out[scale_name(weight)]))):
                raise ValueError(f"experts/{weight} holds NaN or inf: fp8 quantization scales each column by its "
                                 "largest magnitude, so one non-finite weight would spoil its column")
        return out

    return map_experts(params, quantize_node)


def dequantize_experts(params: Mapping[str, Any], dtype: Any = jnp.bfloat16) -> dict[str, Any]:
    """The inverse of `quantize_experts` (up to e4m3 rounding): expert weights `q * scale` in `dtype`, the scale
    leaves dropped. Use with `config.replace(expert_quantization="none")`."""

    def dequantize_node(experts: Mapping[str, Any]) -> dict[str, Any]:
        if not is_quantized(experts):
            raise ValueError("the experts are not quantized: nothing to dequantize")
        out = {k: v for k, v in experts.items() if k not in SCALE_LEAVES}
        for weight in EXPERT_WEIGHTS:
            out[weight] = _dequantize_jit(experts[weight], experts[scale_name(weight)], jnp.dtype(dtype))
        return out

    return map_experts(params, dequantize_node)


_dequantize_jit = jax.jit(dequantize, static_argnums=2)


def quantize_model(config: Config, params: Mapping[str, Any]) -> tuple[Config, dict[str, Any]]:
    """`(config, params)` with fp8 experts: `quantize_experts` and `expert_quantization="fp8"`, every leaf a
    jax array. Hand it host (numpy) leaves, e.g. `convert.load(..., as_numpy=True)`, so that the unquantized
    experts never sit on the device all at once."""
    if config.expert_quantization != "none":
        raise ValueError(f"config.expert_quantization is already {config.expert_quantization!r}")
    if config.expert_layout != "plain":
        # The per-column scales are taken over the contraction axis of the plain layout.
        raise ValueError("quantize the plain-layout experts, then pretile them (diffjax.kernels.moe.pretile_model)")
    quantized = jax.tree.map(jnp.asarray, quantize_experts(params))
    return config.replace(expert_quantization="fp8"), quantized


def storage_dtype(config: Config, path: tuple[str, ...], dtype: Any) -> Any:
    """The dtype of the parameter at `path` (its keys) when the model's weights are in `dtype`: fp8 expert
    weights and float32 scales under `expert_quantization="fp8"`, `dtype` otherwise."""
    if config.expert_quantization == "fp8" and len(path) >= 2 and path[-2] == "experts":
        if path[-1] in EXPERT_WEIGHTS:
            return FP8
        if path[-1] in SCALE_LEAVES:
            return SCALE_DTYPE
    return dtype


__all__ = [
    "EXPERT_WEIGHTS", "FP8", "FP8_MAX", "SCALE_LEAVES", "dequantize", "dequantize_experts", "is_quantized",
    "map_experts", "quantize", "quantize_experts", "quantize_model", "scale_name", "storage_dtype",
]
