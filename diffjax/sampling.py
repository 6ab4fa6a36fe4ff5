"""Pure, jit-able pieces of the DiffusionGemma denoising loop.

"Samplers are values, not code paths": every component below is a frozen dataclass registered as a JAX
pytree. Numeric hyper-parameters (temperatures, entropy bound, thresholds) are pytree *leaves*, so a
jitted loop that takes the component as an argument does not recompile when they change. Structural
choices (a top-k's ``k``, the stability window length, string options) are static pytree metadata:
changing them changes the shapes or the program, so they do recompile.

The generation loop drives the components through a few small protocols::

    state = sampler.init(canvas)                   # once per canvas
    stop_state = stopping.init(canvas)
    for n in N..1:                                 # n = remaining steps, as in transformers
        temperature = schedule(n, N)
        processed = logits_filter(scale_logits(logits, temperature))
        canvas, accepted, state = sampler(processed, canvas, state, key)
        stopped, stop_state = stopping(argmax(processed), processed, stop_state)

Samplers and stopping rules that only need per-position statistics (entropy, one draw, the argmax and
their log-probabilities) also implement ``from_statistics``; the loop can then feed them a
:class:`TokenStatistics` computed in one pass over the vocabulary (``generate(statistics="pallas")``, see
``diffjax.kernels.vocab``) instead of float32 ``[batch, canvas, vocab]`` logits.

The reference behaviour is Hugging Face ``transformers==5.23.0``
(``models/diffusion_gemma/generation_diffusion_gemma.py``): :class:`LinearTemperature`,
:class:`EntropyBoundSampler` and :class:`StableAndConfidentStopping` reproduce it; the other samplers
are named options taken from other public implementations (diffusers, Fast-dLLM, Google's JAX sampler,
vLLM).

Shapes: ``[batch, canvas]`` token ids are int32, logits are float32 ``[batch, canvas, vocab]``.

Floating point notes (why some helpers look odd):

* XLA rewrites ``x / broadcast(t)`` into ``x * broadcast(1 / t)``, which is up to one ulp away from the
  IEEE quotient torch computes; :func:`scale_logits` divides exactly.
* XLA (CPU at least) contracts ``a + b * c`` into a fused multiply-add, which rounds differently from
  torch's separate multiply and add; :func:`_rounded` forces the product to be rounded first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from diffjax.validation import require_int

__all__ = [
    "MASK_VALUE",
    "BlockRefinementSampler",
    "ConfidenceThresholdSampler",
    "ConstantTemperature",
    "DDIMSampler",
    "EntropyBoundSampler",
    "ExponentialRaceSampling",
    "FilterChain",
    "GreedySampling",
    "GumbelMaxSampling",
    "IdentityFilter",
    "LinearTemperature",
    "LogitsFilter",
    "NeverStop",
    "NoiseProportionTemperature",
    "Sampler",
    "SamplerState",
    "StableAndConfidentStopping",
    "StopState",
    "StoppingRule",
    "TemperatureSchedule",
    "TokenSampling",
    "TokenStatistics",
    "TopKFilter",
    "TopPFilter",
    "block_refinement_update",
    "confidence_threshold_update",
    "ddim_corrector_log_probs",
    "ddim_predictor_update",
    "ddim_route_probs",
    "entropy_bound_mask",
    "entropy_bound_update",
    "exponential_race",
    "gumbel_noise",
    "sampled_token_probs",
    "scale_logits",
    "token_entropy",
    "token_statistics",
]

# Filtered-out logits are set to this finite value rather than -inf: softmax still gives them exactly zero
# probability, but entropies, `p * log p` and the self-conditioning product stay NaN-free, and the value
# survives a cast to bfloat16 (float32's own minimum would overflow to -inf there).
MASK_VALUE = -1e30

_CORRECTOR_SELECTIONS = ("lowest_log_margin", "lowest_maxprob", "lowest_current_prob", "random")


# --------------------------------------------------------------------------------------------------
# Protocols
# --------------------------------------------------------------------------------------------------


@runtime_checkable
class TemperatureSchedule(Protocol):
    """Maps (remaining steps n, total steps N) to a float32 temperature scalar; n runs N..1."""

    def __call__(self, remaining_steps: jax.Array | int, num_steps: jax.Array | int) -> jax.Array: ...


@runtime_checkable
class LogitsFilter(Protocol):
    """Per-call logits filtering applied after temperature: ``[..., vocab] -> [..., vocab]``."""

    def __call__(self, logits: jax.Array) -> jax.Array: ...


@runtime_checkable
class TokenSampling(Protocol):
    """Draws one token per position from ``logits [..., vocab]``; returns int32 ``[...]``.

    ``from_statistics(stats)`` returns the same kind of draw, ``(token_ids, log_probs)`` each ``[...]``, from
    a :class:`TokenStatistics` (the statistics path of the loop).
    """

    def __call__(self, key: jax.Array, logits: jax.Array) -> jax.Array: ...

    def from_statistics(self, stats: TokenStatistics) -> tuple[jax.Array, jax.Array]: ...


@runtime_checkable
class Sampler(Protocol):
    """Acceptance + renoising rule of one denoising step.

    ``init(canvas_ids [batch, canvas])`` returns the per-canvas state (any pytree);
    ``__call__(processed_logits [batch, canvas, vocab], canvas_ids [batch, canvas], state, key)`` returns
    ``(new_canvas_ids int32 [batch, canvas], accepted_mask bool [batch, canvas], new_state)``.

    Optional: ``from_statistics(stats, canvas_ids, state, key, vocab_size)`` makes the same step from a
    :class:`TokenStatistics` of ``softmax(processed)`` instead of the logits; samplers that need more of the
    distribution than that (e.g. :class:`DDIMSampler`) do not have it.
    """

    def init(self, canvas_ids: jax.Array) -> Any: ...

    def __call__(
        self, processed_logits: jax.Array, canvas_ids: jax.Array, state: Any, key: jax.Array
    ) -> tuple[jax.Array, jax.Array, Any]: ...


@runtime_checkable
class StoppingRule(Protocol):
    """Adaptive per-row stopping.

    ``(argmax_ids [batch, canvas], processed_logits [batch, canvas, vocab], state) -> (bool [batch], state)``.

    The rule reports the condition at this step; like transformers, the loop ORs it into its running
    ``finished`` flags (a stopped row stays stopped). Optional: ``from_statistics(argmax_ids, stats, state)``,
    the same rule on a :class:`TokenStatistics`.
    """

    def init(self, canvas_ids: jax.Array) -> Any: ...

    def __call__(
        self, argmax_ids: jax.Array, processed_logits: jax.Array, state: Any
    ) -> tuple[jax.Array, Any]: ...


# --------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------


def _concrete(value: Any) -> bool:
    # Pytree unflattening re-runs __post_init__ with tracers (under jit) or placeholder objects (inside
    # tree utilities); only real numbers (Python, NumPy, or a JAX scalar outside a trace) can be checked.
    if isinstance(value, jax.Array):
        return not isinstance(value, jax.core.Tracer) and value.shape == () and value.dtype != bool
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _require(name: str, value: Any, ok: Callable[[float], bool], requirement: str) -> None:
    # Infinity passes most range checks and then reads as a wrong answer, not an error (t_max=inf samples
    # uniformly; a large finite value says the same on purpose).
    if _concrete(value) and not (math.isfinite(float(value)) and ok(float(value))):
        raise ValueError(f"`{name}` must be finite and {requirement} (got {value!r})")


def _require_optional_vocab(value: Any) -> None:
    if value is not None:
        require_int("vocab_size", value, 1)


# --------------------------------------------------------------------------------------------------
# Small numeric helpers
# --------------------------------------------------------------------------------------------------


def _rounded(x: jax.Array) -> jax.Array:
    """Returns ``x`` unchanged, but stops XLA from contracting it into a following add (FMA).

    The select has a data-dependent predicate, so the simplifier cannot remove it and LLVM cannot fuse
    the multiply producing ``x`` with its consumer.
    """
    return jnp.where(jnp.isnan(x), jnp.asarray(jnp.nan, x.dtype), x)


def scale_logits(logits: jax.Array, temperature: jax.Array | float) -> jax.Array:
    """``logits / temperature`` with an IEEE division, as torch computes it.

    Args:
      logits: float ``[batch, canvas, vocab]`` (any shape).
      temperature: scalar (or broadcastable) temperature.

    XLA turns a division by a broadcast scalar into a multiplication by its reciprocal (up to one ulp
    off). Making the divisor depend on each element (NaN where ``logits`` is NaN, where the quotient is NaN
    anyway) keeps a true division; it fuses into one elementwise pass, so nothing is materialised.
    """
    logits = jnp.asarray(logits)
    temperature = jnp.asarray(temperature, logits.dtype)
    divisor = jnp.where(jnp.isnan(logits), jnp.asarray(jnp.nan, logits.dtype), temperature)
    return logits / divisor


def token_entropy(logits: jax.Array) -> jax.Array:
    """Entropy of ``softmax(logits)`` over the last axis, as ``torch.distributions.Categorical`` does.

    Args:
      logits: float32 ``[batch, canvas, vocab]``.

    Returns:
      float32 ``[batch, canvas]``. Follows torch's recipe (normalise by logsumexp, softmax of the normalised
      logits, clamp log-probs at the float minimum so ``0 * log 0`` is ``0``); agrees with torch to float32
      rounding, not bitwise (reduction order differs).
    """
    logits = jnp.asarray(logits, jnp.float32)
    log_probs = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    probs = jax.nn.softmax(log_probs, axis=-1)
    log_probs = jnp.maximum(log_probs, jnp.finfo(jnp.float32).min)
    return -jnp.sum(log_probs * probs, axis=-1)


def sampled_token_probs(logits: jax.Array, token_ids: jax.Array) -> jax.Array:
    """``softmax(logits)[..., token_ids]``: float32 ``[batch, canvas]`` for logits ``[batch, canvas, vocab]``.

    The "confidence" of a draw in diffusers' block refinement and in Fast-dLLM.
    """
    log_probs = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, token_ids[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.exp(picked)


class TokenStatistics(NamedTuple):
    """Per-position statistics of ``softmax(z)`` for processed logits ``z [..., vocab]``, each ``[...]``.

    What the statistics path of the loop hands to ``from_statistics``: enough for the entropy-bound,
    confidence and block-refinement samplers and the stopping rules, and small enough that the
    ``[..., vocab]`` logits never have to exist in float32 (``diffjax.kernels.vocab`` computes it in one
    pass over the vocabulary; :func:`token_statistics` is the plain-JAX twin).
    """

    logsumexp: jax.Array  # float32
    entropy: jax.Array  # float32, nats
    argmax: jax.Array  # int32, first index among ties
    argmax_logprob: jax.Array  # float32, z[argmax] - logsumexp
    sample: jax.Array  # int32, argmax(z + gumbel_noise(seed, row, token))
    sample_logprob: jax.Array  # float32, z[sample] - logsumexp


def _mix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def gumbel_noise(seed: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """Standard Gumbel noise, a pure function of (uint32 seed, row index, token index), broadcasting.

    Counter-based, so a kernel walking the vocabulary in tiles and a plain-JAX twin holding all logits draw
    the same noise. Within a row, distinct token ids get distinct 32-bit words (xor with the row's word and
    the finaliser are bijections); the first round decorrelates rows and seeds. The top 23 bits make a
    uniform in [2**-24, 1 - 2**-24] (so the noise is finite, within about [-2.8, 16.6]). 24 bits would not:
    float32 rounds 2**24 - 0.5 up to 2**24, u to 1 and the noise to +inf for one word in 2**24 (a few
    tokens per row of a 262144-token vocabulary, each then drawn whatever its probability).
    """
    x = _mix32(rows.astype(jnp.uint32) * jnp.uint32(0x9E3779B9) ^ seed)
    x = _mix32(x ^ cols.astype(jnp.uint32))
    u = ((x >> 9).astype(jnp.float32) + 0.5) * (1.0 / (1 << 23))
    return -jnp.log(-jnp.log(u))


def token_statistics(processed_logits: jax.Array, seed: jax.Array | int) -> TokenStatistics:
    """:class:`TokenStatistics` of float ``processed_logits [..., vocab]`` (rows numbered in C order).

    ``seed`` (uint32 scalar) picks the Gumbel noise of the draw; the same seed gives the same draw as
    ``diffjax.kernels.vocab.vocab_stats_pallas`` on the same logits.
    """
    z = jnp.asarray(processed_logits, jnp.float32)
    lse = jax.nn.logsumexp(z, axis=-1)
    rows = jnp.arange(z.size // z.shape[-1], dtype=jnp.uint32).reshape(z.shape[:-1])[..., None]
    cols = jnp.arange(z.shape[-1], dtype=jnp.uint32)
    seed = jnp.asarray(seed).astype(jnp.uint32).reshape(())
    sample = jnp.argmax(z + gumbel_noise(seed, rows, cols), axis=-1).astype(jnp.int32)
    argmax = jnp.argmax(z, axis=-1).astype(jnp.int32)

    log_probs = jax.nn.log_softmax(z, axis=-1)  # as `sampled_token_probs` rounds it

    def logprob(ids: jax.Array) -> jax.Array:
        return jnp.take_along_axis(log_probs, ids[..., None], axis=-1)[..., 0]

    return TokenStatistics(lse, token_entropy(z), argmax, logprob(argmax), sample, logprob(sample))


def exponential_race(probs: jax.Array, exp_noise: jax.Array) -> jax.Array:
    """``argmax(probs / exp_noise)``: a categorical draw given Exp(1) noise of the same shape.

    This is exactly what ``torch.multinomial(probs, 1)`` computes on its one-sample fast path (and what
    vLLM's sampler does), so feeding the same exponential draws reproduces torch's sample.

    Args:
      probs: float32 ``[..., vocab]``.
      exp_noise: float32 ``[..., vocab]``, i.i.d. Exp(1).

    Returns:
      int32 ``[...]``.
    """
    return jnp.argmax(probs / exp_noise, axis=-1).astype(jnp.int32)


def _uniform_tokens(key: jax.Array, shape: tuple[int, ...], vocab_size: int) -> jax.Array:
    return jax.random.randint(key, shape, 0, vocab_size, dtype=jnp.int32)


def _draw_and_noise(
    sampling: Any, vocab_size: int | None, processed_logits: jax.Array, canvas_shape: tuple[int, ...],
    key: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """One draw per position and a uniform renoise token per position: (sampled_ids, noise_ids)."""
    sample_key, noise_key = jax.random.split(key)
    sampled = sampling(sample_key, processed_logits)
    return sampled, _uniform_tokens(noise_key, canvas_shape, _vocab(vocab_size, processed_logits))


def _vocab(vocab_size: int | None, logits: jax.Array) -> int:
    return int(logits.shape[-1]) if vocab_size is None else int(vocab_size)


def _draw_and_noise_from_statistics(
    sampling: Any, vocab_size: int | None, stats: TokenStatistics, canvas_shape: tuple[int, ...],
    key: jax.Array, model_vocab_size: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The statistics path's `_draw_and_noise`: (sampled_ids, their probabilities, noise_ids).

    The noise comes from the same key split as `_draw_and_noise`'s, so both paths renoise identically.
    """
    sampled, log_probs = sampling.from_statistics(stats)
    _, noise_key = jax.random.split(key)
    noise = _uniform_tokens(noise_key, canvas_shape, model_vocab_size if vocab_size is None else int(vocab_size))
    return sampled, jnp.exp(log_probs), noise


# --------------------------------------------------------------------------------------------------
# Token draws
# --------------------------------------------------------------------------------------------------


@struct.dataclass
class GumbelMaxSampling:
    """Categorical draw by Gumbel-max, ``argmax(logits + Gumbel)`` (``jax.random.categorical``).

    The default draw; Google's JAX DiffusionGemma sampler uses ``jax.random.categorical`` too.
    """

    def __call__(self, key: jax.Array, logits: jax.Array) -> jax.Array:
        logits = jnp.asarray(logits, jnp.float32)
        perturbed = logits + jax.random.gumbel(key, logits.shape, jnp.float32)
        # The same draw as `jax.random.categorical` (argmax of the same perturbed logits, first index on
        # ties), written as max then min-index: XLA CPU runs argmax's (value, index) reduction ~3x slower.
        top = jnp.max(perturbed, axis=-1, keepdims=True)
        index = jax.lax.broadcasted_iota(jnp.int32, perturbed.shape, perturbed.ndim - 1)
        return jnp.min(jnp.where(perturbed == top, index, perturbed.shape[-1]), axis=-1)

    def from_statistics(self, stats: TokenStatistics) -> tuple[jax.Array, jax.Array]:
        return stats.sample, stats.sample_logprob


@struct.dataclass
class ExponentialRaceSampling:
    """Categorical draw as ``argmax(softmax(logits) / Exp(1))``.

    The exponential form of Gumbel-max used by ``torch.multinomial`` (one sample) -- hence by transformers'
    DiffusionGemma loop -- and by vLLM's sampler. Same distribution as :class:`GumbelMaxSampling`.
    """

    def __call__(self, key: jax.Array, logits: jax.Array) -> jax.Array:
        probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)
        # A float32 Exp(1) draw is exactly 0 with probability 2^-23 (tens of times per full-size step); 0/0
        # would be NaN, which argmax picks. Flooring at `tiny` keeps zero-probability tokens at exactly 0.
        noise = jnp.maximum(
            jax.random.exponential(key, probs.shape, jnp.float32), jnp.finfo(jnp.float32).tiny
        )
        return exponential_race(probs, noise)

    def from_statistics(self, stats: TokenStatistics) -> tuple[jax.Array, jax.Array]:
        # Same distribution as the Gumbel-max draw the statistics carry (not the same random stream).
        return stats.sample, stats.sample_logprob


