"""generate(): parity with transformers' generate in the deterministic regime, determinism, plug-in samplers."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import struct
from reference import diffjax_params, random_hf_model

import diffjax
from diffjax import sampling
from diffjax.config import FULL, SLIDING, AttentionConfig, Config
from diffjax.generate import _generate, generate, make_components

# Near-zero temperatures make sampling argmax-like and entropies ~0, so both implementations take the same
# path whatever their random number generators.
DETERMINISTIC = dict(t_min=1e-4, t_max=2e-4)

CONFIGS = {
    "tiny": Config.tiny(),
    "two_blocks": Config.tiny(
        num_layers=6, layer_types=(SLIDING, SLIDING, FULL) * 2, sliding_window=5, canvas_length=12,
        sliding=AttentionConfig(head_dim=16, num_kv_heads=4, rope_theta=10_000.0),
    ),
}


# Small enough to compile fast: one sliding and one global layer.
MICRO = Config.tiny(num_layers=2, layer_types=(SLIDING, FULL))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = {}
    for name, config in CONFIGS.items():
        # At T ~ 1e-4 sampling is argmax only where the top-two logit gap is >> T: spread the logits.
        model = random_hf_model(config, seed=11, embed_std=1.0)
        _, params = diffjax_params(model, tmp_path_factory.mktemp(name))
        out[name] = config, model, params
    return out


def _inputs(config: Config, batch: int, prompt: int, pad: list[int], seed: int):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, config.vocab_size, (batch, prompt))
    mask = np.ones((batch, prompt), bool)
    for row, n_pad in enumerate(pad):
        ids[row, :n_pad], mask[row, :n_pad] = config.pad_token_id, False
    canvas = rng.integers(0, config.vocab_size, (batch, config.canvas_length))
    return ids, mask, canvas


@pytest.mark.parametrize(
    ("name", "batch", "prompt", "pad", "eos", "stop", "statistics"),
    [
        ("tiny", 1, 4, [0], None, {}, "logits"),
        ("tiny", 3, 9, [2, 0, 0], "many", {}, "logits"),
        ("two_blocks", 2, 13, [0, 5], 1, {}, "logits"),
        ("two_blocks", 3, 6, [0, 0, 3], None, dict(stability_threshold=1, confidence_threshold=1e3), "logits"),
        ("tiny", 3, 9, [2, 0, 0], "many", {}, "pallas"),
        ("two_blocks", 3, 6, [0, 0, 3], None, dict(stability_threshold=1, confidence_threshold=1e3), "pallas"),
    ],
    # eos_appears: a quarter of the vocabulary ends a row, so EOS appears mid-canvas and pads the rest.
    # rows_stop_early: always confident, so each row stops once its argmax repeats, at its own step, and
    # stays frozen while the others go on. pallas: the fused vocabulary pass (interpreted on CPU).
    ids=["tiny-batch1_no_eos", "tiny-eos_appears", "two_blocks-padded_longer_than_window",
         "two_blocks-rows_stop_early", "tiny-eos_appears-pallas", "two_blocks-rows_stop_early-pallas"],
)
def test_matches_transformers_generate(pairs, name, batch, prompt, pad, eos, stop, statistics):
    config, model, params = pairs[name]
    ids, mask, canvas = _inputs(config, batch, prompt, pad, seed=prompt)
    eos_ids = list(range(3, config.vocab_size, 4)) if eos == "many" else eos
    kwargs = dict(DETERMINISTIC, max_new_tokens=config.canvas_length, max_denoising_steps=10,
                  eos_token_id=eos_ids, pad_token_id=0, **stop)
    with torch.no_grad():
        ref = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                             decoder_input_ids=torch.tensor(canvas), **kwargs)
    out = generate(params, config, ids, attention_mask=mask, key=jax.random.key(0), initial_canvas=canvas,
                   statistics=statistics, **kwargs)
    np.testing.assert_array_equal(np.asarray(out.sequences), ref.sequences.numpy())
    np.testing.assert_allclose(np.asarray(out.tokens_per_forward), ref.tokens_per_forward.numpy(), rtol=1e-6)
    new = np.asarray(out.sequences)[:, prompt:]
    assert (new != config.pad_token_id).any()
    if eos == "many":
        assert (new == config.pad_token_id).any(), "the EOS case should have padded something"
    if stop:
        passes = np.asarray(out.decoder_passes)
        assert passes.min() < passes.max(), f"rows should stop at different steps: {passes}"


def test_matches_transformers_over_several_canvases_at_real_temperatures(monkeypatch, tmp_path):
    """The whole loop against transformers over three canvases at the default temperatures (0.8 -> 0.4): rows
    ending in different canvases (EOS mid-canvas pads the rest and later canvases), adaptive stopping per row
    in every canvas, self-conditioning reset per canvas, a left-padded row, max_new_tokens not a multiple of
    the canvas (rows end in canvases 2, 0 and 1 after 16, 5 and 7 decoder passes). Both sides draw greedily, and transformers' canvas noise and renoise tokens are ours (same
    keys as `_generate`'s), so the comparison is exact whatever the temperature. On MICRO: through the
    self-conditioning feedback, the 6-layer random model above amplifies float32 rounding ~5x per step (a
    token flips by step 8), where this one keeps both sides' logits within 3e-3 of each other."""
    import transformers.models.diffusion_gemma.generation_diffusion_gemma as hf_generation

    config = MICRO
    model = random_hf_model(config, seed=11, embed_std=1.0)
    _, params = diffjax_params(model, tmp_path)
    batch, steps, key = 3, 8, jax.random.key(1)
    ids, mask, _ = _inputs(config, batch, 7, [0, 3, 0], seed=1)
    kwargs = dict(max_new_tokens=2 * config.canvas_length + 8, max_denoising_steps=steps,
                  eos_token_id=list(range(3, config.vocab_size, 23)), pad_token_id=0, stability_threshold=0,
                  confidence_threshold=0.3)
    canvases = iter(range(3))
    steps_keys = {}

    def our_tokens(noise_key):
        return torch.tensor(np.asarray(jax.random.randint(noise_key, (batch, config.canvas_length), 0,
                                                          config.vocab_size, jnp.int32)), dtype=torch.long)

    def initialize_canvas(sampler, batch_size, device):
        noise_key, steps_keys["canvas"] = jax.random.split(jax.random.fold_in(key, next(canvases)))
        return our_tokens(noise_key)

    def renoise_canvas(sampler, accepted, remaining):
        step_key = jax.random.fold_in(steps_keys["canvas"], steps - int(remaining))
        return torch.where(~sampler.accepted_token_mask, our_tokens(jax.random.split(step_key)[1]), accepted)

    monkeypatch.setattr(hf_generation.EntropyBoundSampler, "initialize_canvas", initialize_canvas)
    monkeypatch.setattr(hf_generation.EntropyBoundSampler, "renoise_canvas", renoise_canvas)
    monkeypatch.setattr(torch, "multinomial", lambda probs, num_samples=1, **_: probs.argmax(-1, keepdim=True))
    with torch.no_grad():
        ref = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs)
    out = generate(params, config, ids, attention_mask=mask, key=key,
                   sampler=sampling.EntropyBoundSampler(sampling=sampling.GreedySampling()), **kwargs)
    theirs, ours = ref.sequences.numpy(), np.asarray(out.sequences)
    np.testing.assert_array_equal(ours[:, :theirs.shape[1]], theirs)
    assert (ours[:, theirs.shape[1]:] == 0).all()  # canvases they did not return: every row had ended
    np.testing.assert_allclose(np.asarray(out.tokens_per_forward), ref.tokens_per_forward.numpy(), rtol=1e-6)
    # The cases the test is for happened: rows ended in different canvases, and stopped at different steps.
    eos = np.isin(ours[:, 7:], kwargs["eos_token_id"])
    ended_in = [int(np.argmax(row)) // config.canvas_length if row.any() else 3 for row in eos]
    passes = np.asarray(out.decoder_passes)
    print("canvas each row ended in:", ended_in, "decoder passes:", passes)
    assert len(set(ended_in)) > 1 and max(ended_in) > 0, ended_in
    assert (passes % steps).any() and len(set(passes.tolist())) > 1, passes  # stopped mid-canvas, per row


def test_unrolled_blocks_generate_what_transformers_does(pairs):
    """The whole loop with `scan_unroll` (no loop over the two blocks, prefill, decoder and encoder alike): one
    canvas against transformers, two against the looped model (a later canvas starts from noise of our own)."""
    config, model, params = pairs["two_blocks"]
    unrolled = config.replace(scan_unroll=config.num_blocks)
    ids, mask, canvas = _inputs(config, 2, 13, [0, 5], seed=31)
    kwargs = dict(DETERMINISTIC, max_new_tokens=config.canvas_length, max_denoising_steps=6, eos_token_id=None,
                  pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                             decoder_input_ids=torch.tensor(canvas), **kwargs)
    out = generate(params, unrolled, ids, attention_mask=mask, key=jax.random.key(0), initial_canvas=canvas,
                   **kwargs)
    np.testing.assert_array_equal(np.asarray(out.sequences), ref.sequences.numpy())
    two = dict(kwargs, max_new_tokens=2 * config.canvas_length)
    looped, straight = (generate(params, c, ids, attention_mask=mask, key=jax.random.key(1), **two)
                        for c in (config, unrolled))
    np.testing.assert_array_equal(np.asarray(straight.sequences), np.asarray(looped.sequences))
    np.testing.assert_allclose(np.asarray(straight.cache.keys["layer_0"]), np.asarray(looped.cache.keys["layer_0"]),
                               atol=1e-5)


def test_eos_and_pad_default_to_the_models_own():
    """As transformers reads them from the checkpoint: a config ending rows on a quarter of its vocabulary, and
    padding with 2, ends and pads rows without being told."""
    config = MICRO.replace(eos_token_id=tuple(range(3, MICRO.vocab_size, 4)), pad_token_id=2)
    params = diffjax.init_params(config, jax.random.key(1))
    ids = np.arange(3, 9)[None].repeat(2, 0)
    kwargs = dict(max_new_tokens=2 * config.canvas_length, max_denoising_steps=2)
    default = generate(params, config, ids, key=jax.random.key(7), **kwargs)
    told = generate(params, config, ids, key=jax.random.key(7), eos_token_id=config.eos_token_id, pad_token_id=2,
                    **kwargs)
    np.testing.assert_array_equal(np.asarray(default.sequences), np.asarray(told.sequences))
    assert (np.asarray(default.sequences)[:, 6:] == 2).any()  # something ended and was padded


def test_a_temperature_end_of_none_means_temperature_one():
    """transformers leaves its temperature step out when t_min or t_max is None."""
    config = MICRO
    params = diffjax.init_params(config, jax.random.key(1))
    ids = np.arange(3, 9)[None]
    kwargs = dict(max_new_tokens=config.canvas_length, max_denoising_steps=3, key=jax.random.key(2))
    plain = generate(params, config, ids, temperature_schedule=sampling.ConstantTemperature(1.0), **kwargs)
    for ends in (dict(t_min=None), dict(t_max=None)):
        assert make_components(**ends).schedule == sampling.ConstantTemperature(1.0)
        np.testing.assert_array_equal(np.asarray(generate(params, config, ids, **ends, **kwargs).sequences),
                                      np.asarray(plain.sequences))


def test_same_key_same_tokens_and_cache_covers_sequences():
    config = MICRO
    params = diffjax.init_params(config, jax.random.key(1))
    ids = np.arange(3, 9)[None].repeat(2, 0)
    kwargs = dict(max_new_tokens=2 * config.canvas_length, max_denoising_steps=4, eos_token_id=None)
    a = generate(params, config, ids, key=jax.random.key(7), **kwargs)
    b = generate(params, config, ids, key=jax.random.key(7), **kwargs)
    c = generate(params, config, ids, key=jax.random.key(8), **kwargs)
    np.testing.assert_array_equal(np.asarray(a.sequences), np.asarray(b.sequences))
    assert not np.array_equal(np.asarray(a.sequences), np.asarray(c.sequences))
    assert a.sequences.shape == (2, 6 + 2 * config.canvas_length)
    assert int(a.cache.length) == a.sequences.shape[1]
    np.testing.assert_array_equal(np.asarray(a.decoder_passes), [8, 8])


def test_samplers_plug_in_without_recompiling():
    """Every shipped sampler runs in the same loop; changing a numeric hyper-parameter reuses the program."""
    config = MICRO
    params = diffjax.init_params(config, jax.random.key(2))
    ids = np.arange(3, 8)[None]
    steps = 4
    common = dict(key=jax.random.key(0), max_new_tokens=config.canvas_length, max_denoising_steps=steps,
                  eos_token_id=None)
    samplers = [
        sampling.BlockRefinementSampler(num_steps=steps),
        sampling.ConfidenceThresholdSampler(threshold=0.5),
        sampling.DDIMSampler(num_steps=steps),
    ]
    for sampler in samplers:
        out = generate(params, config, ids, sampler=sampler, logits_filter=sampling.TopKFilter(k=5), **common)
        new = np.asarray(out.sequences)[:, 5:]
        assert new.shape == (1, config.canvas_length) and ((new >= 0) & (new < config.vocab_size)).all()

    generate(params, config, ids, entropy_bound=0.1, t_min=0.3, **common)
    compiled = _generate._cache_size()
    generate(params, config, ids, entropy_bound=0.5, t_min=0.1, t_max=0.9, **common)
    assert _generate._cache_size() == compiled


@pytest.mark.parametrize(
    "sampler",
    [
        sampling.EntropyBoundSampler(entropy_bound=0.5),
        sampling.ConfidenceThresholdSampler(threshold=0.3, sampling=sampling.GreedySampling()),
        sampling.BlockRefinementSampler(num_steps=5, confidence_threshold=0.5),
    ],
    ids=lambda sampler: type(sampler).__name__,
)
def test_statistics_kernel_generates_what_its_twin_does(sampler):
    """Away from the deterministic regime the draws are random: the Pallas vocabulary pass and its plain-JAX
    twin share the counter-based noise, so whole generations agree token for token."""
    config = Config.tiny(num_layers=2, layer_types=(SLIDING, FULL), sliding_window=5)
    params = diffjax.init_params(config, jax.random.key(4))
    ids, mask, _ = _inputs(config, 2, 9, [3, 0], seed=5)
    kwargs = dict(key=jax.random.key(6), attention_mask=mask, max_new_tokens=2 * config.canvas_length,
                  max_denoising_steps=5, eos_token_id=None, t_min=0.5, t_max=1.0, sampler=sampler)
    twin = generate(params, config, ids, statistics="xla", **kwargs)
    fused = generate(params, config, ids, statistics="pallas", **kwargs)
    np.testing.assert_array_equal(np.asarray(fused.sequences), np.asarray(twin.sequences))
    np.testing.assert_array_equal(np.asarray(fused.decoder_passes), np.asarray(twin.decoder_passes))
    # Random draws, not the deterministic regime: a different key changes the tokens.
    other = generate(params, config, ids, statistics="pallas", **{**kwargs, "key": jax.random.key(7)})
    assert not np.array_equal(np.asarray(other.sequences), np.asarray(fused.sequences))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(statistics="fused"), "statistics must be one of"),
        (dict(logits_filter=sampling.TopKFilter(k=4)), "cannot apply TopKFilter"),
        (dict(sampler=sampling.DDIMSampler(num_steps=4)), "DDIMSampler has no from_statistics"),
    ],
)
def test_statistics_path_refuses_what_needs_the_logits(kwargs, match):
    config = MICRO
    params = diffjax.param_shapes(config, np.float32)
    kwargs.setdefault("statistics", "pallas")
    with pytest.raises(ValueError, match=match):
        generate(params, config, np.array([[3, 4, 5]]), key=jax.random.key(0), **kwargs)


