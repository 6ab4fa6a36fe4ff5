"""Running diffjax over a device mesh: data, expert and tensor (model) parallelism.

A mesh has three named axes (`make_mesh(data, expert, model)`):

- `data`: the batch (prompt rows, canvases, training examples) is split over it; weights are replicated.
- `expert`: the experts of every MoE layer are split over it (with `model`, see below).
- `model`: tensor parallelism: attention heads, the dense MLP's intermediate dimension (layers and the
  self-conditioning MLP) and the vocabulary (with `expert`) are split over it.

Partition rules (`param_specs`), `[blocks]` being the scanned leading axis of per-layer weights:

    embedder/embedding [vocab, hidden]          (expert, model) on vocab. The lookup, the tied LM head
                                                (logits come out split over vocab) and the self-conditioning
                                                `softmax(z) @ E` are partitioned by XLA, which inserts the
                                                reductions they need; the model pins the LM head's input rows
                                                whole (`rows_over_data`) and the product's probabilities split
                                                over vocab (`split_over_vocab`), or XLA gathers logits or the
                                                whole embedding.
    self_attn/q_proj [.., hidden, heads*hd]     model on heads      o_proj [.., heads*hd, hidden]: model on heads
    self_attn/{k,v}_proj [.., hidden, kv*hd]    model on kv heads when they divide evenly, else replicated
    mlp/{gate,up}_proj [.., hidden, inter]      model on inter      mlp/down_proj [.., inter, hidden]: model
    experts/* [blocks, experts, ..]             (expert, model) on experts: every device of an expert group
                                                holds whole experts, so an expert's gate/up halves stay together
                                                (fp8 experts' `*_scale` leaves too, beside their weights)
    everything else (norms, router, scalars)    replicated

A dimension that the axes do not divide evenly is replicated instead (jax arrays cannot be split unevenly).
The K/V cache is split over `data` on its batch axis and over `model` on its kv heads (as k/v_proj); token
arrays `[batch, ...]` over `data` (`shard_batch`).

Usage (one host; README "Sharded runs" for several):

    mesh = make_mesh(data=1, expert=8, model=1)
    config = config.replace(moe_implementation="expert_parallel")
    with jax.set_mesh(mesh):
        params = shard_params(params, config, mesh)
        out = generate(params, config, shard_batch(prompt_ids, mesh), key=key)

`encode`, `denoise_logits`, `generate` and `train.train_step` are the single-device functions: jit follows
the input shardings. Run them under `jax.set_mesh(mesh)`: the expert-parallel MoE needs it (its token
dispatch is a `jax.shard_map` with two all-to-alls), and the model's layout pins (`constrain`) take effect
only there.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffjax.config import Config
from diffjax.layers import experts_grouped
from diffjax.model import KVCache, Params, param_shapes

Array = jax.Array

DATA, EXPERT, MODEL = "data", "expert", "model"
AXES = (DATA, EXPERT, MODEL)
# The devices that split the experts (and the vocabulary) between them: one "expert group".
EXPERT_GROUP = (EXPERT, MODEL)


def make_mesh(data: int = 1, expert: int = 1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `(data, expert, model)` mesh over `devices` (default: all devices, of every host).

    The product of the axis sizes must equal the number of devices.
    """
    sizes = {DATA: data, EXPERT: expert, MODEL: model}
    for name, size in sizes.items():
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"mesh axis {name!r} must be a positive integer, got {size!r}")
    devices = list(jax.devices() if devices is None else devices)
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(
            f"mesh (data={data}, expert={expert}, model={model}) needs {math.prod(sizes.values())} devices, "
            f"got {len(devices)}"
        )
    return jax.make_mesh((data, expert, model), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _check_mesh(mesh: Any) -> None:
    if tuple(mesh.axis_names) != AXES:
        raise ValueError(f"mesh axes must be {AXES} (use diffjax.sharding.make_mesh), got {tuple(mesh.axis_names)}")


def _names(entry: Any) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _fit(spec: Sequence[Any], shape: Sequence[int], mesh: Any) -> P:
    """`spec` with every entry whose axes do not divide its dimension replaced by None (replicated)."""
    fitted = []
    for entry, dim in zip(spec, shape, strict=True):
        names = _names(entry)
        size = math.prod(mesh.shape[name] for name in names)
        fitted.append(entry if names and dim % size == 0 else None)
    return P(*fitted)


def _kv_axis(config: Config, layer_type: str, mesh: Any) -> str | None:
    # Splitting inside a head would cut the q/k norms and RoPE apart: whole kv heads or nothing.
    return MODEL if config.attention(layer_type).num_kv_heads % mesh.shape[MODEL] == 0 else None


def _leaf_spec(path: tuple[str, ...], shape: tuple[int, ...], config: Config, mesh: Any) -> P:
    """The rule of one parameter (see the module docstring)."""
    stacked = path[0] == "blocks"
    layer_type = config.block_layer_types[int(path[1].removeprefix("layer_"))] if stacked else None
    sub = path[2:] if stacked else path
    kernel = sub[-1] == "kernel"
    if path == ("embedder", "embedding"):
        rule: tuple[Any, ...] = (EXPERT_GROUP, None)
    elif sub[0] == "experts":
        rule = (EXPERT_GROUP,) + (None,) * (len(shape) - stacked - 1)
    elif kernel and sub[:2] == ("self_attn", "q_proj"):
        rule = (None, MODEL) if config.num_heads % mesh.shape[MODEL] == 0 else (None, None)
    elif kernel and sub[:2] == ("self_attn", "o_proj"):
        rule = (MODEL, None) if config.num_heads % mesh.shape[MODEL] == 0 else (None, None)
    elif kernel and sub[:2] in (("self_attn", "k_proj"), ("self_attn", "v_proj")):
        rule = (None, _kv_axis(config, layer_type, mesh))
    elif kernel and "mlp" in sub and sub[-2] in ("gate_proj", "up_proj"):
        rule = (None, MODEL)
    elif kernel and "mlp" in sub and sub[-2] == "down_proj":
        rule = (MODEL, None)
    else:
        rule = (None,) * (len(shape) - stacked)
    return _fit(((None,) if stacked else ()) + rule, shape, mesh)


def param_specs(config: Config, mesh: Mesh | jax.sharding.AbstractMesh) -> Params:
    """`PartitionSpec` of every parameter: a pytree with the structure of `param_shapes(config)`."""
    _check_mesh(mesh)
    if config.projection_layout != "separate" or config.block_layout != "stacked":
        # A fused kernel's columns are q|k|v (gate|up): splitting them over `model` would not split heads.
        raise ValueError("sharding takes the separate projections and stacked blocks (diffjax.layout."
                         "unfuse_projections / stack_blocks first): config.projection_layout is "
                         f"{config.projection_layout!r}, config.block_layout {config.block_layout!r}")
    return jax.tree_util.tree_map_with_path(
        lambda path, s: _leaf_spec(tuple(k.key for k in path), s.shape, config, mesh), _param_shapes(config)
    )


@functools.lru_cache(maxsize=8)
def _param_shapes(config: Config) -> Params:
    # Tracing the model's init costs about a second; loading and sharding ask for the same config repeatedly.
    return param_shapes(config)


def param_shardings(config: Config, mesh: Mesh) -> Params:
    """`NamedSharding` of every parameter (`param_specs` on `mesh`)."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(config, mesh))


def shard_params(params: Params, config: Config, mesh: Mesh) -> Params:
    """`params` placed on `mesh` by the partition rules (each device receives only its shards)."""
    return jax.device_put(params, param_shardings(config, mesh))


def param_bytes_per_device(config: Config, mesh: Mesh | jax.sharding.AbstractMesh, dtype: Any = jnp.bfloat16) -> int:
    """Bytes of parameters one device holds under the partition rules (no allocation); weights in `dtype`
    except fp8 experts (`param_shapes`)."""
    shapes, specs = param_shapes(config, dtype), param_specs(config, mesh)
    total = 0
    for shape, spec in zip(jax.tree.leaves(shapes), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)),
                           strict=True):
        per_device = [dim // math.prod(mesh.shape[a] for a in _names(entry)) for dim, entry in
                      zip(shape.shape, tuple(spec) + (None,) * (len(shape.shape) - len(spec)), strict=True)]
        total += math.prod(per_device) * jnp.dtype(shape.dtype).itemsize
    return total


def cache_specs(config: Config, mesh: Mesh) -> KVCache:
    """`PartitionSpec`s of a `KVCache`: batch over `data`, kv heads over `model` where they divide."""
    _check_mesh(mesh)
    kv = {
        f"layer_{j}": P(None, DATA, None, _kv_axis(config, layer_type, mesh), None)
        for j, layer_type in enumerate(config.block_layer_types)
    }
    return KVCache(keys=kv, values=dict(kv), mask=P(DATA, None), length=P())


def shard_cache(cache: KVCache, config: Config, mesh: Mesh) -> KVCache:
    """`cache` placed on `mesh` (`cache_specs`); its batch must divide by the `data` axis (else ValueError: a
    batch the axis does not divide would be replicated on every device, silently)."""
    _check_mesh(mesh)
    if cache.batch_size % mesh.shape[DATA]:
        raise ValueError(f"cache batch {cache.batch_size} is not divisible by the mesh's data axis ({mesh.shape[DATA]})")
    specs = cache_specs(config, mesh)
    return jax.tree.map(lambda x, spec: jax.device_put(x, NamedSharding(mesh, _fit(spec, x.shape, mesh))),
                        cache, specs, is_leaf=lambda x: isinstance(x, P))


def constrain(x: Array, spec: P) -> Array:
    """`x` held to `spec` (fitted to its shape) inside a jit under `jax.set_mesh` of a `make_mesh` mesh; `x`
    itself without one (one device, or a mesh of other axes or of non-Auto axes), so the model's code can pin a
    layout that XLA's propagation gets wrong and still run anywhere."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or tuple(mesh.axis_names) != AXES or any(t != AxisType.Auto for t in mesh.axis_types):
        return x
    return jax.lax.with_sharding_constraint(x, _fit(spec, x.shape, mesh))


def split_over_vocab(x: Array) -> Array:
    """`[rows, ..., vocab]` held split as the embedding is: rows over `data`, the vocabulary over the expert
    group (`constrain`)."""
    return constrain(x, P(DATA, *[None] * (x.ndim - 2), EXPERT_GROUP)) if x.ndim >= 2 else x


def rows_over_data(x: Array) -> Array:
    """`[rows, ..., features]` held split over `data` on its rows only, whole on every device of an expert
    group (`constrain`)."""
    return constrain(x, P(DATA, *[None] * (x.ndim - 1))) if x.ndim >= 2 else x


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Every array of `tree` (token ids, masks, a `train.Batch`, `NoiseDraws`) split over `data` on axis 0.

    Scalars are replicated; the leading axis must divide by the `data` axis size.
    """
    _check_mesh(mesh)

    def place(x: Any) -> Array:
        x = jnp.asarray(x)
        if x.ndim and x.shape[0] % mesh.shape[DATA]:
            raise ValueError(f"batch axis {x.shape[0]} is not divisible by the mesh's data axis ({mesh.shape[DATA]})")
        return jax.device_put(x, NamedSharding(mesh, P(DATA) if x.ndim else P()))

    return jax.tree.map(place, tree)


# ------------------------------------------------------------------------------- expert parallelism


def experts_expert_parallel(x: Array, weights: Array, expert_ids: Array, gate_up: Array, down: Array) -> Array:
    """`experts_grouped` with the experts split over the current mesh's expert group (`expert` x `model`).

    x `[tokens, hidden]`, weights/expert_ids `[tokens, k]`, gate_up `[experts, hidden, 2 * inter]`, down
    `[experts, inter, hidden]` (global shapes). Runs as a `jax.shard_map` over the mesh set by `jax.set_mesh`:
    every device routes 1/devices of the tokens, sends each (token, expert) pair to the member of its expert
    group owning that expert (all-to-all), runs its own experts on what it received (grouped matmuls), sends
    the weighted results back (all-to-all) and sums the k results per token. The tokens enter and leave split
    over the whole mesh (`data` major, so a batch split over `data` needs no exchange; padded to a multiple of
    the device count): no device ever holds all the tokens. No pair is dropped: each send buffer has room for
    all of a device's pairs, so the exchanged volume is G times the routed one (the price of exactness with a
    fixed-shape all-to-all).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or tuple(mesh.axis_names) != AXES:
        raise ValueError(
            "moe_implementation='expert_parallel' needs a (data, expert, model) mesh: run under "
            "`with jax.set_mesh(diffjax.sharding.make_mesh(...))`"
        )
    groups = mesh.shape[EXPERT] * mesh.shape[MODEL]
    num_experts = gate_up.shape[0]
    if num_experts % groups:
        raise ValueError(f"{num_experts} experts cannot be split evenly over an expert group of {groups} devices")
    if mesh.size == 1:
        return experts_grouped(x, weights, expert_ids, gate_up, down)
    tokens = x.shape[0]
    # Pad so the tokens split evenly over the devices; padding has weight 0 (and is sliced off the result).
    pad = -tokens % mesh.size
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
        expert_ids = jnp.pad(expert_ids, ((0, pad), (0, 0)))
    # A group of one holds every expert: "replicated" keeps the shard_map's replication check exact.
    experts_spec = P(EXPERT_GROUP, None, None) if groups > 1 else P()
    tokens_spec = P(AXES, None)
    dispatch = jax.shard_map(
        functools.partial(_dispatch, groups=groups), mesh=mesh,
        in_specs=(tokens_spec, tokens_spec, tokens_spec, experts_spec, experts_spec), out_specs=tokens_spec,
    )
    return dispatch(x, weights, expert_ids, gate_up, down)[:tokens]


