"""Block-diffusion generation: the whole loop compiled as one program.

    encode(prompt) -> for each canvas (lax.while_loop):
        canvas = uniform noise (or `initial_canvas` for the first)
        for n = N..1 while some row is still denoising (lax.while_loop):
            logits = denoise_logits(cache, canvas, self_conditioning)
            processed = filter(logits / T(n))
            canvas, accepted, state = sampler(processed, canvas, state, key)
            stopped |= stopping(argmax(processed), processed)      # a stopped row's argmax stays
        append the argmax canvas; EOS ends a row (later tokens -> pad); encode it into the cache

With `statistics="pallas"` the step never holds float32 logits: the decoder returns its hidden state, one
pass over the vocabulary (`diffjax.kernels.vocab`) gives per-position statistics (entropy, a draw, the
argmax) and the processed logits once in the model's dtype for self-conditioning, and the sampler and
stopping rule take the statistics (`from_statistics`). Its plain-JAX twin, `"xla"`, takes the same path but
makes the float32 logits to compute them.

The defaults reproduce transformers 5.23.0 `DiffusionGemmaGenerationMixin.generate`; samplers, schedules,
filters and stopping rules are values (see `diffjax.sampling`), swapped without touching this loop.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffjax import sampling
from diffjax.config import Config
from diffjax.kernels.vocab import vocab_stats_pallas, vocab_stats_reference
from diffjax.model import (
    KVCache,
    Params,
    _denoise_logits,
    _encode,
    check_context,
    check_params,
    init_cache,
    param_dtype,
    prefill,
)
from diffjax.validation import padding_mask, prng_key, require_int, token_ids

Array = jax.Array
# How a step turns the decoder's output into the sampler's input: "logits" (float32 [batch, canvas, vocab],
# any sampler, filter or stopping rule; the transformers-exact path), "xla" / "pallas" (TokenStatistics from
# one vocabulary pass; "xla" materialises the logits to compute them, "pallas" does not).
STATISTICS = ("logits", "xla", "pallas")
# on_step(canvas_index, remaining_steps, argmax_canvas [batch, canvas]) — runs on the host.
StepCallback = Callable[[int, int, np.ndarray], None]


@flax.struct.dataclass
class GenerationOutput:
    """sequences `[batch, prompt + canvases * canvas]` (prompt included; rows that ended early and canvases
    never generated hold `pad_token_id`), tokens_per_forward `[batch]` (non-pad new tokens / counted decoder
    passes), decoder_passes `[batch]`, and the cache holding every generated token of `sequences`: canvases
    never generated are not encoded, so `cache.length` can stop short of `sequences`' width."""

    sequences: Array
    tokens_per_forward: Array
    decoder_passes: Array
    cache: KVCache


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """Generation hyper-parameters that are not sampler components. Defaults: transformers' defaults."""

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    eos_token_id: tuple[int, ...] | None = (1,)
    pad_token_id: int = 0
    prefill_chunk_size: int = 2048
    statistics: str = "logits"

    def validate(self, config: Config) -> None:
        require_int("max_new_tokens", self.max_new_tokens, 1)
        require_int("max_denoising_steps", self.max_denoising_steps, 1)
        require_int("prefill_chunk_size", self.prefill_chunk_size, 1)
        if self.statistics not in STATISTICS:
            raise ValueError(f"statistics must be one of {STATISTICS}, got {self.statistics!r}")
        for name, token in (("pad_token_id", self.pad_token_id),
                            *(("eos_token_id", eos) for eos in (self.eos_token_id or ()))):
            require_int(name, token, 0)
            if token >= config.vocab_size:
                raise ValueError(f"special token id {token} outside the vocabulary [0, {config.vocab_size})")

    def num_canvases(self, config: Config) -> int:
        return math.ceil(self.max_new_tokens / config.canvas_length)