def test_streaming_callback_sees_every_step():
    config = MICRO
    params = diffjax.init_params(config, jax.random.key(3))
    drafts = []
    out = generate(params, config, np.arange(3, 7)[None], key=jax.random.key(0), max_new_tokens=config.canvas_length,
                   max_denoising_steps=3, eos_token_id=None, stability_threshold=None,
                   on_step=lambda canvas, remaining, argmax: drafts.append((int(canvas), int(remaining), argmax)))
    jax.effects_barrier()
    assert [(c, r) for c, r, _ in drafts] == [(0, 3), (0, 2), (0, 1)]
    np.testing.assert_array_equal(drafts[-1][2], np.asarray(out.sequences)[:, 4:])


def test_rows_that_ended_count_no_passes_and_the_cache_holds_the_padded_sequences():
    """A row that ended at an EOS is padded in the later canvases and counts no decoder passes there (a batch
    of one would not have run them; transformers counts so too). The cache holds the tokens of `sequences` as
    returned, pads included, so a next turn reads what the caller sees."""
    config, steps, prompt = MICRO, 4, 6
    params = diffjax.init_params(config, jax.random.key(1))
    ids = np.arange(3, 3 + prompt)[None].repeat(3, 0) + np.arange(3)[:, None] * 7
    eos = list(range(3, config.vocab_size, 8))
    out = generate(params, config, ids, key=jax.random.key(0), max_new_tokens=3 * config.canvas_length,
                   max_denoising_steps=steps, eos_token_id=eos, t_min=0.5, t_max=1.0, stability_threshold=None)
    sequences = np.asarray(out.sequences)
    canvases = sequences[:, prompt:].reshape(3, 3, config.canvas_length)
    has_eos = np.isin(canvases, eos).any(axis=2)  # [row, canvas]
    assert has_eos.any(axis=1).all()
    ended_in = np.argmax(has_eos, axis=1)
    assert ended_in.min() < ended_in.max(), f"rows should end in different canvases: {ended_in}"
    # No early stopping: a row runs every step of each canvas up to the one it ended in, and no more.
    np.testing.assert_array_equal(np.asarray(out.decoder_passes), steps * (ended_in + 1))

    length = int(out.cache.length)  # canvases after every row ended are never generated nor encoded
    assert length == prompt + (ended_in.max() + 1) * config.canvas_length
    early = np.argmin(ended_in)
    assert (sequences[early, length - config.canvas_length:length] == config.pad_token_id).all()
    fresh = diffjax.encode(params, config, sequences[:, :length], capacity=sequences.shape[1])
    np.testing.assert_array_equal(np.asarray(out.cache.mask), np.asarray(fresh.mask))
    for name in fresh.keys:
        for got, want in ((out.cache.keys[name], fresh.keys[name]), (out.cache.values[name], fresh.values[name])):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, err_msg=name)


