"""The DiffusionGemma network: one set of weights used as a causal encoder and as a bidirectional decoder.

ids -> embeddings -> (self-conditioning, decoder only) -> scanned layer blocks -> final norm -> tied logits.

The encoder writes the K/V of new tokens (the prompt, later each finished canvas) into a `KVCache` of fixed
capacity; the decoder denoises a canvas reading that cache read-only. Functional surface: `init_params`,
`encode`, `denoise_logits` take the parameter pytree as an argument and are jit-compiled with the config
static.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.config import FULL, SLIDING, STACK_READING_MOE_IMPLEMENTATIONS, Config
from diffjax.layers import (
    MLP,
    Attention,
    Experts,
    RMSNorm,
    Router,
    Weight,
    feedforward_outputs,
    moe_inputs,
    rms_norm,
)
from diffjax.quantize import FP8, SCALE_LEAVES, storage_dtype
from diffjax.validation import first_few, padding_mask, require_int, token_ids

Array = jax.Array
Params = dict[str, Any]

ENCODE, DECODE = "encode", "decode"


# ------------------------------------------------------------------------------ cache


@flax.struct.dataclass
class KVCache:
    """Keys and values the encoder has written, per layer of the repeating block.

    keys/values: `"layer_{j}" -> [blocks, batch, slots, kv_heads, head_dim]`. Full layers hold `capacity`
    slots indexed by absolute position; sliding layers hold a ring of `min(sliding_window - 1, capacity)`
    slots (position p lives at slot p % ring), what transformers' sliding cache keeps.
    mask: `[batch, capacity]` True where the slot holds a real (non-padding) token.
    length: int32 scalar, slots written so far; the next token's position.
    """

    keys: dict[str, Array]
    values: dict[str, Array]
    mask: Array
    length: Array

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]


def ring_size(config: Config, capacity: int) -> int:
    """Slots of a sliding layer's cache ring: the window's past keys (the window counts the query itself),
    fewer when the cache holds fewer tokens."""
    return min(config.sliding_window - 1, capacity)


def init_cache(config: Config, batch_size: int, capacity: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty cache for `capacity` positions."""
    require_int("batch_size", batch_size, 1)
    require_int("capacity", capacity, 1)
    keys = {}
    for j, layer_type in enumerate(config.block_layer_types):
        att = config.attention(layer_type)
        slots = ring_size(config, capacity) if layer_type == SLIDING else capacity
        keys[f"layer_{j}"] = jnp.zeros((config.num_blocks, batch_size, slots, att.num_kv_heads, att.head_dim), dtype)
    return KVCache(
        keys=keys,
        values=dict(keys),
        mask=jnp.zeros((batch_size, capacity), bool),
        length=jnp.zeros((), jnp.int32),
    )