@struct.dataclass
class GreedySampling:
    """``argmax(logits)``: temperature-zero decoding (Fast-dLLM's and diffusers' default)."""

    def __call__(self, key: jax.Array, logits: jax.Array) -> jax.Array:
        del key
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def from_statistics(self, stats: TokenStatistics) -> tuple[jax.Array, jax.Array]:
        return stats.argmax, stats.argmax_logprob


# --------------------------------------------------------------------------------------------------
# Temperature schedules
# --------------------------------------------------------------------------------------------------


@struct.dataclass
class LinearTemperature:
    """``T(n) = t_min + (t_max - t_min) * n / N`` with ``n`` the remaining steps (N..1).

    transformers' ``LinearTemperatureScheduleLogitsProcessor``. Bitwise equal to what its ``generate``
    computes: there ``cur_step`` is an int32 tensor, so ``n / N`` is a float32 division, ``t_max - t_min``
    is a Python (float64) difference rounded to float32, then one float32 multiply and one float32 add.
    ``_span`` holds that float64 difference, computed at construction (leave it unset). Calling the torch
    processor with a Python ``int`` step instead evaluates everything in float64 and rounds once; that
    differs from ``generate`` by up to one ulp.

    Attributes:
      t_min: final temperature (n -> 0); >= 0 as in transformers (T(n) > t_min for every n >= 1).
      t_max: initial temperature (n = N); must exceed ``t_min``.
    """

    t_min: float = 0.4
    t_max: float = 0.8
    _span: float | None = None

    def __post_init__(self) -> None:
        _require("t_min", self.t_min, lambda v: v >= 0.0, ">= 0")
        _require("t_max", self.t_max, lambda v: v > 0.0, "> 0")
        if _concrete(self.t_min) and _concrete(self.t_max):
            if not float(self.t_max) > float(self.t_min):
                raise ValueError(
                    f"`t_max` must be > `t_min` (got t_max={self.t_max!r}, t_min={self.t_min!r})"
                )
            # Recomputed whenever the ends are concrete, so `replace(t_max=...)` cannot leave it stale.
            object.__setattr__(self, "_span", float(self.t_max) - float(self.t_min))
        elif self._span is None:
            object.__setattr__(self, "_span", self.t_max - self.t_min)

    def __call__(self, remaining_steps: jax.Array | int, num_steps: jax.Array | int) -> jax.Array:
        n = jnp.asarray(remaining_steps).astype(jnp.float32)
        total = jnp.asarray(num_steps).astype(jnp.float32)
        span = jnp.asarray(self._span, jnp.float32)
        return jnp.asarray(self.t_min, jnp.float32) + _rounded(span * (n / total))