def test_stopped_rows_keep_their_draft_and_the_schedule_sees_the_remaining_steps():
    """With a stub stopping rule (row 0 stops after its first step, row 1 after its fourth): the stopped row's
    argmax draft never changes again while row 1's keeps moving, each row counts its own passes, and the
    temperature schedule is asked for n = N, N-1, ... remaining steps, as transformers' processor."""

    @struct.dataclass
    class StopAfter:
        steps: tuple = struct.field(pytree_node=False, default=(0, 3))

        def init(self, canvas):
            return jnp.zeros((), jnp.int32)

        def __call__(self, argmax, processed, step):
            return step >= jnp.asarray(self.steps), step + 1

    asked = []

    @struct.dataclass
    class SpySchedule:
        def __call__(self, remaining, total):
            jax.debug.callback(lambda n, big_n: asked.append((int(n), int(big_n))), remaining, total, ordered=True)
            return sampling.LinearTemperature(0.5, 1.0)(remaining, total)

    config = MICRO
    params = diffjax.init_params(config, jax.random.key(1))
    drafts = []
    out = generate(params, config, np.arange(3, 9)[None].repeat(2, 0), key=jax.random.key(0),
                   max_new_tokens=config.canvas_length, max_denoising_steps=5, eos_token_id=None,
                   stopping_rule=StopAfter(), temperature_schedule=SpySchedule(),
                   on_step=lambda canvas, remaining, argmax: drafts.append(np.asarray(argmax)))
    jax.effects_barrier()
    assert asked == [(5, 5), (4, 5), (3, 5), (2, 5)]
    assert len(drafts) == 4
    for draft in drafts[1:]:
        np.testing.assert_array_equal(draft[0], drafts[0][0])
    assert any(not np.array_equal(draft[1], drafts[0][1]) for draft in drafts[1:])
    np.testing.assert_array_equal(drafts[-1], np.asarray(out.sequences)[:, 6:])
    np.testing.assert_array_equal(np.asarray(out.decoder_passes), [1, 4])