def generate(
    params: Params,
    config: Config,
    input_ids: Array,
    *,
    key: Array,
    attention_mask: Array | None = None,
    max_new_tokens: int = 256,
    max_denoising_steps: int = 48,
    t_min: float | None = 0.4,
    t_max: float | None = 0.8,
    entropy_bound: float = 0.1,
    stability_threshold: int | None = 1,
    confidence_threshold: float | None = 0.005,
    eos_token_id: int | Sequence[int] | Literal["config"] | None = "config",
    pad_token_id: int | Literal["config"] = "config",
    initial_canvas: Array | None = None,
    prefill_chunk_size: int = 2048,
    statistics: str = "logits",
    sampler: sampling.Sampler | None = None,
    temperature_schedule: sampling.TemperatureSchedule | None = None,
    logits_filter: sampling.LogitsFilter | None = None,
    stopping_rule: sampling.StoppingRule | None = None,
    on_step: StepCallback | None = None,
) -> GenerationOutput:
    """Generate `max_new_tokens` (rounded up to whole canvases) after `input_ids [batch, prompt]`.

    The defaults are transformers': linear temperature from t_max to t_min over the remaining steps (either
    None: temperature 1), the entropy-bound sampler, and stable-and-confident adaptive stopping (`stability_threshold=None` or
    `confidence_threshold=None` disables it: every canvas then runs `max_denoising_steps`). Pass
    `sampler`, `temperature_schedule`, `logits_filter` or `stopping_rule` to replace a component; their
    numeric hyper-parameters are traced, so sweeping them does not recompile.
    `eos_token_id` and `pad_token_id` are the model's (`config.eos_token_id`, `config.pad_token_id`) unless
    given; `eos_token_id=None` never ends a row.
    `initial_canvas [batch, canvas]` fixes the first canvas (transformers' `decoder_input_ids`; later
    canvases start from uniform noise). The prompt is encoded `prefill_chunk_size` tokens at a time (peak
    attention memory grows with chunk x context, not prompt squared). `on_step`, if given, receives every
    step's argmax draft on the host (`jax.debug.callback`); without it the loop has no host round trip.
    `statistics` (see `STATISTICS`): "pallas" runs the LM head, the sampler's statistics and the draw in one
    kernel without float32 `[batch, canvas, vocab]` logits (the filter must be the identity, the sampler and
    stopping rule must have `from_statistics`); its draw uses a counter-based Gumbel noise, so the tokens
    follow the same distribution as "logits" but not the same random stream; "xla" is its plain-JAX twin.
    Same `key`, same inputs -> bitwise the same tokens.
    """
    check_params(params, config)
    input_ids = token_ids("input_ids", input_ids, config.vocab_size)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, prompt], got shape {input_ids.shape}")
    batch, prompt = input_ids.shape
    if batch == 0:
        raise ValueError("input_ids has zero rows: batch size must be at least 1")
    if prompt == 0:
        raise ValueError("input_ids has zero tokens: give at least one prompt token (e.g. <bos>)")
    attention_mask = (jnp.ones((batch, prompt), bool) if attention_mask is None
                      else padding_mask("attention_mask", attention_mask, (batch, prompt), every_row_real=True,
                                       left_padded=True))
    key = prng_key("key", key)
    # The model's own by default, as transformers reads them from the checkpoint's generation config (the
    # released model ends a turn on 106 as well as on EOS).
    if isinstance(eos_token_id, str) and eos_token_id == "config":
        eos_token_id = config.eos_token_id
    if isinstance(pad_token_id, str) and pad_token_id == "config":
        pad_token_id = config.pad_token_id
    # Validated (as integers, not bools) by settings.validate.
    eos = None if eos_token_id is None else (
        (eos_token_id,) if isinstance(eos_token_id, int | np.integer) else tuple(eos_token_id)
    )
    settings = GenerationSettings(
        max_new_tokens, max_denoising_steps, eos, pad_token_id, prefill_chunk_size, statistics
    )
    settings.validate(config)
    generated = settings.num_canvases(config) * config.canvas_length
    check_context(config, prompt + generated, f"prompt ({prompt}) + generated tokens ({generated})")
    if initial_canvas is not None:
        initial_canvas = token_ids("initial_canvas", initial_canvas, config.vocab_size)
        if initial_canvas.shape != (batch, config.canvas_length):
            raise ValueError(
                f"initial_canvas must be [batch={batch}, canvas={config.canvas_length}], got {initial_canvas.shape}"
            )

    components = make_components(
        sampler=sampler, temperature_schedule=temperature_schedule, logits_filter=logits_filter,
        stopping_rule=stopping_rule, t_min=t_min, t_max=t_max, entropy_bound=entropy_bound,
        stability_threshold=stability_threshold, confidence_threshold=confidence_threshold,
    )
    _check_components(components, config)
    _check_step_budget(components.sampler, max_denoising_steps)
    if statistics != "logits":
        _check_statistics_components(components, statistics)
    return _generate(
        params, config, settings, input_ids, attention_mask, key,
        initial_canvas, components, on_step, node_types(components),
    )


