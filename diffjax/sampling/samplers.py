"""Samplers that accept part of a proposal each step: the entropy bound (transformers' reference), block
refinement (diffusers) and the confidence threshold (Fast-dLLM)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from diffjax.sampling.checks import require_finite, require_optional_vocab
from diffjax.sampling.draws import GumbelMaxSampling
from diffjax.sampling.protocols import TokenSampling
from diffjax.sampling.statistics import (
    TokenStatistics,
    draw_and_noise,
    draw_and_noise_from_statistics,
    sampled_token_probs,
    token_entropy,
)


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


def initial_sampler_state(canvas_ids: jax.Array) -> SamplerState:
    """Step 0, nothing committed."""
    return SamplerState(step=jnp.zeros((), jnp.int32), committed=jnp.zeros(canvas_ids.shape, jnp.bool_))


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
    entropy: jax.Array,
    sampled_ids: jax.Array,
    noise_ids: jax.Array,
    entropy_bound: jax.Array | float,
) -> tuple[jax.Array, jax.Array]:
    """Deterministic core of :class:`EntropyBoundSampler` given its random draws, on either entry point's
    entropies (:func:`token_entropy` of the processed logits, or the fused pass's statistics).

    Args:
      entropy: float32 ``[batch, canvas]``, each position's entropy under the processed logits.
      sampled_ids: int32 ``[batch, canvas]``, one draw from ``softmax(processed_logits)`` per position.
      noise_ids: int32 ``[batch, canvas]``, uniform tokens over the whole vocabulary.
      entropy_bound: scalar.

    Returns:
      ``(new_canvas_ids, accepted)``: accepted positions take the sample, every other position takes the
      noise token. The current canvas plays no part: the reference first writes ``where(accepted, sample,
      current)`` and then renoises the non-accepted positions, so the current tokens never survive (a token
      accepted at one step is re-decided, and possibly renoised, at the next).
    """
    accepted = entropy_bound_mask(entropy, entropy_bound)
    return jnp.where(accepted, sampled_ids, noise_ids).astype(jnp.int32), accepted


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
        require_finite("entropy_bound", self.entropy_bound, lambda v: v > 0.0, "> 0")
        require_optional_vocab(self.vocab_size)

    def init(self, canvas_ids: jax.Array) -> SamplerState:
        return initial_sampler_state(canvas_ids)

    def __call__(
        self, processed_logits: jax.Array, canvas_ids: jax.Array, state: SamplerState, key: jax.Array
    ) -> tuple[jax.Array, jax.Array, SamplerState]:
        sampled, noise = draw_and_noise(self.sampling, self.vocab_size, processed_logits, canvas_ids.shape, key)
        new_canvas, accepted = entropy_bound_update(token_entropy(processed_logits), sampled, noise,
                                                    self.entropy_bound)
        return new_canvas, accepted, SamplerState(step=state.step + 1, committed=accepted)

    def from_statistics(
        self, stats: TokenStatistics, canvas_ids: jax.Array, state: SamplerState, key: jax.Array,
        vocab_size: int,
    ) -> tuple[jax.Array, jax.Array, SamplerState]:
        sampled, _, noise = draw_and_noise_from_statistics(
            self.sampling, self.vocab_size, stats, canvas_ids.shape, key, vocab_size
        )
        new_canvas, accepted = entropy_bound_update(stats.entropy, sampled, noise, self.entropy_bound)
        return new_canvas, accepted, SamplerState(step=state.step + 1, committed=accepted)


class _ConfidenceSampler:
    """The shared step of the samplers that decide from each draw's probability (its "confidence"): draw,
    renoise, then the subclass's `_update(canvas_ids, sampled, confidence, noise, state)`. Needs the fields
    `sampling` and `vocab_size`."""

    def init(self, canvas_ids: jax.Array) -> SamplerState:
        return initial_sampler_state(canvas_ids)

    def __call__(
        self, processed_logits: jax.Array, canvas_ids: jax.Array, state: SamplerState, key: jax.Array
    ) -> tuple[jax.Array, jax.Array, SamplerState]:
        sampled, noise = draw_and_noise(self.sampling, self.vocab_size, processed_logits, canvas_ids.shape, key)
        return self._update(canvas_ids, sampled, sampled_token_probs(processed_logits, sampled), noise, state)

    def from_statistics(
        self, stats: TokenStatistics, canvas_ids: jax.Array, state: SamplerState, key: jax.Array,
        vocab_size: int,
    ) -> tuple[jax.Array, jax.Array, SamplerState]:
        sampled, confidence, noise = draw_and_noise_from_statistics(
            self.sampling, self.vocab_size, stats, canvas_ids.shape, key, vocab_size
        )
        return self._update(canvas_ids, sampled, confidence, noise, state)


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
    :class:`GreedySampling` for that); the quota uses ``num_steps`` here, so set it to the loop's N;
    `diffjax.generate` returns, as transformers' loop does for every sampler, the argmax of each canvas's
    last logits, where diffusers returns the committed canvas (up to 10 of 32 positions differ on a random
    model; run the sampler in a loop of your own to keep the committed tokens).

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
        require_finite("num_steps", self.num_steps, lambda v: v >= 1 and float(v).is_integer(), "an integer >= 1")
        require_finite("confidence_threshold", self.confidence_threshold, lambda v: 0.0 < v <= 1.0, "in (0, 1]")
        require_finite("editing_threshold", self.editing_threshold, lambda v: 0.0 < v <= 1.0, "in (0, 1]")
        require_optional_vocab(self.vocab_size)

    @property
    def num_calls(self) -> int:
        """Loop steps needed to commit every position: ``num_steps``."""
        return int(self.num_steps)

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
    here). `diffjax.generate` returns the argmax of each canvas's last logits (transformers' rule for every
    sampler), not the committed canvas Fast-dLLM returns.

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
        require_finite("threshold", self.threshold, lambda v: 0.0 < v <= 1.0, "in (0, 1]")
        require_optional_vocab(self.vocab_size)

    def _update(
        self, canvas_ids: jax.Array, sampled: jax.Array, confidence: jax.Array, noise: jax.Array,
        state: SamplerState,
    ) -> tuple[jax.Array, jax.Array, SamplerState]:
        new_canvas, accepted, committed = confidence_threshold_update(
            canvas_ids, sampled, confidence, state.committed, noise, self.threshold, self.monotone
        )
        return new_canvas, accepted, SamplerState(step=state.step + 1, committed=committed)