@struct.dataclass
class NoiseProportionTemperature:
    """Google's JAX sampler annealing (``AnnealingTemperatureShaper`` in google-deepmind/gemma).

    ``T = t_min + (1 - (1 - p) ** exponent) * (t_max - t_min)`` with the noise proportion ``p = n / N``
    of the current step (Google counts steps up, ``p = 1 - step / N``; with ``n = N - step`` remaining
    steps it is the same value). With ``exponent = 1`` this is :class:`LinearTemperature` up to float32
    rounding of the intermediate terms.

    Attributes:
      t_min: temperature as p -> 0 (> 0).
      t_max: temperature at p = 1 (>= t_min).
      exponent: curve shape (> 0); > 1 keeps the temperature high for longer.
    """

    t_min: float = 0.4
    t_max: float = 0.8
    exponent: float = 1.0

    def __post_init__(self) -> None:
        _require("t_min", self.t_min, lambda v: v > 0.0, "> 0")
        _require("t_max", self.t_max, lambda v: v > 0.0, "> 0")
        _require("exponent", self.exponent, lambda v: v > 0.0, "> 0")
        if _concrete(self.t_min) and _concrete(self.t_max) and float(self.t_max) < float(self.t_min):
            raise ValueError(f"`t_max` must be >= `t_min` (got t_max={self.t_max!r}, t_min={self.t_min!r})")

    def __call__(self, remaining_steps: jax.Array | int, num_steps: jax.Array | int) -> jax.Array:
        p = jnp.asarray(remaining_steps).astype(jnp.float32) / jnp.asarray(num_steps).astype(jnp.float32)
        fraction = 1.0 - (1.0 - p) ** jnp.asarray(self.exponent, jnp.float32)
        t_min = jnp.asarray(self.t_min, jnp.float32)
        return fraction * (jnp.asarray(self.t_max, jnp.float32) - t_min) + t_min


