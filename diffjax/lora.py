"""LoRA: low-rank updates `W + (alpha / rank) * A @ B` of chosen linear kernels, as pure functions on pytrees.

The LoRA tree mirrors the parameter tree down to each targeted module, which holds `{"a", "b"}` instead of
`{"kernel"}`. The layer stack is scanned, so every leaf keeps the leading block axis:

    params["blocks"]["layer_0"]["self_attn"]["q_proj"]["kernel"]   [blocks, in, out]
    lora  ["blocks"]["layer_0"]["self_attn"]["q_proj"]["a"]        [blocks, in, rank]
    lora  ["blocks"]["layer_0"]["self_attn"]["q_proj"]["b"]        [blocks, rank, out]

Training merges the update into the frozen weights inside the jit-compiled step (`merge_lora`), so the
forward is the model's own and the gradient reaches only A and B; the merged kernels are transient.
Default targets are the published fine-tuning recipes': the attention q/k/v/o projections and the dense MLP
gate/up/down of every layer. Experts, router, norms, self-conditioning and the tied embedding/LM head stay
frozen. Full-attention layers have no v_proj (values come from k_proj), so `v_proj` adapts sliding layers only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
Params = dict[str, Any]

DEFAULT_TARGETS = (
    "self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
    "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj",
)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, scale alpha (the update is `alpha / r * A @ B`), and the targeted linear modules, each named by
    its path inside a layer (`"self_attn/q_proj"`, `"mlp/down_proj"`, ...)."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not self.targets:
            raise ValueError("LoRA needs at least one target module")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _targeted_kernels(params: Params, lora_config: LoraConfig) -> dict[tuple[str, ...], Array]:
    """{module path from the root: its kernel `[blocks, in, out]`} for every targeted module of every layer."""
    found: dict[tuple[str, ...], Array] = {}
    unmatched = set(lora_config.targets)
    if "blocks" not in params:
        raise ValueError("LoRA adapts stacked blocks (`blocks/layer_j/...`); these params have none: "
                         "diffjax.layout.stack_blocks first if they are unstacked")
    for layer_name, layer in params["blocks"].items():
        for target in lora_config.targets:
            node: Any = layer
            for part in target.split("/"):
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and "kernel" in node:
                found[("blocks", layer_name, *target.split("/"))] = node["kernel"]
                unmatched.discard(target)
    if unmatched:
        known = sorted(
            f"{group}/{name}" for layer in params["blocks"].values() for group in ("self_attn", "mlp")
            for name, node in layer.get(group, {}).items() if isinstance(node, dict) and "kernel" in node
        )
        raise ValueError(f"LoRA targets {sorted(unmatched)} match no linear layer; known: {sorted(set(known))}")
    return found


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def init_lora(params: Params, lora_config: LoraConfig, key: Array, dtype: Any = jnp.float32) -> Params:
    """A fresh LoRA tree: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's default), B = 0, so the model starts unchanged.

    LoRA weights are float32 by default whatever the base dtype: they are small and get optimiser updates.
    """
    kernels = _targeted_kernels(params, lora_config)
    keys = jax.random.split(key, len(kernels))
    lora: Params = {}
    for (path, kernel), leaf_key in zip(sorted(kernels.items()), keys, strict=True):
        blocks, fan_in, fan_out = kernel.shape
        bound = fan_in**-0.5
        a = jax.random.uniform(leaf_key, (blocks, fan_in, lora_config.rank), dtype, -bound, bound)
        _set(lora, path, {"a": a, "b": jnp.zeros((blocks, lora_config.rank, fan_out), dtype)})
    return lora


def merge_lora(params: Params, lora: Params, lora_config: LoraConfig) -> Params:
    """`params` with every LoRA-adapted kernel replaced by `W + scale * A @ B` (in W's dtype); other leaves are
    shared, not copied. Use it in the training step, and once for export or inference."""
    kernels = _targeted_kernels(params, lora_config)
    adapted = {tuple(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(lora)[0]}
    expected = {(*path, ab) for path in kernels for ab in ("a", "b")}
    if adapted != expected:
        names = sorted("/".join(p) for p in adapted ^ expected)
        raise ValueError(f"LoRA tree does not match lora_config.targets on these params: {names}")
    merged = jax.tree.map(lambda x: x, params)  # new dicts, same leaves
    for path, kernel in kernels.items():
        node = lora
        for part in path:
            node = node[part]
        a, b = node["a"], node["b"]
        if a.shape != (*kernel.shape[:2], lora_config.rank) or b.shape != (kernel.shape[0], lora_config.rank,
                                                                           kernel.shape[2]):
            raise ValueError(f"LoRA {'/'.join(path)}: a {a.shape} and b {b.shape} do not fit kernel {kernel.shape} "
                             f"at rank {lora_config.rank}")
        delta = jnp.einsum("nir,nro->nio", a, b, preferred_element_type=jnp.float32) * lora_config.scale
        _set(merged, (*path, "kernel"), (kernel.astype(jnp.float32) + delta).astype(kernel.dtype))
    return merged


__all__ = ["DEFAULT_TARGETS", "LoraConfig", "init_lora", "merge_lora"]