def ring_positions(length: Array, ring: int) -> Array:
    """`[ring]` absolute position held by each ring slot once `length` tokens are written (-1: empty)."""
    slots = jnp.arange(ring)
    return jnp.where(slots < length, slots + ring * ((length - 1 - slots) // ring), -1)


# ----------------------------------------------------------------------------- modules


def tied_logits(hidden: Array, embedding: Array, softcap: float | None) -> Array:
    """`softcap * tanh(hidden @ embedding^T / softcap)`: float32 `[..., vocab]` for hidden `[..., hidden]`."""
    from diffjax.sharding import rows_over_data, split_over_vocab  # sharding imports the model

    # On a mesh, the rows whole on every device of an expert group (split over `data` only), as the vocabulary
    # split of the embedding needs them: the MoE leaves its tokens split over every device, and from there XLA
    # made each device's logits for its own tokens and gathered them, [rows, vocab / group] floats a step
    # instead of [rows, hidden].
    hidden = rows_over_data(hidden)
    # float32 output even for bf16 weights: transformers rounds logits to bf16 first, which turns top-two
    # gaps below one bf16 ulp (~1% of the logit) into ties and flips the argmax; we keep the extra bits.
    logits = jnp.einsum("...h,vh->...v", hidden, embedding.astype(hidden.dtype), preferred_element_type=jnp.float32)
    # ... and the logits (and so their gradient) left split over the vocabulary: a training step's loss otherwise
    # took them split over rows, and their gradient was gathered whole to get back.
    logits = split_over_vocab(logits)
    return logits if softcap is None else softcap * jnp.tanh(logits / softcap)


class Embedder(nn.Module):
    """Token embedding, tied LM head and the soft embedding used by self-conditioning."""

    config: Config

    def setup(self) -> None:
        self.embedding = self.param(
            "embedding", nn.initializers.normal(0.02), (self.config.vocab_size, self.config.hidden_size)
        )

    def _scale(self, dtype: Any) -> Array:
        # transformers casts sqrt(hidden) to the weight dtype first: in bf16 sqrt(2816) becomes 53.0.
        return jnp.asarray(self.config.embed_scale, self.embedding.dtype).astype(dtype)

    def embed(self, ids: Array) -> Array:
        """`[batch, seq]` ids -> `[batch, seq, hidden]` scaled embeddings."""
        return jnp.take(self.embedding, ids, axis=0) * self._scale(self.embedding.dtype)

    def soft_embed(self, logits: Array) -> Array:
        """`softmax(logits) @ E * scale`: the expected embedding under `[batch, canvas, vocab]` logits."""
        from diffjax.sharding import split_over_vocab  # sharding imports the model

        # On a mesh, the probabilities split over the vocabulary as the embedding is: each device contracts
        # its own slice and the partial sums are reduced (in float32, rounded once as one device does). Given
        # split some other way (rows only, as `shard_batch` places them), XLA gathered the whole embedding
        # onto every device instead.
        probs = split_over_vocab(jax.nn.softmax(logits.astype(jnp.float32), axis=-1)).astype(self.embedding.dtype)
        soft = jnp.einsum("...v,vh->...h", probs, self.embedding, preferred_element_type=jnp.float32)
        return soft.astype(self.embedding.dtype) * self._scale(self.embedding.dtype)

    def logits(self, hidden: Array) -> Array:
        """Tied LM head with the final softcap, float32 `[batch, seq, vocab]`."""
        return tied_logits(hidden, self.embedding, self.config.final_logit_softcapping)


class SelfConditioning(nn.Module):
    """`post_norm(embeddings + down(gelu(gate(pre_norm(soft))) * up(pre_norm(soft))))`, post_norm unscaled."""

    config: Config

    @nn.compact
    def __call__(self, embeddings: Array, soft_embeddings: Array | None) -> Array:
        cfg = self.config
        # No logits yet (first step): pre_norm(0) = 0 and the MLP has no bias, so the signal is exactly zero.
        soft = jnp.zeros_like(embeddings) if soft_embeddings is None else soft_embeddings
        mlp = MLP(cfg.hidden_size, cfg.intermediate_size, fused=cfg.projection_layout == "fused", name="mlp")
        signal = mlp(RMSNorm(cfg.rms_norm_eps, name="pre_norm")(soft))
        return rms_norm(embeddings + signal, None, cfg.rms_norm_eps)


class Layer(nn.Module):
    """One pre-norm Gemma 4 layer: attention, then a dense MLP and a mixture of experts side by side."""

    config: Config
    layer_type: str
    mode: str

    @nn.compact
    def __call__(
        self, x: Array, positions: Array, context: tuple[Array, Array], mask: Array,
        stacked_experts: tuple[Mapping[str, Array], Array] | None = None, context_layer: Array | None = None,
        normed_input: Array | None = None, next_input_scale: Array | None = None,
    ) -> tuple[Array, Array | None, tuple[Array, Array]]:
        """-> (x, x normed for the next layer or None, this layer's new keys and values).

        `context_layer`: the context keys/values are every block's stacks and this is the block's index.
        `normed_input`: x already normed with this layer's input norm (by the layer before). `next_input_scale`
        (with the outputs kernel, `fused_layer_outputs`): the next layer's input norm scale, or the final
        norm's, which the kernel applies to its output too."""
        cfg = self.config
        input_scale = Weight("scale", (cfg.hidden_size,), name="input_layernorm")()
        if normed_input is None:  # else the layer before applied this norm (the outputs kernel)
            normed_input = rms_norm(x, input_scale, cfg.rms_norm_eps)
        attn_out, new_kv = Attention(cfg, self.layer_type, padding_only_mask=self.mode == DECODE, name="self_attn")(
            normed_input, positions, context[0], context[1], mask, context_layer
        )
        scales = [Weight("scale", (cfg.hidden_size,), name=name)() for name in (
            "post_attention_layernorm", "pre_feedforward_layernorm", "pre_feedforward_layernorm_2")]
        make_inputs = moe_inputs
        if cfg.norm_implementation == "pallas" and not self.is_initializing():
            from diffjax.kernels.norms import moe_inputs_pallas as make_inputs
        residual, dense_in, experts_in, router_in = make_inputs(attn_out, x, *scales, cfg.rms_norm_eps)

        mlp = MLP(cfg.hidden_size, cfg.intermediate_size, fused=cfg.projection_layout == "fused", name="mlp")
        weights, expert_ids = Router(cfg, name="router")(router_in.reshape(-1, cfg.hidden_size))
        experts = Experts(cfg, name="experts")
        token_rows = (-1, cfg.hidden_size)
        # The encoder and the decoder carry separate scalars (the encoder's is a buffer, not tied).
        encoder_scalar = self.param("encoder_layer_scalar", nn.initializers.ones, (1,))
        decoder_scalar = self.param("decoder_layer_scalar", nn.initializers.ones, (1,))
        scalar = encoder_scalar if self.mode == ENCODE else decoder_scalar
        output_scales = [Weight("scale", (cfg.hidden_size,), name=name)() for name in (
            "post_feedforward_layernorm_1", "post_feedforward_layernorm_2", "post_feedforward_layernorm")]
        if cfg.mlp_implementation == "pallas" and not self.is_initializing():
            # The MLP's weights go to the expert kernels as they lie: a scan's block slice would be a copy.
            weights_of_mlp = self.variables["params"]["mlp"] if stacked_experts is None else stacked_experts[0]["mlp"]
            mlp_inputs = (dense_in.reshape(token_rows), weights_of_mlp["gate_up_proj"]["kernel"],
                          weights_of_mlp["down_proj"]["kernel"])
            if fused_layer_outputs(cfg):  # the experts' rows summed by the outputs kernel itself
                from diffjax.kernels.norms import feedforward_outputs_pallas

                rows, dense = experts(experts_in.reshape(token_rows), weights, expert_ids, stacked_experts,
                                      mlp_inputs, sum_rows=False)
                out = feedforward_outputs_pallas(residual, dense.reshape(residual.shape), rows, cfg.top_k_experts,
                                                 *output_scales, scalar, cfg.rms_norm_eps, next_input_scale)
                x, normed_next = out if next_input_scale is not None else (out, None)
                return x, normed_next, new_kv
            moe, dense = experts(experts_in.reshape(token_rows), weights, expert_ids, stacked_experts, mlp_inputs)
        else:
            dense = mlp(dense_in)
            moe = experts(experts_in.reshape(token_rows), weights, expert_ids, stacked_experts)
        x = feedforward_outputs(residual, dense.reshape(residual.shape), moe.reshape(residual.shape), *output_scales,
                                scalar, cfg.rms_norm_eps)
        return x, None, new_kv


class Block(nn.Module):
    """The repeating pattern of layers (5 sliding + 1 full in the released model); scanned over blocks."""

    config: Config
    mode: str

    @nn.compact
    def __call__(
        self, stream: tuple[Array, Array | None], context: tuple[dict[str, Array], dict[str, Array]],
        positions: Array, masks: dict[str, Array], block_index: Array,
        expert_stacks: dict[str, Mapping[str, Array]] | None, context_stacked: bool = False,
        next_block_scale: Array | None = None,
    ) -> tuple[tuple[Array, Array | None], tuple[dict[str, Array], dict[str, Array]]]:
        """`stream`: the residual stream and, with the outputs kernel (`fused_layer_outputs`), the stream
        already normed for the block's first layer (else None); the same out, for the next block.
        `context_stacked`: `context` holds every block's keys and values (`[blocks, ...]` stacks), which the
        layers index with `block_index`, not this block's slices. `next_block_scale` (the outputs kernel): the
        input norm scale of the next block's first layer, or the final norm's."""
        x, normed = stream
        new_keys, new_values = {}, {}
        layer_types = self.config.block_layer_types
        for j, layer_type in enumerate(layer_types):
            name = f"layer_{j}"
            stacked = None if expert_stacks is None else (expert_stacks[name], block_index)
            next_scale = None
            if next_block_scale is not None:
                next_scale = (self.variables["params"][f"layer_{j + 1}"]["input_layernorm"]["scale"]
                              if j + 1 < len(layer_types) else next_block_scale)
            x, normed, (k, v) = Layer(self.config, layer_type, self.mode, name=name)(
                x, positions, (context[0][name], context[1][name]), masks[layer_type], stacked,
                block_index if context_stacked else None, normed, next_scale,
            )
            new_keys[name], new_values[name] = k, v
        return (x, normed), (new_keys, new_values)


class DiffusionGemma(nn.Module):
    """The shared network. `mode` picks the causal encoder or the bidirectional decoder."""

    config: Config

    @nn.compact
    def __call__(
        self, mode: str, ids: Array, cache: KVCache, attention_mask: Array | None = None,
        self_conditioning_logits: Array | None = None, self_conditioning_mask: Array | None = None,
        return_hidden: bool = False,
    ) -> Any:
        cfg = self.config
        embedder = Embedder(cfg, name="embedder")
        x = embedder.embed(ids)
        n = ids.shape[1]
        positions = cache.length + jnp.arange(n, dtype=jnp.int32)
        if mode == ENCODE:
            masks = _encoder_masks(cfg, cache, attention_mask, positions)
        else:
            soft = None
            if self_conditioning_logits is not None:
                soft = embedder.soft_embed(self_conditioning_logits)
                if self_conditioning_mask is not None:
                    soft = soft * self_conditioning_mask.astype(soft.dtype)[:, None, None]
            x = SelfConditioning(cfg, name="self_conditioning")(x, soft)
            masks = _decoder_masks(cfg, cache, n)

        # The decoder's Pallas attention reads each block's cached keys from the whole stacks in place, as the
        # Pallas experts read their weights: the scan's slice of a cache stack is a copy on a GPU (~1 GB per
        # batch-8 step at full size), unrolled or not.
        context_stacked = mode == DECODE and "pallas" in (
            cfg.global_attention_implementation, cfg.sliding_attention_implementation) and not self.is_initializing()
        if cfg.block_layout == "unstacked":
            (x, normed), new_kv = self._unstacked_blocks(x, cache, positions, masks, mode, context_stacked)
        else:
            (x, normed), new_kv = self._scanned_blocks(x, cache, positions, masks, mode, context_stacked)
        # With the outputs kernel the last layer applied the final norm (its parameter, made at init, stays).
        hidden = normed if normed is not None else RMSNorm(cfg.rms_norm_eps, name="final_norm")(x)
        if mode == ENCODE:
            return hidden, new_kv
        return hidden if return_hidden else embedder.logits(hidden)

    def _scanned_blocks(self, x: Array, cache: KVCache, positions: Array, masks: dict[str, Array], mode: str,
                        context_stacked: bool) -> tuple[tuple[Array, Array | None], Any]:
        """The blocks as one `nn.scan` over `[blocks, ...]` parameter stacks."""
        cfg = self.config
        expert_stacks = None
        if cfg.moe_implementation in STACK_READING_MOE_IMPLEMENTATIONS and not self.is_initializing():
            # The Pallas experts read each block's weights from the whole stack: the scan's per-block slice
            # of a stack feeding a custom call would be a 1.5 GB copy per layer and step at full size. The
            # fp8 scales ride along (same reason, smaller copies).
            expert_stacks = {
                name: dict(layer["experts"]) for name, layer in self.variables["params"]["blocks"].items()
            }
            if cfg.mlp_implementation == "pallas":  # the dense MLP runs in the expert kernels: its stacks too
                for name, layer in self.variables["params"]["blocks"].items():
                    expert_stacks[name]["mlp"] = layer["mlp"]
        normed = next_scales = None
        if fused_layer_outputs(cfg) and not self.is_initializing():
            # The outputs kernel norms for the next layer: each block's last layer hands over the next block's
            # first input norm, the last block's the final norm; the first block's is applied here.
            params = self.variables["params"]
            firsts = params["blocks"]["layer_0"]["input_layernorm"]["scale"]
            final = params["final_norm"]["scale"].astype(firsts.dtype)
            next_scales = jnp.concatenate([firsts[1:], final[None]])
            normed = rms_norm(x, firsts[0], cfg.rms_norm_eps)
        blocks = nn.scan(
            Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast if context_stacked else 0, nn.broadcast, nn.broadcast, 0, nn.broadcast,
                     nn.broadcast, 0),
            length=cfg.num_blocks,
            unroll=min(cfg.scan_unroll, cfg.num_blocks),
        )(cfg, mode, name="blocks")
        return blocks(
            (x, normed), (cache.keys, cache.values), positions, masks, jnp.arange(cfg.num_blocks, dtype=jnp.int32),
            expert_stacks, context_stacked, next_scales,
        )

    def _unstacked_blocks(self, x: Array, cache: KVCache, positions: Array, masks: dict[str, Array], mode: str,
                          context_stacked: bool) -> tuple[tuple[Array, Array | None], Any]:
        """The blocks one after another, each with parameters of its own (`block_{i}`, no `[blocks]` axis):
        `Config.block_layout="unstacked"`. The cache keeps its `[blocks, ...]` stacks; the new keys and values
        are stacked back in that layout."""
        cfg = self.config
        stream, next_scales = (x, None), [None] * cfg.num_blocks
        if fused_layer_outputs(cfg) and not self.is_initializing():  # as in `_scanned_blocks`, leaf by leaf
            params = self.variables["params"]
            scales = [params[f"block_{i}"]["layer_0"]["input_layernorm"]["scale"] for i in range(cfg.num_blocks)]
            next_scales = [*scales[1:], params["final_norm"]["scale"]]
            stream = (x, rms_norm(x, scales[0], cfg.rms_norm_eps))
        outputs = []
        for i in range(cfg.num_blocks):
            context = (cache.keys, cache.values)
            if not context_stacked:
                context = jax.tree.map(lambda stack, i=i: stack[i], context)
            stream, new_kv = Block(cfg, mode, name=f"block_{i}")(
                stream, context, positions, masks, jnp.int32(i), None, context_stacked, next_scales[i])
            outputs.append(new_kv)
        return stream, jax.tree.map(lambda *per_block: jnp.stack(per_block), *outputs)


def fused_layer_outputs(config: Config) -> bool:
    """Whether each layer's output is made by `kernels.norms.feedforward_outputs_pallas` (the Pallas norms with
    the MLP in the expert launches), which also norms it for the next layer (or as the final norm)."""
    return config.norm_implementation == "pallas" and config.mlp_implementation == "pallas"


def _encoder_masks(config: Config, cache: KVCache, attention_mask: Array, positions: Array) -> dict[str, Array]:
    """`[batch, new, context + new]` visibility for the causal encoder, per layer type."""
    n = positions.shape[0]
    query = positions[:, None]
    new_visible = attention_mask[:, None, :] & (positions[None, :] <= query)[None]
    full = jnp.concatenate([jnp.broadcast_to(cache.mask[:, None, :], (cache.batch_size, n, cache.capacity)),
                            new_visible], axis=-1)
    ring_pos = ring_positions(cache.length, ring_size(config, cache.capacity))
    ring_visible = _ring_valid(cache, ring_pos)[:, None, :] & (query - config.sliding_window < ring_pos)[None]
    new_in_window = (query - config.sliding_window < positions[None, :])[None]
    sliding = jnp.concatenate([ring_visible, new_visible & new_in_window], axis=-1)
    return {FULL: full, SLIDING: sliding}


def _decoder_masks(config: Config, cache: KVCache, canvas: int) -> dict[str, Array]:
    """`[batch, canvas, context + canvas]`: every canvas token sees all visible cache slots and the canvas.

    Sliding layers see the last `sliding_window - 1` cached positions whatever the query (the ring).
    """
    batch = cache.batch_size
    canvas_visible = jnp.ones((batch, canvas), bool)
    ring_valid = _ring_valid(cache, ring_positions(cache.length, ring_size(config, cache.capacity)))

    def rows(context_visible: Array) -> Array:
        row = jnp.concatenate([context_visible, canvas_visible], axis=-1)
        return jnp.broadcast_to(row[:, None, :], (batch, canvas, row.shape[-1]))

    return {FULL: rows(cache.mask), SLIDING: rows(ring_valid)}


def _ring_valid(cache: KVCache, ring_pos: Array) -> Array:
    return (ring_pos >= 0)[None, :] & jnp.take(cache.mask, jnp.maximum(ring_pos, 0), axis=1)


def _write_cache(config: Config, cache: KVCache, new_kv: tuple[dict, dict], attention_mask: Array) -> KVCache:
    n = attention_mask.shape[1]
    ring = ring_size(config, cache.capacity)
    kept = min(n, ring)  # a prompt longer than the ring only leaves its last `ring` tokens
    ring_slots = (cache.length + n - kept + jnp.arange(kept)) % ring

    def write(layer_type: str, old: Array, new: Array) -> Array:
        new = new.astype(old.dtype)
        if layer_type == SLIDING:
            return old.at[:, :, ring_slots].set(new[:, :, n - kept:])
        return jax.lax.dynamic_update_slice_in_dim(old, new, cache.length, axis=2)

    keys, values = {}, {}
    for j, layer_type in enumerate(config.block_layer_types):
        name = f"layer_{j}"
        keys[name] = write(layer_type, cache.keys[name], new_kv[0][name])
        values[name] = write(layer_type, cache.values[name], new_kv[1][name])
    mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, attention_mask, cache.length, axis=1)
    return KVCache(keys=keys, values=values, mask=mask, length=cache.length + n)