@struct.dataclass
class ConstantTemperature:
    """A fixed temperature (``1.0`` leaves the logits as they are)."""

    temperature: float = 1.0

    def __post_init__(self) -> None:
        _require("temperature", self.temperature, lambda v: v > 0.0, "> 0")

    def __call__(self, remaining_steps: jax.Array | int, num_steps: jax.Array | int) -> jax.Array:
        del remaining_steps, num_steps
        return jnp.asarray(self.temperature, jnp.float32)


# --------------------------------------------------------------------------------------------------
# Logits filters
# --------------------------------------------------------------------------------------------------


@struct.dataclass
class IdentityFilter:
    """No filtering."""

    def __call__(self, logits: jax.Array) -> jax.Array:
        return logits


@struct.dataclass
class TopKFilter:
    """Keeps the ``k`` largest logits per position; the rest become :data:`MASK_VALUE`.

    Like transformers' ``TopKLogitsWarper`` the cut is by value: every logit equal to the k-th largest is
    kept, so exact ties can keep more than ``k``. ``k`` is static (it is the shape of ``lax.top_k``);
    ``k >= vocab`` keeps everything.
    """

    k: int = struct.field(pytree_node=False, default=50)

    def __post_init__(self) -> None:
        require_int("k", self.k, 1)

    def __call__(self, logits: jax.Array) -> jax.Array:
        if self.k >= logits.shape[-1]:
            return logits
        kth = jax.lax.top_k(logits, self.k)[0][..., -1:]
        return jnp.where(logits >= kth, logits, jnp.asarray(MASK_VALUE, logits.dtype))


@struct.dataclass
class TopPFilter:
    """Nucleus filter: keeps the smallest set of largest-probability tokens whose mass reaches ``p``.

    Tokens sorted by probability (descending) are kept while the mass *before* them is below ``p``; the
    most likely token is always kept, and ties at the cut are kept (the cut is a logit value). The rest
    become :data:`MASK_VALUE`. ``p`` is a leaf: changing it does not recompile. ``p = 1`` keeps all.
    """

    p: float = 0.95

    def __post_init__(self) -> None:
        _require("p", self.p, lambda v: 0.0 < v <= 1.0, "in (0, 1]")

    def __call__(self, logits: jax.Array) -> jax.Array:
        sorted_logits = -jnp.sort(-logits, axis=-1)  # descending
        sorted_probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        top_p = jnp.asarray(self.p, jnp.float32)
        # p = 1 must keep everything, but a float32 running sum reaches 1.0 before the tail does.
        keep = (mass_before < top_p) | (top_p >= 1.0)
        keep = keep.at[..., 0].set(True)
        # The kept entries form a prefix of the sorted order; the last kept logit is the cut.
        cut = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(logits >= cut, logits, jnp.asarray(MASK_VALUE, logits.dtype))


@struct.dataclass
class FilterChain:
    """Applies ``filters`` left to right (e.g. top-k then top-p)."""

    filters: tuple[Any, ...] = ()

    def __call__(self, logits: jax.Array) -> jax.Array:
        for f in self.filters:
            logits = f(logits)
        return logits


# --------------------------------------------------------------------------------------------------
# Sampler state
# --------------------------------------------------------------------------------------------------


@struct.dataclass
class SamplerState:
    """Per-canvas sampler state.

    Attributes:
      step: int32 scalar, number of sampler calls made on this canvas (0 on the first call).
      committed: bool ``[batch, canvas]``; positions the sampler holds fixed (monotone samplers) or the last
        accepted mask (memoryless samplers, for inspection only).
    """

    step: jax.Array
    committed: jax.Array


def _initial_state(canvas_ids: jax.Array) -> SamplerState:
    return SamplerState(step=jnp.zeros((), jnp.int32), committed=jnp.zeros(canvas_ids.shape, jnp.bool_))


# --------------------------------------------------------------------------------------------------
# Entropy-bound sampler (transformers reference)
# --------------------------------------------------------------------------------------------------


def entropy_bound_mask(entropy: jax.Array, entropy_bound: jax.Array | float) -> jax.Array:
    """Entropy-bound acceptance mask (transformers' ``EntropyBoundSampler.accept_canvas``).

    Positions are sorted by entropy (ascending) and the k lowest are accepted while
    ``cumsum(H)_k - H_k <= entropy_bound`` -- computed as that float32 expression, not as an exclusive sum,
    to round like the reference. The first (lowest-entropy) position always passes since ``x - x = 0``.

    Ties: our sort is stable, so exactly equal entropies are taken in position order. torch's default
    ``sort`` is not stable (on CPU, for longer rows, tied elements come out in no particular order), so when
    the bound cuts through a group of exactly tied entropies the reference's choice among them is
    implementation-defined; everywhere else the masks agree.

    Rounding: torch's CPU ``cumsum`` accumulates float32 in float64, XLA's in float32, and the entropies
    themselves agree only to float32 rounding; a position can flip only if its ``cumsum - H`` lies within a
    few ulps of the bound.

    Args:
      entropy: float32 ``[batch, canvas]``.
      entropy_bound: scalar.

    Returns:
      bool ``[batch, canvas]``.
    """
    order = jnp.argsort(entropy, axis=-1, stable=True)
    sorted_entropy = jnp.take_along_axis(entropy, order, axis=-1)
    excess = jnp.cumsum(sorted_entropy, axis=-1) - sorted_entropy
    sorted_mask = excess <= jnp.asarray(entropy_bound, jnp.float32)
    ranks = jnp.argsort(order, axis=-1)  # inverse permutation: sorted slot of each position
    return jnp.take_along_axis(sorted_mask, ranks, axis=-1)