def _dispatch(
    x: Array, weights: Array, expert_ids: Array, gate_up: Array, down: Array, *, groups: int
) -> Array:
    """One device's part of `experts_expert_parallel`: x `[tokens / devices, hidden]` (its share of the
    tokens), gate_up/down its `experts / groups` local experts."""
    if groups == 1:
        return experts_grouped(x, weights, expert_ids, gate_up, down)
    return _exchange(x, weights, expert_ids, gate_up, down, groups)


def _exchange(xs: Array, ws: Array, ids: Array, gate_up: Array, down: Array, groups: int) -> Array:
    """xs `[share, hidden]`, ws/ids `[share, k]` -> `[share, hidden]` through the expert group's all-to-alls."""
    local_experts, top_k, hidden = gate_up.shape[0], ids.shape[1], xs.shape[1]
    ws, ids = ws.reshape(-1), ids.reshape(-1)  # pairs: [share * k], token-major
    # send[d, p]: pair p if its expert lives on group member d; elsewhere weight 0 and no expert
    # (local id `local_experts`, which the grouped matmul skips).
    to_member = ids[None, :] // local_experts == jnp.arange(groups)[:, None]  # [groups, pairs]
    send_x = jnp.where(to_member[..., None], jnp.repeat(xs, top_k, axis=0)[None], 0)
    send_w = jnp.where(to_member, ws[None], 0)
    send_id = jnp.where(to_member, ids[None] % local_experts, local_experts)
    recv_x, recv_w, recv_id = (
        jax.lax.all_to_all(a, EXPERT_GROUP, 0, 0) for a in (send_x, send_w, send_id)
    )  # [groups (source), pairs, ...]
    ys = experts_grouped(
        recv_x.reshape(-1, hidden), recv_w.reshape(-1, 1), recv_id.reshape(-1, 1), gate_up, down
    ).reshape(groups, -1, hidden)
    back = jax.lax.all_to_all(ys, EXPERT_GROUP, 0, 0)  # [groups (owner), pairs, hidden], one owner per pair
    return jnp.sum(back, axis=0).reshape(-1, top_k, hidden).sum(axis=1)


__all__ = [
    "AXES", "DATA", "EXPERT", "EXPERT_GROUP", "MODEL", "cache_specs", "constrain", "experts_expert_parallel",
    "make_mesh", "param_bytes_per_device", "param_shardings", "param_specs", "rows_over_data", "shard_batch",
    "shard_cache", "shard_params", "split_over_vocab",
]