# ------------------------------------------------------------------------ functional API


def _flax_variables(config: Config, key: Array) -> Any:
    """flax's init: traces one decoder pass (with self-conditioning) to discover every parameter."""
    batch, canvas = 1, 2
    return DiffusionGemma(config).init(
        key, DECODE, jnp.zeros((batch, canvas), jnp.int32), init_cache(config, batch, 1),
        self_conditioning_logits=jnp.zeros((batch, canvas, config.vocab_size), jnp.float32),
    )


def param_shapes(config: Config, dtype: Any = jnp.bfloat16) -> Params:
    """The parameter pytree as `jax.ShapeDtypeStruct`s, without allocating: every leaf in `dtype`, except
    fp8 experts (`expert_quantization="fp8"`: float8_e4m3fn weights, float32 scales)."""
    shapes = jax.eval_shape(functools.partial(_flax_variables, config), jax.random.key(0))["params"]
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jax.ShapeDtypeStruct(s.shape, storage_dtype(config, _keys(path), dtype)), shapes
    )


def _keys(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def param_leaf_shapes(config: Config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Each parameter leaf's path (`("blocks", "layer_0", ...)`) and shape."""
    return dict(_param_leaf_shapes(config))


@functools.lru_cache(maxsize=16)
def _param_leaf_shapes(config: Config) -> dict[tuple[str, ...], tuple[int, ...]]:
    # Tracing the model's init takes about a second; checks and conversions ask once per call.
    flat, _ = jax.tree_util.tree_flatten_with_path(param_shapes(config, jnp.float32))
    return {_keys(path): tuple(s.shape) for path, s in flat}


def check_params(params: Params, config: Config) -> None:
    """Raise `ValueError` unless `params` has this config's leaves and shapes, each of a floating dtype: a
    mismatch would otherwise fail deep inside the trace (flax scope errors, a scan carry of another type)."""
    expected = _param_leaf_shapes(config)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    given = {_keys(path): leaf for path, leaf in flat}
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    problems = [f"missing {'/'.join(p)}" for p in missing] + [f"unexpected {'/'.join(p)}" for p in unexpected]
    for path in sorted(set(expected) & set(given)):
        shape, dtype = tuple(getattr(given[path], "shape", ())), getattr(given[path], "dtype", None)
        fixed = storage_dtype(config, path, None)  # fp8 experts and their scales
        if shape != expected[path]:
            problems.append(f"{'/'.join(path)} has shape {list(shape)}, expected {list(expected[path])}")
        elif dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            problems.append(f"{'/'.join(path)} is {dtype}, not a floating dtype")
        elif fixed is not None and dtype != fixed:
            problems.append(f"{'/'.join(path)} is {dtype}, expected {jnp.dtype(fixed)}")
    if problems:
        hint = ""
        if config.expert_quantization == "fp8" and any(p[-1] in SCALE_LEAVES for p in missing):
            hint = ": fp8 experts come from diffjax.quantize.quantize_model(config, params)"
        elif config.expert_quantization != "fp8" and any(p[-1] in SCALE_LEAVES for p in unexpected):
            hint = ": these are fp8 experts, for the config quantize_model returned (expert_quantization='fp8')"
        raise ValueError(f"params do not match this config: {first_few(problems, '; ')}{hint}")


_UNIT_PARAMS = ("scale", "per_expert_scale", "encoder_layer_scalar", "decoder_layer_scalar")


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def init_params(config: Config, key: Array, dtype: Any = jnp.float32) -> Params:
    """Random parameters made directly on the default device (no host copy), leaf by leaf from
    `param_shapes`: weights ~ N(0, 0.02) drawn in `dtype` (no float32 copy of a 5 GB expert tensor), norm
    scales and layer scalars 1; fp8 experts (`expert_quantization="fp8"`) as e4m3 N(0, 1) with scales 0.02."""
    paths_and_shapes, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(config, dtype))
    keys = jax.random.split(key, len(paths_and_shapes))
    leaves = [_init_leaf(_keys(path), shape, leaf_key, dtype)
              for (path, shape), leaf_key in zip(paths_and_shapes, keys, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _init_leaf(path: tuple[str, ...], shape: jax.ShapeDtypeStruct, key: Array, dtype: Any) -> Array:
    if path[-1] in _UNIT_PARAMS:
        return jnp.ones(shape.shape, dtype)
    if path[-1] in SCALE_LEAVES:
        return jnp.full(shape.shape, 0.02, shape.dtype)
    if shape.dtype == FP8:
        # N(0, 1) rounded to e4m3 times the 0.02 scale: the unquantized init's N(0, 0.02), drawn elementwise
        # (no amax pass over, nor a full-precision copy of, a 5 GB expert stack).
        return jax.random.normal(key, shape.shape, dtype).astype(FP8)
    return jax.random.normal(key, shape.shape, dtype) * jnp.asarray(0.02, dtype)


def count_params(config: Config) -> int:
    """Distinct weights (the two layer-scalar sets counted once, as transformers does)."""
    shapes = param_shapes(config.replace(expert_quantization="none"))  # fp8 scales are not weights
    total = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    return total - config.num_layers  # encoder_layer_scalar duplicates decoder_layer_scalar in size


def param_dtype(params: Params) -> Any:
    """The model's activation dtype: its embedding's (fp8 experts and float32 scales do not decide it)."""
    return params["embedder"]["embedding"].dtype


@functools.partial(jax.jit, static_argnames=("config",))
def _encode(
    params: Params, config: Config, input_ids: Array, attention_mask: Array, cache: KVCache
) -> tuple[KVCache, Array]:
    hidden, new_kv = DiffusionGemma(config).apply(
        {"params": params}, ENCODE, input_ids, cache, attention_mask=attention_mask
    )
    # The cache is written only after every layer has read it: left free, XLA on a GPU scheduled some writes
    # first and then copied each cache stack to keep the old values readable (0.24 GB per canvas at batch 1,
    # 1.9 GB at batch 8, in the full-size encoder compiled for an H200 with the cache donated).
    cache, hidden = jax.lax.optimization_barrier((cache, hidden))
    return _write_cache(config, cache, new_kv, attention_mask), hidden


@functools.partial(jax.jit, static_argnames=("config", "return_hidden"))
def _denoise_logits(
    params: Params, config: Config, cache: KVCache, canvas_ids: Array,
    self_conditioning_logits: Array | None, self_conditioning_mask: Array | None, return_hidden: bool = False,
) -> Array:
    """Float32 logits `[batch, canvas, vocab]`, or with `return_hidden` the final-norm hidden state
    `[batch, canvas, hidden]` (for a fused LM head, `diffjax.kernels.vocab`)."""
    return DiffusionGemma(config).apply(
        {"params": params}, DECODE, canvas_ids, cache,
        self_conditioning_logits=self_conditioning_logits, self_conditioning_mask=self_conditioning_mask,
        return_hidden=return_hidden,
    )


def prefill(
    params: Params, config: Config, input_ids: Array, attention_mask: Array, cache: KVCache, chunk_size: int
) -> KVCache:
    """`_encode` in chunks of `chunk_size` tokens, traceable (used inside `generate`'s jit).

    One pass over a long prompt materialises `[batch, heads, prompt, context]` attention scores (64 GB at 32K
    tokens); in chunks the peak is `chunk x context`. The first chunk takes the remainder so every other chunk
    has the same static shape (one compiled body, a `fori_loop` over it) and no padding shifts positions.
    """
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"the prefill chunk size (prefill_chunk_size) must be a positive integer, got {chunk_size!r}")
    length = input_ids.shape[1]
    first = length % chunk_size or chunk_size
    cache, _ = _encode(params, config, input_ids[:, :first], attention_mask[:, :first], cache)
    if first == length:
        return cache

    def next_chunk(i: Array, cache: KVCache) -> KVCache:
        start = first + i * chunk_size
        ids = jax.lax.dynamic_slice_in_dim(input_ids, start, chunk_size, axis=1)
        mask = jax.lax.dynamic_slice_in_dim(attention_mask, start, chunk_size, axis=1)
        return _encode(params, config, ids, mask, cache)[0]

    return jax.lax.fori_loop(0, (length - first) // chunk_size, next_chunk, cache)


def encode_with_hidden(
    params: Params, config: Config, input_ids: Array, attention_mask: Array | None = None,
    cache: KVCache | None = None, *, capacity: int | None = None,
) -> tuple[KVCache, Array]:
    """`encode` that also returns the encoder's final-normed hidden states `[batch, seq, hidden]`."""
    check_params(params, config)
    input_ids = token_ids("input_ids", input_ids, config.vocab_size)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
    batch, n = input_ids.shape
    if batch == 0 or n == 0:
        raise ValueError(f"input_ids must have at least one row and one token, got shape {input_ids.shape}")
    attention_mask = (jnp.ones((batch, n), bool) if attention_mask is None
                      else padding_mask("attention_mask", attention_mask, (batch, n)))
    if cache is None:
        cache = init_cache(config, batch, n if capacity is None else capacity, param_dtype(params))
    elif capacity is not None and capacity != cache.capacity:
        raise ValueError(f"capacity={capacity} given with a cache of capacity {cache.capacity}")
    if cache.batch_size != batch:
        raise ValueError(f"cache holds {cache.batch_size} rows but input_ids has {batch}")
    if not isinstance(cache.length, jax.core.Tracer):
        cached = int(cache.length)
        if cached + n > cache.capacity:
            raise ValueError(f"prompt too long: {cached} cached + {n} new tokens exceed the cache capacity "
                             f"{cache.capacity}")
        check_context(config, cached + n, f"{cached} cached + {n} new tokens")
    return _encode(params, config, input_ids, attention_mask, cache)


def encode(
    params: Params, config: Config, input_ids: Array, attention_mask: Array | None = None,
    cache: KVCache | None = None, *, capacity: int | None = None,
) -> KVCache:
    """Run the causal encoder over `input_ids [batch, seq]` and write their K/V into the cache.

    With `cache=None` a new cache of `capacity` slots (default: seq) is made; with a cache, the tokens are
    appended after `cache.length` (this is how a finished canvas joins the context). Positions are absolute
    slot indices; `attention_mask [batch, seq]` (1 = real token) masks left padding, it does not shift it.
    """
    return encode_with_hidden(params, config, input_ids, attention_mask, cache, capacity=capacity)[0]


def denoise_logits(
    params: Params, config: Config, cache: KVCache, canvas_ids: Array,
    self_conditioning_logits: Array | None = None, self_conditioning_mask: Array | None = None,
) -> Array:
    """One bidirectional decoder pass over `canvas_ids [batch, canvas]`, reading the cache read-only.

    `self_conditioning_logits [batch, canvas, vocab]` are the previous step's processed logits (None on the
    first step: a zero signal); `self_conditioning_mask [batch]` zeroes the signal per row (training).
    Returns float32 logits `[batch, canvas, vocab]`, softcapped.
    """
    check_params(params, config)
    canvas_ids = token_ids("canvas_ids", canvas_ids, config.vocab_size)
    if canvas_ids.ndim != 2 or canvas_ids.shape[0] != cache.batch_size:
        raise ValueError(
            f"canvas_ids must be [batch={cache.batch_size}, canvas], got shape {canvas_ids.shape}"
        )
    if not isinstance(cache.length, jax.core.Tracer):
        cached = int(cache.length)
        check_context(config, cached + canvas_ids.shape[1], f"{cached} cached tokens + a canvas of "
                      f"{canvas_ids.shape[1]}")
    expected = (*canvas_ids.shape, config.vocab_size)
    if self_conditioning_logits is not None and tuple(self_conditioning_logits.shape) != expected:
        raise ValueError(
            f"self_conditioning_logits must have shape {expected}, got {tuple(self_conditioning_logits.shape)}"
        )
    if self_conditioning_mask is not None and tuple(self_conditioning_mask.shape) != (canvas_ids.shape[0],):
        raise ValueError(f"self_conditioning_mask must be [batch], got {tuple(self_conditioning_mask.shape)}")
    return _denoise_logits(params, config, cache, canvas_ids, self_conditioning_logits, self_conditioning_mask)


def check_context(config: Config, positions: int, what: str) -> None:
    """Raise unless `positions` fit the model's context (RoPE was trained up to it; past it the cache's ring
    and positions would still run and give a plausible-looking wrong answer)."""
    if positions > config.max_position_embeddings:
        raise ValueError(f"{what} exceed the model's context ({config.max_position_embeddings} positions)")