def node_types(tree: Any) -> tuple[Any, ...]:
    """The type of every pytree node in `tree`, nested as its structure is: `(type, (children...))`, None for
    a leaf. `_generate` takes it as a static argument because jit's cache cannot tell component classes
    apart by their treedef alone: JAX compares two dataclass pytree nodes by their field names, not their
    classes, so a sampler class could otherwise run the program compiled for another one with the same
    fields (field-less draws such as GreedySampling and GumbelMaxSampling included), silently."""
    return _treedef_node_types(jax.tree.structure(tree))


def _treedef_node_types(treedef: Any) -> tuple[Any, ...]:
    data = treedef.node_data()
    return (None if data is None else data[0], tuple(_treedef_node_types(child) for child in treedef.children()))


@flax.struct.dataclass
class Components:
    """The swappable pieces of the loop, passed as one pytree so their numbers are traced, not baked in."""

    sampler: Any
    schedule: Any
    logits_filter: Any
    stopping: Any


def make_components(
    *,
    sampler: sampling.Sampler | None = None,
    temperature_schedule: sampling.TemperatureSchedule | None = None,
    logits_filter: sampling.LogitsFilter | None = None,
    stopping_rule: sampling.StoppingRule | None = None,
    t_min: float | None = 0.4,
    t_max: float | None = 0.8,
    entropy_bound: float = 0.1,
    stability_threshold: int | None = 1,
    confidence_threshold: float | None = 0.005,
) -> Components:
    """The loop's components as `generate` takes them: those given, and transformers' defaults built from the
    scalar hyper-parameters for the others."""
    return Components(
        sampler=sampler if sampler is not None else sampling.EntropyBoundSampler(entropy_bound=entropy_bound),
        schedule=(
            temperature_schedule if temperature_schedule is not None
            # transformers drops its temperature step when either end is None: the logits as they are.
            else sampling.ConstantTemperature(1.0) if t_min is None or t_max is None
            else sampling.LinearTemperature(t_min=t_min, t_max=t_max)
        ),
        logits_filter=logits_filter if logits_filter is not None else sampling.IdentityFilter(),
        stopping=stopping_rule if stopping_rule is not None else (
            sampling.NeverStop() if stability_threshold is None or confidence_threshold is None
            else sampling.StableAndConfidentStopping(
                stability_threshold=stability_threshold, confidence_threshold=confidence_threshold
            )
        ),
    )


# What the loop calls each kind of component with: a sampler and a stopping rule both have `init` and
# `__call__`, so the protocols alone cannot tell one passed for the other.
_CALL_ARGUMENTS = {
    sampling.Sampler: ("processed_logits", "canvas_ids", "state", "key"),
    sampling.TemperatureSchedule: ("remaining_steps", "num_steps"),
    sampling.LogitsFilter: ("logits",),
    sampling.StoppingRule: ("argmax_ids", "processed_logits", "state"),
}


def _takes(component: Any, count: int) -> bool:
    """Whether `component(...)` accepts `count` positional arguments (True when its signature is not known)."""
    try:
        inspect.signature(component).bind(*range(count))
    except TypeError:
        return False
    except ValueError:  # no signature to read (e.g. a builtin)
        return True
    return True


def _check_components(components: Components, config: Config) -> None:
    """Each component of its kind (a wrong one would fail inside the trace, far from its cause), and no noise
    range past the model's vocabulary (its ids would index past the embedding: silent garbage)."""
    for name, component, kind in (
        ("sampler", components.sampler, sampling.Sampler),
        ("temperature_schedule", components.schedule, sampling.TemperatureSchedule),
        ("logits_filter", components.logits_filter, sampling.LogitsFilter),
        ("stopping_rule", components.stopping, sampling.StoppingRule),
    ):
        if not isinstance(component, kind) or not _takes(component, len(_CALL_ARGUMENTS[kind])):
            raise ValueError(f"{name} must be a diffjax.sampling.{kind.__name__}, called with "
                             f"({', '.join(_CALL_ARGUMENTS[kind])}) (e.g. one of the classes in "
                             f"diffjax.sampling), got {type(component).__name__}")
        for path, leaf in jax.tree_util.tree_flatten_with_path(component)[0]:
            if not isinstance(leaf, jax.Array | np.ndarray | np.generic | int | float | complex):
                where = name + jax.tree_util.keystr(path)
                raise ValueError(
                    f"{where} ({type(leaf).__name__}) is not a JAX pytree of arrays, so it cannot be an argument "
                    "of the compiled loop: make its class a @flax.struct.dataclass, with the fields that pick a "
                    "structure (a top-k's k) as flax.struct.field(pytree_node=False)")
        vocab_size = getattr(component, "vocab_size", None)
        if vocab_size is not None and vocab_size > config.vocab_size:
            raise ValueError(f"{name}.vocab_size ({vocab_size}) exceeds the model's vocabulary "
                             f"({config.vocab_size}): its noise tokens would be ids the model does not have")


