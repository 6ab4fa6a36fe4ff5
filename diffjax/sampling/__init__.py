"""Pure, jit-able pieces of the DiffusionGemma denoising loop.

"Samplers are values, not code paths": every component below is a frozen dataclass registered as a JAX
pytree. Numeric hyper-parameters (temperatures, entropy bound, thresholds) are pytree *leaves*, so a
jitted loop that takes the component as an argument does not recompile when they change. Structural
choices (a top-k's ``k``, the stability window length, string options) are static pytree metadata:
changing them changes the shapes or the program, so they do recompile. A component of your own follows the
same rules: a ``@flax.struct.dataclass`` (``generate`` refuses a plain object or a lambda by name), its
structural fields declared ``flax.struct.field(pytree_node=False)`` (a traced ``k`` fails inside the trace),
and no checks on leaf values in ``__post_init__`` unless they tolerate tracers (it runs again when JAX
rebuilds the object inside the loop).

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

Modules, in the order a step uses them: ``schedules`` (temperature), ``filters`` (top-k, top-p),
``statistics`` (entropy, probabilities, counter-based Gumbel noise, :class:`TokenStatistics`), ``draws`` (one
token per position), ``samplers`` (entropy bound, block refinement, confidence threshold), ``ddim``,
``stopping``; ``protocols`` holds the interfaces the loop calls. Every public name is importable from
``diffjax.sampling``.
"""

from diffjax.sampling.ddim import (
    DDIMSampler,
    ddim_corrector_log_probs,
    ddim_predictor_update,
    ddim_route_probs,
)
from diffjax.sampling.draws import ExponentialRaceSampling, GreedySampling, GumbelMaxSampling
from diffjax.sampling.filters import FilterChain, IdentityFilter, TopKFilter, TopPFilter
from diffjax.sampling.protocols import LogitsFilter, Sampler, StoppingRule, TemperatureSchedule, TokenSampling
from diffjax.sampling.samplers import (
    BlockRefinementSampler,
    ConfidenceThresholdSampler,
    EntropyBoundSampler,
    SamplerState,
    block_refinement_update,
    confidence_threshold_update,
    entropy_bound_mask,
    entropy_bound_update,
)
from diffjax.sampling.schedules import ConstantTemperature, LinearTemperature, NoiseProportionTemperature
from diffjax.sampling.statistics import (
    MASK_VALUE,
    TokenStatistics,
    exponential_race,
    gumbel_noise,
    sampled_token_probs,
    scale_logits,
    token_entropy,
    token_statistics,
)
from diffjax.sampling.stopping import NeverStop, StableAndConfidentStopping, StopState

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