def entropy_bound_update(
    processed_logits: jax.Array,
    canvas_ids: jax.Array,
    sampled_ids: jax.Array,
    noise_ids: jax.Array,
    entropy_bound: jax.Array | float,
) -> tuple[jax.Array, jax.Array]:
    """Deterministic core of :class:`EntropyBoundSampler` given its random draws.

    Args:
      processed_logits: float32 ``[batch, canvas, vocab]`` (temperature-scaled, filtered).
      canvas_ids: int32 ``[batch, canvas]``, the current canvas.
      sampled_ids: int32 ``[batch, canvas]``, one draw from ``softmax(processed_logits)`` per position.
      noise_ids: int32 ``[batch, canvas]``, uniform tokens over the whole vocabulary.
      entropy_bound: scalar.

    Returns:
      ``(new_canvas_ids, accepted)``: accepted positions take the sample, every other position takes the
      noise token. (The reference first writes ``where(accepted, sample, current)`` and then renoises the
      non-accepted positions, so the current tokens never survive: a token accepted at one step is
      re-decided, and possibly renoised, at the next.)
    """
    accepted = entropy_bound_mask(token_entropy(processed_logits), entropy_bound)
    kept = jnp.where(accepted, sampled_ids, canvas_ids)
    return jnp.where(accepted, kept, noise_ids).astype(jnp.int32), accepted


@struct.dataclass
class EntropyBoundSampler:
    """transformers' ``EntropyBoundSampler`` (the EB-sampler of arXiv 2505.24857), default sampler.

    Each step: draw ``x ~ softmax(processed)`` per position; accept the lowest-entropy positions while
    ``sum_{i<=k} H_i - max_{i<=k} H_i <= entropy_bound``; accepted positions take their draw, all others are
    re-noised with fresh uniform tokens over the whole vocabulary. Memoryless: the state counts steps and
    records the last accepted mask, nothing feeds back.

    Attributes:
      entropy_bound: > 0; larger accepts more tokens per step.
      vocab_size: range of the renoise tokens; ``None`` uses the logits' last dimension (transformers uses
        ``text_config.vocab_size``, which is that dimension).
      sampling: how the draw is made; transformers uses ``torch.multinomial``, i.e.
        :class:`ExponentialRaceSampling` (same distribution as the default Gumbel-max).
    """

    entropy_bound: float = 0.1
    vocab_size: int | None = struct.field(pytree_node=False, default=None)
    sampling: TokenSampling = struct.field(default_factory=GumbelMaxSampling)

    def __post_init__(self) -> None:
        _require("entropy_bound", self.entropy_bound, lambda v: v > 0.0, "> 0")
        _require_optional_vocab(self.vocab_size)

    def init(self, canvas_ids: jax.Array) -> SamplerState:
        return _initial_state(canvas_ids)

    def __call__(
        self, processed_logits: jax.Array, canvas_ids: jax.Array, state: SamplerState, key: jax.Array
    ) -> tuple[jax.Array, jax.Array, SamplerState]:
        sampled, noise = _draw_and_noise(self.sampling, self.vocab_size, processed_logits, canvas_ids.shape, key)
        new_canvas, accepted = entropy_bound_update(
            processed_logits, canvas_ids, sampled, noise, self.entropy_bound
        )
        return new_canvas, accepted, SamplerState(step=state.step + 1, committed=accepted)

    def from_statistics(
        self, stats: TokenStatistics, canvas_ids: jax.Array, state: SamplerState, key: jax.Array,
        vocab_size: int,
    ) -> tuple[jax.Array, jax.Array, SamplerState]:
        sampled, _, noise = _draw_and_noise_from_statistics(
            self.sampling, self.vocab_size, stats, canvas_ids.shape, key, vocab_size
        )
        accepted = entropy_bound_mask(stats.entropy, self.entropy_bound)
        new_canvas = jnp.where(accepted, sampled, noise).astype(jnp.int32)
        return new_canvas, accepted, SamplerState(step=state.step + 1, committed=accepted)


class _ConfidenceSampler:
    """The shared step of the samplers that decide from each draw's probability (its "confidence"): draw,
    renoise, then the subclass's `_update(canvas_ids, sampled, confidence, noise, state)`. Needs the fields
    `sampling` and `vocab_size`."""

    def init(self, canvas_ids: jax.Array) -> SamplerState:
        return _initial_state(canvas_ids)

    def __call__(
        self, processed_logits: jax.Array, canvas_ids: jax.Array, state: SamplerState, key: jax.Array
    ) -> tuple[jax.Array, jax.Array, SamplerState]:
        sampled, noise = _draw_and_noise(self.sampling, self.vocab_size, processed_logits, canvas_ids.shape, key)
        return self._update(canvas_ids, sampled, sampled_token_probs(processed_logits, sampled), noise, state)

    def from_statistics(
        self, stats: TokenStatistics, canvas_ids: jax.Array, state: SamplerState, key: jax.Array,
        vocab_size: int,
    ) -> tuple[jax.Array, jax.Array, SamplerState]:
        sampled, confidence, noise = _draw_and_noise_from_statistics(
            self.sampling, self.vocab_size, stats, canvas_ids.shape, key, vocab_size
        )
        return self._update(canvas_ids, sampled, confidence, noise, state)


# --------------------------------------------------------------------------------------------------
# Block refinement (diffusers, uniform corruption mode)
# --------------------------------------------------------------------------------------------------