def _check_step_budget(sampler: sampling.Sampler, max_denoising_steps: int) -> None:
    """A sampler whose schedule needs more steps than the loop runs would leave each canvas half-committed
    and still return an answer (the argmax of its last logits): refuse it."""
    needed = getattr(sampler, "num_calls", None)
    if needed is not None and needed > max_denoising_steps:
        raise ValueError(
            f"{type(sampler).__name__} spreads its schedule over {needed} steps, but max_denoising_steps is "
            f"{max_denoising_steps}: set its num_steps to at most max_denoising_steps (e.g. equal), or raise "
            "max_denoising_steps"
        )


def _check_statistics_components(components: Components, statistics: str) -> None:
    if not isinstance(components.logits_filter, sampling.IdentityFilter):
        raise ValueError(
            f"statistics={statistics!r} never materialises the logits, so it cannot apply "
            f"{type(components.logits_filter).__name__}: use statistics='logits' with a logits filter"
        )
    for role, component in (("sampler", components.sampler), ("stopping rule", components.stopping)):
        if not hasattr(component, "from_statistics"):
            raise ValueError(
                f"the {role} {type(component).__name__} has no from_statistics (it needs the full logits): "
                f"use statistics='logits'"
            )
    draw = getattr(components.sampler, "sampling", None)  # the shipped samplers' token draw, if any
    if draw is not None and not hasattr(draw, "from_statistics"):
        raise ValueError(
            f"the token draw {type(draw).__name__} has no from_statistics: use statistics='logits'"
        )