class _PlainStopping:
    """A stopping rule that is not a pytree."""

    def init(self, canvas_ids):
        return ()

    def __call__(self, argmax_ids, processed_logits, state):
        return jnp.zeros(argmax_ids.shape[0], bool), state


class _PlainDraw:
    """A token draw that is not a pytree."""

    def __call__(self, logits, key):
        return jnp.argmax(logits, -1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(t_min=-0.1), "t_min"),
        (dict(t_min=0.5, t_max=0.5), "t_max"),
        (dict(entropy_bound=0.0), "entropy_bound"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_denoising_steps=-1), "max_denoising_steps"),
        (dict(input_ids=np.zeros((0, 4), np.int32)), "zero rows"),
        (dict(input_ids=np.array([[3, 600]])), "outside the vocabulary"),
        (dict(max_new_tokens=10**6), "exceed the model's context"),
        (dict(initial_canvas=np.zeros((1, 3), np.int32)), "initial_canvas"),
        (dict(eos_token_id=10**6), "special token id"),
        # Ids a conversion or a gather would silently turn into other tokens.
        (dict(input_ids=np.array([[3, 2**32 + 5]])), "token id 4294967301 outside the vocabulary"),
        (dict(input_ids=np.array([[3.0, 5.9]])), "integer token ids, got dtype float64"),
        (dict(input_ids=np.array([[True, False]])), "integer token ids, got dtype bool"),
        (dict(initial_canvas=np.full((1, 16), 3.7)), "initial_canvas must hold integer"),
        (dict(attention_mask=np.array([[1, 0.5, 1]])), "attention_mask must be booleans or integers"),
        (dict(attention_mask=np.array([[1, 2, 1]])), r"only 0 \(padding\) and 1"),
        (dict(attention_mask=np.array([[0, 0, 0]])), "row 0 has no real token"),
        (dict(attention_mask=np.ones((1, 4), bool)), "does not match"),
        # Right padding (or a hole) would leave padding where the canvas continues from.
        (dict(attention_mask=np.array([[1, 1, 0]])), "row 0 has padding after a real token: pad prompts on the left"),
        (dict(input_ids=np.array([[3, 4, 5], [3, 4, 5]]), attention_mask=np.array([[0, 1, 1], [1, 0, 1]])),
         "row 1 has padding after a real token"),
        (dict(sampler=sampling.DDIMSampler(vocab_size=10**6)), r"sampler.vocab_size \(1000000\) exceeds"),
        # A schedule the loop cannot finish would leave the canvas half-committed, silently.
        (dict(sampler=sampling.BlockRefinementSampler(num_steps=9), max_denoising_steps=8),
         "BlockRefinementSampler spreads its schedule over 9 steps, but max_denoising_steps is 8"),
        (dict(sampler=sampling.DDIMSampler(num_steps=3, corrector_steps=2), max_denoising_steps=8),
         "DDIMSampler spreads its schedule over 9 steps"),
        (dict(sampler="ddim"), "sampler must be a diffjax.sampling.Sampler"),
        (dict(sampler=sampling.TopKFilter(3)), "sampler must be a diffjax.sampling.Sampler.*got TopKFilter"),
        (dict(temperature_schedule=0.5), "temperature_schedule must be a diffjax.sampling.TemperatureSchedule"),
        (dict(logits_filter="top_k"), "logits_filter must be a diffjax.sampling.LogitsFilter"),
        (dict(stopping_rule=sampling.DDIMSampler()),
         r"stopping_rule must be a diffjax.sampling.StoppingRule, called with \(argmax_ids, processed_logits, state\)"),
        (dict(sampler=sampling.StableAndConfidentStopping()), "sampler must be a diffjax.sampling.Sampler"),
        # Not pytrees: jit cannot take them as arguments (JAX's own message names an internal function).
        (dict(stopping_rule=_PlainStopping()),
         r"stopping_rule \(_PlainStopping\) is not a JAX pytree of arrays.*@flax.struct.dataclass"),
        (dict(temperature_schedule=lambda remaining_steps, num_steps: 1.0),
         r"temperature_schedule \(function\) is not a JAX pytree"),
        (dict(sampler=sampling.EntropyBoundSampler(sampling=_PlainDraw())),
         r"sampler.sampling \(_PlainDraw\) is not a JAX pytree"),
        (dict(key=0), "key must be one PRNG key"),
        (dict(key=jax.random.split(jax.random.key(0))), "key must be one PRNG key"),
        (dict(eos_token_id=True), "eos_token_id"),
        (dict(max_new_tokens=True), "max_new_tokens"),
        (dict(max_new_tokens=2.5), "max_new_tokens"),
        (dict(t_max=float("inf")), "t_max` must be finite"),
        (dict(t_min=jax.numpy.float32(-1.0)), "t_min"),
    ],
)
def test_bad_parameters_name_themselves(kwargs, match):
    config = Config.tiny(max_position_embeddings=4096)
    params = diffjax.param_shapes(config, np.float32)  # validation happens before any tracing
    input_ids = kwargs.pop("input_ids", np.array([[3, 4, 5]]))
    kwargs.setdefault("key", jax.random.key(0))
    with pytest.raises(ValueError, match=match):
        generate(params, config, input_ids, **kwargs)