def block_refinement_update(
    canvas_ids: jax.Array,
    sampled_ids: jax.Array,
    confidence: jax.Array,
    committed: jax.Array,
    noise_ids: jax.Array,
    step: jax.Array | int,
    num_steps: jax.Array | int,
    confidence_threshold: jax.Array | float,
    editing_threshold: jax.Array | float | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Deterministic core of :class:`BlockRefinementSampler`.

    Args:
      canvas_ids, sampled_ids, noise_ids: int32 ``[batch, canvas]``.
      confidence: float32 ``[batch, canvas]``, probability of each sampled token.
      committed: bool ``[batch, canvas]`` before this step.
      step: 0-based step index; ``num_steps``: the schedule length N.
      confidence_threshold: uncommitted positions with confidence above it are committed too.
      editing_threshold: ``None`` disables editing; otherwise committed positions whose sample differs and
        whose confidence exceeds it are overwritten (they stay committed).

    Returns:
      ``(new_canvas_ids, changed, new_committed)`` where ``changed`` marks positions that took the sample
      this step (newly committed or edited). Uncommitted positions are re-noised with ``noise_ids``.
    """
    length = canvas_ids.shape[-1]
    steps_done = jnp.asarray(step, jnp.int32) + 1
    total = jnp.asarray(num_steps, jnp.int32)
    # Cumulative quota ceil((step + 1) * L / N): after the last step every position is committed.
    target = (steps_done * length + total - 1) // total
    needed = jnp.maximum(target - jnp.sum(committed, axis=-1, dtype=jnp.int32), 0)
    open_confidence = jnp.where(committed, -jnp.inf, confidence)
    order = jnp.argsort(open_confidence, axis=-1, descending=True, stable=True)
    ranks = jnp.argsort(order, axis=-1)
    transfer = ~committed & ((ranks < needed[:, None]) | (confidence > confidence_threshold))
    if editing_threshold is None:
        edit = jnp.zeros_like(transfer)
    else:
        edit = committed & (sampled_ids != canvas_ids) & (confidence > editing_threshold)
    changed = transfer | edit
    updated = jnp.where(changed, sampled_ids, canvas_ids)
    new_committed = committed | transfer
    return jnp.where(new_committed, updated, noise_ids).astype(jnp.int32), changed, new_committed


@struct.dataclass
class BlockRefinementSampler(_ConfidenceSampler):
    """diffusers' ``BlockRefinementScheduler`` in uniform-corruption mode (``mask_token_id=None``).

    The mode diffusers' ``DiffusionGemmaPipeline`` uses. Step ``i`` (0-based, counted by the state) draws
    a token per position, with confidence = its probability under ``softmax(processed)``; it commits the
    most confident not-yet-committed positions until ``ceil((i + 1) * L / N)`` are committed, plus every
    uncommitted position whose confidence exceeds ``confidence_threshold``. Commits are monotone: a
    committed token never changes unless ``allow_reediting`` (diffusers' editing: a committed position is
    overwritten when its new draw differs with confidence above ``editing_threshold``). Uncommitted
    positions are re-noised uniformly. Ties in confidence go to the lower position index.

    Differences from diffusers: the draw comes from the loop's processed logits (diffusers applies its own
    temperature/top-k/top-p, and at temperature 0 takes the argmax with temperature-1 probabilities; use
    :class:`GreedySampling` for that); the quota uses ``num_steps`` here, so set it to the loop's N.

    Attributes:
      num_steps: N, the number of denoising steps the quota is spread over (a leaf).
      confidence_threshold: in (0, 1]; diffusers' ``threshold`` (default 0.95). 1 disables early commits.
      allow_reediting: static; enables editing of committed tokens.
      editing_threshold: in (0, 1]; used only with ``allow_reediting``.
      vocab_size: renoise range, ``None`` = logits' last dimension.
      sampling: token draw.
    """

    num_steps: int = 48
    confidence_threshold: float = 0.95
    allow_reediting: bool = struct.field(pytree_node=False, default=False)
    editing_threshold: float = 0.9
    vocab_size: int | None = struct.field(pytree_node=False, default=None)
    sampling: TokenSampling = struct.field(default_factory=GumbelMaxSampling)

    def __post_init__(self) -> None:
        _require("num_steps", self.num_steps, lambda v: v >= 1 and float(v).is_integer(), "an integer >= 1")
        _require("confidence_threshold", self.confidence_threshold, lambda v: 0.0 < v <= 1.0, "in (0, 1]")
        _require("editing_threshold", self.editing_threshold, lambda v: 0.0 < v <= 1.0, "in (0, 1]")
        _require_optional_vocab(self.vocab_size)

    def _update(
        self, canvas_ids: jax.Array, sampled: jax.Array, confidence: jax.Array, noise: jax.Array,
        state: SamplerState,
    ) -> tuple[jax.Array, jax.Array, SamplerState]:
        new_canvas, changed, committed = block_refinement_update(
            canvas_ids,
            sampled,
            confidence,
            state.committed,
            noise,
            state.step,
            self.num_steps,
            self.confidence_threshold,
            self.editing_threshold if self.allow_reediting else None,
        )
        return new_canvas, changed, SamplerState(step=state.step + 1, committed=committed)


# --------------------------------------------------------------------------------------------------
# Confidence threshold (Fast-dLLM)
# --------------------------------------------------------------------------------------------------


def confidence_threshold_update(
    canvas_ids: jax.Array,
    sampled_ids: jax.Array,
    confidence: jax.Array,
    committed: jax.Array,
    noise_ids: jax.Array,
    threshold: jax.Array | float,
    monotone: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Deterministic core of :class:`ConfidenceThresholdSampler`.

    Among eligible positions (uncommitted ones if ``monotone``, else all), accepts every position with
    ``confidence >= threshold`` and always the single most confident one (lowest index on ties), as
    Fast-dLLM's ``get_transfer_index`` does.

    Returns:
      ``(new_canvas_ids, accepted, new_committed)``; positions not committed afterwards are re-noised.
    """
    eligible = ~committed if monotone else jnp.ones_like(committed)
    open_confidence = jnp.where(eligible, confidence, -jnp.inf)
    best = jnp.argmax(open_confidence, axis=-1)
    top1 = (jnp.arange(canvas_ids.shape[-1])[None, :] == best[:, None]) & jnp.any(
        eligible, axis=-1, keepdims=True
    )
    accepted = eligible & ((confidence >= threshold) | top1)
    updated = jnp.where(accepted, sampled_ids, canvas_ids)
    new_committed = committed | accepted if monotone else accepted
    return jnp.where(new_committed, updated, noise_ids).astype(jnp.int32), accepted, new_committed


@struct.dataclass
class ConfidenceThresholdSampler(_ConfidenceSampler):
    """Fast-dLLM's confidence-aware parallel decoding (arXiv 2505.22618), for uniform noise.

    Each step draws a token per position; its confidence is the draw's probability under
    ``softmax(processed)`` (with :class:`GreedySampling`, Fast-dLLM's default, that is the max probability).
    Every position with confidence ``>= threshold`` is accepted (Fast-dLLM drops selections with
    ``confidence < threshold``), and always at least the most confident one, so each step makes progress.
    Positions not accepted are re-noised uniformly (Fast-dLLM keeps them masked; there is no mask token
    here).

    Attributes:
      threshold: in (0, 1]; Fast-dLLM's default is 0.9.
      monotone: static. True (Fast-dLLM): accepted tokens stay fixed for the rest of the canvas and only
        uncommitted positions compete. False: memoryless like the entropy-bound sampler, every position is
        re-decided each step.
      vocab_size: renoise range, ``None`` = logits' last dimension.
      sampling: token draw.
    """

    threshold: float = 0.9
    monotone: bool = struct.field(pytree_node=False, default=True)
    vocab_size: int | None = struct.field(pytree_node=False, default=None)
    sampling: TokenSampling = struct.field(default_factory=GumbelMaxSampling)

    def __post_init__(self) -> None:
        _require("threshold", self.threshold, lambda v: 0.0 < v <= 1.0, "in (0, 1]")
        _require_optional_vocab(self.vocab_size)

    def _update(
        self, canvas_ids: jax.Array, sampled: jax.Array, confidence: jax.Array, noise: jax.Array,
        state: SamplerState,
    ) -> tuple[jax.Array, jax.Array, SamplerState]:
        new_canvas, accepted, committed = confidence_threshold_update(
            canvas_ids, sampled, confidence, state.committed, noise, self.threshold, self.monotone
        )
        return new_canvas, accepted, SamplerState(step=state.step + 1, committed=committed)


# --------------------------------------------------------------------------------------------------
# Discrete DDIM with predictor-corrector (diffusers' DiscreteDDIMScheduler)
# --------------------------------------------------------------------------------------------------


