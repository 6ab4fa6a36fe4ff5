"""Load-time parameter layouts for a GPU's decoder step; checkpoints hold neither (unmake them before saving).

`Config.projection_layout` "separate" <-> "fused" (`fuse_projections`, `unfuse_projections`): the projections
that read the same input become one kernel each (same maths, same parameter count):

    self_attn/qkv_proj/kernel   [..., hidden, q + k (+ v on sliding layers)]   columns in that order
    mlp/gate_up_proj/kernel     [..., hidden, 2 * intermediate]                gate first

(`...` is `[blocks]` inside stacked blocks; the self-conditioning MLP is fused too.)

`Config.block_layout` "stacked" <-> "unstacked" (`unstack_blocks`, `stack_blocks`): `blocks/layer_j/...`
leaves with a leading `[blocks]` axis become one tree per block, `block_{i}/layer_j/...`.

`diffjax.load(path, projections_fused=True, blocks_unstacked=True)` makes both while loading.
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


def unstack_blocks(config: Config, params: Params, donate: bool = False) -> tuple[Config, Params]:
    """`(config, params)` with each block's parameters a tree of its own (`block_{i}`, the `[blocks]` axis
    gone) and `config.block_layout="unstacked"`. Each block's leaves are new device arrays. `donate`: delete
    each stacked leaf (its device memory) once its blocks are made, so the model is never held twice (a
    full-size bf16 model is ~50 GB); `params` is unusable afterwards."""
    if config.block_layout == "unstacked":
        raise ValueError("config.block_layout is already 'unstacked'")
    if "blocks" not in params:
        raise ValueError("no `blocks` parameters in this tree: not a stacked DiffusionGemma parameter tree")
    leaves, treedef = jax.tree.flatten(params["blocks"])
    per_block: list[list[Any]] = [[] for _ in range(config.num_blocks)]
    for leaf in leaves:
        if leaf.shape[:1] != (config.num_blocks,):
            raise ValueError(f"a block stack of shape {leaf.shape}: expected [{config.num_blocks}, ...]")
        slices = [leaf[i] for i in range(config.num_blocks)]
        if donate and isinstance(leaf, jax.Array):
            jax.block_until_ready(slices)
            leaf.delete()
        for block, piece in zip(per_block, slices, strict=True):
            block.append(piece)
    out = {key: value for key, value in params.items() if key != "blocks"}
    out.update({f"block_{i}": jax.tree.unflatten(treedef, block) for i, block in enumerate(per_block)})
    return config.replace(block_layout="unstacked"), out


def stack_blocks(config: Config, params: Params) -> tuple[Config, Params]:
    """The inverse of `unstack_blocks`: `[blocks, ...]` stacks under `blocks` and
    `config.block_layout="stacked"` (a copy of every block's leaves)."""
    if config.block_layout != "unstacked":
        raise ValueError(f"config.block_layout is {config.block_layout!r}, not 'unstacked'")
    names = [f"block_{i}" for i in range(config.num_blocks)]
    missing = [name for name in names if name not in params]
    if missing:
        raise ValueError(f"unstacked parameters without {', '.join(missing)}")
    out = {key: value for key, value in params.items() if key not in names}
    out["blocks"] = jax.tree.map(lambda *blocks: jnp.stack(blocks), *(params[name] for name in names))
    return config.replace(block_layout="stacked"), out


def relayout(config: Config, params: Params, projection_layout: str, block_layout: str) -> tuple[Config, Params]:
    """`(config, params)` in the given projection and block layouts, whatever they are in now (a new tree;
    `params` stays usable)."""
    if config.projection_layout != projection_layout:
        config, params = (fuse_projections if projection_layout == "fused" else unfuse_projections)(config, params)
    if config.block_layout != block_layout:
        config, params = (unstack_blocks if block_layout == "unstacked" else stack_blocks)(config, params)
    return config, params


def arrange_for_gpu(config: Config, params: Params, *, experts_pretiled: bool = False,
                    projections_fused: bool = False, blocks_unstacked: bool = False) -> tuple[Config, Params]:
    """The load-time layouts `diffjax.load` and `diffjax generate` offer, in the one order they compose: the
    experts pretiled for the Pallas kernels (`kernels.moe.pretile_model`), then the projections fused, then
    the blocks unstacked (which gives its input's arrays away: `donate`)."""
    if experts_pretiled:
        from diffjax.kernels.moe import pretile_model

        config, params = pretile_model(config, params)
    if projections_fused:
        config, params = fuse_projections(config, params)
    if blocks_unstacked:
        config, params = unstack_blocks(config, params, donate=True)
    return config, params
