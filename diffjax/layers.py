"""Building blocks of the Gemma 4 MoE backbone: norms, rotary embeddings, attention, MLP, mixture of experts.

Every module computes in the dtype of its parameters (bf16 weights -> bf16 activations), with norms,
softmaxes and the router in float32, as transformers does.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.config import FULL, SLIDING, STACK_READING_MOE_IMPLEMENTATIONS, AttentionConfig, Config
from diffjax.quantize import FP8, SCALE_LEAVES, dequantize

Array = jax.Array

_init = nn.initializers.normal(stddev=0.02)


def _init_fp8(key: Array, shape: tuple[int, ...]) -> Array:
    return jax.random.normal(key, shape).astype(FP8)


def rms_norm(x: Array, scale: Array | None, eps: float) -> Array:
    """`x * (mean(x^2) + eps)^-0.5 * scale` in float32, cast back to x's dtype (scale used as is, not 1+w)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.pow(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps, -0.5)
    if scale is not None:
        normed = normed * scale.astype(jnp.float32)
    return normed.astype(x.dtype)


def gelu_tanh(x: Array) -> Array:
    """Gemma's activation (`gelu_pytorch_tanh`): GELU with the tanh approximation."""
    return jax.nn.gelu(x, approximate=True)


class RMSNorm(nn.Module):
    eps: float
    with_scale: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],)) if self.with_scale else None
        return rms_norm(x, scale, self.eps)


class Weight(nn.Module):
    """One parameter alone (`{module name}/{name}`), for code that applies it itself (a fused kernel) where a
    module (RMSNorm, Linear) would otherwise own it."""

    param_name: str
    shape: tuple[int, ...]
    initializer: Callable[..., Array] = nn.initializers.ones

    @nn.compact
    def __call__(self) -> Array:
        return self.param(self.param_name, self.initializer, self.shape)


class Linear(nn.Module):
    """Bias-free projection with a `[in, out]` kernel, plus a LoRA adapter's low-rank path where the params
    hold one (`lora_a` `[in, rank]`, `lora_b` `[rank, out]`: `diffjax.lora.attach_lora`, during training)."""

    features: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", _init, (x.shape[-1], self.features))
        out = x @ kernel.astype(x.dtype)
        if self.has_variable("params", "lora_a"):
            a, b = self.get_variable("params", "lora_a"), self.get_variable("params", "lora_b")
            out = out + (x @ a.astype(x.dtype)) @ b.astype(x.dtype)
        return out


# ----------------------------------------------------------------------------- rotary