def test_params_that_do_not_match_the_config_are_named():
    config = Config.tiny(max_position_embeddings=4096)
    good = diffjax.param_shapes(config, np.float32)
    embedding = good["embedder"]["embedding"]
    cases = [
        ({**good, "embedder": {"embedding": jax.ShapeDtypeStruct((7, 3), np.float32)}},
         "embedder/embedding has shape [7, 3], expected"),
        ({**good, "embedder": {}}, "missing embedder/embedding"),
        ({**good, "extra": {"w": embedding}}, "unexpected extra/w"),
        ({**good, "embedder": {"embedding": jax.ShapeDtypeStruct(embedding.shape, np.int32)}},
         "embedder/embedding is int32, not a floating dtype"),
    ]
    cache = diffjax.init_cache(config, 1, 8)
    for params, match in cases:
        match = re.escape(match)
        with pytest.raises(ValueError, match=f"params do not match this config: .*{match}"):
            generate(params, config, np.array([[3, 4, 5]]), key=jax.random.key(0))
        with pytest.raises(ValueError, match=match):
            diffjax.encode(params, config, np.array([[3, 4, 5]]))
        with pytest.raises(ValueError, match=match):
            diffjax.denoise_logits(params, config, cache, np.zeros((1, config.canvas_length), np.int32))