@functools.partial(jax.jit, static_argnames=("config", "settings", "on_step", "component_types"))
def _generate(
    params: Params, config: Config, settings: GenerationSettings, input_ids: Array, attention_mask: Array,
    key: Array, initial_canvas: Array | None, components: Components, on_step: StepCallback | None,
    component_types: tuple[Any, ...],
) -> GenerationOutput:
    """`generate`'s loop; `component_types` is `node_types(components)`, only a key of jit's cache."""
    del component_types
    batch, prompt = input_ids.shape
    canvas_len, num_canvases = config.canvas_length, settings.num_canvases(config)
    cache = init_cache(config, batch, prompt + num_canvases * canvas_len, param_dtype(params))
    cache = prefill(params, config, input_ids, attention_mask, cache, settings.prefill_chunk_size)
    sequences = jnp.concatenate(
        [input_ids, jnp.full((batch, num_canvases * canvas_len), settings.pad_token_id, jnp.int32)], axis=1
    )
    eos = jnp.asarray(settings.eos_token_id or (), jnp.int32)

    def denoise_canvas(canvas_index, cache, finished_rows):
        """Run the inner loop on one canvas: (argmax canvas, counted decoder passes per row)."""
        noise_key, steps_key = jax.random.split(jax.random.fold_in(key, canvas_index))
        noise = jax.random.randint(noise_key, (batch, canvas_len), 0, config.vocab_size, jnp.int32)
        canvas = noise if initial_canvas is None else jnp.where(canvas_index == 0, initial_canvas, noise)
        sc_dtype = param_dtype(params)
        state = dict(
            step=jnp.zeros((), jnp.int32),
            canvas=canvas,
            argmax=canvas,
            sc_logits=jnp.zeros((batch, canvas_len, config.vocab_size), sc_dtype),
            stopped=jnp.zeros((batch,), bool),
            passes=jnp.zeros((batch,), jnp.int32),
            sampler=components.sampler.init(canvas),
            stop=components.stopping.init(canvas),
        )

        def keep_going(s):
            return (s["step"] < settings.max_denoising_steps) & ~jnp.all(s["stopped"])

        def logits_step(s, self_conditioning_on, temperature, step_key):
            logits = _denoise_logits(params, config, cache, s["canvas"], s["sc_logits"], self_conditioning_on)
            processed = components.logits_filter(sampling.scale_logits(logits, temperature))
            canvas, _, sampler_state = components.sampler(processed, s["canvas"], s["sampler"], step_key)
            argmax = jnp.argmax(processed, axis=-1).astype(jnp.int32)
            # A stopped row's verdict is ignored (it stays stopped), so the rule may see its fresh logits.
            return canvas, argmax, processed, sampler_state, lambda argmax, state: components.stopping(
                argmax, processed, state
            )

        def statistics_step(s, self_conditioning_on, temperature, step_key):
            hidden = _denoise_logits(
                params, config, cache, s["canvas"], s["sc_logits"], self_conditioning_on, return_hidden=True
            )
            # The draw's seed comes from the key half the logits path draws with; the sampler renoises with
            # the other half, as there.
            draw_key, _ = jax.random.split(step_key)
            vocab_pass = (functools.partial(vocab_stats_pallas, **config.kernel_tiles.kwargs("vocab"))
                          if settings.statistics == "pallas" else vocab_stats_reference)
            stats, processed = vocab_pass(
                hidden, params["embedder"]["embedding"], temperature, seed=jax.random.bits(draw_key, (), jnp.uint32),
                softcap=config.final_logit_softcapping, return_logits=True,
            )
            canvas, _, sampler_state = components.sampler.from_statistics(
                stats, s["canvas"], s["sampler"], step_key, config.vocab_size
            )
            return canvas, stats.argmax, processed, sampler_state, lambda argmax, state: (
                components.stopping.from_statistics(argmax, stats, state)
            )

        def step(s):
            remaining = settings.max_denoising_steps - s["step"]
            # The first step has no previous logits: a masked (exactly zero) signal, as transformers' None.
            self_conditioning_on = jnp.broadcast_to(s["step"] > 0, (batch,))
            temperature = components.schedule(remaining, settings.max_denoising_steps)
            step_key = jax.random.fold_in(steps_key, s["step"])
            propose = logits_step if settings.statistics == "logits" else statistics_step
            canvas, argmax, processed, sampler_state, stopping = propose(s, self_conditioning_on, temperature, step_key)
            # A row that has stopped keeps its argmax and self-conditioning. Its canvas is left to move: rows never
            # mix, and what the canvas feeds (the decoder's output and the sampler's step) is discarded for it.
            frozen = s["stopped"]
            argmax = jnp.where(frozen[:, None], s["argmax"], argmax)
            processed = jnp.where(frozen[:, None, None], s["sc_logits"].astype(processed.dtype), processed)
            newly_stopped, stop_state = stopping(argmax, s["stop"])
            if on_step is not None:
                jax.debug.callback(on_step, canvas_index, remaining, argmax, ordered=True)
            return dict(
                step=s["step"] + 1,
                canvas=canvas,
                argmax=argmax,
                sc_logits=processed.astype(sc_dtype),
                stopped=frozen | newly_stopped,
                passes=s["passes"] + (~(frozen | finished_rows)).astype(jnp.int32),
                sampler=sampler_state,
                stop=stop_state,
            )

        final = jax.lax.while_loop(keep_going, step, state)
        return final["argmax"], final["passes"]

    def finalize(new_tokens, finished_rows):
        """EOS ends a row: tokens after its first EOS, and whole canvases of ended rows, become pad."""
        if not settings.eos_token_id:  # no row ever ends
            return new_tokens, finished_rows
        is_eos = jnp.isin(new_tokens, eos)
        seen = jnp.cumsum(is_eos, axis=-1)
        after_first_eos = (seen > 0) & ~((seen == 1) & is_eos)
        new_tokens = jnp.where(after_first_eos | finished_rows[:, None], settings.pad_token_id, new_tokens)
        return new_tokens, finished_rows | jnp.any(is_eos, axis=-1)

    def canvas_loop_body(s):
        canvas_index = s["index"]
        argmax, passes = denoise_canvas(canvas_index, s["cache"], s["finished"])
        new_tokens, finished = finalize(argmax, s["finished"])
        offset = prompt + canvas_index * canvas_len
        sequences = jax.lax.dynamic_update_slice_in_dim(s["sequences"], new_tokens, offset, axis=1)
        # The finished canvas joins the context with every slot attended (its pads included), as in transformers.
        cache, _ = _encode(params, config, new_tokens, jnp.ones_like(new_tokens, bool), s["cache"])
        return dict(index=canvas_index + 1, sequences=sequences, cache=cache, finished=finished,
                    passes=s["passes"] + passes)

    state = jax.lax.while_loop(
        lambda s: (s["index"] < num_canvases) & ~jnp.all(s["finished"]),
        canvas_loop_body,
        dict(index=jnp.zeros((), jnp.int32), sequences=sequences, cache=cache,
             finished=jnp.zeros((batch,), bool), passes=jnp.zeros((batch,), jnp.int32)),
    )
    valid = jnp.sum(state["sequences"][:, prompt:] != settings.pad_token_id, axis=-1)
    return GenerationOutput(
        sequences=state["sequences"],
        tokens_per_forward=valid.astype(jnp.float32) / state["passes"].astype(jnp.float32),
        decoder_passes=state["passes"],
        cache=state["cache"],
    )