def ddim_route_probs(
    same: jax.Array, step_index: jax.Array | int, num_steps: jax.Array | int, vocab_size: int
) -> jax.Array:
    """Posterior route probabilities of one uniform-noise DDIM step from ``t`` to ``s``.

    With ``alpha_t = i / N``, ``alpha_s = (i + 1) / N``, ``a = alpha_t / alpha_s``, ``b = alpha_s`` and ``K``
    the vocabulary size, the unnormalised masses are (all multiplied by ``K``, which cancels):
    clean ``b (1 - a) + a b K [x_t = x0]``, stay ``a (1 - b)``, noise ``(1 - a)(1 - b)``.

    Args:
      same: bool ``[batch, canvas]``, ``x_t == x0``.
      step_index: ``i`` in ``[0, N - 1]`` (clamped there).

    Returns:
      float32 ``[batch, canvas, 3]`` (clean, stay, noise), rows summing to 1.
    """
    total = jnp.asarray(num_steps, jnp.float32)
    i = jnp.clip(jnp.asarray(step_index, jnp.float32), 0.0, total - 1.0)
    alpha_t = i / total
    alpha_s = (i + 1.0) / total
    a = alpha_t / alpha_s
    b = alpha_s
    same = same.astype(jnp.float32)
    clean = b * (1.0 - a) + a * b * float(vocab_size) * same
    stay = jnp.broadcast_to(a * (1.0 - b), same.shape)
    noise = jnp.broadcast_to((1.0 - a) * (1.0 - b), same.shape)
    masses = jnp.stack([clean, stay, noise], axis=-1)
    return masses / jnp.sum(masses, axis=-1, keepdims=True)


def ddim_predictor_update(
    canvas_ids: jax.Array,
    sampled_ids: jax.Array,
    route_uniform: jax.Array,
    noise_ids: jax.Array,
    step_index: jax.Array | int,
    num_steps: jax.Array | int,
    vocab_size: int,
) -> tuple[jax.Array, jax.Array]:
    """Deterministic core of the DDIM predictor step.

    Args:
      canvas_ids: ``x_t``, int32 ``[batch, canvas]``.
      sampled_ids: ``x0`` draws, int32 ``[batch, canvas]``.
      noise_ids: uniform tokens, int32 ``[batch, canvas]``.
      route_uniform: float32 ``[batch, canvas]`` in [0, 1), picks the route by inverse CDF.

    Returns:
      ``(x_s, took_x0)`` with ``took_x0`` the positions that went the clean route. On the last step
      (``i = N - 1``) every position takes ``x0``.
    """
    probs = ddim_route_probs(canvas_ids == sampled_ids, step_index, num_steps, vocab_size)
    clean = route_uniform < probs[..., 0]
    noise = ~clean & (route_uniform >= probs[..., 0] + probs[..., 1])
    out = jnp.where(clean, sampled_ids, canvas_ids)
    return jnp.where(noise, noise_ids, out).astype(jnp.int32), clean


def ddim_corrector_log_probs(logits: jax.Array, canvas_ids: jax.Array, alpha: jax.Array | float) -> jax.Array:
    """One-coordinate conditional ``log Cat(alpha * x0_loo + (1 - alpha) / K)`` of the LOO corrector.

    The leave-one-out denoiser (arXiv 2605.22765, eq. 13) subtracts ``log(1 + K alpha / (1 - alpha))`` from
    the observed token's logit; at ``alpha`` in {0, 1} the logits are used as they are.

    Args:
      logits: float32 ``[batch, canvas, vocab]`` computed on ``canvas_ids``.
      canvas_ids: int32 ``[batch, canvas]``.
      alpha: survival probability at the corrector's time.

    Returns:
      float32 ``[batch, canvas, vocab]`` normalised log-probabilities.
    """
    logits = jnp.asarray(logits, jnp.float32)
    vocab = logits.shape[-1]
    alpha = jnp.asarray(alpha, jnp.float32)
    interior = (alpha > 0.0) & (alpha < 1.0)
    safe = jnp.where(interior, alpha, 0.5)
    delta = jnp.where(interior, jnp.log1p(vocab * safe / (1.0 - safe)), 0.0)
    observed = jax.nn.one_hot(canvas_ids, vocab, dtype=jnp.bool_)
    loo_log_probs = jax.nn.log_softmax(jnp.where(observed, logits - delta, logits), axis=-1)
    log_uniform = jnp.log1p(-alpha) - math.log(vocab)
    return jnp.logaddexp(jnp.log(alpha) + loo_log_probs, log_uniform)