def test_numpy_integers_are_integers():
    """np.int64 settings and int64 id arrays within range are what a numpy-built batch holds: accepted."""
    config = MICRO
    params = diffjax.init_params(config, jax.random.key(1))
    out = generate(params, config, np.array([[3, 4, 5]], np.int64), key=jax.random.key(0),
                   max_new_tokens=np.int64(config.canvas_length), max_denoising_steps=np.int64(2),
                   eos_token_id=np.int64(1), attention_mask=np.array([[0, 1, 1]], np.int8))
    assert out.sequences.shape == (1, 3 + config.canvas_length)


def test_encode_and_denoise_refuse_what_the_model_cannot_read():
    config = Config.tiny(num_layers=2, layer_types=(SLIDING, FULL), max_position_embeddings=64)
    params = diffjax.init_params(config, jax.random.key(1))
    with pytest.raises(ValueError, match="token id 4294967301 outside"):
        diffjax.encode(params, config, np.array([[3, 2**32 + 5]]))
    with pytest.raises(ValueError, match="integer token ids, got dtype float32"):
        diffjax.encode(params, config, np.array([[3.0, 4.0]], np.float32))
    with pytest.raises(ValueError, match=r"0 cached \+ 65 new tokens exceed the model's context \(64"):
        diffjax.encode(params, config, np.full((1, 65), 3), capacity=80)
    with pytest.raises(ValueError, match="capacity"):
        diffjax.encode(params, config, np.full((1, 4), 3), capacity=0)
    with pytest.raises(ValueError, match="capacity"):
        diffjax.init_cache(config, 1, 10.5)
    with pytest.raises(ValueError, match="batch_size"):
        diffjax.init_cache(config, -1, 10)
    # A padding-only row may be encoded (generate refuses it as a prompt, a cache may hold one).
    cache = diffjax.encode(params, config, np.full((2, 56), 3), np.array([[1] * 56, [0] * 56]), capacity=64)
    canvas = np.full((2, config.canvas_length), 3)
    with pytest.raises(ValueError, match="56 cached tokens \\+ a canvas of 16 exceed the model's context"):
        diffjax.denoise_logits(params, config, cache, canvas)
    with pytest.raises(ValueError, match="canvas_ids must hold integer token ids"):
        diffjax.denoise_logits(params, config, cache, canvas[:, :8].astype(np.float32))


