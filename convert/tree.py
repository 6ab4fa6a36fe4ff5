"""Flat views of the nested parameter dict, dtype names, and the check against `diffjax.param_shapes`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np

from convert.errors import CheckpointError
from diffjax.config import Config
from diffjax.model import param_leaf_shapes
from diffjax.quantize import storage_dtype

Path = tuple[str, ...]

# Target dtypes a checkpoint may be cast to. float64 is left out on purpose: jax (x64 off) would silently
# turn it into float32 anyway.
_DTYPE_NAMES: dict[str, np.dtype] = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "f32": np.dtype(np.float32),
    "fp32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "f16": np.dtype(np.float16),
    "fp16": np.dtype(np.float16),
}
SUPPORTED_DTYPES = frozenset(_DTYPE_NAMES.values())


def resolve_dtype(dtype: Any) -> np.dtype | None:
    """None, a name ("bfloat16", "float32", "float16") or a numpy/ml_dtypes/jax dtype -> numpy dtype."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        key = dtype.lower()
        if key not in _DTYPE_NAMES:
            raise ValueError(f"unsupported dtype {dtype!r}: use one of bfloat16, float32, float16")
        return _DTYPE_NAMES[key]
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"unsupported dtype {dtype!r}: use one of bfloat16, float32, float16") from None
    if resolved not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {resolved}: use one of bfloat16, float32, float16")
    return resolved


def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
    """Nested dict -> {path tuple: leaf}, in sorted key order (deterministic file layout)."""
    flat: dict[Path, Any] = {}
    for key in sorted(tree):
        value = tree[key]
        if isinstance(value, Mapping):
            flat.update(flatten(value, (*prefix, str(key))))
        else:
            flat[(*prefix, str(key))] = value
    return flat


def unflatten(flat: Mapping[Path, Any]) -> dict[str, Any]:
    """The nested dict of a `{path tuple: leaf}` mapping (the inverse of `flatten`)."""
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


def check_tree(flat: Mapping[Path, Any], config: Config, what: str, dtype: np.dtype | None = None) -> None:
    """Raise `CheckpointError` unless `flat` has exactly the leaves and shapes of `param_shapes(config)`, and
    with a `dtype` its dtypes (`dtype_mismatches`: fp8 experts and their scales keep their own)."""
    expected = param_leaf_shapes(config)
    missing = sorted("/".join(p) for p in set(expected) - set(flat))
    unexpected = sorted("/".join(p) for p in set(flat) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing leaves: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected leaves: {', '.join(unexpected)}")
    for path in sorted(set(expected) & set(flat)):
        shape = tuple(flat[path].shape)
        if shape != expected[path]:
            problems.append(f"shape mismatch for {'/'.join(path)}: expected {list(expected[path])}, got {list(shape)}")
    if dtype is not None:
        stored = [("/".join(p), p, np.dtype(flat[p].dtype)) for p in sorted(set(expected) & set(flat))]
        problems += [f"dtype of {line}" for line in dtype_mismatches(stored, config, dtype)]
    if problems:
        raise CheckpointError(f"{what} does not match the parameter tree of this config: " + "; ".join(problems))


# The loaders' heading for `dtype_mismatches` without a requested dtype.
MIXED_DTYPES = "dtype mismatch (ask for a dtype, dtype=... or --dtype, to cast every tensor to it)"


def dtype_mismatches(
    stored: Iterable[tuple[str, Path, np.dtype]], config: Config, dtype: np.dtype | None = None
) -> list[str]:
    """`"NAME is D, expected E"` for each floating tensor (name, leaf path, dtype) not in its leaf's dtype.

    That is `dtype`, or for None the checkpoint's own: the most common floating dtype among the tensors
    whose dtype follows the model's. Leaves with a dtype of their own keep it whatever the rest hold:
    under `expert_quantization="fp8"` the expert weights are float8_e4m3fn and their scales float32
    (`diffjax.quantize.storage_dtype`). Without this, one float16 tensor in a float32 checkpoint would load
    as a mixed-dtype tree that the model silently computes in whatever dtypes promotion then picks.
    """
    floating = [(name, path, np.dtype(d)) for name, path, d in stored if jax.numpy.issubdtype(d, jax.numpy.floating)]
    note = ""
    if dtype is None:
        follows = Counter(d for _, path, d in floating if storage_dtype(config, path, None) is None)
        if not follows:
            return []
        dtype, count = follows.most_common(1)[0]
        note = f" like {count} of the other {sum(follows.values()) - 1} tensors"
    return [
        f"{name} is {d}, expected {want}{note if want == dtype else ''}"
        for name, path, d in floating
        if d != (want := np.dtype(storage_dtype(config, path, dtype)))
    ]


def refuse_load_time_formats(config: Config) -> None:
    """Checkpoints hold unquantized, plain-layout weights: fp8 experts (`diffjax.quantize`), pretiled ones
    (`diffjax.kernels.moe`), fused projections and unstacked blocks (`diffjax.layout`) are made at load time."""
    if config.expert_quantization != "none":
        raise CheckpointError(
            f"cannot save expert_quantization={config.expert_quantization!r} params: checkpoints hold unquantized "
            "weights. Save the unquantized ones (or diffjax.quantize.dequantize_experts) and quantize at load: "
            "diffjax.load(path, experts_fp8=True)"
        )
    if config.expert_layout != "plain":
        raise CheckpointError(
            f"cannot save expert_layout={config.expert_layout!r} params: checkpoints hold the plain layout. Save "
            "diffjax.kernels.moe.untile_model(config, params) and pretile at load: diffjax.load(path, "
            "experts_pretiled=True)"
        )
    if config.projection_layout != "separate":
        raise CheckpointError(
            f"cannot save projection_layout={config.projection_layout!r} params: checkpoints hold the separate "
            "projections. Save diffjax.layout.unfuse_projections(config, params) and fuse at load: "
            "diffjax.load(path, projections_fused=True)"
        )
    if config.block_layout != "stacked":
        raise CheckpointError(
            f"cannot save block_layout={config.block_layout!r} params: checkpoints hold the blocks stacked. Save "
            "diffjax.layout.stack_blocks(config, params) and unstack at load: diffjax.load(path, "
            "blocks_unstacked=True)"
        )


def to_jax(flat: dict[Path, np.ndarray]) -> dict[str, Any]:
    """numpy leaves -> jax arrays, emptying `flat` as it goes so each host array can be freed once copied."""
    out: dict[Path, Any] = {}
    for path in list(flat):
        out[path] = jax.numpy.asarray(flat.pop(path))
    return unflatten(out)
