"""Load-time layout of the dense projections: `Config.projection_layout` "separate" <-> "fused".

Fused, the projections that read the same input are one kernel each (same maths, same parameter count):

    self_attn/qkv_proj/kernel   [..., hidden, q + k (+ v on sliding layers)]   columns in that order
    mlp/gate_up_proj/kernel     [..., hidden, 2 * intermediate]                gate first

(`...` is `[blocks]` inside the scanned blocks; the self-conditioning MLP is fused too.) Checkpoints hold the
separate layout: fuse after loading (`diffjax.load(path, projections_fused=True)`), unfuse before saving.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp

from diffjax.config import Config
from diffjax.layers import projection_widths

Params = dict[str, Any]

_ATTENTION = ("q_proj", "k_proj", "v_proj")
_MLP = ("gate_proj", "up_proj")


def fuse_projections(config: Config, params: Params) -> tuple[Config, Params]:
    """`(config, params)` with q/k/v and gate/up fused and `config.projection_layout="fused"`. Each fused
    kernel is a new device array; the separate ones are dropped from the returned tree (freed once the caller
    drops `params`)."""
    if config.projection_layout == "fused":
        raise ValueError("config.projection_layout is already 'fused'")

    def fuse(node: dict[str, Any], names: tuple[str, ...], fused_name: str) -> None:
        present = [name for name in names if name in node]
        node[fused_name] = {"kernel": _concatenate(tuple(node.pop(name)["kernel"] for name in present))}

    def visit(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        node = {key: visit(child) for key, child in node.items()}
        if "q_proj" in node:
            fuse(node, _ATTENTION, "qkv_proj")
        if "gate_proj" in node:
            fuse(node, _MLP, "gate_up_proj")
        return node

    return config.replace(projection_layout="fused"), visit(params)


def unfuse_projections(config: Config, params: Params) -> tuple[Config, Params]:
    """The inverse of `fuse_projections`: the separate kernels back (exactly) and
    `config.projection_layout="separate"`."""
    if config.projection_layout != "fused":
        raise ValueError(f"config.projection_layout is {config.projection_layout!r}, not 'fused'")

    def unfuse(node: dict[str, Any], widths: tuple[int, ...], names: tuple[str, ...], fused_name: str) -> None:
        pieces = _split(node.pop(fused_name)["kernel"], widths)
        node.update({name: {"kernel": piece} for name, piece in zip(names, pieces, strict=True)})

    def visit(node: Any, layer_type: str | None) -> Any:
        if not isinstance(node, dict):
            return node
        node = {key: visit(child, _layer_type(config, key, layer_type)) for key, child in node.items()}
        if "qkv_proj" in node:
            if layer_type is None:
                raise ValueError("a qkv_proj outside blocks/layer_<j>: not a diffjax parameter tree")
            widths = projection_widths(config, layer_type)
            unfuse(node, widths, _ATTENTION[:len(widths)], "qkv_proj")
        if "gate_up_proj" in node and isinstance(node["gate_up_proj"], dict):  # the experts' is an array
            unfuse(node, (node["gate_up_proj"]["kernel"].shape[-1] // 2,) * 2, _MLP, "gate_up_proj")
        return node

    return config.replace(projection_layout="separate"), visit(params, None)


def _layer_type(config: Config, key: str, inherited: str | None) -> str | None:
    if key.startswith("layer_") and key.removeprefix("layer_").isdigit():
        return config.block_layer_types[int(key.removeprefix("layer_"))]
    return inherited


@jax.jit
def _concatenate(kernels: tuple[jax.Array, ...]) -> jax.Array:
    return jnp.concatenate(kernels, axis=-1)


def _split(kernel: jax.Array, widths: tuple[int, ...]) -> list[jax.Array]:
    if kernel.shape[-1] != sum(widths):
        raise ValueError(f"a fused kernel of {kernel.shape[-1]} columns, expected {' + '.join(map(str, widths))}")
    return jnp.split(kernel, list(itertools.accumulate(widths[:-1])), axis=-1)