def test_component_classes_with_the_same_fields_get_their_own_compiled_loop(monkeypatch):
    """JAX compares dataclass pytree nodes by field names, not classes, so jit's cache can run the program
    compiled for one component class on another with the same fields (field-less token draws included):
    `generate` keys its jit on every node's type (`node_types`) as well."""
    import importlib

    generate_module = importlib.import_module("diffjax.generate")  # diffjax.generate is also the function
    greedy = make_components(sampler=sampling.EntropyBoundSampler(sampling=sampling.GreedySampling()))
    gumbel = make_components(sampler=sampling.EntropyBoundSampler(sampling=sampling.GumbelMaxSampling()))
    assert generate_module.node_types(greedy) != generate_module.node_types(gumbel)
    assert generate_module.node_types(greedy) == generate_module.node_types(
        make_components(sampler=sampling.EntropyBoundSampler(entropy_bound=0.3, sampling=sampling.GreedySampling())))

    # The mechanism on a small jit: many field-less classes, each must run its own program.
    @functools.partial(jax.jit, static_argnames=("component_types",))
    def keyed(component, x, component_types):
        return component(x)

    classes = []
    for c in range(200):
        classes.append(struct.dataclass(type(f"Add{c}", (), {"__call__": lambda self, x, c=c: x + c})))
        component = classes[-1]()
        assert int(keyed(component, jnp.int32(0), component_types=generate_module.node_types(component))) == c

    seen = []
    monkeypatch.setattr(generate_module, "_generate", lambda *args: seen.append(args))
    config = Config.tiny()
    for draw in (sampling.GreedySampling(), sampling.GumbelMaxSampling()):
        sampler = sampling.EntropyBoundSampler(sampling=draw)
        generate(diffjax.param_shapes(config), config, np.array([[3, 4]]), key=jax.random.key(0), sampler=sampler)
        assert seen[-1][-1] == generate_module.node_types(seen[-1][-3])
        assert seen[-1][-1][1][0][1][1][0] is type(draw)