@struct.dataclass
class DDIMSampler:
    """Discrete DDIM for uniform noise with optional predictor-corrector, after diffusers'
    ``DiscreteDDIMScheduler`` (D3PM posterior; corrector from arXiv 2605.22765).

    Predictor (call ``i`` of the schedule, 0-based): draw ``x0``, then sample each position's route from the
    exact posterior ``q(x_s | x_t, x0)`` (:func:`ddim_route_probs`): take ``x0``, keep ``x_t``, or jump to a
    uniform token. The last predictor step takes ``x0`` everywhere.

    Corrector (``corrector_steps`` sweeps after each predictor step): form the one-coordinate conditional
    at ``alpha_s = (i + 1) / N`` (:func:`ddim_corrector_log_probs`), choose ``corrector_k`` positions by
    Gumbel-top-k on a "least confident" score divided by ``corrector_selection_tau``, and resample them.

    Interleaving: a corrector needs logits computed on the post-predictor canvas, i.e. a fresh forward pass,
    exactly as diffusers' pipeline recomputes them per sweep. So each sampler call does one sub-step and
    the state's step counter says which: call ``c`` is a predictor when ``c % (1 + corrector_steps) == 0``.
    Run the loop for :attr:`num_calls` steps.

    Simplifications vs diffusers: both sub-steps use the loop's processed (temperature-scaled, filtered)
    logits, while diffusers draws ``x0`` at its temperature but runs the corrector on raw logits; the
    corrector runs in float32 (diffusers uses float64); the route and selection draws use JAX's RNG.

    Attributes:
      num_steps: N predictor steps (a leaf).
      corrector_steps: static, sweeps per predictor step (0 = plain ancestral DDIM).
      corrector_k: static, positions resampled per sweep.
      corrector_selection: static, one of ``lowest_log_margin`` (default), ``lowest_maxprob``,
        ``lowest_current_prob``, ``random``.
      corrector_selection_tau: > 0, temperature of the Gumbel-top-k selection.
      vocab_size: renoise range, ``None`` = logits' last dimension.
      sampling: token draw (``x0`` and corrector resamples).
    """

    num_steps: int = 48
    corrector_steps: int = struct.field(pytree_node=False, default=0)
    corrector_k: int = struct.field(pytree_node=False, default=1)
    corrector_selection: str = struct.field(pytree_node=False, default="lowest_log_margin")
    corrector_selection_tau: float = 1.0
    vocab_size: int | None = struct.field(pytree_node=False, default=None)
    sampling: TokenSampling = struct.field(default_factory=GumbelMaxSampling)

    def __post_init__(self) -> None:
        _require("num_steps", self.num_steps, lambda v: v >= 1 and float(v).is_integer(), "an integer >= 1")
        require_int("corrector_steps", self.corrector_steps, 0)
        require_int("corrector_k", self.corrector_k, 1)
        if self.corrector_selection not in _CORRECTOR_SELECTIONS:
            raise ValueError(
                f"`corrector_selection` must be one of {_CORRECTOR_SELECTIONS} "
                f"(got {self.corrector_selection!r})"
            )
        _require("corrector_selection_tau", self.corrector_selection_tau, lambda v: v > 0.0, "> 0")
        _require_optional_vocab(self.vocab_size)

    @property
    def num_calls(self) -> int:
        """Loop steps needed for the full schedule: ``num_steps * (1 + corrector_steps)``."""
        return int(self.num_steps) * (1 + self.corrector_steps)

    def init(self, canvas_ids: jax.Array) -> SamplerState:
        return _initial_state(canvas_ids)

    def _predict(
        self, processed_logits: jax.Array, canvas_ids: jax.Array, index: jax.Array, key: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        sample_key, route_key, noise_key = jax.random.split(key, 3)
        sampled = self.sampling(sample_key, processed_logits)
        route_uniform = jax.random.uniform(route_key, canvas_ids.shape, jnp.float32)
        noise = _uniform_tokens(noise_key, canvas_ids.shape, _vocab(self.vocab_size, processed_logits))
        return ddim_predictor_update(
            canvas_ids, sampled, route_uniform, noise, index, self.num_steps, processed_logits.shape[-1]
        )

    def _correct(
        self, processed_logits: jax.Array, canvas_ids: jax.Array, index: jax.Array, key: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        select_key, sample_key = jax.random.split(key)
        total = jnp.asarray(self.num_steps, jnp.float32)
        alpha = jnp.minimum(jnp.asarray(index, jnp.float32) + 1.0, total) / total
        cond = ddim_corrector_log_probs(processed_logits, canvas_ids, alpha)
        batch, length = canvas_ids.shape
        k = min(self.corrector_k, length)
        if self.corrector_selection == "random":
            keys = jax.random.uniform(select_key, (batch, length), jnp.float32)
        else:
            current = jnp.take_along_axis(cond, canvas_ids[..., None], axis=-1)[..., 0]
            if self.corrector_selection == "lowest_maxprob":
                score = -jnp.max(cond, axis=-1)
            elif self.corrector_selection == "lowest_current_prob":
                score = -current
            else:  # lowest_log_margin: small margin of the current token over its best rival
                observed = jax.nn.one_hot(canvas_ids, cond.shape[-1], dtype=jnp.bool_)
                rival = jnp.max(jnp.where(observed, -jnp.inf, cond), axis=-1)
                score = rival - current
            gumbel = jax.random.gumbel(select_key, (batch, length), jnp.float32)
            keys = score / jnp.asarray(self.corrector_selection_tau, jnp.float32) + gumbel
        positions = jax.lax.top_k(keys, k)[1]  # [batch, k]
        chosen = jnp.take_along_axis(cond, positions[..., None], axis=1)  # [batch, k, vocab]
        resampled = self.sampling(sample_key, chosen)
        rows = jnp.arange(batch)[:, None]
        new_canvas = canvas_ids.at[rows, positions].set(resampled)
        changed = jnp.zeros(canvas_ids.shape, jnp.bool_).at[rows, positions].set(True)
        return new_canvas.astype(jnp.int32), changed

    def __call__(
        self, processed_logits: jax.Array, canvas_ids: jax.Array, state: SamplerState, key: jax.Array
    ) -> tuple[jax.Array, jax.Array, SamplerState]:
        period = 1 + self.corrector_steps
        index = state.step // period
        if self.corrector_steps == 0:
            new_canvas, changed = self._predict(processed_logits, canvas_ids, index, key)
        else:
            new_canvas, changed = jax.lax.cond(
                state.step % period == 0,
                lambda: self._predict(processed_logits, canvas_ids, index, key),
                lambda: self._correct(processed_logits, canvas_ids, index, key),
            )
        return new_canvas, changed, SamplerState(step=state.step + 1, committed=changed)


# --------------------------------------------------------------------------------------------------
# Stopping rules
# --------------------------------------------------------------------------------------------------


@struct.dataclass
class StopState:
    """State of :class:`StableAndConfidentStopping`.

    Attributes:
      history: int32 ``[stability_threshold, batch, canvas]``, the last argmax canvases, oldest first;
        starts at -1 so no row is stable before it has been seen ``stability_threshold`` times.
    """

    history: jax.Array


@struct.dataclass
class StableAndConfidentStopping:
    """transformers' ``StableAndConfidentStoppingCriteria``.

    A row stops when it is *stable* -- its argmax canvas equals each of the previous
    ``stability_threshold`` argmax canvases (always true for 0) -- and *confident* -- the mean over the
    canvas of the per-position entropy of the processed logits is ``< confidence_threshold``. The
    comparison uses the history before this step's argmax is pushed (oldest dropped).

    Attributes:
      stability_threshold: static int >= 0 (it is the history's length).
      confidence_threshold: > 0 (a leaf).
    """

    stability_threshold: int = struct.field(pytree_node=False, default=1)
    confidence_threshold: float = 0.005

    def __post_init__(self) -> None:
        require_int("stability_threshold", self.stability_threshold, 0)
        _require("confidence_threshold", self.confidence_threshold, lambda v: v > 0.0, "> 0")

    def init(self, canvas_ids: jax.Array) -> StopState:
        shape = (self.stability_threshold, *canvas_ids.shape)
        return StopState(history=jnp.full(shape, -1, jnp.int32))

    def __call__(
        self, argmax_ids: jax.Array, processed_logits: jax.Array, state: StopState
    ) -> tuple[jax.Array, StopState]:
        return self._decide(argmax_ids, token_entropy(processed_logits), state)

    def from_statistics(
        self, argmax_ids: jax.Array, stats: TokenStatistics, state: StopState
    ) -> tuple[jax.Array, StopState]:
        return self._decide(argmax_ids, stats.entropy, state)

    def _decide(self, argmax_ids: jax.Array, entropy: jax.Array, state: StopState) -> tuple[jax.Array, StopState]:
        argmax_ids = argmax_ids.astype(jnp.int32)
        # all() over an empty history is True: stability_threshold = 0 means "always stable".
        stable = jnp.all(state.history == argmax_ids[None], axis=(0, 2))
        if self.stability_threshold == 0:
            history = state.history
        else:  # drop the oldest, append the newest (torch.roll(-1) then write the last slot)
            history = jnp.concatenate([state.history[1:], argmax_ids[None]], axis=0)
        mean_entropy = jnp.mean(entropy, axis=-1)
        confident = mean_entropy < jnp.asarray(self.confidence_threshold, jnp.float32)
        return stable & confident, StopState(history=history)


@struct.dataclass
class NeverStop:
    """Runs every denoising step (Google's ``NoEarlyStop``)."""

    def init(self, canvas_ids: jax.Array) -> tuple[()]:
        del canvas_ids
        return ()

    def __call__(
        self, argmax_ids: jax.Array, processed_logits: jax.Array, state: tuple[()]
    ) -> tuple[jax.Array, tuple[()]]:
        del processed_logits
        return jnp.zeros(argmax_ids.shape[:1], jnp.bool_), state

    def from_statistics(
        self, argmax_ids: jax.Array, stats: TokenStatistics, state: tuple[()]
    ) -> tuple[jax.Array, tuple[()]]:
        del stats
        return jnp.zeros(argmax_ids.shape[:1], jnp.bool_), state