def rope_inverse_frequencies(att: AttentionConfig) -> Array:
    """`[head_dim // 2]` inverse frequencies.

    Proportional RoPE (global layers) rotates only the first `int(factor * head_dim // 2)` pairs, with the
    exponent's denominator the FULL head_dim; the remaining pairs get frequency 0 (identity rotation).
    """
    half = att.head_dim // 2
    if att.rope_type == "proportional":
        rotated = int(att.partial_rotary_factor * att.head_dim // 2)
        exponents = jnp.arange(0, 2 * rotated, 2, dtype=jnp.float32) / att.head_dim
        inv = 1.0 / (att.rope_theta**exponents)
        inv = jnp.concatenate([inv, jnp.zeros((half - rotated,), jnp.float32)])
    else:
        inv = 1.0 / (att.rope_theta ** (jnp.arange(0, att.head_dim, 2, dtype=jnp.float32) / att.head_dim))
    return inv / att.rope_factor


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
    """Rotate `x [batch, seq, heads, head_dim]` at integer `positions [seq]` (rotate-half layout)."""
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([freqs, freqs], axis=-1)  # [seq, head_dim]
    # transformers rounds cos/sin to the activation dtype before use.
    cos = jnp.cos(angles).astype(x.dtype)[None, :, None, :]
    sin = jnp.sin(angles).astype(x.dtype)[None, :, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


def attention_inputs(
    sources: tuple[Array, Array, Array], offsets: tuple[int, int, int], heads: int, kv_heads: int,
    q_scale: Array, k_scale: Array, positions: Array, inv_freq: Array, eps: float,
) -> tuple[Array, Array, Array]:
    """Gemma 4's attention inputs from the raw projections: q and k RMS-normed with their scales, then rotated
    (RoPE after the norms); v RMS-normed without a scale.

    sources: the arrays `[batch, n, columns]` holding q, k and v (a fused `qkv_proj` output three times, or the
    three projections); offsets: the column where each starts; `heads` q heads and `kv_heads` k and v heads of
    `head_dim = len(q_scale)`. Returns q `[batch, n, heads, head_dim]`, k and v `[batch, n, kv_heads, head_dim]`.
    """
    head_dim = q_scale.shape[0]
    q, k, v = (source[..., offset:offset + count * head_dim].reshape(*source.shape[:2], count, head_dim)
               for source, offset, count in zip(sources, offsets, (heads, kv_heads, kv_heads), strict=True))
    q = apply_rope(rms_norm(q, q_scale, eps), positions, inv_freq)
    k = apply_rope(rms_norm(k, k_scale, eps), positions, inv_freq)
    return q, k, rms_norm(v, None, eps)


# -------------------------------------------------------------------------- attention


def attend(query: Array, keys: Array, values: Array, mask: Array) -> Array:
    """Grouped-query attention with scale 1.0 and a boolean mask.

    query `[batch, q, heads, hd]`, keys/values `[batch, k, kv_heads, hd]`, mask `[batch, q, k]`
    (True = visible). A query row with no visible key returns zeros (as torch SDPA does) rather than the NaN
    a `-inf` mask would give: left-padded rows must keep finite K/V in the cache.
    """
    batch, q_len, num_heads, head_dim = query.shape
    kv_heads = keys.shape[2]
    grouped = query.reshape(batch, q_len, kv_heads, num_heads // kv_heads, head_dim)
    # Scores and the weighted sum accumulate in float32 (as fused attention kernels do): with scale 1.0 the
    # scores reach tens, where a bf16 rounding step (0.06) would already move the softmax by several percent.
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", grouped, keys, preferred_element_type=jnp.float32)
    visible = mask[:, None, None, :, :]
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(jnp.any(visible, axis=-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, values.astype(jnp.float32))
    return out.reshape(batch, q_len, num_heads * head_dim).astype(values.dtype)


def attend_cudnn(query: Array, keys: Array, values: Array, mask: Array) -> Array:
    """`attend` through cuDNN's fused attention (NVIDIA GPUs, bf16/fp16, head_dim <= 256).

    Same shapes and maths as `attend` for masks where every query row sees at least one key (cuDNN leaves a
    fully masked row unspecified); softmax and the weighted sum accumulate in float32 inside the kernel.
    """
    if jax.default_backend() != "gpu":
        raise ValueError(
            f"sliding_attention_implementation='cudnn' needs an NVIDIA GPU backend, this one is "
            f"{jax.default_backend()!r}: use 'xla'"
        )
    if query.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"sliding_attention_implementation='cudnn' needs bf16 or fp16 activations (cuDNN has no float32 "
            f"attention), got {query.dtype}: use bf16 params or 'xla'"
        )
    batch, q_len, num_heads, head_dim = query.shape
    out = jax.nn.dot_product_attention(
        query, keys.astype(query.dtype), values.astype(query.dtype), mask=mask[:, None], scale=1.0,
        implementation="cudnn",
    )
    return out.reshape(batch, q_len, num_heads * head_dim)


def projection_widths(config: Config, layer_type: str) -> tuple[int, ...]:
    """Output widths of the q, k (and, on sliding layers, v) projections: the column blocks of a fused
    `qkv_proj` kernel, in that order. Full layers have no v_proj."""
    att = config.attention(layer_type)
    kv = att.num_kv_heads * att.head_dim
    return (config.num_heads * att.head_dim, kv, kv) if layer_type == SLIDING else (config.num_heads * att.head_dim, kv)


class Attention(nn.Module):
    """Gemma 4 attention: q/k/v RMSNorms, RoPE after the norms, scale 1.0, GQA.

    Global (full) layers have no v_proj: values are `v_norm(k_proj(x))`, the raw key projection. Under
    `config.projection_layout="fused"` q/k/v are one `qkv_proj` kernel (`projection_widths` columns each).
    """

    config: Config
    layer_type: str
    # True when every query row of `mask` is the same (the decoder: padding only), which lets the layer use
    # the kernel its `config.*_attention_implementation` field names (split-K Pallas or cuDNN).
    padding_only_mask: bool = False

    @nn.compact
    def __call__(
        self, x: Array, positions: Array, context_keys: Array, context_values: Array, mask: Array,
        context_layer: Array | None = None,
    ) -> tuple[Array, tuple[Array, Array]]:
        """Attend from `x [batch, n, hidden]` to `context ++ x`.

        context_keys/values `[batch, c, kv_heads, hd]` are already normed and rotated (a cache), or with
        `context_layer` (an int32 scalar) `[layers, batch, c, kv_heads, hd]` stacks of which that layer's are
        attended (read in place by the Pallas kernel, sliced for the others); mask `[batch, n, c + n]`.
        Returns the output `[batch, n, hidden]` and this call's new (keys, values).
        """
        cfg, att = self.config, self.config.attention(self.layer_type)
        configured = (cfg.global_attention_implementation if self.layer_type == FULL
                      else cfg.sliding_attention_implementation)
        # Flax's init traces the model in float32 on a few dummy tokens, under the kernels' minimum sizes. The
        # inputs kernel takes any mask; the attention kernels want a padding-only one (the decoder's).
        inputs_kernel = configured == "pallas" and not self.is_initializing()
        implementation = configured if self.padding_only_mask and not self.is_initializing() else "xla"
        widths = projection_widths(cfg, self.layer_type)
        if cfg.projection_layout == "fused":
            fused = Linear(sum(widths), name="qkv_proj")(x)
            sources, offsets = (fused,) * 3, tuple(itertools.accumulate(widths[:-1], initial=0))
        else:
            names = ("q_proj", "k_proj", "v_proj")[:len(widths)]
            sources = tuple(Linear(width, name=name)(x) for name, width in zip(names, widths, strict=True))
            offsets = (0, 0, 0)
        if len(widths) == 2:  # no v_proj: values are the raw keys
            sources, offsets = (*sources[:2], sources[1]), (*offsets[:2], offsets[1])
        scales = (Weight("scale", (att.head_dim,), name="q_norm")(), Weight("scale", (att.head_dim,), name="k_norm")())
        make_inputs = attention_inputs
        if inputs_kernel:  # (the kernels import this module)
            from diffjax.kernels.attention import attention_inputs_pallas as make_inputs
        q, k, v = make_inputs(sources, offsets, cfg.num_heads, att.num_kv_heads, *scales, positions,
                              rope_inverse_frequencies(att), cfg.rms_norm_eps)
        context_keys, context_values = context_keys.astype(k.dtype), context_values.astype(v.dtype)
        if context_layer is not None and implementation != "pallas":
            context_keys, context_values, context_layer = context_keys[context_layer], context_values[context_layer], None
        if implementation == "pallas":
            from diffjax.kernels.attention import global_attention_pallas

            tiles = cfg.kernel_tiles.kwargs("global_attention" if self.layer_type == FULL
                                            else "sliding_attention")
            # The canvas's own keys as a second source: no concatenation with the cache is written.
            out = global_attention_pallas(q, context_keys, context_values, mask[:, 0, :context_keys.shape[-3]], k, v,
                                          context_layer, **tiles)
        else:
            keys = jnp.concatenate([context_keys, k], axis=1)
            values = jnp.concatenate([context_values, v], axis=1)
            out = (attend_cudnn if implementation == "cudnn" else attend)(q, keys, values, mask)
        return Linear(cfg.hidden_size, name="o_proj")(out), (k, v)


# ------------------------------------------------------------------------ feed-forward


def moe_inputs(attention_out: Array, residual: Array, post_attention_scale: Array, dense_scale: Array,
               experts_scale: Array, eps: float) -> tuple[Array, Array, Array, Array]:
    """What a layer's feed-forward parts read, from its attention output `[..., hidden]`: the new residual
    `residual + norm(attention_out) * post_attention_scale`, and that residual normed for the dense MLP (times
    dense_scale), for the experts (times experts_scale) and for the router (unscaled)."""
    new_residual = residual + rms_norm(attention_out, post_attention_scale, eps)
    return (new_residual, rms_norm(new_residual, dense_scale, eps), rms_norm(new_residual, experts_scale, eps),
            rms_norm(new_residual, None, eps))


def feedforward_outputs(residual: Array, dense: Array, experts: Array, dense_scale: Array, experts_scale: Array,
                        output_scale: Array, layer_scalar: Array, eps: float) -> Array:
    """A layer's output from its feed-forward parts `[..., hidden]`: the dense MLP's and the experts' outputs
    each normed with its scale, their sum normed with `output_scale` and added to the residual, all times the
    layer scalar `[1]`."""
    mixed = rms_norm(dense, dense_scale, eps) + rms_norm(experts, experts_scale, eps)
    return (residual + rms_norm(mixed, output_scale, eps)) * layer_scalar.astype(residual.dtype)


class MLP(nn.Module):
    """Gated GELU-tanh MLP: `down(gelu(gate(x)) * up(x))`; `fused`: gate and up are one `gate_up_proj` kernel
    `[in, 2 * intermediate]` (gate first), `Config.projection_layout="fused"`."""

    hidden_size: int
    intermediate_size: int
    fused: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.fused:
            gate, up = jnp.split(Linear(2 * self.intermediate_size, name="gate_up_proj")(x), 2, axis=-1)
        else:
            gate = Linear(self.intermediate_size, name="gate_proj")(x)
            up = Linear(self.intermediate_size, name="up_proj")(x)
        return Linear(self.hidden_size, name="down_proj")(gelu_tanh(gate) * up)


class Router(nn.Module):
    """Top-k router on the residual stream: weights renormalised to 1, then scaled per expert."""

    config: Config

    @nn.compact
    def __call__(self, normed_residual: Array) -> tuple[Array, Array]:
        """`rms_norm(residual, None) [tokens, hidden]` (the layer norms the residual for all its feed-forward
        parts at once: `moe_inputs`) -> (weights `[tokens, k]`, expert ids `[tokens, k]` int32)."""
        cfg = self.config
        scale = self.param("scale", nn.initializers.ones, (cfg.hidden_size,))
        per_expert_scale = self.param("per_expert_scale", nn.initializers.ones, (cfg.num_experts,))
        proj = Weight("kernel", (cfg.hidden_size, cfg.num_experts), _init, name="proj")()
        if cfg.routing_implementation == "pallas" and not self.is_initializing():
            from diffjax.kernels.routing import route_pallas  # the kernels import this module

            return route_pallas(normed_residual, scale, proj, per_expert_scale, cfg.top_k_experts,
                                **cfg.kernel_tiles.kwargs("routing"))
        return route(normed_residual, scale, proj, per_expert_scale, cfg.top_k_experts)


def route(normed_residual: Array, scale: Array, proj: Array, per_expert_scale: Array, k: int
          ) -> tuple[Array, Array]:
    """The router: `router_scores`, then `top_k_routing`. normed_residual `[tokens, hidden]`, proj
    `[hidden, experts]`."""
    return top_k_routing(router_scores(normed_residual, scale, proj), per_expert_scale, k)


def router_scores(normed_residual: Array, scale: Array, proj: Array) -> Array:
    """`(normed_residual * scale * hidden**-0.5) @ proj` `[tokens, experts]`, in the activation dtype and rounded
    where transformers rounds: after each product."""
    dtype = normed_residual.dtype
    h = normed_residual * scale.astype(dtype)
    h = h * jnp.asarray(normed_residual.shape[-1] ** -0.5, dtype)
    return h @ proj.astype(dtype)


def top_k_routing(scores: Array, per_expert_scale: Array, k: int) -> tuple[Array, Array]:
    """scores `[tokens, experts]` -> (weights `[tokens, k]` float32, expert ids `[tokens, k]` int32): the k most
    probable experts (ties to the lower expert), their probabilities renormalised to 1, times their scale."""
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    weights, expert_ids = jax.lax.top_k(probs, k)
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights * per_expert_scale.astype(jnp.float32)[expert_ids], expert_ids


def experts_grouped(
    x: Array, weights: Array, expert_ids: Array, gate_up: Array, down: Array,
    ragged_dot: Callable[[Array, Array, Array], Array] = jax.lax.ragged_dot,
) -> Array:
    """Mixture of experts computing only the routed (token, expert) pairs.

    x `[tokens, hidden]`, weights/expert_ids `[tokens, k]`, gate_up `[experts, hidden, 2 * inter]` (gate first
    half, up second), down `[experts, inter, hidden]`. The tokens * k assignments are sorted by expert and
    run through two grouped matmuls (`ragged_dot(rows, weights, group_sizes)`, by default
    `jax.lax.ragged_dot`), then scattered back weighted.
    """
    ys, order = _grouped_assignments(x, weights, expert_ids, gate_up, down, ragged_dot)
    return jnp.zeros_like(x).at[order // expert_ids.shape[1]].add(ys)


def experts_grouped_rows(
    x: Array, weights: Array, expert_ids: Array, gate_up: Array, down: Array,
    ragged_dot: Callable[[Array, Array, Array], Array] = jax.lax.ragged_dot,
) -> Array:
    """`experts_grouped` before each token's sum: the weighted output of each assignment `token * k + j`,
    `[tokens * k, hidden]`."""
    ys, order = _grouped_assignments(x, weights, expert_ids, gate_up, down, ragged_dot)
    return jnp.zeros((order.shape[0], x.shape[1]), x.dtype).at[order].set(ys)


def _grouped_assignments(x: Array, weights: Array, expert_ids: Array, gate_up: Array, down: Array,
                         ragged_dot: Callable[[Array, Array, Array], Array]) -> tuple[Array, Array]:
    """The assignments' weighted outputs in expert order `[tokens * k, hidden]`, and that order (assignment
    indices)."""
    top_k = expert_ids.shape[1]
    num_experts = gate_up.shape[0]
    flat_experts = expert_ids.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    group_sizes = jnp.bincount(flat_experts, length=num_experts).astype(jnp.int32)
    xs = x[order // top_k]
    gate, up = jnp.split(ragged_dot(xs, gate_up.astype(x.dtype), group_sizes), 2, axis=-1)
    ys = ragged_dot(gelu_tanh(gate) * up, down.astype(x.dtype), group_sizes)
    return ys * weights.reshape(-1)[order][:, None].astype(ys.dtype), order


def experts_dense(
    x: Array, weights: Array, expert_ids: Array, gate_up: Array, down: Array
) -> Array:
    """Every expert on every token, unrouted pairs weighted zero: the plain oracle for `experts_grouped`."""
    num_experts = gate_up.shape[0]
    dense_weights = jnp.sum(
        jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32) * weights[..., None], axis=1
    )  # [tokens, experts]
    gate, up = jnp.split(jnp.einsum("th,ehi->eti", x, gate_up.astype(x.dtype)), 2, axis=-1)
    ys = jnp.einsum("eti,eih->eth", gelu_tanh(gate) * up, down.astype(x.dtype))
    return jnp.einsum("eth,te->th", ys, dense_weights.astype(ys.dtype))


class Experts(nn.Module):
    config: Config

    @nn.compact
    def __call__(
        self, x: Array, weights: Array, expert_ids: Array,
        stacked: tuple[Mapping[str, Array], Array] | None = None,
        mlp: tuple[Array, Array, Array] | None = None, sum_rows: bool = True,
    ) -> Array | tuple[Array, Array]:
        """`stacked` (the kernels of `STACK_READING_MOE_IMPLEMENTATIONS` only): this layer position's expert
        leaves as `[blocks, ...]` stacks by name, and the block index; the kernel reads them in place instead of
        this module's (sliced) params. `mlp` (`Config.mlp_implementation="pallas"`): the layer's dense MLP, its
        input and fused weights (`[blocks, ...]` stacks with `stacked`), run by the expert kernels; returns
        (experts, mlp) then. `sum_rows=False` (the Pallas kernel): the experts' rows unsummed
        (`experts_pallas`)."""
        cfg = self.config
        # fp8: flax's own init (tracing the model for `param_shapes`) must see e4m3 weights too.
        init = _init if cfg.expert_quantization == "none" else _init_fp8
        gate_up_shape = (cfg.num_experts, cfg.hidden_size, 2 * cfg.moe_intermediate_size)
        down_shape = (cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size)
        pretiled = cfg.expert_layout == "pretiled"
        if pretiled:
            from diffjax.kernels.moe import pretiled_shapes  # the kernels import this module

            gate_up_shape, down_shape = pretiled_shapes(gate_up_shape, down_shape)
        gate_up = self.param("gate_up_proj", init, gate_up_shape)
        down = self.param("down_proj", init, down_shape)
        leaves = {"gate_up_proj": gate_up, "down_proj": down}
        if cfg.expert_quantization == "fp8":
            self._check_fp8(gate_up, down)
            leaves["gate_up_proj_scale"] = self.param(
                "gate_up_proj_scale", nn.initializers.ones, (cfg.num_experts, 2 * cfg.moe_intermediate_size)
            )
            leaves["down_proj_scale"] = self.param("down_proj_scale", nn.initializers.ones,
                                                   (cfg.num_experts, cfg.hidden_size))
        elif gate_up.dtype == FP8 or down.dtype == FP8:
            raise ValueError(
                "the expert weights are float8_e4m3fn but config.expert_quantization is 'none': use "
                "config.replace(expert_quantization='fp8') with params from diffjax.quantize.quantize_experts"
            )
        # Flax's init (float32, shapes only) takes the twin below: wgmma does not take float32.
        if cfg.moe_implementation in STACK_READING_MOE_IMPLEMENTATIONS and not self.is_initializing():
            # The kernels import this module.
            if cfg.moe_implementation == "pallas_mgpu":
                from diffjax.kernels.moe_mgpu import experts_mgpu

                kernel = functools.partial(experts_mgpu, **cfg.kernel_tiles.kwargs("experts_mgpu"))
            else:
                from diffjax.kernels.moe import experts_pallas

                # (Config allows the MLP, and so the unsummed rows, with this kernel only)
                kernel = functools.partial(experts_pallas, routing=cfg.routing_implementation, mlp=mlp,
                                           sum_rows=sum_rows, **cfg.kernel_tiles.kwargs("experts"))
            stacks, layer = stacked if stacked is not None else (leaves, None)
            return kernel(x, weights, expert_ids, stacks["gate_up_proj"], stacks["down_proj"], layer,
                          gate_up_scale=stacks.get("gate_up_proj_scale"), down_scale=stacks.get("down_proj_scale"),
                          pretiled=pretiled)
        if pretiled:
            from diffjax.kernels.moe import untile_experts

            gate_up, down = untile_experts(gate_up, down)
        if cfg.expert_quantization == "fp8":
            # The plain-JAX forms (the kernel's oracles) run on weights dequantized to the activation dtype.
            gate_up = dequantize(gate_up, leaves["gate_up_proj_scale"], x.dtype)
            down = dequantize(down, leaves["down_proj_scale"], x.dtype)
        if cfg.moe_implementation == "expert_parallel":
            from diffjax.sharding import experts_expert_parallel  # sharding imports the model

            return experts_expert_parallel(x, weights, expert_ids, gate_up, down)
        compute = experts_dense if cfg.moe_implementation == "dense" else experts_grouped
        return compute(x, weights, expert_ids, gate_up, down)

    def _check_fp8(self, gate_up: Array, down: Array) -> None:
        if self.is_initializing():
            return
        if gate_up.dtype != FP8 or down.dtype != FP8:
            raise ValueError(
                f"config.expert_quantization='fp8' needs float8_e4m3fn expert weights, got gate_up_proj "
                f"{gate_up.dtype} and down_proj {down.dtype}: quantize them with diffjax.quantize.quantize_experts"
            )
        missing = [name for name in SCALE_LEAVES if not self.has_variable("params", name)]
        if missing:
            raise ValueError(f"fp8 expert weights without their scales: {', '.join(missing)} missing in {'/'.join(self.path)}")
