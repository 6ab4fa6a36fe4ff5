"""The interfaces the denoising loop calls: schedules, filters, token draws, samplers, stopping rules."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

from diffjax.sampling.statistics import TokenStatistics


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
    ``(new_canvas_ids int32 [batch, canvas], accepted_mask bool [batch, canvas], new_state)``. The new ids
    must lie in ``[0, vocab)``: they are the next step's input, and the loop runs on the device, where an id
    past the embedding cannot raise (its embedding lookup gives NaN, and the answer pad tokens).

    Optional: ``from_statistics(stats, canvas_ids, state, key, vocab_size)`` makes the same step from a
    :class:`TokenStatistics` of ``softmax(processed)`` instead of the logits; samplers that need more of the
    distribution than that (e.g. :class:`DDIMSampler`) do not have it. ``num_calls``: the loop steps a
    sampler's schedule needs to finish (:class:`BlockRefinementSampler`, :class:`DDIMSampler`);
    ``diffjax.generate`` refuses a ``max_denoising_steps`` below it.
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
